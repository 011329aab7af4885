"""Byte relays that give pods in their own network namespaces the API server's in-cluster endpoint.

A pod in a network namespace (``tests/k8s/netns.py``) cannot reach 127.0.0.1 of the test's own
namespace, where the emulator listens; on a cluster, kube-proxy makes ``kubernetes.default.svc``
reachable from every pod. Here a Unix socket, which is a file and so crosses network namespaces,
plays that part: :class:`UnixToTcp` (in the test process) passes each connection on to the
emulator's TLS port, and this file run as a program inside a pod's namespace listens on its
127.0.0.1 and passes each connection to that Unix socket. TLS runs end to end through both, so
the pod still checks the server's certificate.

Example (inside a namespace)::

    ip netns exec NS python3 relay.py 6443 /tmp/sim-api/api.sock
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def pump(source: socket.socket, target: socket.socket) -> None:
    """Copy bytes from ``source`` to ``target`` until either end closes, then close both."""
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


def _relay_pair(client: socket.socket, upstream: socket.socket) -> None:
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


class UnixToTcp:
    """A Unix socket at ``path`` whose connections go on to ``127.0.0.1:port``; stop with :meth:`close`."""

    def __init__(self, path: str, port: int) -> None:
        self.path, self.port = path, port
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        os.chmod(path, 0o666)  # pods run as a non-root user
        self._server.listen(64)
        self._thread = threading.Thread(target=self._serve, name="sim-api-relay", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            _relay_pair(client, upstream)

    def close(self) -> None:
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def main(argv: list[str]) -> None:
    """Listen on 127.0.0.1:``argv[0]`` (in the namespace this runs in) and pass each connection to ``argv[1]``."""
    port, path = int(argv[0]), argv[1]
    server = socket.create_server(("127.0.0.1", port))
    while True:
        client, _ = server.accept()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            client.close()
            upstream.close()
            continue
        _relay_pair(client, upstream)


if __name__ == "__main__":
    main(sys.argv[1:])
