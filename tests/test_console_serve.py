"""``dsnb serve`` and ``dsnb endpoints``: serving from a terminal on the local backend."""

from __future__ import annotations

import io
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("uvicorn")

from rich.console import Console  # noqa: E402
from serving_servers import SERVING_CODE  # noqa: E402

from dsnb import Cluster  # noqa: E402
from dsnb.console import cli  # noqa: E402
from dsnb.status import JobState  # noqa: E402


def dsnb(*argv: str) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    code = cli.main(list(argv), console=console)
    return code, console.file.getvalue()


def test_serve_detached_list_query_and_cancel(dsnb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVE_TOKEN", "cli-token-0123456789")
    code, out = dsnb("serve", "tiny_models:tiny_mlp", "--working-dir", SERVING_CODE, "--name", "mlp", "--detach",
                     "--token-env", "MY_SERVE_TOKEN", "--wait", "180")
    assert code == 0, out
    assert "ready at http://127.0.0.1:" in out and "base_url=" in out and "dsnb cancel mlp-" in out
    assert "cli-token-0123456789" not in out
    (status,) = Cluster().endpoints()
    url = Cluster().endpoint(status.name).url
    request = urllib.request.Request(url, data=b'{"inputs": [[0.0, 1.0, 2.0, 3.0]]}', method="POST",
                                     headers={"Authorization": "Bearer cli-token-0123456789"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200

    code, out = dsnb("endpoints")
    assert code == 0 and status.name in out and "RUNNING" in out and f"{status.name}: {url}" in out
    code, out = dsnb("cancel", status.name)
    assert code == 0 and "CANCELLED" in out
    assert Cluster().endpoints()[0].state == JobState.CANCELLED


def test_serve_in_the_foreground_stops_on_ctrl_c(dsnb_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class InterruptedClock:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds: float) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "time", InterruptedClock)
    code, out = dsnb("serve", "tiny_models:tiny_mlp", "--working-dir", SERVING_CODE, "--name", "fg", "--wait", "180")
    assert code == 130, out
    assert "serving; Ctrl-C stops it" in out and "CANCELLED" in out
    assert Cluster().endpoints()[0].state == JobState.CANCELLED


@pytest.mark.parametrize(("argv", "says"), [
    (["--replicas", "2"], "option --replicas"),
    (["--port", "80"], "option --port"),
    (["--token-env", "DSNB_TEST_UNSET_VARIABLE"], "option --token-env"),
    (["--dtype", "int8"], "option --dtype"),
])
def test_bad_serve_options_exit_2_and_start_nothing(dsnb_home: Path, argv: list[str], says: str) -> None:
    code, out = dsnb("serve", "tiny_models:tiny_mlp", "--working-dir", SERVING_CODE, *argv)
    assert code == 2 and says in out
    assert Cluster().jobs() == []


def test_serve_dryrun_shows_every_rank_and_starts_nothing(dsnb_home: Path) -> None:
    code, out = dsnb("serve", "tiny_models:tiny_mlp", "--working-dir", SERVING_CODE, "--procs", "2", "--dryrun")
    assert code == 0 and out.count("-m dsnb.runtime.server --model tiny_models:tiny_mlp") == 2
    assert Cluster().jobs() == []
    assert dsnb("endpoints") == (0, "no endpoints; serve a model with: dsnb serve MODEL\n")
