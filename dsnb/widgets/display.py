"""How jobs, endpoints and clusters show themselves in a notebook, with or without ipywidgets.

``Job._ipython_display_``, ``Endpoint._ipython_display_`` and ``Cluster._ipython_display_`` call
:func:`display_job`, :func:`display_endpoint` and :func:`display_cluster`. With ipywidgets they
show a live :class:`~dsnb.widgets.panel.JobPanel`, :class:`~dsnb.widgets.endpoint_panel.EndpointPanel`
or :class:`~dsnb.widgets.cluster_view.ClusterView`, made once per object and reused when the
object is displayed again; without it, a static HTML table and a plain-text line. A missing
optional package never makes a display fail.

Example:
    >>> from dsnb import Cluster
    >>> cluster = Cluster()
    >>> display_cluster(cluster)      # the same as leaving `cluster` last in a cell  # doctest: +SKIP
"""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any

from dsnb.formatting import elapsed_of, format_duration, format_time
from dsnb.status import JobStatus

if TYPE_CHECKING:
    from dsnb.cluster import Cluster
    from dsnb.job import Job
    from dsnb.serving.endpoint import Endpoint
    from dsnb.widgets.cluster_view import ClusterView
    from dsnb.widgets.endpoint_panel import EndpointPanel
    from dsnb.widgets.panel import JobPanel

#: Where a job or an endpoint keeps its panel (``Job.panel()``, ``Endpoint.panel()``).
PANEL_ATTR = "_panel"
#: Attribute that caches a cluster's view on the cluster itself, so the cache lives exactly
#: as long as the cluster and needs no weak references.
VIEW_ATTR = "_dsnb_view"
_cache_lock = threading.Lock()


def widgets_available() -> bool:
    """True if ipywidgets can be imported (the live views need it).

    Example:
        >>> isinstance(widgets_available(), bool)
        True
    """
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def panel_for(job: Job, **options: Any) -> JobPanel:
    """The job's panel (``job.panel()``): the one it keeps if still open, else a new one (which starts following).

    Args:
        job: the job.
        **options: passed to :class:`~dsnb.widgets.panel.JobPanel` when a new panel is made.

    Raises:
        BackendUnavailable: ipywidgets is not installed (``pip install 'dsnb[notebook]'``).

    Example:
        >>> panel_for(job) is panel_for(job)  # doctest: +SKIP
        True
    """
    return job.panel(**options)


def endpoint_panel_for(endpoint: Endpoint, **options: Any) -> EndpointPanel:
    """The endpoint's panel (``endpoint.panel()``): the one it keeps if still open, else a new one.

    Args:
        endpoint: the endpoint, served through a job (local, Kubernetes).
        **options: passed to :class:`~dsnb.widgets.endpoint_panel.EndpointPanel` when a new panel is made.

    Raises:
        ClusterError: the backend serves with Ray Serve: there is no job to follow.
        BackendUnavailable: ipywidgets is not installed (``pip install 'dsnb[notebook]'``).

    Example:
        >>> endpoint_panel_for(endpoint) is endpoint.panel()  # doctest: +SKIP
        True
    """
    return endpoint.panel(**options)


def view_for(cluster: Cluster, load: bool = True) -> ClusterView:
    """The cluster's job list widget: the cached one if still open, else a new one.

    Args:
        cluster: the cluster.
        load: read the job list again, on a background thread.

    Raises:
        BackendUnavailable: ipywidgets is not installed (``pip install 'dsnb[notebook]'``).

    Example:
        >>> view_for(cluster).job_selector.options  # doctest: +SKIP
        (('tiny-gpt-x7k2 (RUNNING)', 'tiny-gpt-x7k2'),)
    """
    from dsnb.widgets.cluster_view import ClusterView

    with _cache_lock:
        view: ClusterView | None = getattr(cluster, VIEW_ATTR, None)
        if view is None or view.closed:
            view = ClusterView(cluster, load=False)
            setattr(cluster, VIEW_ATTR, view)
    if load:
        view.refresh_async()
    return view


def display_job(job: Job) -> JobPanel | None:
    """Show ``job``: its live panel with ipywidgets, else a static HTML summary.

    Returns at once: the panel follows the job on a background thread.

    Returns:
        The panel, or None where the static summary was shown.

    Raises:
        Nothing of its own: without ipywidgets, or when the status cannot be read, it shows
        a static summary (with the error) instead.

    Example:
        >>> panel = display_job(job)  # doctest: +SKIP
    """
    if widgets_available():
        try:
            panel = panel_for(job)
        except ImportError:
            panel = None  # ipywidgets imports but something it needs does not
        if panel is not None:
            panel.show(_display)
            return panel
    _display_bundle(_static_bundle(job, "job"))
    return None


def display_endpoint(endpoint: Endpoint) -> EndpointPanel | None:
    """Show ``endpoint``: its live panel with ipywidgets, else a static HTML summary.

    The static summary (state, URL, the latest serving metrics and the last log lines) is
    shown without ipywidgets and on Ray Serve, whose logs and metrics stay in Ray (the summary
    says where). Returns at once: the panel follows the endpoint on a background thread.

    Returns:
        The panel, or None where the static summary was shown.

    Raises:
        Nothing of its own: where the status cannot be read, the summary shows the error.

    Example:
        >>> panel = display_endpoint(endpoint)  # doctest: +SKIP
    """
    if widgets_available() and endpoint.served_as_job:
        try:
            panel = endpoint_panel_for(endpoint)
        except ImportError:
            panel = None
        if panel is not None:
            panel.show(_display)
            return panel
    _display_bundle(_static_bundle(endpoint, "endpoint"))
    return None


def display_cluster(cluster: Cluster) -> ClusterView | None:
    """Show ``cluster``: a job list with Refresh and Open with ipywidgets, else a static table.

    Returns:
        The view, or None where the static table was shown.

    Raises:
        Nothing of its own: without ipywidgets, or when the jobs cannot be listed, it shows a
        static table (or the error) instead.

    Example:
        >>> view = display_cluster(cluster)  # doctest: +SKIP
    """
    if widgets_available():
        try:
            view = view_for(cluster, load=False)  # listed once the display can be refreshed
        except ImportError:
            view = None
        if view is not None:
            view.add_display_handle(_display(view, display_id=True))
            view.refresh_async()
            return view
    _display_bundle(_static_cluster(cluster))
    return None


def jobs_table_html(statuses: list[JobStatus], now: float | None = None) -> str:
    """A table of jobs: name, state, created, elapsed, message (one ``<tr class="dsnb-job">`` a job).

    Example:
        >>> from dsnb.status import JobState
        >>> jobs_table_html([JobStatus(name="a-x1", backend="local", state=JobState.RUNNING)]).count('class="dsnb-job"')
        1
    """
    now = time.time() if now is None else now
    rows = "".join(
        f'<tr class="dsnb-job"><td><code>{html.escape(s.name)}</code></td><td>{s.state.value}</td>'
        f"<td>{format_time(s.created_at)}</td><td>{format_duration(elapsed_of(s, now))}</td>"
        f"<td>{html.escape(s.message)}</td></tr>"
        for s in statuses
    )
    if not statuses:
        rows = '<tr><td colspan="5"><i>no jobs</i></td></tr>'
    return (
        '<table class="dsnb-jobs-table" style="font-size:12px">'
        "<tr><th>name</th><th>state</th><th>created</th><th>elapsed</th><th>message</th></tr>"
        f"{rows}</table>"
    )


def _static_bundle(handle: Job | Endpoint, kind: str) -> dict[str, str]:
    try:
        body = handle._repr_html_()
    except Exception as e:  # a display shows the problem rather than raising it
        body = f"<b>dsnb {kind}</b> <code>{html.escape(handle.name)}</code>: status unavailable ({html.escape(str(e))})"
    return {"text/plain": repr(handle), "text/html": body}


def _static_cluster(cluster: Cluster) -> dict[str, str]:
    try:
        statuses = cluster.jobs()
    except Exception as e:
        return {"text/plain": f"{cluster!r}: jobs unavailable ({e})",
                "text/html": f"<b>dsnb</b> {html.escape(repr(cluster))}: jobs unavailable ({html.escape(str(e))})"}
    plain = "\n".join([repr(cluster)] + [f"  {s.name}  {s.state.value}  {s.message}" for s in statuses])
    head = f"<b>dsnb</b> {html.escape(repr(cluster))}: {len(statuses)} job{'s' if len(statuses) != 1 else ''}"
    return {"text/plain": plain, "text/html": f"<div>{head}</div>{jobs_table_html(statuses)}"}


def _display(obj: Any, **kwargs: Any) -> Any:
    try:
        import IPython.display
    except ImportError:
        print(repr(obj))
        return None
    return IPython.display.display(obj, **kwargs)


def _display_bundle(bundle: dict[str, str]) -> None:
    try:
        import IPython.display
    except ImportError:
        print(bundle["text/plain"])
        return
    IPython.display.display(bundle, raw=True)
