"""A watch-based cache of one kind of object: list once, then watch from that resourceVersion.

One informer per kind and namespace serves every job of a backend, so status needs no
per-pod polling: a background thread lists the objects that carry dsnb's label, watches
for changes from the list's ``resourceVersion`` and, when the server answers 410 Gone
(the version is too old), lists again and replaces its cache. Readers take consistent
snapshots and can wait for the next change.

Example:
    >>> informer = Informer(conn.core.list_namespaced_pod, "ml", label_selector="app.kubernetes.io/managed-by=dsnb")  # doctest: +SKIP
    >>> informer.start().wait_synced(10)                                                           # doctest: +SKIP
    True
    >>> [p["metadata"]["name"] for p in informer.items()]                                          # doctest: +SKIP
    ['tiny-gpt-x7k2-0', 'tiny-gpt-x7k2-1']
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from dsnb.backends.kubernetes.objects import read_json

log = logging.getLogger(__name__)

#: Seconds a watch request stays open before it is renewed (servers cut them anyway).
WATCH_RENEW_S = 300
RETRY_S = (0.5, 1, 2, 5, 10)
HTTP_GONE = 410

ListFunction = Callable[..., Any]


class Informer:
    """A live, read-only cache of the objects a list function returns.

    Args:
        list_function: a list call of the official client, e.g. ``CoreV1Api.list_namespaced_pod``
            or ``CustomObjectsApi.list_namespaced_custom_object`` (it must accept ``watch=True``).
        *args: its positional arguments (the namespace; group, version, namespace, plural).
        label_selector: which objects to keep.

    Attributes:
        resyncs: how many times a 410 forced a fresh list (for tests and diagnostics).
        error: the last error talking to the API, or None while things work.
    """

    def __init__(self, list_function: ListFunction, *args: str, label_selector: str) -> None:
        self._list = list_function
        self._args = args
        self._selector = label_selector
        self._objects: dict[str, dict[str, Any]] = {}
        self._version = 0
        self._changed = threading.Condition()
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self.resyncs = 0
        self.error: Exception | None = None

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> Informer:
        """Start the background list-and-watch thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"dsnb-informer-{self._list.__name__}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and end the thread."""
        self._stopping.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblock a read waiting for the next event
            except Exception:  # noqa: BLE001 - best effort: the connection may already be closed
                pass
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def refused(self) -> ApiException | None:
        """The API's answer when it refused the last list or watch for this user (401 or 403), else None.

        The informer keeps retrying (a Role may be granted meanwhile); a caller turns this into an error.
        """
        error = self.error
        return error if isinstance(error, ApiException) and error.status in (401, 403) else None

    @property
    def running(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first complete list; True when the cache is filled."""
        return self._synced.wait(timeout)

    # -- reading ---------------------------------------------------------------------------
    def items(self, predicate: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """A snapshot of the cached objects (optionally filtered)."""
        with self._changed:
            values = list(self._objects.values())
        return values if predicate is None else [o for o in values if predicate(o)]

    def get(self, name: str) -> dict[str, Any] | None:
        """The cached object called ``name``, if any."""
        with self._changed:
            return self._objects.get(name)

    @property
    def version(self) -> int:
        """A counter that grows with every change the cache sees."""
        return self._version

    def wait_for_change(self, since: int, timeout: float) -> int:
        """Block until the cache changes after ``since`` (a ``version``) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._version == since and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._version

    # -- the loop --------------------------------------------------------------------------
    def _replace(self, objects: list[dict[str, Any]]) -> None:
        with self._changed:
            self._objects = {o["metadata"]["name"]: o for o in objects}
            self._version += 1
            self._changed.notify_all()

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK: only a newer resourceVersion, taken by the caller
        name = obj["metadata"]["name"]
        with self._changed:
            if kind == "DELETED":
                self._objects.pop(name, None)
            else:
                self._objects[name] = obj
            self._version += 1
            self._changed.notify_all()

    def _list_all(self) -> str:
        data = read_json(self._list(*self._args, label_selector=self._selector, _preload_content=False))
        self._replace(data.get("items") or [])
        self._synced.set()
        return data["metadata"]["resourceVersion"]

    def _events(self, resource_version: str) -> Iterator[dict[str, Any]]:
        """Watch events, their objects as plain dicts.

        The client's ``Watch`` reads the stream; ``return_type=object`` keeps each object the
        dict the server sent (its default validates objects into the strict models, where one
        field a server leaves out ends the watch), and with ``timeout_seconds`` given it raises
        the 410 of an ERROR event as an ``ApiException`` instead of retrying by itself.
        """
        def opened(*args: Any, **kwargs: Any) -> Any:
            # The response is kept so that stop() can shut it down under a blocked read.
            response = self._response = self._list(*args, **kwargs)
            if self._stopping.is_set():
                response.shutdown()  # stop() came while the request was made
            elif 200 <= response.status < 300:
                self.error = None  # the watch is open: an earlier refusal no longer holds
            return response

        stream = watch.Watch(return_type=object).stream(
            opened, *self._args, label_selector=self._selector, resource_version=resource_version,
            timeout_seconds=WATCH_RENEW_S, allow_watch_bookmarks=True)
        try:
            yield from stream
        finally:
            stream.close()
            self._response = None

    def _run(self) -> None:
        failures = 0
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list_all()
                for event in self._events(resource_version):
                    obj = event["object"]
                    resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                    self._apply(event["type"], obj)
                    failures = 0
                    self.error = None
                    if self._stopping.is_set():
                        break
            except ApiException as e:
                if e.status == HTTP_GONE:
                    # Our version fell out of the server's history: list again, then watch on.
                    self.resyncs += 1
                    resource_version = None
                    continue
                failures += 1
                self.error = e
            except Exception as e:  # noqa: BLE001 - network errors of every kind: retry with backoff
                if self._stopping.is_set():
                    break
                failures += 1
                self.error = e
            if failures:
                delay = RETRY_S[min(failures, len(RETRY_S)) - 1]
                log.debug("watch of %s failed (%s); retrying in %.1f s", self._list.__name__, self.error, delay)
                self._stopping.wait(delay)
