"""The Ray job's driver: runs the user's training script on every Ray Train worker with DeepSpeed.

``python -m dsnb.runtime.ray_train_entry`` is the entrypoint dsnb submits through Ray's Job
Submission API (directly, or from a KubeRay RayJob). It reads the job from ``DSNB_RAY_JOB``
(JSON, see :func:`driver_env`), builds a ``TorchTrainer`` with ``ScalingConfig(num_workers=
world size, use_gpu=...)`` and ``TorchConfig(backend="gloo" | "nccl")``, and fits it. On each
worker the user's script (or ``python -m`` module) runs in the worker's own Python, as
``__main__``, and any other command as the worker's child (:func:`program_of`), with the same
environment every dsnb backend gives a rank (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_SIZE``, ``MASTER_ADDR``...; Ray Train sets most, this module the rest), so
``deepspeed.init_distributed()`` finds Ray's process group and reuses it.

Checkpoints go through Ray Train: each worker gets ``DSNB_CHECKPOINT_DIR`` (read it with
:func:`dsnb.checkpoint_dir`), filled from ``ray.train.get_checkpoint()`` when the run has one,
and reported back with ``ray.train.report`` when the script ends. Runs are named after the
job without its unique suffix, so submitting the same spec again resumes from the last
checkpoint (Ray Train keeps its run state under ``storage_path/<name>``).

Log lines: every worker first prints a ``DSNB_RAY_WORKER`` line (its rank and pid); Ray
prefixes each worker line with ``(RayTrainWorker pid=N)``, which dsnb maps back to the rank.
The driver ends with a ``DSNB_RAY_OUTCOME`` line (exit code, failing rank, error).

Example:
    >>> from dsnb import JobSpec
    >>> env = driver_env(JobSpec(name="t-x7k2", script="train.py", procs_per_node=2), "/tmp/ray-runs")
    >>> job = json.loads(env[JOB_ENV])
    >>> job["num_workers"], job["run_name"], job["backend"]
    (2, 't', 'gloo')
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

from dsnb.spec import JobSpec

JOB_ENV = "DSNB_RAY_JOB"
WORKER_TAG = "DSNB_RAY_WORKER "
OUTCOME_TAG = "DSNB_RAY_OUTCOME "
#: The driver's command line; ``python`` is the one on the Ray node's PATH.
DRIVER_ARGV = ("python", "-m", "dsnb.runtime.ray_train_entry")
_SUFFIX = re.compile(r"-[a-z0-9]{4}$")


def run_name(job_name: str) -> str:
    """The Ray Train run a job writes to: its name without the unique suffix.

    Example:
        >>> run_name("tiny-gpt-x7k2")
        'tiny-gpt'
    """
    return _SUFFIX.sub("", job_name)


def program_of(spec: JobSpec) -> dict[str, Any]:
    """What each Ray Train worker runs, as the job record holds it.

    A script (``script=`` or ``command=["python", "x.py", ...]``) and a module
    (``command=["python", "-m", "pkg.mod", ...]``) run in the worker's own Python, where Ray's
    process group already is; any other command runs as a child process of the worker, with the
    rank's variables and a rendezvous port of its own (see :func:`_run_command`). A function
    (``function=``) is called in the worker's own Python by :mod:`dsnb.runtime.function_runner`.

    Example:
        >>> program_of(JobSpec(name="t", command=["python", "-m", "pkg.train", "--lr", "0.1"]))
        {'script': None, 'module': 'pkg.train', 'command': None, 'function': None, 'args': ['--lr', '0.1']}
        >>> program_of(JobSpec(name="t", command=["bash", "run.sh"]))["command"]
        ['bash', 'run.sh']
    """
    program: dict[str, Any] = {"script": None, "module": None, "command": None, "function": None, "args": []}
    if spec.function is not None:
        return {**program, "function": {"payload": spec.function.payload, "python": spec.function.python}}  # type: ignore[union-attr]
    if spec.script is not None:
        return {**program, "script": spec.script, "args": list(spec.args)}
    argv = [*(spec.command or []), *spec.args]
    if len(argv) >= 2 and Path(argv[0]).name.startswith("python"):
        if argv[1].endswith(".py"):
            return {**program, "script": argv[1], "args": argv[2:]}
        if argv[1] == "-m" and len(argv) >= 3:
            return {**program, "module": argv[2], "args": argv[3:]}
    return {**program, "command": argv}


def cpus_per_rank(spec: JobSpec) -> float:
    """Logical CPUs each Ray Train worker asks for: the node's CPUs shared by its ranks, else 1.

    Example:
        >>> from dsnb import JobSpec, Resources
        >>> cpus_per_rank(JobSpec(name="t", script="t.py", procs_per_node=4, resources=Resources(cpu=16)))
        4.0
    """
    cpu = spec.resources.cpu
    return float(cpu) / spec.procs_per_node if isinstance(cpu, (int, float)) else 1.0


def driver_env(spec: JobSpec, storage_path: str) -> dict[str, str]:
    """Environment variables of the Ray job (driver and workers), secrets excluded.

    Args:
        spec: the job, carrying its unique name.
        storage_path: where Ray Train keeps runs and checkpoints (a directory every node
            sees, or a URI such as ``s3://bucket/runs``).

    Raises:
        Nothing: every JobSpec has a program a worker can run (:func:`program_of`).
    """
    use_gpu = spec.resources.gpus > 0
    job = {
        "name": spec.name, **program_of(spec),
        "num_workers": spec.world_size, "procs_per_node": spec.procs_per_node,
        "use_gpu": use_gpu, "cpus_per_worker": cpus_per_rank(spec),
        "backend": spec.dist_backend,
        "max_failures": spec.max_restarts, "timeout": spec.timeout,
        "storage_path": storage_path, "run_name": run_name(spec.name),
    }
    env = {
        JOB_ENV: json.dumps(job, separators=(",", ":")),
        "DSNB_JOB_NAME": spec.name,
        "DSNB_DIST_BACKEND": job["backend"],
        "PYTHONUNBUFFERED": "1",
        # One line per print, in order: Ray's dedup would fold the ranks' equal lines into one,
        # and Train's print patch would write each line twice.
        "RAY_DEDUP_LOGS": "0",
        "RAY_COLOR_PREFIX": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # The script starts in the job's working directory, as on every backend (not in the run's artifacts).
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    if spec.deepspeed_config is not None:
        env["DSNB_DEEPSPEED_CONFIG_JSON"] = json.dumps(spec.deepspeed_config, separators=(",", ":"))
    return env


class RankFailed(RuntimeError):
    """The user's script ended with a non-zero exit code on one rank."""

    def __init__(self, rank: int, exit_code: int) -> None:
        super().__init__(f"rank {rank} exited with code {exit_code}")
        self.rank = rank
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[Any, ...]:
        return (RankFailed, (self.rank, self.exit_code))


def enter_code() -> str | None:
    """On a KubeRay pod of a job that ships its ``working_dir``: unpack it (once per pod, from the ConfigMap
    mounted at ``$DSNB_CODE_BUNDLE``) into ``$DSNB_CODE_DIR`` and go there; None when the job ships none.

    Raises:
        ValueError, OSError: the bundle cannot be unpacked.
    """
    from dsnb.runtime.code_unpack import unpack_from_environment

    where = unpack_from_environment()
    if where is not None:
        os.chdir(where)
    return where


def _worker_loop(job: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: the user's script, between checkpoint restore and report."""
    import ray.train as train

    ctx = train.get_context()
    rank = ctx.get_world_rank()
    announcement = WORKER_TAG + json.dumps({"rank": rank, "pid": os.getpid(), "node": ctx.get_node_rank()})
    print(announcement, flush=True)
    print(announcement, file=sys.stderr, flush=True)  # Ray reads stderr apart: announce there too
    os.environ["LOCAL_SIZE"] = str(ctx.get_local_world_size())  # DeepSpeed's AutoTP reads it
    os.environ["GROUP_RANK"] = str(ctx.get_node_rank())
    ckpt_dir = Path(tempfile.mkdtemp(prefix=f"dsnb-{job['run_name']}-rank{rank}-"))
    os.environ["DSNB_CHECKPOINT_DIR"] = str(ckpt_dir)
    try:
        enter_code()
        previous = train.get_checkpoint()
        if previous is not None:
            previous.to_directory(str(ckpt_dir))
        code = _run_program(job, rank)
        if code:
            raise RankFailed(rank, code)
        saved = any(ckpt_dir.iterdir())
        # ray.train.report is collective (every worker must call it), so the workers agree on
        # whether any of them saved before reporting; a run that saved nothing skips the round.
        # A script that closed the process group (as PyTorch advises) leaves nothing to agree
        # over: then every worker reports, with or without files.
        if not _group_open() or _any_rank(saved):
            from ray.train import Checkpoint

            checkpoint = Checkpoint.from_directory(str(ckpt_dir)) if saved else None
            # The files of every worker merge into one checkpoint (DeepSpeed names its shards per rank).
            train.report({"rank": rank}, checkpoint=checkpoint)
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _group_open() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any worker (an all-reduce over Ray Train's process group)."""
    return bool(_largest(1 if flag else 0))


def _largest(number: int) -> int:
    """The largest of ``number`` over the workers (an all-reduce over Ray Train's process group)."""
    import torch
    import torch.distributed as dist

    if not _group_open():
        return number
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([number], device=device, dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _run_program(job: dict[str, Any], rank: int) -> int:
    """Run the job's script, module or command on this worker; its exit code."""
    if job.get("script"):
        return _run_script(job["script"], job["args"])
    if job.get("module"):
        return _run_in_process(lambda: runpy.run_module(job["module"], run_name="__main__", alter_sys=True),
                               [job["module"], *job["args"]], os.getcwd())
    if job.get("function"):
        from dsnb.runtime import function_runner

        called = job["function"]
        return _run_in_process(lambda: function_runner.main([called["payload"], called["python"]]), ["-c"], os.getcwd())
    return _run_command(job["command"], rank)


def _run_command(argv: list[str], rank: int) -> int:
    """Run a command as a child of this worker, with the rank's variables, and wait for it.

    Ray Train's own process group holds ``MASTER_PORT`` on rank 0's node, so a child that
    starts its own (``deepspeed.init_distributed()``) gets another port: rank 0 picks a free one
    and the workers agree on it through Ray's group. The child writes to the worker's output,
    which Ray prefixes with the worker's pid, so its lines keep their rank.
    """
    port = _largest(_free_port() if rank == 0 else 0)
    env = {**os.environ, "MASTER_PORT": str(port)}
    return subprocess.call(argv, env=env)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _run_script(script: str, args: list[str]) -> int:
    """Run ``script`` as ``__main__`` here; its exit code (0 when it returns)."""
    return _run_in_process(lambda: runpy.run_path(script, run_name="__main__"), [script, *args],
                           str(Path(script).resolve().parent))


def _run_in_process(run: Any, argv: list[str], path: str) -> int:
    """Call ``run`` with ``sys.argv`` and ``sys.path[0]`` as a script would see them; its exit code."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = list(argv)
    sys.path.insert(0, path)
    try:
        run()
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr, flush=True)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _outcome_of(error: BaseException) -> dict[str, Any]:
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        text = str(failures[rank])
        found = re.search(r"exited with code (-?\d+)", text)
        code = int(found.group(1)) if found else 1
        return {"exit_code": 1, "failed_rank": rank, "rank_exit_code": code, "error": text.strip().splitlines()[-1][:500]}
    return {"exit_code": 1, "failed_rank": None, "error": (str(error).strip().splitlines() or [type(error).__name__])[-1][:500]}


def main() -> int:
    """Fit the job in ``DSNB_RAY_JOB``; print the outcome line; return the driver's exit code."""
    job = json.loads(os.environ[JOB_ENV])
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": job["cpus_per_worker"]}
    if job["use_gpu"]:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        lambda _config: _worker_loop(job),
        scaling_config=ScalingConfig(num_workers=job["num_workers"], use_gpu=job["use_gpu"], resources_per_worker=resources),
        torch_config=TorchConfig(backend=job["backend"]),
        run_config=RunConfig(name=job["run_name"], storage_path=job["storage_path"],
                             failure_config=FailureConfig(max_failures=job["max_failures"])),
    )
    if job.get("timeout"):
        # A watchdog, not SIGALRM: fit() waits inside Ray's C++ code, where a Python signal
        # handler may not run for as long as the run lasts. Ending the driver ends the job's
        # actors (the Train controller and its workers) with it.
        def _timed_out() -> None:
            error = f"the job ran longer than its timeout of {job['timeout']:g} s and was stopped"
            print(OUTCOME_TAG + json.dumps({"exit_code": 1, "failed_rank": None, "error": error, "timeout": True}), flush=True)
            os._exit(1)

        watchdog = threading.Timer(float(job["timeout"]), _timed_out)
        watchdog.daemon = True
        watchdog.start()
    try:
        trainer.fit()
        outcome: dict[str, Any] = {"exit_code": 0}
    except Exception as e:  # the outcome line carries it; the traceback goes to the log
        traceback.print_exc()
        outcome = _outcome_of(e)
    print(OUTCOME_TAG + json.dumps(outcome), flush=True)
    return int(outcome["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
