"""One daemon thread that calls the live views' refresh callbacks, each at its own interval.

Every open panel refreshes its elapsed time (and a plot held back by its rate limit) about once
a second. Rather than a thread per panel, they all register with one :class:`Ticker`, whose
thread starts with the first registration and ends when the last one is cancelled, so the
number of threads stays bounded however many panels a notebook opens.

Example:
    >>> ticker = Ticker()
    >>> ticking = ticker.register(lambda: None, interval=0.5)
    >>> ticker.thread is not None
    True
    >>> ticking.cancel(); ticker.join(5)      # no callback left: the thread ends
    True
    >>> ticker.thread is None
    True
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from types import MethodType
from typing import Any

log = logging.getLogger(__name__)

#: Shortest interval a callback may ask for: the ticker is for views, not for timing.
MIN_INTERVAL_S = 0.05


class Ticking:
    """One callback registered with a :class:`Ticker`; cancel it to stop the calls.

    It reads like a thread's handle: :meth:`is_alive` while the callback is registered (or
    still running after a cancel), :meth:`join` waits until it is neither.

    A bound method is held by a weak reference, so a view that is dropped without being
    closed stops ticking once it is collected; any other callable is held as given.

    Example:
        >>> ticking = Ticker().register(print, interval=1.0)
        >>> ticking.is_alive()
        True
        >>> ticking.cancel(); ticking.is_alive()
        False
    """

    def __init__(self, ticker: Ticker, callback: Callable[[], Any], interval: float) -> None:
        self.ticker = ticker
        self.interval = interval
        self.failures = 0
        self._target: Callable[[], Callable[[], Any] | None]
        if isinstance(callback, MethodType):
            self._target = weakref.WeakMethod(callback)
        else:
            self._target = lambda: callback
        self._due = time.monotonic() + interval
        self._running = False
        self._cancelled = False
        self._ended = threading.Event()

    def callback(self) -> Callable[[], Any] | None:
        """The callback, or None once its owner was collected."""
        return self._target()

    def cancel(self) -> None:
        """Stop calling the callback (a call under way finishes); safe to call again, from any thread."""
        self.ticker._unregister(self)

    def is_alive(self) -> bool:
        """True while registered, or while a call is still under way after :meth:`cancel`."""
        return not self._ended.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds until the callback is cancelled and its last call returned.

        Returns:
            True if it has ended.
        """
        if threading.current_thread() is self.ticker.thread:
            return not self.is_alive()  # a callback waiting for itself would wait forever
        return self._ended.wait(timeout)


class Ticker:
    """A daemon thread that calls each registered callback every ``interval`` seconds.

    The thread starts on the first :meth:`register` and stops once no callback is left. A
    callback that raises is logged and keeps its place; the others are called as before.
    Callbacks run one after another on the ticker's thread, so each should be short.

    Args:
        name: the thread's name.

    Raises:
        Nothing of its own.

    Example:
        >>> ticker = Ticker(name="dsnb-example-ticker")
        >>> ticks = []
        >>> ticking = ticker.register(lambda: ticks.append(1), interval=0.05)
        >>> time.sleep(0.3); ticking.cancel(); ticker.join(5)
        True
        >>> len(ticks) >= 2, ticker.thread
        (True, None)
    """

    def __init__(self, name: str = "dsnb-ticker") -> None:
        self.name = name
        self._changed = threading.Condition(threading.Lock())
        self._tickings: list[Ticking] = []
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The running thread, or None while nothing is registered."""
        with self._changed:
            return self._thread

    def __len__(self) -> int:
        with self._changed:
            return len(self._tickings)

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the thread to end, once no callback is left.

        Returns:
            True if no thread runs (none was started, or it ended).

        Example:
            >>> ticker.join(5)  # doctest: +SKIP
            True
        """
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return thread is None
        thread.join(timeout)
        return not thread.is_alive()

    def register(self, callback: Callable[[], Any], interval: float) -> Ticking:
        """Call ``callback()`` every ``interval`` seconds, first after one interval, until cancelled.

        Args:
            callback: what to call, with no arguments; its return value is ignored.
            interval: seconds between two calls (at least ``MIN_INTERVAL_S``).

        Returns:
            The handle that cancels the calls.

        Raises:
            ValueError: ``interval`` is below ``MIN_INTERVAL_S``.

        Example:
            >>> ticking = ticker.register(panel._tick, interval=1.0)  # doctest: +SKIP
        """
        if interval < MIN_INTERVAL_S:
            raise ValueError(f"interval must be at least {MIN_INTERVAL_S} s, got {interval!r}")
        ticking = Ticking(self, callback, interval)
        with self._changed:
            self._tickings.append(ticking)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._changed.notify()
        return ticking

    def _unregister(self, ticking: Ticking) -> None:
        with self._changed:
            ticking._cancelled = True
            if ticking in self._tickings:
                self._tickings.remove(ticking)
            if not ticking._running:
                ticking._ended.set()
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                due = self._next_due()
                if due is None:
                    return
                for ticking in due:
                    ticking._running = True
            for ticking in due:
                self._call(ticking)
            with self._changed:
                for ticking in due:
                    ticking._running = False
                    if ticking not in self._tickings:
                        ticking._ended.set()

    def _next_due(self) -> list[Ticking] | None:
        """Under the lock: wait for the callbacks due next; None (with the thread forgotten) once none is left."""
        while True:
            for collected in [t for t in self._tickings if t.callback() is None]:
                self._tickings.remove(collected)
                collected._cancelled = True
                collected._ended.set()
            if not self._tickings:
                self._thread = None
                return None
            now = time.monotonic()
            due = [t for t in self._tickings if t._due <= now]
            if due:
                for ticking in due:
                    ticking._due = now + ticking.interval
                return due
            self._changed.wait(min(t._due for t in self._tickings) - now)

    def _call(self, ticking: Ticking) -> None:
        callback = ticking.callback()
        if callback is None or ticking._cancelled:
            return
        try:
            callback()
        except Exception:  # one broken view must not stop the others' refreshes
            ticking.failures += 1
            level = logging.WARNING if ticking.failures == 1 else logging.DEBUG
            log.log(level, "dsnb ticker callback %r failed (%d times)", callback, ticking.failures, exc_info=True)


#: The ticker the notebook panels share.
SHARED_TICKER = Ticker()
