"""How long rank 0's HTTP server waits for a client, and how many it serves at once.

uvicorn closes a keep-alive connection idle between requests (``timeout_keep_alive``) and can
refuse connections past a limit (``limit_concurrency``, a 503), but it waits for ever for a
request that never arrives in full: a client that connects and sends nothing, or sends half its
headers, holds a connection (and its memory) as long as it likes. :func:`guarded_protocol`
closes a connection whose request head has not arrived ``head_timeout`` seconds after the
connection was made or after the previous response; :func:`read_body` gives up on a body that
stops coming for ``body_timeout`` seconds, and a :class:`BodyBudget` bounds the bytes of all
bodies being received at once, so that many clients sending large bodies slowly cannot fill
memory (the concurrency limit alone would let 512 x 16 MiB in).

Example::

    uvicorn.Config(app, http=guarded_protocol(head_timeout=10), limit_concurrency=512)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
#: Bytes of request bodies held at once by default (being received, or parsed).
BODY_BYTES_IN_FLIGHT = 64 * 1024 * 1024


class SlowClient(TimeoutError):
    """The request body stopped arriving (HTTP 408)."""


class BodyBudget:
    """The bytes of request bodies held at once, across connections (all on the event loop's thread).

    Example:
        >>> budget = BodyBudget(100)
        >>> budget.take(60), budget.take(60), budget.held
        (True, False, 60)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes if the budget allows; False (and nothing held) otherwise."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        """Release ``size`` bytes taken before."""
        self.held = max(0, self.held - size)


def guarded_protocol(head_timeout: float = HEAD_TIMEOUT_S) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request head is late (see the module docstring):
    httptools' (its parser is C) when httptools is installed, else h11's (pure Python)."""
    timeout = head_timeout
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class GuardedH11Protocol(_HeadTimer, H11Protocol):
            head_timeout = timeout

            def handle_events(self) -> None:
                super().handle_events()
                if self.cycle is not None and not self.cycle.response_complete:
                    self._disarm()  # a request is in: its body has a timeout of its own

        return GuardedH11Protocol

    class GuardedHttpToolsProtocol(_HeadTimer, HttpToolsProtocol):
        head_timeout = timeout

        def on_headers_complete(self) -> None:
            self._disarm()  # a request is in: its body has a timeout of its own
            super().on_headers_complete()

    return GuardedHttpToolsProtocol


class _HeadTimer:
    """Closes the connection when no request head comes ``head_timeout`` seconds after it opened, or after the
    previous answer (mixed into a uvicorn protocol, which says when a head arrived by calling ``_disarm``)."""

    head_timeout: float
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm()  # the next request head must come in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._late)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _late(self) -> None:
        self._head_timer = None
        cycle, transport = self.cycle, self.transport  # type: ignore[attr-defined]
        if (cycle is None or cycle.response_complete) and not transport.is_closing():
            transport.close()


async def read_body(chunks: AsyncIterator[bytes], limit: int, too_large: type[Exception], budget: BodyBudget,
                    too_busy: type[Exception], body_timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, at most ``limit`` bytes (else ``too_large``), each part within ``body_timeout`` seconds,
    its bytes taken from ``budget``: the caller gives ``len(body)`` back when done with it.

    Raises:
        SlowClient: the body stopped coming.
        too_large: the body passed ``limit``.
        too_busy: other bodies hold the budget.
    """
    parts, size = [], 0
    iterator = chunks.__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(iterator.__anext__(), body_timeout)
            except StopAsyncIteration:
                body = b"".join(parts)
                size = 0  # now the caller's to give back
                return body
            except asyncio.TimeoutError:
                raise SlowClient(f"the request body stopped arriving for {body_timeout:g} s") from None
            if size + len(chunk) > limit:
                raise too_large(f"the body is above the server's limit of {limit} bytes")
            if not budget.take(len(chunk)):
                raise too_busy("the server is receiving too many large bodies at once; retry shortly")
            size += len(chunk)
            parts.append(chunk)
    finally:
        budget.give(size)
