"""Two clients changing a Ray cluster's Serve applications at once keep each other's.

Ray Serve's REST API takes the whole set of applications in one ``PUT``; a client that read the
set, then wrote it back with its change, would drop an application another client deployed in
between. ``ServeClient.change`` locks within a process and, across processes, reads the set
back for a few seconds after its write, writing again while its change is not there.

The unit test below plays a rival writer with a stale read against a stand-in of the REST API
(``GET``/``PUT`` of the whole set, the last ``PUT`` wins, as Ray's declarative API does); the
Ray test deploys two models at once on a real private head.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dsnb.backends.ray import serve as serve_module
from dsnb.backends.ray.serve import ServeClient


class DeclarativeServe:
    """The Serve REST API's contract: GET the applications, PUT the whole set (the last PUT wins).

    As Ray 2.60's ``ray/serve/_private/application_state.py`` does, an application left out of a
    PUT is not gone at once: it stays listed, with its config and status ``DELETING``, for
    ``deleting_s`` (until its replicas have stopped).
    """

    def __init__(self, deleting_s: float = 1.5) -> None:
        self.applications: dict[str, dict] = {}
        self.deleting: dict[str, tuple[dict, float]] = {}  # name -> (config, listed until)
        self.deleting_s = deleting_s
        self.puts = 0
        self.after_put = None  # called after each PUT, to play another client
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                now = time.monotonic()
                listed = {name: {"deployed_app_config": config, "status": "DELETING"}
                          for name, (config, until) in outer.deleting.items() if until > now}
                listed.update({name: {"deployed_app_config": config, "status": "RUNNING"}
                               for name, config in outer.applications.items()})
                self._answer(json.dumps({"applications": listed}).encode())

            def do_PUT(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stated = {app["name"]: app for app in body["applications"]}
                until = time.monotonic() + outer.deleting_s
                outer.deleting.update({name: (config, until) for name, config in outer.applications.items()
                                       if name not in stated})
                for name in stated:
                    outer.deleting.pop(name, None)
                outer.applications = stated
                outer.puts += 1
                self._answer(b"")
                if outer.after_put is not None:
                    hook, outer.after_put = outer.after_put, None
                    hook()

            def _answer(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_a_deploy_undone_by_a_stale_writer_is_made_again(monkeypatch) -> None:
    monkeypatch.setattr(serve_module, "SETTLE_S", 1.0)
    api = DeclarativeServe()
    api.applications = {"theirs": {"name": "theirs", "import_path": "x:y"}}
    stale = dict(api.applications)  # what another client read before our write

    def rival() -> None:  # another process's PUT, from its stale read: ours is dropped
        time.sleep(0.2)
        api.applications = {**stale, "rival": {"name": "rival", "import_path": "r:s"}}

    api.after_put = lambda: threading.Thread(target=rival).start()
    try:
        ServeClient(api.url, {}).change("ours", {"name": "ours", "import_path": "o:p"}, None)
        assert sorted(api.applications) == ["ours", "rival", "theirs"]  # nobody's application lost
        assert api.puts == 2  # written again once it was seen undone
    finally:
        api.server.shutdown()
        api.server.server_close()


def test_a_removal_holds_while_serve_still_lists_the_application_as_deleting(monkeypatch) -> None:
    monkeypatch.setattr(serve_module, "SETTLE_S", 0.5)
    api = DeclarativeServe(deleting_s=5.0)
    api.applications = {"ours": {"name": "ours", "import_path": "o:p"}, "theirs": {"name": "theirs", "import_path": "x:y"}}
    try:
        client = ServeClient(api.url, {})
        client.change("ours", None, None)
        assert client.applications()["ours"]["status"] == "DELETING"  # still listed while it is removed
        assert api.puts == 1  # the DELETING listing is the removal holding, not another client's undo
        # A change of another application does not write the one being deleted back.
        client.change("new", {"name": "new", "import_path": "n:m"}, None)
        assert sorted(api.applications) == ["new", "theirs"]
    finally:
        api.server.shutdown()
        api.server.server_close()


def test_a_change_that_never_holds_gives_up_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(serve_module, "SETTLE_S", 0.2)
    api = DeclarativeServe()
    original_put = ServeClient.put

    def put_then_lose(self, applications, http_options) -> None:
        original_put(self, applications, http_options)
        api.applications = {}  # every write is undone at once

    monkeypatch.setattr(ServeClient, "put", put_then_lose)
    try:
        from dsnb import ClusterError

        with pytest.raises(ClusterError, match="changed by another client each time"):
            ServeClient(api.url, {}).change("ours", {"name": "ours"}, None)
    finally:
        api.server.shutdown()
        api.server.server_close()


@pytest.mark.timeout(900)
def test_two_models_deployed_at_once_both_run(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from dsnb import Cluster, JobState, ServeSpec

    code = str(Path(__file__).parent / "serving_code")
    with Cluster("ray", storage_path=str(tmp_path)) as first, Cluster("ray", storage_path=str(tmp_path)) as second:
        endpoints: dict[str, object] = {}
        errors: list[BaseException] = []

        def deploy(cluster, name: str) -> None:
            try:
                endpoints[name] = cluster.serve(ServeSpec(name=name, model="tiny_models:tiny_mlp", working_dir=code))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=deploy, args=(c, n)) for c, n in ((first, "alpha"), (second, "beta"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        assert not errors, errors
        try:
            running = {s.name.rsplit("-", 1)[0]: s.state for s in first.endpoints()}
            assert running == {"alpha": JobState.RUNNING, "beta": JobState.RUNNING}
            for endpoint in endpoints.values():
                assert len(endpoint.predict({"inputs": [[1.0, 2.0, 3.0, 4.0]]})["outputs"]) == 1
        finally:
            for endpoint in endpoints.values():
                endpoint.stop()
