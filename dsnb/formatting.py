"""Durations, times and metric values as text, for every view (console, notebook panels, plain HTML).

Nothing here imports a UI toolkit, so the notebook widgets and the console share it without
importing each other.

Example:
    >>> format_duration(125), format_value(13863.2)
    ('2m 05s', '13,863')
"""

from __future__ import annotations

from datetime import datetime

from dsnb.status import JobStatus

__all__ = ["elapsed_of", "format_duration", "format_time", "format_value"]


def format_duration(seconds: float | None) -> str:
    """A short human duration.

    Example:
        >>> format_duration(4.25), format_duration(125), format_duration(3725), format_duration(None)
        ('4.2 s', '2m 05s', '1h 02m', '-')
    """
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_time(epoch: float | None) -> str:
    """Local wall-clock time of an epoch timestamp, ``YYYY-MM-DD HH:MM:SS`` (``-`` if None)."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def format_value(value: float) -> str:
    """A metric value: four significant digits, large numbers in full with separators.

    Example:
        >>> format_value(2.318765), format_value(13863.2), format_value(1e-4), format_value(float("nan"))
        ('2.319', '13,863', '0.0001', 'nan')
    """
    if abs(value) >= 10_000 and abs(value) < 1e15:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def elapsed_of(status: JobStatus, now: float) -> float | None:
    """Seconds from start to finish, or to ``now`` while running; None before start."""
    if status.started_at is None:
        return None
    end = status.finished_at if status.finished_at is not None else now
    return max(0.0, end - status.started_at)
