"""Stand-in for ``python -m dsnb.runtime.server`` in the Kubernetes serving tests (standard library only).

It keeps the server's contract with the cluster, not its model: the real server loads a model
with DeepSpeed (seconds to minutes), this one pretends to for ``DSNB_STANDIN_LOAD_S`` seconds.

- Rank 0 listens on ``--host``/``--port`` with ``GET /healthz`` (200 while alive), ``GET /readyz``
  (200 once "loaded", else 503 ``{"ready": false, "reason": ...}``) and ``POST /`` (answers
  ``{"outputs": <inputs>, "rank": 0}``; with ``DSNB_SERVE_TOKEN`` set, only for
  ``Authorization: Bearer <token>``, else 401); every other process with ``LOCAL_RANK`` 0
  answers the two probes only.
- Rank 0 prints what the real server prints: nothing while it loads, then
  ``DSNB_SERVE {"ready": true, "url": "http://<host>:<port>/", ...}`` once loaded, and
  ``DSNB_SERVE {"ready": false, "reason": "stopped"}`` when it stops.
- ``DSNB_STANDIN_FAIL=<text>``: instead of loading, print the text and exit 3 (a loader error).
- SIGTERM: stop serving and exit 0, as the real server drains and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANK = int(os.environ.get("RANK", "0"))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
TOKEN = os.environ.get("DSNB_SERVE_TOKEN")
LOADED = threading.Event()


def report(**fields: object) -> None:
    if RANK == 0:
        print("DSNB_SERVE " + json.dumps(fields), flush=True)


class Handler(BaseHTTPRequestHandler):
    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/healthz":
            self._answer(200, {"alive": True})
        elif self.path == "/readyz" and LOADED.is_set():
            self._answer(200, {"ready": True})
        elif self.path == "/readyz":
            self._answer(503, {"ready": False, "reason": "loading the model"})
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0") or 0)) or b"{}")
        if RANK != 0 or self.path != "/":
            self._answer(404, {"error": "not found"})
        elif TOKEN and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._answer(401, {"error": "a Bearer token is needed"})
        elif not LOADED.is_set():
            self._answer(503, {"error": "loading the model"})
        else:
            self._answer(200, {"outputs": body.get("inputs"), "rank": RANK})

    def log_message(self, *args: object) -> None:
        pass  # quiet: the test reads the ranks' output


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args, _ = parser.parse_known_args()
    server = None
    if RANK == 0 or LOCAL_RANK == 0:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    failure = os.environ.get("DSNB_STANDIN_FAIL")
    if stop.wait(float(os.environ.get("DSNB_STANDIN_LOAD_S", "0.5"))):
        return 0
    if failure:
        print(failure, file=sys.stderr, flush=True)
        return 3
    LOADED.set()
    report(ready=True, url=f"http://{args.host}:{args.port}/", model="standin", kind="tensor", ranks=int(os.environ.get("WORLD_SIZE", "1")))
    while not stop.wait(3600):
        pass
    report(ready=False, reason="stopped")
    if server is not None:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
