"""A cluster's jobs in a notebook: a table with Refresh, and Open to show one job's live panel.

Example:
    >>> from dsnb import Cluster
    >>> view = ClusterView(Cluster())        # lists the jobs on a background thread  # doctest: +SKIP
    >>> view.job_selector.value = "tiny-gpt-x7k2"; view.open_button.click()         # doctest: +SKIP
    >>> view.panel.state_label.value                                                # doctest: +SKIP
    'RUNNING'
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dsnb.errors import BackendUnavailable
from dsnb.formatting import format_time
from dsnb.status import JobStatus
from dsnb.widgets.display import jobs_table_html
from dsnb.widgets.panel import JobPanel

try:
    import ipywidgets as widgets
except ImportError as e:  # pragma: no cover - exercised through display.py's fallback
    raise BackendUnavailable("notebook", "the cluster view needs ipywidgets", "pip install 'dsnb[notebook]'") from e

if TYPE_CHECKING:
    from dsnb.cluster import Cluster


class ClusterView:
    """The jobs of one cluster, with Refresh, and Open to show a job's :class:`JobPanel` below.

    Reading the job list and attaching to a job run on background threads when started from
    a button (or on construction), so no click blocks the kernel; :meth:`refresh` and
    :meth:`open` are the same steps, run on the caller's thread.

    Child widgets: ``title``, ``refresh_button``, ``status_label``, ``jobs_table`` (HTML table),
    ``job_selector`` (Dropdown of job names), ``open_button``, ``panel_box`` (holds the open
    panel's widget); ``widget`` is the whole view, ``panel`` the open :class:`JobPanel`.

    Args:
        cluster: the cluster whose jobs to list.
        load: list the jobs at once, on a background thread.

    Raises:
        BackendUnavailable: ipywidgets is missing (raised when this module is imported).

    Example:
        >>> view = ClusterView(cluster, load=False)  # doctest: +SKIP
        >>> [s.name for s in view.refresh()]          # doctest: +SKIP
        ['tiny-gpt-x7k2']
        >>> view.open("tiny-gpt-x7k2")                # doctest: +SKIP
        JobPanel(job='tiny-gpt-x7k2', state=RUNNING)
    """

    def __init__(self, cluster: Cluster, *, load: bool = True) -> None:
        self.cluster = cluster
        self.statuses: list[JobStatus] = []
        #: Panels opened from this view, by job name.
        self.panels: dict[str, JobPanel] = {}
        self.panel: JobPanel | None = None
        #: The last background thread (a refresh or an open).
        self.thread: threading.Thread | None = None
        self.closed = False
        self._lock = threading.RLock()
        self._display_handles: list[Any] = []
        w = widgets
        self.title = w.HTML(f"<b>dsnb</b> jobs on <i>{html.escape(cluster.backend.name)}</i>")
        self.refresh_button = w.Button(description="Refresh", icon="refresh", layout=w.Layout(width="auto"))
        self.status_label = w.Label("")
        self.jobs_table = w.HTML(jobs_table_html([]))
        self.job_selector = w.Dropdown(options=[], description="job", layout=w.Layout(width="28em"))
        self.open_button = w.Button(description="Open", icon="eye", layout=w.Layout(width="auto"),
                                    tooltip="Show the selected job's live panel below")
        self.panel_box = w.VBox([])
        self.refresh_button.on_click(lambda _button: self.refresh_async())
        self.open_button.on_click(lambda _button: self.open_async())
        for widget, css in ((self.jobs_table, "dsnb-jobs"), (self.job_selector, "dsnb-job-selector"),
                            (self.open_button, "dsnb-open"), (self.refresh_button, "dsnb-refresh")):
            widget.add_class(css)
        self.widget = w.VBox([
            w.HBox([self.title, self.refresh_button, self.status_label],
                   layout=w.Layout(align_items="center", grid_gap="12px")),
            self.jobs_table,
            w.HBox([self.job_selector, self.open_button], layout=w.Layout(align_items="center", grid_gap="8px")),
            self.panel_box,
        ])
        self.widget.add_class("dsnb-cluster")
        if load:
            self.refresh_async()

    def refresh(self) -> list[JobStatus]:
        """Read the job list and show it (on this thread).

        Returns:
            The statuses, newest first.

        Raises:
            DsnbError: the backend could not list its jobs.

        Example:
            >>> [s.state.value for s in view.refresh()]  # doctest: +SKIP
            ['RUNNING']
        """
        statuses = self.cluster.jobs()
        with self._lock:
            if self.closed:
                return statuses
            self.statuses = statuses
            self.jobs_table.value = jobs_table_html(statuses)
            current = self.job_selector.value
            names = [s.name for s in statuses]
            self.job_selector.options = [(f"{s.name} ({s.state.value})", s.name) for s in statuses]
            # Keep the user's choice; otherwise the newest job, so Open works at once.
            self.job_selector.value = current if current in names else (names[0] if names else None)
            self.status_label.value = f"{len(statuses)} job{'s' if len(statuses) != 1 else ''}, {format_time(time.time())}"
            handles, self._display_handles = self._display_handles, []
        for handle in handles:
            try:
                handle.update(self)
            except Exception:
                pass  # a display that cannot be refreshed keeps its last state
        return statuses

    def add_display_handle(self, handle: Any) -> None:
        """Refresh ``handle`` (an IPython ``DisplayHandle``) once, after the next refresh.

        The first listing runs in the background, so the static table saved with the notebook
        would otherwise be empty.

        Example:
            >>> view.add_display_handle(display(view, display_id=True))  # doctest: +SKIP
        """
        if callable(getattr(handle, "update", None)):
            with self._lock:
                self._display_handles.append(handle)

    def open(self, name: str | None = None) -> JobPanel:
        """Show one job's live panel below the list (the same panel if it was opened before).

        Args:
            name: the job; the selected one if None.

        Raises:
            ValueError: no job given or selected.
            JobNotFound: no job of that name.

        Example:
            >>> view.open("tiny-gpt-x7k2").log_selector.value = 0  # doctest: +SKIP
        """
        name = name if name is not None else self.job_selector.value
        if not name:
            raise ValueError("choose a job first (job_selector), or pass its name")
        with self._lock:
            panel = self.panels.get(name)
        if panel is None or panel.closed:
            panel = JobPanel(self.cluster.attach(name))
        with self._lock:
            if self.closed:
                panel.close()
                return panel
            self.panels[name] = panel
            self.panel = panel
            self.panel_box.children = (panel.widget,)
        return panel

    def refresh_async(self) -> threading.Thread:
        """Run :meth:`refresh` on a background thread; an error is shown in ``status_label``.

        Example:
            >>> view.refresh_button.click()  # the same  # doctest: +SKIP
        """
        return self._in_background(self.refresh, "refresh")

    def open_async(self, name: str | None = None) -> threading.Thread:
        """Run :meth:`open` on a background thread; an error is shown in ``status_label``.

        Example:
            >>> view.open_button.click()  # the same, for the selected job  # doctest: +SKIP
        """
        name = name if name is not None else self.job_selector.value
        return self._in_background(lambda: self.open(name), "open")

    def _in_background(self, step: Callable[[], Any], what: str) -> threading.Thread:
        def run() -> None:
            try:
                step()
            except Exception as e:  # shown in the view: no one can catch it on this thread
                with self._lock:
                    if not self.closed:
                        self.status_label.value = f"{what} failed: {type(e).__name__}: {e}"

        thread = threading.Thread(target=run, name=f"dsnb-cluster-{what}", daemon=True)
        self.thread = thread
        thread.start()
        return thread

    def close(self) -> None:
        """Close the opened panels (their jobs keep running) and the widgets.

        Example:
            >>> view.close()  # doctest: +SKIP
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            panels = list(self.panels.values())
        for panel in panels:
            panel.close()
        for widget in (self.title, self.refresh_button, self.status_label, self.jobs_table, self.job_selector,
                       self.open_button, self.panel_box, self.widget):
            widget.close()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        if not self.closed:
            bundle.update(self.widget._repr_mimebundle_() or {})
        with self._lock:
            statuses = list(self.statuses)
        bundle["text/plain"] = "\n".join(
            [f"{self.cluster!r}: {len(statuses)} jobs"] + [f"  {s.name}  {s.state.value}  {s.message}" for s in statuses]
        )
        bundle["text/html"] = f"<div>{self.title.value}</div>{jobs_table_html(statuses)}"
        return bundle

    def __repr__(self) -> str:
        return f"ClusterView(cluster={self.cluster!r}, jobs={len(self.statuses)})"
