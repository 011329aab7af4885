"""Pod logs for many pods at once: one follower thread per pod, one bounded buffer per job.

A follower starts when its pod's container starts, reads the log with timestamps, and
remembers the timestamp of the last line it kept. When the stream drops (API server
restart, idle proxy, network), it reconnects asking for the last few seconds and skips
what it already has, so no line is lost or repeated. When the container restarted, the
previous container's log is read first. Each line is attributed to a rank: torchrun's
``[default<local rank>]:`` prefix names it; other lines (the launcher's, dsnb's own in
the pod) are the node's (a negative rank, see :func:`dsnb.status.node_line_rank`).

Example:
    >>> split_rank("[default1]:loss 2.1", node=1, procs_per_node=2)
    (3, 'loss 2.1')
    >>> split_rank("dsnb: waiting for peers", node=1, procs_per_node=2)
    (-2, 'dsnb: waiting for peers')
    >>> split_rank("[1,3]<stdout>:loss 2.1", node=None, procs_per_node=2)
    (3, 'loss 2.1')
    >>> split_rank("[1,3]<stdout>:loss 2.1 tokens/s 3894[1,3]<stdout>:", node=None, procs_per_node=2)
    (3, 'loss 2.1 tokens/s 3894')
"""

from __future__ import annotations

import calendar
import email.utils
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from dsnb.backends.kubernetes.pod_status import container_status
from dsnb.status import LAUNCHER_LINE_RANK, node_line_rank

_TORCHRUN_PREFIX = re.compile(r"^\[[A-Za-z_]*?(\d+)\]:")
_MPIRUN_TAG = re.compile(r"^\[\d+,(\d+)\]<std(?:out|err)>:")
_MPIRUN_TAG_ANYWHERE = re.compile(r"\[\d+,\d+\]<std(?:out|err)>:")
#: Seconds of overlap asked for when a stream resumes; the overlap is skipped by timestamp.
RESUME_MARGIN_S = 2
#: Seconds of silence after which a follow is opened again: after a log rotation the kubelet's follow
#: may stall, open but silent (kubernetes#115701, #126564); a quiet container costs one request.
STALL_S = 60.0
CONNECT_S = 10.0
#: Put into the log where a resumed read did not find the last line kept: the lines between are lost.
GAP_MARK = ("[dsnb] lines may be missing before this one: the kubelet rotated this pod's log "
            "(containerLogMaxSize, 10 MiB by default) before dsnb read them")


def split_rank(text: str, node: int | None, procs_per_node: int) -> tuple[int, str]:
    """The global rank of one pod log line and the line without its launcher prefix.

    ``node`` is the node rank of the pod, or None for a job-wide launcher (``mpirun
    --tag-output`` prefixes ``[job,rank]<stdout>:``; its own lines are the launcher's).
    """
    tagged = _MPIRUN_TAG.match(text)
    if tagged:
        # mpirun tags every write: a line written in two parts carries a second tag inside.
        return int(tagged.group(1)), _MPIRUN_TAG_ANYWHERE.sub("", text[tagged.end():])
    if node is None:
        return LAUNCHER_LINE_RANK, text
    found = _TORCHRUN_PREFIX.match(text)
    if found and int(found.group(1)) < procs_per_node:
        return node * procs_per_node + int(found.group(1)), text[found.end():]
    return node_line_rank(node), text


def parse_timestamp(stamp: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC timestamp as the kubelet writes it.

    >>> parse_timestamp("1970-01-01T00:00:01.5Z")
    1500000000
    """
    stamp = stamp.rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    digits = re.match(r"\d*", fraction).group(0)  # type: ignore[union-attr]
    return seconds * 1_000_000_000 + int((digits + "000000000")[:9])


def container_started(pod: dict[str, Any], container: str) -> bool:
    """True once the container has run (running now, or terminated, or restarted)."""
    status = container_status(pod, container)
    if not status:
        return False
    state = status.get("state") or {}
    return bool(state.get("running") or state.get("terminated") or status.get("restartCount"))


class PodLogFollower:
    """Follows one pod's container log into a sink, resuming after drops.

    Args:
        core: a ``CoreV1Api``.
        namespace: the pod's namespace.
        pod_name: the pod.
        container: the container whose log to read.
        pod_state: returns the pod's current dict (from an informer), or None once deleted.
        wait_for_change: blocks until pods change or a timeout passes (an informer's).
        sink: receives ``(text, time)`` for every new line, in order.
    """

    def __init__(
        self,
        core: Any,
        namespace: str,
        pod_name: str,
        container: str,
        pod_state: Callable[[], dict[str, Any] | None],
        wait_for_change: Callable[[float], None],
        sink: Callable[[str, float], None],
    ) -> None:
        self.core = core
        self.namespace = namespace
        self.pod_name = pod_name
        self.container = container
        self._pod_state = pod_state
        self._wait = wait_for_change
        self._sink = sink
        self._last_ns = -1  # timestamp of the last line kept
        self._same_ns = 0  # how many kept lines carry exactly that timestamp
        self._same_ns_seen = 0  # lines at that timestamp met again in the current response
        self._segment: int | None = None  # restartCount of the container being followed
        self._server_clock: tuple[float, float] | None = None  # (server epoch s, local monotonic s)
        self._stop = threading.Event()
        self._response: Any = None
        self.connections = 0
        self.refused: Exception | None = None  # the API's 401/403 for the last read, while it lasts
        self._read_segment: int | None = None  # restartCount of the container whose current log was read last
        self._resumed = False  # whether this response continues a log already read in part
        self._overlap = False  # whether it brought back a line already kept
        self._gap_said = False
        self._thread = threading.Thread(target=self._run, name=f"dsnb-logs-{pod_name}", daemon=True)

    def start(self) -> PodLogFollower:
        """Follow in the background from where :meth:`catch_up` left off."""
        self._thread.start()
        return self

    def catch_up(self) -> None:
        """Read, now and without following, every line written so far that is not yet kept.

        Raises:
            ApiException: the API refused (other than the pod not having started).
        """
        pod = self._pod_state()
        if pod is None or not container_started(pod, self.container):
            return
        restarts = int((container_status(pod, self.container) or {}).get("restartCount") or 0)
        if restarts > 0 and (self._segment is None or restarts > self._segment):
            self._read(previous=True, follow=False)
        self._segment = restarts
        self._read(previous=False, follow=False)

    def finish(self) -> None:
        """Stop following, then read what is left (the pod still exists)."""
        self.stop()
        self._stop.clear()
        try:
            self.catch_up()
        except Exception as e:  # noqa: BLE001 - the pod may be gone already; what was read is kept
            if getattr(e, "status", None) in (401, 403):
                self.refused = e
        self._stop.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following and end the thread."""
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # noqa: BLE001 - best effort: it may be closed already
                pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- reading ---------------------------------------------------------------------------
    def _since_seconds(self) -> int | None:
        if self._last_ns < 0:
            return None
        if self._server_clock is None:
            now = time.time()
        else:
            # The server's clock, not ours: a laptop's clock may be off from the cluster's.
            server_then, local_then = self._server_clock
            now = server_then + (time.monotonic() - local_then)
        return max(1, math.ceil(now - self._last_ns / 1e9) + RESUME_MARGIN_S)

    def _keep(self, line: str) -> None:
        stamp, _, text = line.partition(" ")
        try:
            when_ns = parse_timestamp(stamp)
        except ValueError:
            return
        if when_ns < self._last_ns:
            self._overlap = True
            return
        if when_ns == self._last_ns:
            if self._same_ns_seen < self._same_ns:
                self._same_ns_seen += 1
                self._overlap = True
                return
            self._same_ns += 1
            self._same_ns_seen += 1
        else:
            if self._resumed and not self._overlap and not self._gap_said:
                # The window asked for starts before the last line kept: that line is gone (a rotation).
                self._gap_said = True
                self._sink(GAP_MARK, when_ns / 1e9)
            self._last_ns, self._same_ns, self._same_ns_seen = when_ns, 1, 1
        self._sink(text, when_ns / 1e9)

    def _read(self, previous: bool, follow: bool) -> None:
        self._same_ns_seen = 0
        self.connections += 1
        # A gap can be told only within one container's log: a restarted container's log starts anew.
        self._resumed = not previous and self._last_ns >= 0 and self._read_segment == self._segment
        self._overlap = self._gap_said = False
        if not previous:
            self._read_segment = self._segment
        response = self.core.read_namespaced_pod_log(
            self.pod_name, self.namespace, container=self.container, follow=follow, previous=previous,
            timestamps=True, since_seconds=self._since_seconds(), _preload_content=False,
            **({"_request_timeout": (CONNECT_S, STALL_S)} if follow else {}),
        )
        self._response = response
        try:
            if response.status >= 400:
                return
            date = response.headers.get("Date")
            if date:
                self._server_clock = (email.utils.parsedate_to_datetime(date).timestamp(), time.monotonic())
            pending = b""
            for chunk in response.stream(64 * 1024, decode_content=True):
                if self._stop.is_set():
                    return
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    self._keep(raw.decode("utf-8", "replace"))
            # A line without its newline is the cut end of a dropped stream: it is read again.
        except Exception:  # noqa: BLE001 - a dropped connection: the caller reconnects
            if self._stop.is_set():
                return
            raise
        finally:
            self._response = None
            response.release_conn()

    def _run(self) -> None:
        seen_pod = False
        while not self._stop.is_set():
            pod = self._pod_state()
            if pod is None:
                if seen_pod:
                    return  # deleted
                self._wait(1.0)
                continue
            seen_pod = True
            if not container_started(pod, self.container):
                self._wait(1.0)
                continue
            status = container_status(pod, self.container) or {}
            restarts = int(status.get("restartCount") or 0)
            before = self._last_ns
            try:
                if restarts > 0 and (self._segment is None or restarts > self._segment):
                    self._read(previous=True, follow=False)
                self._segment = restarts
                running = bool((status.get("state") or {}).get("running"))
                self._read(previous=False, follow=running)
            except Exception as e:  # noqa: BLE001 - dropped or refused: try again shortly
                if getattr(e, "status", None) in (401, 403):
                    self.refused = e  # the backend tells the user; a Role granted meanwhile clears it
                self._stop.wait(0.5)
                continue
            self.refused = None
            if self._last_ns == before:
                self._wait(2.0)  # nothing new: wait for the pod to change before asking again
