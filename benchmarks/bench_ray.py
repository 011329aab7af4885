"""What dsnb's Ray backend costs next to the same TorchTrainer run without dsnb.

Both runs train ``examples/tiny_gpt/train.py`` (2 Ray Train workers, ZeRO-2, CPU, gloo) on
one private Ray head that the benchmark starts once, interleaved within each repetition:

- ``direct``: ``benchmarks/ray_direct_train.py``, a hand-written TorchTrainer driver, submitted
  with Ray's ``JobSubmissionClient`` (the anchor);
- ``dsnb``: ``Cluster("ray").submit(JobSpec(...))`` then ``job.wait()``, as a notebook does.

Two times per run: **wall** (submit until Ray reports the job SUCCEEDED and, for dsnb, until
``job.wait()`` returns) and **first log line** (submit until the first line a training
worker wrote reaches the submitting process: for dsnb the first line ``job.logs(follow=True)``
yields with a rank; for direct the first ``(RayTrainWorker ...)`` line in the job's log other
than Ray's own "Setting up process group", polled as often as dsnb polls). Medians and ratios are written to ``benchmarks/results/ray.md``.

Example::

    python benchmarks/bench_ray.py --reps 2 --steps 20
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from machine import describe

from dsnb import Cluster, JobSpec, JobState

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny_gpt"
RESULTS = ROOT / "benchmarks" / "results" / "ray.md"
POLL_S = 0.5  # as often as dsnb reads a running job's status and log
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours the worker prefixes
RUN_TIMEOUT_S = 900
TARGET_RATIO = 1.05


@dataclass
class Run:
    wall: float
    first_line: float


def run_dsnb(cluster: Cluster, steps: int) -> Run:
    start = time.perf_counter()
    job = cluster.submit(JobSpec(name="bench-dsnb", script="train.py", working_dir=str(EXAMPLE), procs_per_node=2,
                                 args=["--steps", str(steps), "--no-save"], deepspeed=str(EXAMPLE / "ds_config.json")))
    first = None
    for line in job.logs(follow=True):
        if first is None and line.rank >= 0:
            first = time.perf_counter() - start
    status = job.wait(timeout=RUN_TIMEOUT_S)
    wall = time.perf_counter() - start
    assert status.state == JobState.SUCCEEDED and first is not None, status
    return Run(wall, first)


def run_direct(cluster: Cluster, steps: int, storage: str) -> Run:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.backend.dashboard_url)
    workdir = Path(tempfile.mkdtemp(prefix="bench-direct-"))
    for name in ("train.py", "data.txt", "ds_config.json"):
        shutil.copy(EXAMPLE / name, workdir / name)
    shutil.copy(ROOT / "benchmarks" / "ray_direct_train.py", workdir / "ray_direct_train.py")
    start = time.perf_counter()
    job_id = client.submit_job(
        entrypoint=f"python ray_direct_train.py bench-direct {storage} --steps {steps} --no-save",
        runtime_env={"working_dir": str(workdir), "env_vars": {"DS_ACCELERATOR": "cpu", "RAY_DEDUP_LOGS": "0"}},
        entrypoint_num_cpus=0)
    first = None
    while True:
        status = client.get_job_status(job_id)
        if first is None and any(line.startswith("(RayTrainWorker pid=") and "Setting up process group" not in line
                                 for line in _ANSI.sub("", client.get_job_logs(job_id)).splitlines()):
            first = time.perf_counter() - start
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    shutil.rmtree(workdir, ignore_errors=True)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    return Run(wall, first if first is not None else wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    storage = tempfile.mkdtemp(prefix="bench-ray-runs-")
    runs: dict[str, list[Run]] = {"direct": [], "dsnb": []}
    with Cluster("ray", storage_path=storage) as cluster:
        started = time.perf_counter()
        print(f"dashboard {cluster.backend.dashboard_url}")  # starts the head, outside the timed runs
        head_s = time.perf_counter() - started
        print(f"private Ray head up in {head_s:.1f} s", flush=True)
        run_direct(cluster, 2, storage)  # untimed: warms Ray's worker start-up and the file cache
        for rep in range(args.reps):
            order = ("direct", "dsnb") if rep % 2 == 0 else ("dsnb", "direct")
            for name in order:
                run = run_direct(cluster, args.steps, storage) if name == "direct" else run_dsnb(cluster, args.steps)
                runs[name].append(run)
                print(f"rep {rep + 1} {name}: wall {run.wall:.1f} s, first log line {run.first_line:.1f} s", flush=True)
    shutil.rmtree(storage, ignore_errors=True)
    anchor_wall = statistics.median(r.wall for r in runs["direct"])
    anchor_first = statistics.median(r.first_line for r in runs["direct"])
    rows = ["| run | wall (median) | wall vs direct | first log line (median) | first line vs direct | wall of each run |",
            "| --- | --- | --- | --- | --- | --- |"]
    labels = {"direct": "TorchTrainer script, submitted with JobSubmissionClient", "dsnb": "dsnb `Cluster(\"ray\").submit` + `wait`"}
    for name in ("direct", "dsnb"):
        wall = statistics.median(r.wall for r in runs[name])
        first = statistics.median(r.first_line for r in runs[name])
        rows.append(f"| {labels[name]} | {wall:.2f} s | {wall / anchor_wall:.3f}× | {first:.2f} s | {first - anchor_first:+.2f} s | "
                    f"{', '.join(f'{r.wall:.1f}' for r in runs[name])} s |")
    ratio = statistics.median(r.wall for r in runs["dsnb"]) / anchor_wall
    table = "\n".join(rows)
    text = (f"{date.today()}, {describe()}; --reps {args.reps} --steps {args.steps}; head start {head_s:.1f} s (not in the runs)\n\n"
            f"{table}\n\ntarget: dsnb wall ≤ {TARGET_RATIO:.2f}× direct: {'met' if ratio <= TARGET_RATIO else 'NOT met'} ({ratio:.3f}×)\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
