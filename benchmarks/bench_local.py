"""What dsnb's local backend costs next to torchrun and the DeepSpeed launcher.

Runs ``examples/tiny_gpt/train.py`` (2 ranks, ZeRO-2, CPU) through three launchers,
interleaved within each repetition so that machine noise hits all of them alike:

- ``dsnb``: ``Cluster().submit(JobSpec(...))`` then ``job.wait()``, as a notebook does;
- ``torchrun --nproc_per_node 2``: the anchor every ratio is taken against;
- ``deepspeed --num_gpus 2`` with ``DS_ACCELERATOR=cpu``.

Every launcher gets the same ``OMP_NUM_THREADS``. Two times are taken per run:

- wall: launch until every process has exited (for dsnb: until ``job.wait()`` returns);
- first step: launch until rank 0 finished step 1, read from the
  ``first step done at t_wall=<epoch seconds>`` line the script prints.

The medians are printed as a markdown table and written to ``benchmarks/results/local.md``.

Example::

    python benchmarks/bench_local.py --reps 3        # or: make bench
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from machine import describe

from dsnb import Cluster, JobSpec

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "tiny_gpt" / "train.py"
DS_CONFIG = ROOT / "examples" / "tiny_gpt" / "ds_config.json"
RESULTS = ROOT / "benchmarks" / "results" / "local.md"
LAUNCHERS = ("torchrun", "dsnb", "deepspeed")
ANCHOR = "torchrun"
RANKS = 2
RUN_TIMEOUT_S = 900
TARGET_WALL_PCT = 2.0
TARGET_FIRST_STEP_S = 1.0
_FIRST_STEP = re.compile(r"^first step done at t_wall=([0-9.]+)$", re.MULTILINE)


@dataclass
class Run:
    """One timed run of one launcher."""

    launcher: str
    wall_s: float
    first_step_s: float
    final_loss: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_args(steps: int, workdir: Path) -> list[str]:
    return ["--steps", str(steps), "--no-resume", "--no-save", "--report-every", "10",
            "--checkpoint-dir", str(workdir / "ckpt")]


def parse_output(text: str, launcher: str) -> tuple[float, float]:
    """(t_wall of step 1, loss of the last reported step) from a rank-0 output."""
    first = _FIRST_STEP.search(text)
    losses = re.findall(r'DSNB_METRIC \{"step": \d+, "loss": ([0-9.eE+-]+)', text)
    if not first or not losses:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"{launcher}: no first-step marker or loss in the output; last lines:\n{tail}")
    return float(first.group(1)), float(losses[-1])


def remove_shm_leftovers(port: int) -> None:
    # torchrun and the deepspeed launcher leave DeepSpeed's CPU all-reduce segments behind.
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        Path(path).unlink(missing_ok=True)


def run_cli(launcher: str, steps: int, env: dict[str, str], workdir: Path) -> Run:
    """torchrun or the deepspeed launcher, as a subprocess whose output goes to a file."""
    port = free_port()
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        argv = [str(bindir / "torchrun"), "--nproc_per_node", str(RANKS), "--master_port", str(port)]
    else:
        argv = [str(bindir / "deepspeed"), "--num_gpus", str(RANKS), "--master_port", str(port)]
    argv += [str(SCRIPT), *script_args(steps, workdir), "--deepspeed-config", str(DS_CONFIG)]
    log = workdir / f"{launcher}.log"
    with open(log, "w") as out:
        start = time.time()
        code = subprocess.call(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, timeout=RUN_TIMEOUT_S)
        wall = time.time() - start
    remove_shm_leftovers(port)
    text = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"{launcher} exited with {code}; see {log}:\n" + "\n".join(text.splitlines()[-30:]))
    t_first, loss = parse_output(text, launcher)
    return Run(launcher, wall, t_first - start, loss)


def run_dsnb(steps: int, workdir: Path) -> Run:
    """The local backend, driven the way a notebook drives it (dsnb already imported)."""
    start = time.time()
    spec = JobSpec(name="bench", script=str(SCRIPT), procs_per_node=RANKS, deepspeed=str(DS_CONFIG),
                   args=script_args(steps, workdir), working_dir=str(workdir))
    cluster = Cluster("local", home=workdir / "dsnb-jobs")
    job = cluster.submit(spec)
    job.wait(timeout=RUN_TIMEOUT_S)
    wall = time.time() - start
    text = "\n".join(line.text for line in job.logs(rank=0))
    t_first, loss = parse_output(text, "dsnb")
    cluster.close()
    return Run("dsnb", wall, t_first - start, loss)


def median(runs: list[Run], launcher: str, field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs if r.launcher == launcher)


def table(runs: list[Run], launchers: list[str]) -> str:
    anchor_wall, anchor_first = median(runs, ANCHOR, "wall_s"), median(runs, ANCHOR, "first_step_s")
    rows = [
        "| launcher | wall (median) | wall vs torchrun | launch → first step (median) | first step vs torchrun | final loss | wall of each run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in launchers:
        wall, first = median(runs, name, "wall_s"), median(runs, name, "first_step_s")
        mine = [r for r in runs if r.launcher == name]
        walls = ", ".join(f"{r.wall_s:.1f}" for r in mine)
        rows.append(
            f"| {label(name)} | {wall:.2f} s | {wall / anchor_wall:.3f}× ({100 * (wall / anchor_wall - 1):+.1f}%) "
            f"| {first:.2f} s | {first / anchor_first:.3f}× ({first - anchor_first:+.2f} s) "
            f"| {mine[-1].final_loss:.3f} | {walls} s |"
        )
    return "\n".join(rows)


def label(name: str) -> str:
    return {"dsnb": "dsnb local (`submit` + `wait`)", "torchrun": f"`torchrun --nproc_per_node {RANKS}`",
            "deepspeed": f"`deepspeed --num_gpus {RANKS}`"}[name]


def machine() -> str:
    import deepspeed
    import torch

    import dsnb
    return describe(torch=torch.__version__, DeepSpeed=deepspeed.__version__, dsnb=dsnb.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per launcher (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // RANKS),
                        help="OMP_NUM_THREADS for every rank of every launcher (default: %(default)s)")
    parser.add_argument("--launchers", default=",".join(LAUNCHERS),
                        help="comma-separated subset of %(default)s; torchrun is always run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown output (default: %(default)s)")
    args = parser.parse_args(argv)
    launchers = [n for n in LAUNCHERS if n in args.launchers.split(",") or n == ANCHOR]

    # Set in this process too: dsnb's ranks inherit the caller's environment.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    env = dict(os.environ)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="dsnb-bench-") as tmp:
        # Untimed: builds DeepSpeed's shm op on a fresh machine and warms the file cache.
        print("warm-up run (untimed) ...", flush=True)
        warm = Path(tmp) / "warmup"
        warm.mkdir()
        run_cli(ANCHOR, 2, env, warm)
        for rep in range(args.reps):
            # Rotate the order too, so that no launcher always runs first after a pause.
            order = launchers[rep % len(launchers):] + launchers[:rep % len(launchers)]
            for name in order:
                workdir = Path(tmp) / f"{name}-{rep}"
                workdir.mkdir()
                run = run_dsnb(args.steps, workdir) if name == "dsnb" else run_cli(name, args.steps, env, workdir)
                runs.append(run)
                print(f"rep {rep + 1}/{args.reps} {name:9s} wall {run.wall_s:6.2f} s  "
                      f"first step {run.first_step_s:6.2f} s  final loss {run.final_loss:.3f}", flush=True)
                shutil.rmtree(workdir, ignore_errors=True)

    body = table(runs, launchers)
    lines = [f"# Local launch overhead, {date.today().isoformat()}", "",
             f"Machine: {machine()}.", "",
             f"Workload: `examples/tiny_gpt/train.py`, {RANKS} ranks, ZeRO-2, {args.steps} steps, no checkpoint; "
             f"OMP_NUM_THREADS={args.threads} for every launcher; median of {args.reps} interleaved runs.", "",
             body, ""]
    if "dsnb" in launchers:
        wall_pct = 100 * (median(runs, "dsnb", "wall_s") / median(runs, ANCHOR, "wall_s") - 1)
        first_s = median(runs, "dsnb", "first_step_s") - median(runs, ANCHOR, "first_step_s")
        verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        lines += [f"dsnb vs torchrun: wall {wall_pct:+.1f}% (target < {TARGET_WALL_PCT:g}%: "
                  f"{verdict(wall_pct < TARGET_WALL_PCT)}), first step {first_s:+.2f} s "
                  f"(target < {TARGET_FIRST_STEP_S:g} s: {verdict(first_s < TARGET_FIRST_STEP_S)}).", ""]
    report = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print()
    print(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
