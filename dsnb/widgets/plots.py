"""The metric plots of the live panels: one PNG, one plot per group of metrics, one line per rank.

The panels embed the PNG in their static HTML too, so a saved notebook shows the plot in
nbconvert and on GitHub, where no widget front end runs; an interactive plotting widget would
leave those views blank.

Example:
    >>> png = plot_png(monitor)                 # loss and throughput, by step  # doctest: +SKIP
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"       # doctest: +SKIP
    True
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dsnb.status import MetricSample

if TYPE_CHECKING:
    from dsnb.monitor import JobMonitor

#: Ranks drawn per metric; more would make the plot unreadable.
MAX_RANKS_PLOTTED = 8
THROUGHPUT_SUFFIXES = ("_per_s", "_per_sec", "_per_second")
#: Below this many points a line also marks each point.
MARKED_POINTS_BELOW = 40


def is_loss(name: str) -> bool:
    """True for the metrics drawn on the loss plot.

    Example:
        >>> is_loss("loss"), is_loss("val_loss"), is_loss("lr")
        (True, True, False)
    """
    return name == "loss" or name.endswith(("_loss", "/loss"))


def is_throughput(name: str) -> bool:
    """True for the metrics drawn on the throughput plot (``tokens_per_s``, ``samples_per_sec``...).

    Example:
        >>> is_throughput("tokens_per_s"), is_throughput("avg_samples_per_sec"), is_throughput("loss")
        (True, True, False)
    """
    return name.endswith(THROUGHPUT_SUFFIXES)


#: A plot of :func:`plot_png`: its title, and which metric names it draws.
PlotGroup = tuple[str, Callable[[str], bool]]
#: A job's plots: loss, and throughput.
JOB_PLOTS: tuple[PlotGroup, ...] = (("loss", is_loss), ("throughput", is_throughput))
#: What each rank uses (:mod:`dsnb.runtime.usage`), drawn by time: CPU, memory, GPU.
USAGE_PLOTS: tuple[PlotGroup, ...] = (
    ("CPU %", lambda name: name == "cpu_percent"),
    ("memory (MiB)", lambda name: name in ("rss_mib", "gpu_mem_mib")),
    ("GPU %", lambda name: name == "gpu_util_percent"),
)


def plot_png(
    monitor: JobMonitor,
    width: float = 8.0,
    height: float = 2.8,
    dpi: int = 80,
    *,
    groups: Sequence[PlotGroup] = JOB_PLOTS,
    labels: Mapping[str, str] | None = None,
    x: str = "step",
) -> bytes | None:
    """One plot per group of metrics (loss and throughput by default), one line per rank, as PNG bytes.

    It draws on a :class:`matplotlib.figure.Figure` with the Agg canvas, never through pyplot,
    so it touches no global figure state and is safe off the main thread.

    Args:
        monitor: where the metric series are.
        width: inches.
        height: inches.
        dpi: dots per inch.
        groups: ``(title, wanted)`` per plot; a plot draws the metrics ``wanted(name)`` selects,
            and is left out when it selects none.
        labels: how a metric is named in the legends (default: its name).
        x: ``"step"`` (the reported step) or ``"time"`` (seconds since the first point drawn).

    Returns:
        The PNG, or None with nothing to draw.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``x`` is neither ``"step"`` nor ``"time"``.

    Example:
        >>> png = plot_png(monitor)      # doctest: +SKIP
        >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"  # doctest: +SKIP
        True
        >>> plot_png(monitor, groups=[("latency (ms)", lambda n: n.endswith("_ms"))], x="time")  # doctest: +SKIP
    """
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    chosen = chosen_groups(monitor.metric_names(), groups)
    if not chosen:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {name: monitor.series(name) for _, group in chosen for name in group}
    start = min((s.time for points in series.values() for s in points), default=0.0)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, (title, group) in zip(axes, chosen):
        _draw_group(ax, title, {name: series[name] for name in group}, labels or {}, x, start)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def chosen_groups(names: Sequence[str], groups: Sequence[PlotGroup]) -> list[tuple[str, list[str]]]:
    """Each plot's title with the metric names it draws, leaving out the plots that draw none.

    Example:
        >>> chosen_groups(["loss", "lr", "tokens_per_s"], JOB_PLOTS)
        [('loss', ['loss']), ('throughput', ['tokens_per_s'])]
        >>> chosen_groups(["lr"], JOB_PLOTS)
        []
    """
    chosen = [(title, [name for name in names if wanted(name)]) for title, wanted in groups]
    return [(title, group) for title, group in chosen if group]


def by_rank(samples: Sequence[MetricSample], x: str, start: float) -> dict[int, tuple[list[float], list[float]]]:
    """One metric's points split by rank: ``{rank: (xs, values)}``, x the step or the seconds since ``start``.

    Example:
        >>> by_rank([MetricSample(1, "loss", 2.0, 0, 10.0), MetricSample(1, "loss", 2.5, 1, 10.5)], "time", 10.0)
        {0: ([0.0], [2.0]), 1: ([0.5], [2.5])}
    """
    lines: dict[int, tuple[list[float], list[float]]] = {}
    for sample in samples:
        xs, values = lines.setdefault(sample.rank, ([], []))
        xs.append(sample.step if x == "step" else sample.time - start)
        values.append(sample.value)
    return lines


def _draw_group(ax: Any, title: str, series: Mapping[str, Sequence[MetricSample]], labels: Mapping[str, str],
                x: str, start: float) -> None:
    """One plot: a line per metric and rank (at most ``MAX_RANKS_PLOTTED`` ranks), a legend where it helps."""
    drawn, labelled = 0, False
    for name, samples in series.items():
        lines = by_rank(samples, x, start)
        ranks = sorted(lines)[:MAX_RANKS_PLOTTED]
        for rank in ranks:
            xs, values = lines[rank]
            label = labels.get(name, name)
            label = label if len(ranks) == 1 else f"{label} (rank {rank})"
            ax.plot(xs, values, label=label, marker="." if len(xs) < MARKED_POINTS_BELOW else None)
            drawn += 1
            labelled = labelled or label != title
    ax.set_title(title, fontsize="medium")
    units = {sample.step_unit for samples in series.values() for sample in samples}
    ax.set_xlabel(" / ".join(sorted(units)) if x == "step" and units else "step" if x == "step" else "seconds")
    ax.grid(alpha=0.3)
    if drawn > 1 or labelled:
        ax.legend(fontsize="small")
