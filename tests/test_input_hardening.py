"""Inputs that used to pass validation and then misbehave: trailing newlines, nan and inf, odd NCCL keys,
placeholders and ``$(VAR)`` in the user's arguments, absurd world sizes; a token that followed a
redirect; escape sequences from a job reaching the terminal."""

from __future__ import annotations

import http.server
import io
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dsnb import Cluster, InvalidSpecError, JobSpec, PodOptions, Resources, ServeSpec
from dsnb.runtime import pod_entry as entry

IMAGE = "registry.example/train:1"


@pytest.mark.parametrize("build, field", [
    (lambda: JobSpec(name="job\n", script="t.py"), "name"),
    (lambda: JobSpec(name="job", script="t.py", env={"FOO\n": "1"}), "env"),
    (lambda: JobSpec(name="job", script="t.py", resources=Resources(memory="4Gi\n")), "resources.memory"),
    (lambda: ServeSpec(name="m", model="pkg.mod:build\n"), "model"),
    (lambda: PodOptions(service_account="sa\n"), "options.service_account"),
    (lambda: PodOptions(nccl={"NCCL_A=B C": "1"}), "options.nccl"),
    (lambda: JobSpec(name="job", script="t.py", timeout=math.nan), "timeout"),
    (lambda: JobSpec(name="job", script="t.py", timeout=math.inf), "timeout"),
    (lambda: JobSpec(name="job", script="t.py", resources=Resources(cpu=math.inf)), "resources.cpu"),
    (lambda: JobSpec(name="job", script="t.py", resources=Resources(cpu=math.nan)), "resources.cpu"),
    (lambda: JobSpec(name="job", script="t.py", procs_per_node=100_000), "procs_per_node"),
], ids=["name-newline", "env-key-newline", "memory-newline", "loader-newline", "service-account-newline", "nccl-key",
        "timeout-nan", "timeout-inf", "cpu-inf", "cpu-nan", "world-size"])
def test_input_that_used_to_pass_is_refused_naming_its_field(build, field: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        build()
    assert info.value.field.startswith(field), info.value


def test_a_local_job_past_what_the_machine_can_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("")
    with pytest.raises(InvalidSpecError, match="more than this machine can run") as info:
        Cluster().dryrun(JobSpec(name="job", script="t.py", working_dir=str(tmp_path), nodes=64, procs_per_node=64))
    assert info.value.field == "procs_per_node"


def test_placeholders_in_the_users_arguments_are_left_as_given(tmp_path: Path) -> None:
    env = {**os.environ, "DSNB_SET": "j", "DSNB_POD_NAME": "j-1", "DSNB_STATE_DIR": str(tmp_path),
           "DSNB_TERMINATION_LOG": str(tmp_path / "termination-log"), "DSNB_LAUNCHER_ARGC": "4"}
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "--node={node_rank}", "--out={node_rank}/{hostfile}"]
    done = subprocess.run([sys.executable, entry.__file__, *argv], env=env, capture_output=True, text=True, timeout=30)
    assert "['--node=1', '--out={node_rank}/{hostfile}']" in done.stdout  # dsnb's own argument filled, the user's not


@pytest.mark.parametrize("backend", ["statefulset", "mpijob"])
def test_the_kubelet_does_not_expand_the_users_arguments(backend: str) -> None:
    spec = JobSpec(name="job", script="train.py", args=["--home=$(HOME)", "--price=$$5"], image=IMAGE)
    plan = Cluster(backend, namespace="ml").dryrun(spec)
    text = json.dumps(plan.manifests)
    assert "--home=$$(HOME)" in text and "--price=$$$$5" in text and '"--home=$(HOME)"' not in text


def test_a_redirect_does_not_carry_the_endpoints_token() -> None:
    from dsnb.serving.endpoint import Endpoint

    seen: list[dict[str, str]] = []

    class Target(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"outputs": [1]}')

        def log_message(self, *args) -> None:
            pass

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirect(Target):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{target.server_address[1]}/elsewhere")
            self.end_headers()

    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (target, first):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        class Backend:
            def endpoint_url(self, name: str) -> str:
                return f"http://127.0.0.1:{first.server_address[1]}/"

            def endpoint_headers(self, name: str) -> dict[str, str]:
                return {"Authorization": "Bearer tok-1"}

        assert Endpoint(Backend(), "e").predict([1]) == {"outputs": [1]}
    finally:
        for server in (target, first):
            server.shutdown()
            server.server_close()
    assert len(seen) == 1 and not any(k.lower() == "authorization" for k in seen[0])


def test_dsnb_logs_prints_no_escape_sequence(tmp_path: Path) -> None:
    from rich.console import Console

    from dsnb.console.cli import main

    (tmp_path / "noisy.py").write_text("print('before\\x1b[2J\\x1b]52;c;aGk=\\x07after', flush=True)")
    job = Cluster().submit(JobSpec(name="noisy", script="noisy.py", working_dir=str(tmp_path)))
    job.wait(timeout=60)
    console = Console(file=io.StringIO(), width=200)
    assert main(["logs", job.name], console=console) == 0
    out = console.file.getvalue()
    assert "beforeafter" in out and "\x1b" not in out and "\x07" not in out
