"""A Ray job's driver log, followed as Ray writes it: one background thread per job.

Ray's ``JobSubmissionClient.tail_job_logs`` streams the driver log over a websocket, always
from its first character (it is an async generator with no start position). The follower
runs it in a thread with an event loop of its own and counts the characters it has taken, so
a chunk is cut to what is new: a tail opened again after a drop adds nothing twice. After a
drop, ``get_job_logs`` (the whole log) catches up once before the tail is opened again; when
the job has ended, :meth:`DriverLogFollower.finish` reads it once more, so no line is lost.
The thread ends when the tail ends with the job, or when the follower is stopped.

Example:
    >>> class Finished:   # a client of a job that printed two lines and ended
    ...     def get_job_logs(self, job):
    ...         return "(RayTrainWorker pid=42) loss 2.5\\ndone"
    >>> follower = DriverLogFollower(Finished(), "tiny-x7k2")
    >>> follower.finish()
    >>> [line.text for line in follower.logs.read(0, None, 10)[0]]
    ['(RayTrainWorker) loss 2.5', 'done']
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from dsnb.backends.logbuffer import JobLogs
from dsnb.backends.ray.job_status import state_of
from dsnb.backends.ray.logs import DriverLogParser

#: A tail that brings nothing for this long is opened again: a connection can die without closing.
STALL_S = 60.0
#: Seconds before the tail is opened again after a drop, doubling while drops follow each other.
RETRY_S = 1.0
RETRY_MAX_S = 30.0
#: How long :meth:`DriverLogFollower.stop` waits for the thread.
JOIN_S = 5.0


class DriverLogFollower:
    """Follows one Ray job's driver log into a :class:`JobLogs`, each line attributed to its rank.

    Args:
        client: a ``JobSubmissionClient`` (``tail_job_logs``, ``get_job_logs``, ``get_job_info``).
        job: the job's submission id.
        stall_s: how long a quiet tail is trusted before it is opened again.
        retry_s: the first wait after a drop.

    Attributes:
        logs: the lines and metric samples read so far.
        offset: how many characters of the driver log were taken (a line still being written included).
        drops: how many times the tail was opened again after it dropped.
        complete: whether the whole log of the ended job was read.
    """

    def __init__(self, client: Any, job: str, *, stall_s: float = STALL_S, retry_s: float = RETRY_S) -> None:
        self.client = client
        self.job = job
        self.stall_s = stall_s
        self.retry_s = retry_s
        self.logs = JobLogs()
        self.offset = 0
        self.drops = 0
        self.complete = False
        self._parser = DriverLogParser()
        self._partial = ""  # the last line, while its newline has not come
        self._lock = threading.Lock()  # the offset, the parser and the partial line
        self._stop = threading.Event()
        self._ended = False  # the thread saw the job end (or go)
        self._thread: threading.Thread | None = None
        self._running: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None
        self._running_lock = threading.Lock()

    # -- what was read ---------------------------------------------------------------------

    def take(self, chunk: str, at: int) -> None:
        """Keep the part of ``chunk`` that is new; ``chunk`` starts at character ``at`` of the log.

        Only complete lines are parsed; the text after the last newline waits for its end.

        Example:
            >>> follower = DriverLogFollower(None, "j")
            >>> follower.take("a\\nb", 0); follower.take("a\\nbc\\n", 0)
            >>> [line.text for line in follower.logs.read(0, None, 10)[0]], follower.offset
            (['a', 'bc'], 5)

        Raises:
            Nothing.
        """
        with self._lock:
            new = chunk[max(0, self.offset - at):]
            if not new:
                return
            self.offset += len(new)
            text = self._partial + new
            cut = text.rfind("\n") + 1
            self._partial = text[cut:]
            self._parse(text[:cut])

    def _parse(self, text: str) -> None:
        when = time.time()
        for raw in text.splitlines():
            entry = self._parser.feed(raw)
            if entry is not None:
                self.logs.add(entry[0], entry[1], when)

    def announced(self) -> frozenset[int]:
        """The ranks that announced themselves so far."""
        with self._lock:
            return frozenset(self._parser.ranks.values())

    @property
    def outcome(self) -> Any:
        """The driver's outcome record, once its last line was read, else None."""
        with self._lock:
            return self._parser.outcome

    # -- reading ---------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Read the whole log once and keep what is new.

        Raises:
            Exception: what ``get_job_logs`` raises (the job does not exist, Ray cannot be reached).
        """
        self.take(self.client.get_job_logs(self.job), 0)

    def follow(self) -> None:
        """Catch up now, then follow in the background; nothing when already following or the job ended.

        Raises:
            Exception: what the catch-up raises (the thread is then not started).
        """
        if self._ended or (self._thread is not None and self._thread.is_alive()):
            return
        self.catch_up()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"dsnb-ray-logs-{self.job}", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Stop following and read the rest of the ended job's log, its last line included.

        Raises:
            Exception: what the catch-up raises (the follower stays incomplete, to be tried again).
        """
        self.stop()
        self.catch_up()
        with self._lock:
            self._parse(self._partial)
            self._partial = ""
        self.complete = True

    def stop(self, timeout: float = JOIN_S) -> None:
        """Stop following: end the tail and wait up to ``timeout`` seconds for the thread.

        Raises:
            Nothing.
        """
        self._stop.set()
        with self._running_lock:
            running = self._running
        if running is not None:
            loop, task = running
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        drops_in_a_row = 0
        while not self._stop.is_set():
            before = self.offset
            try:
                ended = asyncio.run(self._tail())
            except (Exception, asyncio.CancelledError):  # a drop: Ray's RuntimeError, aiohttp's errors, a stall
                ended = False
            if self._stop.is_set():
                return
            if ended and self._job_ended():
                self._ended = True
                return
            drops_in_a_row = 0 if self.offset > before else drops_in_a_row + 1
            self.drops += 1
            if self._stop.wait(min(RETRY_MAX_S, self.retry_s * 2 ** max(0, drops_in_a_row - 1))):
                return
            try:
                self.catch_up()
            except Exception as e:  # noqa: BLE001 - Ray unreachable for now: tried again after the next wait
                if "does not exist" in str(e):
                    self._ended = True
                    return

    async def _tail(self) -> bool:
        """Follow the tail until it ends (True) or stalls (TimeoutError); a drop raises."""
        with self._running_lock:
            if self._stop.is_set():
                return False
            self._running = (asyncio.get_running_loop(), asyncio.current_task())  # type: ignore[assignment]
        stream = self.client.tail_job_logs(self.job)
        at = 0
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), self.stall_s)
                except StopAsyncIteration:
                    return True
                self.take(chunk, at)
                at += len(chunk)
        finally:
            with self._running_lock:
                self._running = None
            await stream.aclose()

    def _job_ended(self) -> bool:
        """Whether Ray says the job ended (or no longer has it): the tail also ends when the server closes it."""
        try:
            return state_of(self.client.get_job_info(self.job)).is_terminal()
        except Exception as e:  # noqa: BLE001 - unreachable: the tail is opened again
            return "does not exist" in str(e)
