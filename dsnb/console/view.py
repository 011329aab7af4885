"""The console view of one job: a pure function of a :class:`~dsnb.monitor.JobMonitor` and a time.

Example:
    >>> import io
    >>> from rich.console import Console
    >>> console = Console(file=io.StringIO(), width=100)
    >>> console.print(render(monitor, now=time.time()))  # doctest: +SKIP
    >>> "RUNNING" in console.file.getvalue()             # doctest: +SKIP
    True
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dsnb.console.text import printable
from dsnb.formatting import elapsed_of, format_duration, format_time, format_value
from dsnb.metrics import is_metric_line
from dsnb.monitor import JobMonitor, MonitorSnapshot
from dsnb.status import JobState, JobStatus, ReplicaStatus, rank_label

STATE_STYLES: dict[JobState, str] = {
    JobState.PENDING: "yellow",
    JobState.STARTING: "yellow",
    JobState.RUNNING: "bold blue",
    JobState.SUCCEEDED: "bold green",
    JobState.FAILED: "bold red",
    JobState.CANCELLED: "bold magenta",
}


def state_text(state: JobState) -> Text:
    """The state word, coloured."""
    return Text(state.value, style=STATE_STYLES.get(state, ""))


def _header(monitor: JobMonitor, status: JobStatus | None, now: float) -> Text:
    text = Text()
    text.append("dsnb job ", style="dim")
    text.append(monitor.job.name, style="bold")
    text.append(" on ", style="dim")
    text.append(monitor.job.backend.name)
    text.append("  ")
    if status is None:
        text.append("waiting for the first status", style="yellow")
        return text
    text.append_text(state_text(status.state))
    elapsed = elapsed_of(status, now)
    if elapsed is not None:
        text.append(f"  elapsed {format_duration(elapsed)}")
    elif status.created_at is not None:
        text.append(f"  waiting {format_duration(max(0.0, now - status.created_at))}", style="dim")
    if status.replicas:
        text.append(f"  world size {len(status.replicas)}")
    if status.restarts:
        text.append(f"  restarts {status.restarts}", style="yellow")
    if status.message:
        text.append("\n")
        text.append(status.message, style="dim")
    return text


def _progress(snapshot: MonitorSnapshot) -> RenderableType | None:
    progress = snapshot.progress
    if progress is None:
        return None
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=40)
    grid.add_column()
    grid.add_row(
        ProgressBar(total=max(1, progress.total), completed=min(progress.step, progress.total), width=40),
        Text(str(progress)),
    )
    return grid


def _metrics(snapshot: MonitorSnapshot, max_metrics: int) -> RenderableType | None:
    latest = snapshot.latest
    if not latest:
        return None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=None)
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("rank", justify="right", no_wrap=True)
    for name in snapshot.metric_names[:max_metrics]:
        sample = latest[name]
        table.add_row(name, format_value(sample.value), str(sample.step), str(sample.rank))
    return table


def _replica_title(rank: int, replica: ReplicaStatus | None) -> Text:
    title = Text(rank_label(rank))
    if replica is not None:
        title.append(" ")
        title.append_text(state_text(replica.state))
        if replica.exit_code is not None:
            title.append(f" exit code {replica.exit_code}")
    return title


def _rank_logs(snapshot: MonitorSnapshot, lines_per_rank: int) -> list[RenderableType]:
    status = snapshot.status
    replicas = {r.rank: r for r in status.replicas} if status is not None else {}
    panels: list[RenderableType] = []
    for rank in snapshot.ranks:
        body = Text(no_wrap=True, overflow="ellipsis")
        # Metric lines are shown as metrics above; here they would crowd out the output.
        lines = [line for line in snapshot.lines_of(rank) if not is_metric_line(line.text)][-lines_per_rank:]
        for i, line in enumerate(lines):
            if i:
                body.append("\n")
            body.append(printable(line.text))  # plain text: never markup, and no escape sequence reaches the terminal
        if not lines:
            body.append("(no output yet)", style="dim")
        panels.append(Panel(body, title=_replica_title(rank, replicas.get(rank)), title_align="left", box=box.ROUNDED))
    return panels


def render(monitor: JobMonitor, now: float | None = None, lines_per_rank: int = 5, max_metrics: int = 12) -> RenderableType:
    """The whole view of one job: header, progress, latest metrics, each rank's last lines.

    It only reads ``monitor`` (call ``monitor.poll()`` first), so the same state renders the
    same text: tests print it into a ``Console(file=io.StringIO())`` with a fixed ``now``.

    Args:
        monitor: the job's live state.
        now: the current time for elapsed times (``time.time()`` if None).
        lines_per_rank: log lines shown per rank.
        max_metrics: metrics shown at most (in the order they first appeared).

    Example:
        >>> Console().print(render(monitor, now=time.time()))  # doctest: +SKIP
    """
    now = time.time() if now is None else now
    snapshot = monitor.snapshot()
    parts: list[RenderableType] = [_header(monitor, snapshot.status, now)]
    if snapshot.error is not None:
        parts.append(Text(f"monitor stopped: {type(snapshot.error).__name__}: {snapshot.error}", style="red"))
    parts.extend(Text(f"⚠ {text}", style="yellow") for text in snapshot.stragglers)
    for part in (_progress(snapshot), _metrics(snapshot, max_metrics)):
        if part is not None:
            parts.append(part)
    parts.extend(_rank_logs(snapshot, lines_per_rank))
    return Group(*parts)


def jobs_table(statuses: list[JobStatus], now: float | None = None) -> Table:
    """A table of jobs: name, state, created, elapsed, message.

    Example:
        >>> Console().print(jobs_table(Cluster().jobs()))  # doctest: +SKIP
    """
    now = time.time() if now is None else now
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("elapsed", justify="right", no_wrap=True)
    table.add_column("message", overflow="fold")
    for status in statuses:
        table.add_row(
            status.name,
            state_text(status.state),
            format_time(status.created_at),
            format_duration(elapsed_of(status, now)),
            Text(status.message),
        )
    return table


def status_view(status: JobStatus, now: float | None = None) -> RenderableType:
    """One job's status: state, times, message, and a row per rank.

    Example:
        >>> Console().print(status_view(job.status()))  # doctest: +SKIP
    """
    now = time.time() if now is None else now
    head = Text()
    head.append(status.name, style="bold")
    head.append(f" ({status.backend})  ")
    head.append_text(state_text(status.state))
    head.append(f"  created {format_time(status.created_at)}  elapsed {format_duration(elapsed_of(status, now))}")
    if status.restarts:
        head.append(f"  restarts {status.restarts}")
    parts: list[RenderableType] = [head]
    if status.message:
        parts.append(Text(status.message))
    parts.extend(Text(f"⚠ {text}", style="yellow") for text in status.stragglers)
    if status.replicas:
        table = Table(box=box.SIMPLE_HEAD)
        for column in ("rank", "state", "exit code", "pid", "host", "message"):
            table.add_column(column, no_wrap=column != "message")
        for r in status.replicas:
            table.add_row(
                str(r.rank), state_text(r.state), "" if r.exit_code is None else str(r.exit_code),
                "" if r.pid is None else str(r.pid), r.host or "", Text(r.message),
            )
        parts.append(table)
    if status.state == JobState.FAILED and status.last_lines:
        parts.append(Text(status.diagnosis(), style="red"))
    return Group(*parts)
