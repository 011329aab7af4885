"""The batch loop of a multi-rank server: gather requests, share each batch with every rank, run it.

Rank 0 owns an :class:`Engine`: HTTP handlers :meth:`~Engine.submit` work, a thread takes
the first waiting request, gathers compatible ones for up to ``max_wait_s`` (to at most
``max_batch_size`` items; it waits only while requests come concurrently, so that a lone
client is not slowed), sends the batch to the other ranks (:class:`Collective`), runs
it, and hands every request its slice of the answer. The other ranks run :func:`follow`:
receive a batch, run it (their part of a tensor-parallel model), repeat. Idle, rank 0
sends a heartbeat every second, so a rank that died is noticed within about a second: the
engine turns unready and refuses work with :class:`RankLost` rather than hang.

Example:
    >>> import threading
    >>> class Double:                                   # a stand-in model runner
    ...     def encode(self, texts): return [[2.0 * len(t)] for t in texts]
    >>> engine = Engine(Double(), Collective(world_size=1), max_batch_size=4, max_wait_s=0.01)
    >>> engine.start()
    >>> done = threading.Event(); answers = []
    >>> engine.submit(Work("texts", ["ab", "c"], size=2, deliver=lambda r, e: (answers.append(r), done.set())))
    >>> done.wait(5) and answers
    [[[4.0], [2.0]]]
    >>> engine.stop()
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsnb.runtime.server.kv_batch import Step
from dsnb.runtime.server.model import BadRequest

#: Row shapes remembered as ones the model takes (a request of another shape that fails is a 400).
MAX_SHAPES_KEPT = 64
log = logging.getLogger("dsnb.serving")
#: Idle rank 0 sends a heartbeat this often, so a dead rank is found while no request comes.
HEARTBEAT_S = 1.0


class Overloaded(RuntimeError):
    """The queue is full; the client should retry after a moment (HTTP 503 with Retry-After)."""


class RankLost(RuntimeError):
    """A rank of the server is gone; the server cannot answer until it is restarted."""


class Draining(RuntimeError):
    """The server is shutting down and takes no new requests."""


class Abandoned(RuntimeError):
    """The request's client went away, or its deadline passed, before it was answered: it was dropped."""


@dataclass
class Work:
    """One request for the engine.

    Attributes:
        op: ``"texts"`` (embed/classify a list of strings), ``"embed"`` (the same, answered as arrays with
            token counts), ``"lora"`` (load or unload an adapter), ``"tensor"`` (a loader model's
            batch tensor) or ``"generate"`` (one :class:`~dsnb.runtime.server.model.Generation`).
        data: the list of strings, the tensor, or the Generation.
        size: items in ``data`` (strings or rows); batches hold ``max_batch_size`` items at most.
        deliver: called once, from the engine's thread, with ``(result, None)`` or ``(None, error)``.
        on_text: for ``generate``: receives generated text piece by piece (streaming).
        key: requests batch together only when op and key are equal (e.g. a tensor's row shape).
        cancelled: set when the client went away: the engine drops the work, or stops its generation
            at the next step.
        deadline: ``time.monotonic()`` after which the work is dropped, or its generation stopped.
    """

    op: str
    data: Any
    size: int
    deliver: Callable[[Any, BaseException | None], None]
    on_text: Callable[[str], None] | None = None
    key: Any = None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None
    answered: bool = False

    def abandoned(self) -> str | None:
        """Why the work need not run any more (its client left, its deadline passed), or None."""
        if self.cancelled.is_set():
            return "the client went away"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "its deadline passed"
        return None


class Collective:
    """Shares each batch of rank 0 with every rank (``torch.distributed`` broadcast; nothing for one rank).

    Raises (from :meth:`share`):
        RankLost: a rank is gone (its connection closed, or the collective timed out).
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def share(self, message: Any = None) -> Any:
        """Rank 0 sends ``message``; every other rank receives and returns it."""
        if self.world_size == 1:
            return message
        import torch.distributed as dist

        box = [message]
        try:
            dist.broadcast_object_list(box, src=0)
        except Exception as e:  # gloo and nccl raise several types for a lost peer
            raise RankLost(f"a rank of the server is gone ({type(e).__name__}: {str(e)[:200]})") from e
        return box[0]

    def finish(self) -> None:
        """Wait until every rank got the last message (so rank 0 exits after the others read it)."""
        if self.world_size > 1:
            import torch.distributed as dist

            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a rank already gone changes nothing here
                pass


def run_batch(runner: Any, message: dict[str, Any], on_text: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> Any:
    """Run one shared batch on this rank; every rank calls it with the same message.

    ``should_stop`` (rank 0's): whether a generation's client left or its deadline passed; the
    ranks stop together at the next step (the model runner shares the answer each step).

    Returns the model's answer for the whole batch: a list per text, the output tensor(s),
    or a :class:`~dsnb.runtime.server.model.Completion`.
    """
    op, data = message["op"], message.get("data")
    if op == "texts":
        return runner.encode(data)
    if op == "embed":
        return runner.embed(data)
    if op == "tensor":
        return runner.forward(data)
    if op == "generate":
        return runner.generate(data, on_text=on_text, should_stop=should_stop)
    if op == "step":
        return runner.step(Step.from_message(message))
    if op == "lora":
        return runner.lora(data)
    raise ValueError(f"unknown operation {op!r}")


def follow(runner: Any, collective: Collective) -> None:
    """The loop of a rank other than 0: run every batch rank 0 shares, until it says stop.

    Errors of the model are rank 0's to report (every rank meets the same one), so they
    are skipped here; a lost rank 0 ends the loop with :class:`RankLost`.

    Raises:
        RankLost: rank 0 (or another rank) is gone.
    """
    while True:
        message = collective.share()
        if message["op"] == "stop":
            collective.finish()
            return
        if message["op"] == "ping":
            continue
        try:
            run_batch(runner, message)
        except Exception:  # noqa: BLE001 - rank 0 answers the request with this error
            continue


class Engine:
    """Rank 0's batching loop (see the module docstring).

    Args:
        runner: the model runner (:class:`~dsnb.runtime.server.model.Predictor`, or anything with
            ``encode``/``forward``/``generate``), or None until :meth:`set_runner`.
        collective: how batches reach the other ranks.
        max_batch_size: items (strings or rows) per batch at most.
        max_wait_s: how long the first request of a batch waits for more.
        max_queue: requests waiting at most; :meth:`submit` raises Overloaded beyond.
        on_batch: called with each batch's item count (for metrics).
        scheduler: a :class:`~dsnb.runtime.server.scheduler.Scheduler` that batches generations
            continuously (a decode step of every running sequence between the other batches);
            None runs each generation on its own, one after the other.
    """

    def __init__(self, runner: Any, collective: Collective, max_batch_size: int = 16, max_wait_s: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[int], None] | None = None, scheduler: Any = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.collective = collective
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.lost: str | None = None
        self.draining = False
        self._waiting: collections.deque[Work] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._loaded = False  # the last batch found company: later first requests wait for more
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._running: list[Work] = []  # the batch being run, answered by _loop if the loop dies under it
        self._shapes_run: set[Any] = set()  # row shapes the model has taken: a failure on another is the input's fault

    # -- state -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every rank is up, the batch loop runs, and the server takes requests."""
        return (self._started.is_set() and self.lost is None and not self.draining
                and self._thread is not None and self._thread.is_alive())

    @property
    def not_ready_reason(self) -> str:
        """Why the server is not ready ("" when it is)."""
        if self.lost is not None:
            return self.lost
        if self.draining:
            return "shutting down"
        if not self._started.is_set():
            return "loading the model on every rank"
        if self._thread is None or not self._thread.is_alive():
            return "the batch loop stopped"
        return ""

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (and generated sequences waiting for room in the running batch)."""
        return len(self._waiting) + (self.scheduler.waiting if self.scheduler is not None else 0)

    def generation_state(self) -> tuple[int, int, float]:
        """Sequences being generated now, sequences waiting to start, and the share of the cache they
        hold (0 without continuous batching, whose cache lives inside each generation)."""
        if self.scheduler is not None:
            return self.scheduler.running, self.scheduler.waiting, self.scheduler.cache_use
        running = sum(1 for work in list(self._running) if work.op == "generate")
        return running, sum(1 for work in list(self._waiting) if work.op == "generate"), 0.0

    # -- requests ----------------------------------------------------------------------------
    def submit(self, work: Work) -> None:
        """Queue ``work``; its ``deliver`` is called when it has run.

        Raises:
            RankLost: a rank is gone. Draining: shutting down. Overloaded: the queue is full.
        """
        if self.lost is not None:
            raise RankLost(self.lost)
        if self.draining:
            raise Draining("the server is shutting down")
        with self._cond:
            if self.queued >= self.max_queue:
                raise Overloaded(f"{self.queued} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(work)
            self._cond.notify()

    # -- the loop ----------------------------------------------------------------------------
    def set_runner(self, runner: Any) -> None:
        """Give the engine its model runner once loaded; the engine is ready once :meth:`start` ran."""
        self.runner = runner

    def start(self) -> None:
        """Start the batch loop in a thread (the runner must be set and every rank connected)."""
        self._thread = threading.Thread(target=self._loop, name="dsnb-engine", daemon=True)
        self._thread.start()
        self._started.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work, tell the other ranks to stop, and end the loop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def mark_lost(self, reason: str) -> None:
        """Turn unready for good and fail every queued request with RankLost."""
        if self.lost is None:
            self.lost = reason
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for work in waiting:
            deliver(work, None, RankLost(reason))
        if self.scheduler is not None:
            self.scheduler.fail_all(RankLost(reason))

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the loop must not die silently: fail what waits, turn unready, say why
            log.exception("the batch loop stopped")
            self.mark_lost(f"the batch loop stopped ({type(e).__name__}: {e})")
            for work in self._running:
                deliver(work, None, RankLost(self.lost or "the batch loop stopped"))
            if self.scheduler is not None:
                self.scheduler.fail_all(RankLost(self.lost or "the batch loop stopped"))

    def _serve(self) -> None:
        while True:
            batch = self._next_batch(wait=not self._generating())
            if batch is not None:
                self._running = batch
                self._run(batch)
                self._running = []
            elif not self._generating():
                if self._stopping:  # what was queued has run, and no sequence is left to generate
                    if self._share({"op": "stop"}):
                        self.collective.finish()
                    return
                if not self._share({"op": "ping"}):
                    return
                continue
            if self.lost is None and self._generating():
                self._step()  # the running sequences take a step between any two other batches
            if self.lost is not None:
                return

    def _generating(self) -> bool:
        """Whether the scheduler has sequences to run (taking the generations submitted since the last step)."""
        if self.scheduler is None:
            return False
        with self._cond:
            taken = [work for work in self._waiting if work.op == "generate"]
            if taken:
                self._waiting = collections.deque(work for work in self._waiting if work.op != "generate")
        for work in taken:
            try:
                self.scheduler.add(work)
            except Exception as e:  # noqa: BLE001 - a request the scheduler refuses is answered with why
                deliver(work, None, e)
        return self.scheduler.has_work

    def _step(self) -> None:
        """One step of continuous batching on every rank (:mod:`dsnb.runtime.server.scheduler`)."""
        step = self.scheduler.plan()
        if not self._share(step.to_message()):
            self.scheduler.fail_all(RankLost(self.lost or "a rank is gone"))
            return
        try:
            logits = self.runner.step(step)
        except Exception as e:  # noqa: BLE001 - every rank met the same failure: answer its requests, reset, go on
            log.exception("a generation step failed")
            self.scheduler.fail_all(self._failure(None, e))
            return
        self.scheduler.advance(step, logits)

    def _share(self, message: dict[str, Any]) -> bool:
        if self.lost is not None:
            return False
        try:
            self.collective.share(message)
            return True
        except RankLost as e:
            self.mark_lost(str(e))
            return False

    def _next_batch(self, wait: bool = True) -> list[Work] | None:
        """The next batch of requests (at once, or within a heartbeat when ``wait``); None when none,
        or when the first is a generation for the scheduler to take."""
        with self._cond:
            if not self._waiting and wait:
                self._cond.wait(HEARTBEAT_S)
            first = self._first_wanted()
            if first is None:
                return None
            batch, size = [first], first.size
            if first.op == "generate":
                return batch
            # Waiting pays only under concurrent load: one client at a time would just be slowed. The wait
            # counts from when the batch is formed, not from when its first request came: the requests
            # queued behind the last batch would otherwise run at once, without the clients that batch just
            # answered, and a closed loop of C clients would settle into two half batches for good.
            deadline = max(first.enqueued, time.monotonic()) + (self.max_wait_s if self._loaded else 0.0)
            while size < self.max_batch_size:
                taken = self._take_compatible(first, self.max_batch_size - size)
                if taken is not None:
                    batch.append(taken)
                    size += taken.size
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    break
                self._cond.wait(left)
            self._loaded = len(batch) > 1 or bool(self._waiting)
            return batch

    def _first_wanted(self) -> Work | None:
        """The first waiting work someone still waits for (the others are answered Abandoned), taken from
        the queue; None when none is left, or when it is a generation for the scheduler (left in the queue)."""
        while self._waiting:
            first = self._waiting[0]
            if first.op == "generate" and self.scheduler is not None:
                return None  # the scheduler takes it (_generating) and drops it if abandoned
            self._waiting.popleft()
            why = first.abandoned()
            if why is None:
                return first
            deliver(first, None, Abandoned(f"dropped unrun: {why}"))  # nobody waits for it any more
        return None

    def _take_compatible(self, first: Work, room: int) -> Work | None:
        for index, work in enumerate(self._waiting):  # a generation's op never matches: the scheduler takes it
            if work.op == first.op and work.key == first.key and work.size <= room and work.abandoned() is None:
                del self._waiting[index]
                return work
        return None

    def _run(self, batch: list[Work]) -> None:
        """Run ``batch`` on every rank and answer each of its requests with its part, or all with the batch's error."""
        try:
            parts = self._parts(batch)
        except _BatchFailed as failed:
            for work in batch:
                deliver(work, None, failed.error)
            return
        for work, part in zip(batch, parts):
            deliver(work, part, None)

    def _parts(self, batch: list[Work]) -> list[Any]:
        """Each request's part of the answer to ``batch``, which every rank ran.

        Raises:
            _BatchFailed: the requests could not be put together, a rank is gone, the model
                failed or was stopped, or its answer could not be cut up.
        """
        first = batch[0]
        if first.op == "lora" and first.data["action"] == "unload" and self.scheduler is not None:
            first.data["in_use"] = self.scheduler.uses(first.data["name"])
        message = {"op": first.op, "data": _combined(batch)}
        if not self._share(message):
            raise _BatchFailed(RankLost(self.lost or "a rank is gone"))
        self._count(batch)
        result = self._result(first, message)
        try:
            parts = _split(first.op, result, [w.size for w in batch])
        except Exception as e:  # noqa: BLE001 - an output dsnb cannot cut up fails its batch, not the server
            log.exception("could not split the answer of %d request(s)", len(batch))
            raise _BatchFailed(e) from e
        if first.op == "tensor" and len(self._shapes_run) < MAX_SHAPES_KEPT:
            self._shapes_run.add(first.key)
        return parts

    def _count(self, batch: list[Work]) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(sum(w.size for w in batch))
            except Exception:  # noqa: BLE001 - metrics never stop serving
                log.exception("the batch metric failed")

    def _result(self, first: Work, message: dict[str, Any]) -> Any:
        """The model's answer to the shared batch whose first request is ``first``.

        Raises:
            _BatchFailed: the model failed, or a generation was stopped because its client left.
        """
        generating = first.op == "generate"
        try:
            result = run_batch(self.runner, message, on_text=first.on_text,
                               should_stop=(lambda: first.abandoned() is not None) if generating else None)
            why = first.abandoned() if generating else None
            if why is not None:
                raise Abandoned(f"stopped: {why}")
        except Exception as e:  # noqa: BLE001 - handed to the request(s) that caused it
            raise _BatchFailed(self._failure(first, e)) from e
        return result

    def _failure(self, first: Work | None, error: Exception) -> BaseException:
        """What the requests of a batch the model failed on are told: a lost rank, their input's shape, or ``error``."""
        if self.collective.world_size > 1 and not self._share({"op": "ping"}):
            return RankLost(self.lost or "a rank is gone")
        if first is not None and first.op == "tensor" and first.key not in self._shapes_run and not isinstance(error, Abandoned):
            taken = ", ".join(sorted({_row_shape(key) for key in self._shapes_run})[:4])
            return BadRequest(f"the model could not take rows of shape {_row_shape(first.key)} ({type(error).__name__}: {error}); "
                              + (f"it has taken rows of shape {taken}" if taken else "check the shape the model expects"))
        return error


class _BatchFailed(Exception):
    """A batch cannot be answered: every request of it gets ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _row_shape(key: Any) -> str:
    """A tensor request's row shape, as its batching key holds it (``((4,), torch.float32)`` -> ``[4]``)."""
    shape = key[0] if isinstance(key, tuple) and key and isinstance(key[0], tuple) else key
    return str(list(shape)) if isinstance(shape, tuple) else str(shape)


def deliver(work: Work, result: Any, error: BaseException | None) -> None:
    """Answer ``work`` once (later calls do nothing); a ``deliver`` that fails (its client left) changes nothing."""
    if work.answered:
        return
    work.answered = True
    try:
        work.deliver(result, error)
    except Exception:  # noqa: BLE001 - a client that went away must not stop the loop
        pass


def _combined(batch: list[Work]) -> Any:
    """The data of every request of ``batch`` as one model input.

    Raises:
        _BatchFailed: the requests cannot be put together.
    """
    try:
        return _combine(batch)
    except Exception as e:  # noqa: BLE001 - requests the engine cannot put together fail, the loop goes on
        log.exception("could not batch %d request(s)", len(batch))
        raise _BatchFailed(e) from e


def _combine(batch: list[Work]) -> Any:
    if len(batch) == 1:
        return batch[0].data
    if batch[0].op in ("texts", "embed"):
        return [text for work in batch for text in work.data]
    import torch

    return torch.cat([work.data for work in batch])


def _split(op: str, result: Any, sizes: list[int]) -> list[Any]:
    if len(sizes) == 1:
        return [result]
    if op in ("texts", "embed"):
        parts, start = [], 0
        for size in sizes:
            parts.append(result[start:start + size])
            start += size
        return parts
    return _split_rows(result, sizes)


def _split_rows(output: Any, sizes: list[int]) -> list[Any]:
    """Cut a batch-major output (tensor, or tuple/list/dict of them) back into one part per request."""
    if hasattr(output, "split"):
        if output.dim() == 0 or output.shape[0] != sum(sizes):
            raise ValueError(f"the model's output has {tuple(output.shape)} rows for a batch of {sum(sizes)}; "
                             "serve it with max_batch_size=1")
        return list(output.split(sizes))
    if isinstance(output, dict):
        columns = {key: _split_rows(value, sizes) for key, value in output.items()}
        return [{key: parts[i] for key, parts in columns.items()} for i in range(len(sizes))]
    if isinstance(output, (list, tuple)):
        columns = [_split_rows(value, sizes) for value in output]
        if hasattr(output, "_fields"):  # a namedtuple takes its fields as arguments
            return [type(output)(*(parts[i] for parts in columns)) for i in range(len(sizes))]
        return [type(output)(parts[i] for parts in columns) for i in range(len(sizes))]
    raise ValueError(f"cannot split a model output of type {type(output).__name__} per request; serve it with max_batch_size=1")
