"""The HTML the live panels are made of, and their static stand-in for saved notebooks.

Pure functions of statuses and strings: nothing here needs ipywidgets or reads a backend.

Example:
    >>> from dsnb.status import JobState, JobStatus
    >>> status = JobStatus(name="a-x1", backend="local", state=JobState.RUNNING)
    >>> 'color:#1f6feb' in summary_head_html("job", "a-x1", "local", status, ["elapsed 3 s"])
    True
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import replace

from dsnb.function_job import is_result_line
from dsnb.metrics import is_metric_line
from dsnb.status import JobState, JobStatus, LogLine

STATE_COLORS: dict[JobState, str] = {
    JobState.PENDING: "#b58900",
    JobState.STARTING: "#b58900",
    JobState.RUNNING: "#1f6feb",
    JobState.SUCCEEDED: "#1a7f37",
    JobState.FAILED: "#cf222e",
    JobState.CANCELLED: "#8250df",
}


def is_shown(line: LogLine) -> bool:
    """False for metric lines (the panels show metrics as numbers and plots, not as log lines)
    and a function job's result lines (``job.result()`` reads them).

    Example:
        >>> is_shown(LogLine(0, "hello", 1.0)), is_shown(LogLine(0, 'DSNB_METRIC {"step": 1, "loss": 2.0}', 1.0))
        (True, False)
    """
    return not (is_metric_line(line.text) or is_result_line(line.text))


def log_html(text: str) -> str:
    """The scrolling log box, anchored at its newest line.

    Example:
        >>> "&lt;b&gt;" in log_html("<b>")
        True
    """
    # column-reverse keeps the scroll position anchored at the newest line as lines arrive.
    return (
        '<div class="dsnb-log-scroll" style="max-height:24em;overflow:auto;display:flex;'
        'flex-direction:column-reverse;border:1px solid #d0d7de;border-radius:4px;padding:4px">'
        '<pre class="dsnb-log-text" style="flex-shrink:0;margin:0;white-space:pre-wrap;font-size:12px;line-height:1.35">'
        f"{html.escape(text, quote=False)}</pre></div>"
    )


def diagnosis_of(status: JobStatus) -> str:
    """``status.diagnosis()`` without metric lines among the last lines: they are plotted already.

    Example:
        >>> s = JobStatus(name="a-x1", backend="local", state=JobState.FAILED, failed_rank=1,
        ...               last_lines=('DSNB_METRIC {"step": 1, "loss": 2.0}', "boom"))
        >>> diagnosis_of(s).splitlines()[-1]
        '  boom'
    """
    lines = tuple(line for line in status.last_lines if not is_metric_line(line))
    return replace(status, last_lines=lines).diagnosis()


def diagnosis_html(status: JobStatus) -> str:
    """The failure box: who failed, with which exit code, and the diagnosis.

    Example:
        >>> s = JobStatus(name="a-x1", backend="local", state=JobState.FAILED, failed_rank=1, exit_code=3)
        >>> "<b>rank 1 failed with exit code 3</b>" in diagnosis_html(s)
        True
    """
    who = f"rank {status.failed_rank}" if status.failed_rank is not None else "the job"
    code = f" with exit code {status.exit_code}" if status.exit_code is not None else ""
    return (
        f'<div style="border-left:4px solid {STATE_COLORS[JobState.FAILED]};padding:2px 8px">'
        f"<b>{html.escape(who)} failed{code}</b>"
        f'<pre style="margin:4px 0;white-space:pre-wrap;font-size:12px">'
        f"{html.escape(diagnosis_of(status), quote=False)}</pre></div>"
    )


def rank_table_html(rows: list[tuple[str, str, str, str]]) -> str:
    """The per-rank table: rank, state, exit code, message (one ``<tr class="dsnb-rank">`` a rank).

    Example:
        >>> rank_table_html([("0", "RUNNING", "", "")]).count('class="dsnb-rank"')
        1
    """
    body = "".join(
        f'<tr class="dsnb-rank"><td>{html.escape(rank)}</td>'
        f'<td style="color:{STATE_COLORS.get(JobState(state), "")}">{html.escape(state)}</td>'
        f"<td>{html.escape(code)}</td><td>{html.escape(message)}</td></tr>"
        for rank, state, code, message in rows
    )
    return (
        '<table class="dsnb-rank-table" style="font-size:12px">'
        "<tr><th>rank</th><th>state</th><th>exit code</th><th>message</th></tr>"
        f"{body}</table>"
    )


def summary_head_html(kind: str, name: str, backend: str, status: JobStatus | None, details: Sequence[str]) -> str:
    """The first line of a static summary: "dsnb KIND NAME on BACKEND: STATE (details)".

    Example:
        >>> summary_head_html("job", "a-x1", "local", None, [])
        '<div><b>dsnb job</b> <code>a-x1</code> on <i>local</i>: <b style="color:">waiting for the first status</b></div>'
    """
    state = status.state.value if status is not None else "waiting for the first status"
    color = STATE_COLORS.get(status.state, "") if status is not None else ""
    head = (
        f"<b>dsnb {kind}</b> <code>{html.escape(name)}</code> on <i>{html.escape(backend)}</i>: "
        f'<b style="color:{color}">{html.escape(state)}</b>'
    )
    if details:
        head += " (" + ", ".join(html.escape(d) for d in details) + ")"
    return f"<div>{head}</div>"


def png_html(png: bytes, alt: str = "metrics") -> str:
    """A PNG inlined as a data URL, so it survives nbconvert and GitHub's notebook view.

    Example:
        >>> png_html(b"png")
        '<img alt="metrics" src="data:image/png;base64,cG5n">'
    """
    encoded = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def log_tail_html(lines: Sequence[str]) -> str:
    """The last lines of a static summary as a ``<pre>``; empty without lines.

    Example:
        >>> log_tail_html(["a < b"])
        '<pre style="font-size:12px">a &lt; b</pre>'
        >>> log_tail_html([])
        ''
    """
    if not lines:
        return ""
    return f'<pre style="font-size:12px">{html.escape(chr(10).join(lines), quote=False)}</pre>'
