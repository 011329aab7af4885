"""What a server counts: Prometheus metrics for scrapers, and ``dsnb.report`` samples for notebooks.

:class:`ServerStats` keeps the Prometheus series (``/metrics``) and a window of recent
requests; every ``every_s`` seconds with traffic, :meth:`ServerStats.report_window` prints
one ``DSNB_METRIC`` line (request rate, p50/p99 latency, errors, queue, batch size), which
reaches ``endpoint.metrics()`` and the notebook panel the way training metrics do.

Example:
    >>> import io
    >>> stats = ServerStats()
    >>> for ms in (10, 20, 30, 40):
    ...     stats.observe("/v1/embeddings", 200, ms / 1000)
    >>> stats.observe("/v1/embeddings", 503, 0.001)
    >>> out = io.StringIO()
    >>> stats.report_window(now=stats.window_start + 5.0, file=out)
    True
    >>> print(out.getvalue().strip())
    DSNB_METRIC {"step": 1, "requests_per_s": 1.0, "p50_ms": 20.0, "p99_ms": 40.0, "errors": 1.0, "queue": 0.0, "batch_items": 0.0}
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dsnb.metrics import report

#: Latency buckets (seconds) of the request histogram: 1 ms to 60 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Buckets (seconds) of the gap between two generated tokens: 1 ms to 5 s.
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WINDOW_CAP = 100_000


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank); 0 for none.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5), percentile([1.0, 2.0, 3.0, 4.0], 0.99)
        (3.0, 4.0)
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class ServerStats:
    """Counters of one server (thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dsnb_requests", "HTTP requests answered", ["route", "code"], registry=self.registry)
        self.latency = Histogram("dsnb_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_items = Histogram("dsnb_batch_items", "Items (texts or rows) per model batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue = Gauge("dsnb_queue_requests", "Requests waiting for a batch", registry=self.registry)
        self.ready = Gauge("dsnb_ready", "1 when every rank is up and requests are taken", registry=self.registry)
        self.tokens = Counter("dsnb_generated_tokens", "Tokens generated", registry=self.registry)
        self.first_token = Histogram("dsnb_time_to_first_token_seconds", "From a generation request's arrival to its first token",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("dsnb_inter_token_seconds", "Between two tokens of one generation",
                                     buckets=TOKEN_GAP_BUCKETS, registry=self.registry)
        self.running = Gauge("dsnb_running_sequences", "Sequences being generated now", registry=self.registry)
        self.waiting = Gauge("dsnb_waiting_sequences", "Sequences waiting to start", registry=self.registry)
        self.cache_use = Gauge("dsnb_kv_cache_usage_ratio", "Tokens in flight over the server's --max-cache-tokens "
                               "(each running sequence's prompt and every token it may still generate)", registry=self.registry)
        self._generation_state: Callable[[], tuple[int, int, float]] | None = None
        self._first_tokens: list[float] = []
        self._gaps: list[float] = []
        self._generated = 0
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._errors = 0
        self._batches: list[int] = []
        self.window_start = time.monotonic()
        self._step = 0
        self._last_had_traffic = False

    def observe(self, route: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route=route, code=str(code)).inc()
        self.latency.labels(route=route).observe(seconds)
        with self._lock:
            if len(self._latencies) < WINDOW_CAP:
                self._latencies.append(seconds)
            if code >= 500 or code == 429:
                self._errors += 1

    def observe_generation(self, arrived: float, token_times: list[float], tokens: int) -> None:
        """Count one generation: the time to its first token (from ``arrived``, ``time.monotonic()``),
        the gaps between its steps, and its tokens.

        Example:
            >>> stats = ServerStats()
            >>> stats.observe_generation(10.0, [10.25, 10.5, 10.75], tokens=3)
            >>> def totals(histogram):
            ...     return [s.value for s in histogram.collect()[0].samples if s.name.endswith(("_count", "_sum"))]
            >>> totals(stats.first_token), totals(stats.inter_token)
            ([1.0, 0.25], [2.0, 0.5])
        """
        gaps = [later - earlier for earlier, later in zip(token_times, token_times[1:])]
        self.tokens.inc(tokens)
        if token_times:
            self.first_token.observe(max(0.0, token_times[0] - arrived))
        for gap in gaps:
            self.inter_token.observe(gap)
        with self._lock:
            if token_times and len(self._first_tokens) < WINDOW_CAP:
                self._first_tokens.append(max(0.0, token_times[0] - arrived))
            self._gaps.extend(gaps[: max(0, WINDOW_CAP - len(self._gaps))])
            self._generated += tokens

    def watch_generation(self, state: Callable[[], tuple[int, int, float]]) -> None:
        """Read the running and waiting sequences and the cache's use from ``state()`` at each scrape and report.

        Example:
            >>> stats = ServerStats()
            >>> stats.watch_generation(lambda: (3, 1, 0.25))
            >>> b"dsnb_waiting_sequences 1.0" in stats.exposition()
            True
        """
        self._generation_state = state
        self.running.set_function(lambda: state()[0])
        self.waiting.set_function(lambda: state()[1])
        self.cache_use.set_function(lambda: state()[2])

    def observe_batch(self, items: int) -> None:
        """Count one model batch of ``items`` texts or rows."""
        self.batch_items.observe(items)
        with self._lock:
            if len(self._batches) < WINDOW_CAP:
                self._batches.append(items)

    def exposition(self) -> bytes:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry)

    def report_window(self, now: float | None = None, queued: int = 0, file: TextIO | None = None) -> bool:
        """Print one metric sample for the window since the last one; False (nothing printed) when idle twice."""
        now = time.monotonic() if now is None else now
        with self._lock:
            latencies, errors, batches = self._latencies, self._errors, self._batches
            self._latencies, self._errors, self._batches = [], 0, []
            first_tokens, gaps, generated = self._first_tokens, self._gaps, self._generated
            self._first_tokens, self._gaps, self._generated = [], [], 0
            elapsed, self.window_start = max(now - self.window_start, 1e-9), now
        had_traffic = bool(latencies)
        if not had_traffic and not self._last_had_traffic:
            return False
        self._last_had_traffic = had_traffic
        self._step += 1
        generation = {}
        if first_tokens:  # only a server that generated text reports these
            generation = {"ttft_p50_ms": round(percentile(first_tokens, 0.5) * 1000, 2),
                          "ttft_p99_ms": round(percentile(first_tokens, 0.99) * 1000, 2),
                          "itl_p50_ms": round(percentile(gaps, 0.5) * 1000, 2),
                          "itl_p99_ms": round(percentile(gaps, 0.99) * 1000, 2),
                          "tokens_per_s": round(generated / elapsed, 3)}
            if self._generation_state is not None:
                running, waiting, cache_use = self._generation_state()
                generation.update(running=running, waiting=waiting, kv_cache_use=round(cache_use, 4))
        report(step=self._step, file=file, requests_per_s=round(len(latencies) / elapsed, 3),
               p50_ms=round(percentile(latencies, 0.5) * 1000, 2), p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
               errors=errors, queue=queued, batch_items=round(sum(batches) / len(batches), 2) if batches else 0.0,
               **generation)
        return True
