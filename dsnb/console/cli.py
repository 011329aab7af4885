"""The ``dsnb`` command: run, watch, list, follow and stop jobs from a terminal.

Examples::

    dsnb run train.py --procs 2 --deepspeed ds_config.json     # live view until it ends
    dsnb run train.py --procs 2 --detach                       # start it and return
    dsnb jobs                                                  # table of jobs
    dsnb logs train-x7k2 -f --rank 1                           # follow one rank
    dsnb status train-x7k2
    dsnb cancel train-x7k2
    dsnb dryrun train.py --procs 2                             # the commands, nothing started
    dsnb demo                                                  # the bundled tiny GPT, 2 ranks
    dsnb check --backend statefulset --gpus 8 --nodes 2        # can this cluster run it? (exit 1 if not)
    dsnb rbac --namespace ml --user alice@example.com          # the Role a Kubernetes backend needs
    dsnb serve /models/minilm --name minilm                    # serve a model until Ctrl-C
    dsnb serve models:build --procs 2 --detach                 # 2 tensor-parallel ranks, return at once
    dsnb serve /models/llama --backend statefulset --dryrun    # the YAML, nothing created
    dsnb endpoints                                             # served models and their URLs

Options of ``run`` and ``dryrun`` may come before or after SCRIPT; every other argument goes
to the script. Put script arguments that share a name with a dsnb option after ``--``.

Exit codes: 0 the job SUCCEEDED (or the command did its work), 1 the job FAILED or was
cancelled, or a dsnb error, 2 invalid input (nothing started), 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.markup import escape

import dsnb
from dsnb.backends.base import backend_options, load_backend, resolve_name
from dsnb.backends.local.jobdir import dsnb_home
from dsnb.backends.options import BUILTIN_OPTIONS, Option
from dsnb.cluster import Cluster
from dsnb.console.text import printable
from dsnb.console.view import jobs_table, render, status_view
from dsnb.errors import ClusterError, DsnbError, InvalidSpecError, JobFailed
from dsnb.formatting import format_duration
from dsnb.job import Job
from dsnb.monitor import JobMonitor
from dsnb.secrets import is_secret
from dsnb.spec import JobSpec, Resources, suggest_name
from dsnb.status import JobState, JobStatus

if TYPE_CHECKING:
    from dsnb.serving import ServeSpec

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
REFRESH_S = 0.25
DEMO_NAME = "tiny-gpt"

#: Spec fields and the options that set them, to point at the option in error messages.
_OPTION_OF_FIELD = {
    "name": "--name", "nodes": "--nodes", "procs_per_node": "--procs", "deepspeed": "--deepspeed",
    "env": "--env", "timeout": "--timeout", "hang_timeout": "--hang-timeout", "max_restarts": "--max-restarts", "script": "SCRIPT",
    "working_dir": "--working-dir", "resources.gpus": "--gpus",
    # dsnb serve
    "model": "MODEL", "replicas": "--replicas", "dtype": "--dtype", "port": "--port",
    "max_batch_size": "--max-batch-size", "token": "--token-env", "image": "--image",
}


@dataclass
class _Ui:
    out: Console
    err: Console


def examples_dir() -> Path:
    """The ``examples/`` directory of the dsnb checkout this package was installed from.

    Example:
        >>> examples_dir().name
        'examples'
    """
    return Path(dsnb.__file__).resolve().parents[1] / "examples"


# -- argument parsing ------------------------------------------------------------------------
def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", nargs="?", help="Python script to run on every rank (arguments after it go to it)")
    parser.add_argument("--procs", type=int, default=1, metavar="N", help="ranks per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    parser.add_argument("--deepspeed", metavar="CFG", help="DeepSpeed config: a JSON file, or inline JSON")
    parser.add_argument("--name", help="job name (default: from the script's file name); a unique suffix is added")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for every rank (repeatable)")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop the job and mark it FAILED after S seconds")
    parser.add_argument("--hang-timeout", type=float, metavar="S",
                        help="fail the job when a rank writes nothing for S seconds while the others go on (local)")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="K", help="restart all ranks up to K times after a failure")
    parser.add_argument("--gpus", type=int, default=0, metavar="G", help="GPUs per node (default 0: CPU with gloo)")
    parser.add_argument("--working-dir", metavar="DIR", help="where the ranks start (default: the current directory)")
    parser.add_argument("--image", help="container image (Kubernetes backends)")
    _add_cluster_options(parser)


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="local", help="backend name (default: local)")
    group = parser.add_argument_group("backend options", "each taken by the backends that list it (dsnb check shows them)")
    for option, backends in _cli_options().items():
        group.add_argument(option.flag, dest=_dest(option), choices=option.choices, metavar=option.name.upper().replace("_", "-"),
                           help=f"{option.help} [{', '.join(backends)}]")
    group.add_argument("--kuberay", action="store_true", help="with --backend ray: the same as --backend kuberay")


def _dest(option: Option) -> str:
    return f"backend_{option.name}"


def _cli_options() -> dict[Option, list[str]]:
    """Every command-line option of the built-in backends, once, with the backends that take it."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for backend, options in BUILTIN_OPTIONS.items():
        for option in options:
            if option.on_command_line:
                found.setdefault(option.name, (option, []))[1].append(backend)
    return {option: backends for option, backends in found.values()}


def _cluster(args: argparse.Namespace) -> Cluster:
    """The Cluster the arguments name, with the backend options given.

    Raises:
        BackendUnavailable: unknown backend or missing extra.
        ClusterError: an option given to a backend that does not take it (and which do).
        InvalidSpecError: an option's value is not one it takes.
    """
    name, _ = resolve_name(args.backend, {"kuberay": True} if getattr(args, "kuberay", False) else {})
    load_backend(name)  # an unknown backend or a missing extra: the install hint
    takes = {option.name: option for option in backend_options(name) if option.on_command_line}
    offered = _cli_options()
    given = {option: getattr(args, _dest(option)) for option in offered if getattr(args, _dest(option), None) is not None}
    refused = {option.flag: ", ".join(offered[option]) for option in given if option.name not in takes}
    if refused:
        raise ClusterError(f"backend {name!r}", f"takes no {', '.join(refused)}",
                           "; ".join(f"{flag} is for {backends}" for flag, backends in refused.items()))
    return Cluster(name, **{option.name: takes[option.name].parse(value) for option, value in given.items()})


def build_parser() -> argparse.ArgumentParser:
    """The ``dsnb`` argument parser (subcommands run, dryrun, jobs, logs, status, cancel, demo, check, serve, endpoints, rbac,
    estimate)."""
    parser = argparse.ArgumentParser(
        prog="dsnb", description="Launch, watch and stop distributed DeepSpeed jobs.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"dsnb {dsnb.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="start a job and watch it until it ends", allow_abbrev=False)
    _add_job_options(run)
    run.add_argument("--detach", action="store_true", help="start the job and return at once")

    dry = sub.add_parser("dryrun", help="show what run would start; start nothing", allow_abbrev=False)
    _add_job_options(dry)

    jobs = sub.add_parser("jobs", help="list jobs", allow_abbrev=False)
    _add_cluster_options(jobs)

    logs = sub.add_parser("logs", help="print a job's log lines", allow_abbrev=False)
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--rank", type=int, help="only this rank")
    logs.add_argument("--tail", type=int, metavar="N", help="start with the last N lines")
    _add_cluster_options(logs)

    for name, text in (("status", "show a job's status"), ("cancel", "stop a job and everything it started")):
        cmd = sub.add_parser(name, help=text, allow_abbrev=False)
        cmd.add_argument("name")
        _add_cluster_options(cmd)

    demo = sub.add_parser("demo", help="run the bundled tiny GPT example on 2 ranks", allow_abbrev=False)
    demo.add_argument("--detach", action="store_true", help="start the job and return at once")
    demo.add_argument("--steps", type=_positive_steps, default=60, help="optimizer steps to train (default: %(default)s)")
    demo.add_argument("--backend", default="local")

    check = sub.add_parser("check", help="check a backend can run jobs (access, permissions, GPUs); start nothing",
                           allow_abbrev=False)
    _add_cluster_options(check)
    check.add_argument("--gpus", type=int, default=0, metavar="G", help="also check for nodes offering G GPUs each")
    check.add_argument("--nodes", type=int, metavar="M", help="nodes the job needs (default 1)")
    check.add_argument("--procs", type=int, metavar="N", help="ranks per node (default: one per GPU, else 1)")
    check.add_argument("--model", metavar="MODEL", help="also estimate whether this model trains here: a parameter "
                                                        "count (7e9) or a Hugging Face model directory")
    check.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage, with --model")
    check.add_argument("--seq-len", type=int, metavar="S", help="tokens per sample, for the activations (with --model)")

    serve = sub.add_parser("serve", help="serve a model (until Ctrl-C, or --detach)", allow_abbrev=False)
    serve.add_argument("model", help="a loader 'module:function' or a Hugging Face model directory")
    serve.add_argument("--name", help="endpoint name, also the model's name in the APIs (default: from MODEL)")
    serve.add_argument("--procs", type=int, default=1, metavar="N", help="ranks per node; the model is split over all ranks")
    serve.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    serve.add_argument("--replicas", type=int, default=1, metavar="R", help="copies of the model (Ray Serve)")
    serve.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    serve.add_argument("--port", type=int, default=8000, help="rank 0's port on Kubernetes (local picks a free one)")
    serve.add_argument("--max-batch-size", type=int, default=16, metavar="B", help="requests per forward pass at most")
    serve.add_argument("--token-env", metavar="VAR", help="require the bearer token held by environment variable VAR")
    serve.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable for every rank (repeatable)")
    serve.add_argument("--gpus", type=int, default=0, metavar="G", help="GPUs per node")
    serve.add_argument("--working-dir", metavar="DIR", help="where a loader's module lives (default: the current directory)")
    serve.add_argument("--image", help="container image (Kubernetes backends, KubeRay)")
    serve.add_argument("--dryrun", action="store_true", help="show what would start (commands or YAML); start nothing")
    serve.add_argument("--detach", action="store_true", help="return once the endpoint answers")
    serve.add_argument("--wait", type=float, default=600, metavar="S", help="seconds to wait for the endpoint (default 600)")
    _add_cluster_options(serve)

    endpoints = sub.add_parser("endpoints", help="list served models and their URLs", allow_abbrev=False)
    _add_cluster_options(endpoints)

    rbac = sub.add_parser("rbac", help="print the Role and RoleBinding a Kubernetes backend needs", allow_abbrev=False)
    rbac.add_argument("--backend", default="statefulset", help="a Kubernetes backend (default: statefulset)")
    rbac.add_argument("--namespace", help="where the jobs go (default: the kubeconfig context's, else default)")
    rbac.add_argument("--name", default="dsnb", help="name of the Role and the RoleBinding (default: dsnb)")
    rbac.add_argument("--kueue", action="store_true", help="also what queueing jobs with Kueue needs (PodOptions(queue=...))")
    subject = rbac.add_mutually_exclusive_group()
    subject.add_argument("--user", metavar="NAME", help="bind it to this user (your kubeconfig login)")
    subject.add_argument("--group", metavar="NAME", help="bind it to this group")
    subject.add_argument("--service-account", metavar="NAME",
                         help="bind it to this service account of the namespace (your notebook server's; "
                              "'default' only with a warning: every pod that names no account runs as it)")

    estimate = sub.add_parser("estimate", help="estimate the memory a training job needs per GPU and per node; "
                              "start nothing", allow_abbrev=False)
    estimate.add_argument("model", help="a parameter count (7e9), or a Hugging Face model directory (its config.json)")
    estimate.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    estimate.add_argument("--offload-optimizer", action="store_true", help="optimizer states on the CPU")
    estimate.add_argument("--offload-params", action="store_true", help="parameters on the CPU (ZeRO stage 3)")
    estimate.add_argument("--procs", type=int, default=1, metavar="N", help="GPUs (ranks) per node")
    estimate.add_argument("--nodes", type=int, default=1, metavar="M")
    estimate.add_argument("--seq-len", type=int, metavar="S", help="tokens per sample, for the activations")
    estimate.add_argument("--micro-batch", type=int, default=1, metavar="B", help="samples per GPU per step")
    estimate.add_argument("--gpu-gib", type=float, metavar="G", help="GiB per GPU to compare with (default: this machine's)")
    return parser


def _parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            # Never echo what may be a secret typed with the wrong separator (HF_TOKEN:hf_...).
            name = item.split(":")[0].split(" ")[0]
            shown = f"the item for {name!r} (its value is not shown)" if is_secret(name, item) else repr(item)
            raise InvalidSpecError("env", f"{shown} is not KEY=VALUE", "write --env KEY=VALUE")
        env[key] = value
    return env


def _parse_deepspeed(value: str | None) -> dict | str | None:
    if value is None or not value.lstrip().startswith("{"):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise InvalidSpecError("deepspeed", f"inline JSON is invalid ({e.msg} at column {e.colno})", "pass a JSON file or valid JSON") from e


def spec_from_args(args: argparse.Namespace, script_args: list[str]) -> JobSpec:
    """The JobSpec that ``run``/``dryrun`` options describe.

    Raises:
        InvalidSpecError: an invalid option value (the field and the fix named).

    Example:
        >>> ns = build_parser().parse_args(["run", "train.py", "--procs", "2"])
        >>> spec_from_args(ns, ["--lr", "0.1"])
        JobSpec(name='train', script='train.py', args=['--lr', '0.1'], procs_per_node=2)
    """
    return JobSpec(
        name=args.name or suggest_name(Path(args.script).stem),
        script=args.script,
        args=script_args,
        working_dir=args.working_dir,
        image=getattr(args, "image", None),
        nodes=args.nodes,
        procs_per_node=args.procs,
        resources=Resources(gpus=args.gpus),
        env=_parse_env(args.env),
        deepspeed=_parse_deepspeed(args.deepspeed),
        max_restarts=args.max_restarts,
        timeout=args.timeout,
        hang_timeout=args.hang_timeout,
    )


# -- output helpers ----------------------------------------------------------------------------
def _error(ui: _Ui, message: str) -> None:
    ui.err.print(f"[bold red]error:[/] [red]{escape(message)}[/]", soft_wrap=True)


def _spec_error(ui: _Ui, e: InvalidSpecError) -> int:
    option = _OPTION_OF_FIELD.get(e.field) or _OPTION_OF_FIELD.get(e.field.split(".")[0])
    _error(ui, f"{e} (option {option})" if option else str(e))
    return EXIT_USAGE


def _plain(console: Console, text: str, style: str | None = None) -> None:
    console.print(text, style=style, markup=False, highlight=False, emoji=False, soft_wrap=True)


# -- commands --------------------------------------------------------------------------------
def _outcome(ui: _Ui, status: JobStatus) -> int:
    elapsed = format_duration(status.elapsed)
    if status.state == JobState.SUCCEEDED:
        _plain(ui.out, f"job {status.name} SUCCEEDED in {elapsed}", style="bold green")
        return EXIT_OK
    if status.state == JobState.FAILED:
        _plain(ui.err, status.diagnosis(), style="red")
        return EXIT_FAILED
    _plain(ui.err, f"job {status.name} {status.state.value}: {status.message}", style="magenta")
    return EXIT_FAILED


def watch(job: Job, ui: _Ui, refresh: float = REFRESH_S) -> int:
    """Show ``job`` until it ends; Ctrl-C cancels it.

    On a terminal this is a live view; otherwise (a pipe, a file, CI) the log lines are
    streamed as ``[rank r] text`` and the view is printed once at the end.

    Returns:
        The exit code: 0 SUCCEEDED, 1 FAILED or CANCELLED, 130 interrupted (job cancelled).

    Raises:
        DsnbError: the job disappeared while being watched.
    """
    monitor = JobMonitor(job)
    try:
        if ui.out.is_terminal:
            with Live(render(monitor), console=ui.out, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
                while True:
                    monitor.poll()
                    lines = _lines_per_rank(ui.out.size.height, len(monitor.ranks()))
                    live.update(render(monitor, now=time.time(), lines_per_rank=lines), refresh=True)
                    if monitor.done:
                        break
                    time.sleep(refresh)
        else:
            out = ui.out.file
            for line in job.logs(follow=True):
                out.write(f"{line}\n")
                out.flush()
            while not monitor.done:
                monitor.poll()
            ui.out.print(render(monitor, now=time.time()))
    except KeyboardInterrupt:
        _plain(ui.err, f"Ctrl-C: cancelling job {job.name} ...", style="yellow")
        status = job.cancel()
        _plain(ui.err, f"job {job.name} {status.state.value}: {status.message}", style="yellow")
        return EXIT_INTERRUPTED
    assert monitor.status is not None  # set by the first poll
    return _outcome(ui, monitor.status)


def _lines_per_rank(height: int, ranks: int) -> int:
    """Log lines per rank that keep the live view within the terminal (1 to 5)."""
    room = height - 12  # header, progress and a few metrics
    return max(1, min(5, room // max(1, ranks) - 2))


def _submit_and_watch(ui: _Ui, args: argparse.Namespace, spec: JobSpec, detach: bool) -> int:
    with _cluster(args) as cluster:
        job = cluster.submit(spec)
        if detach:
            _plain(ui.out, job.name)
            _plain(ui.err, f"started; follow it with: dsnb logs {job.name} -f   (stop it with: dsnb cancel {job.name})")
            return EXIT_OK
        return watch(job, ui)


def _cmd_run(ui: _Ui, args: argparse.Namespace, script_args: list[str]) -> int:
    try:
        spec = spec_from_args(args, script_args)
        if args.command == "dryrun":
            with _cluster(args) as cluster:
                _plain(ui.out, str(cluster.dryrun(spec)))
            return EXIT_OK
        return _submit_and_watch(ui, args, spec, args.detach)
    except InvalidSpecError as e:
        return _spec_error(ui, e)


def _positive_steps(text: str) -> int:
    """``--steps``: a whole number of steps, at least 1."""
    steps = int(text)
    if steps < 1:
        raise argparse.ArgumentTypeError(f"{steps} is not a number of steps: give 1 or more")
    return steps


def _cmd_demo(ui: _Ui, args: argparse.Namespace) -> int:
    folder = examples_dir() / "tiny_gpt"
    script, config = folder / "train.py", folder / "ds_config.json"
    missing = [p.name for p in (script, config) if not p.is_file()]
    if missing:
        _error(
            ui,
            f"the demo needs {' and '.join(missing)} in {folder}, which this installation lacks; "
            "run it from a dsnb source checkout (git clone, then pip install -e '.[local]')",
        )
        return EXIT_FAILED
    try:
        # A fresh run each time, with its checkpoint under DSNB_HOME rather than in the source tree.
        demo_args = ["--no-resume", "--steps", str(args.steps), "--checkpoint-dir", str(dsnb_home() / "checkpoints" / DEMO_NAME)]
        spec = JobSpec(name=DEMO_NAME, script=script.name, working_dir=str(folder), procs_per_node=2,
                       deepspeed=str(config), args=demo_args)
        return _submit_and_watch(ui, args, spec, args.detach)
    except InvalidSpecError as e:
        return _spec_error(ui, e)


def _cmd_jobs(ui: _Ui, args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        statuses = cluster.jobs()
    if not statuses:
        _plain(ui.out, "no jobs yet; start one with: dsnb run SCRIPT")
    else:
        ui.out.print(jobs_table(statuses))
    return EXIT_OK


def _cmd_logs(ui: _Ui, args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        job = cluster.attach(args.name)
        out = ui.out.file
        try:
            for line in job.logs(rank=args.rank, follow=args.follow, tail=args.tail):
                out.write(f"{printable(str(line))}\n")  # a job's output may not steer the terminal
                if args.follow:
                    out.flush()
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED  # stop following; the job keeps running
        out.flush()
    return EXIT_OK


def _cmd_status(ui: _Ui, args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        ui.out.print(status_view(cluster.attach(args.name).status()))
    return EXIT_OK


def _cmd_cancel(ui: _Ui, args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        job = cluster.attach(args.name)
        before = job.status().state
        status = job.cancel()
    if before.is_terminal():
        _plain(ui.out, f"job {status.name} had already ended: {status.state.value}")
    else:
        _plain(ui.out, f"job {status.name} {status.state.value}: {status.message}")
    return EXIT_OK


_CHECK_STYLES = {"passed": "green", "failed": "red", "warning": "yellow", "not run": "dim"}


def _cmd_check(ui: _Ui, args: argparse.Namespace) -> int:
    try:
        spec = None
        if args.gpus or args.nodes is not None or args.procs is not None or args.model:
            zero = {"deepspeed": {"train_micro_batch_size_per_gpu": 1,
                                  "zero_optimization": {"stage": args.zero_stage}}} if args.model else {}
            spec = JobSpec(name="preflight", command=["true"], nodes=1 if args.nodes is None else args.nodes,
                           procs_per_node=args.procs or max(1, args.gpus), resources=Resources(gpus=args.gpus), **zero)
    except InvalidSpecError as e:
        return _spec_error(ui, e)
    try:
        cluster = _cluster(args)
    except ClusterError as e:
        _error(ui, str(e))
        return EXIT_USAGE
    with cluster:
        report = cluster.check(spec, model=_model_arg(args.model), sequence_length=args.seq_len)
    for result in report.results:
        _plain(ui.out, str(result), style=_CHECK_STYLES[result.status])
    _plain(ui.out, report.summary(), style="bold green" if report.ok else "bold red")
    return EXIT_OK if report.ok else EXIT_FAILED


def serve_spec_from_args(args: argparse.Namespace) -> ServeSpec:
    """The ServeSpec ``dsnb serve`` options describe.

    Raises:
        InvalidSpecError: a bad option (named by its field), or ``--token-env`` naming an unset variable.
    """
    from dsnb.serving import ServeSpec

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise InvalidSpecError("token", f"--token-env {args.token_env}: the variable is not set",
                                   f"export {args.token_env}=<a random token> first", spec="ServeSpec")
    name = args.name or suggest_name(Path(args.model.rstrip("/")).name.partition(":")[0] or "model")
    return ServeSpec(name=name, model=args.model, working_dir=args.working_dir, nodes=args.nodes, procs_per_node=args.procs,
                     replicas=args.replicas, dtype=args.dtype, port=args.port, max_batch_size=args.max_batch_size,
                     resources=Resources(gpus=args.gpus), image=args.image, env=_parse_env(args.env), token=token)


def _cmd_serve(ui: _Ui, args: argparse.Namespace) -> int:
    try:
        return _serve(ui, args, serve_spec_from_args(args))
    except InvalidSpecError as e:
        return _spec_error(ui, e)


def _serve(ui: _Ui, args: argparse.Namespace, spec: ServeSpec) -> int:
    with _cluster(args) as cluster:
        if args.dryrun:
            _plain(ui.out, str(cluster.dryrun(spec)))
            return EXIT_OK
        endpoint = cluster.serve(spec, wait=0)
        _plain(ui.err, f"started {endpoint.name} on {cluster.backend.name}; waiting until it answers (up to {args.wait:g} s)")
        try:
            endpoint.wait(timeout=args.wait)
        except JobFailed:
            endpoint.stop()
            raise
        _plain(ui.out, f"{endpoint.name} ready at {endpoint.url}")
        _plain(ui.err, f"OpenAI clients: base_url={endpoint.url}v1   KServe v2: {endpoint.url}v2/models/{spec.name}/infer")
        if args.detach:
            _plain(ui.err, f"stop it with: dsnb cancel {endpoint.name}" if endpoint.served_as_job
                   else "it runs until the Ray cluster stops it")
            return EXIT_OK
        _plain(ui.err, "serving; Ctrl-C stops it")
        try:
            while not endpoint.status().state.is_terminal():
                time.sleep(1.0)
        except KeyboardInterrupt:
            status = endpoint.stop()
            _plain(ui.err, f"endpoint {endpoint.name} {status.state.value}")
            return EXIT_INTERRUPTED
        status = endpoint.status()
        _plain(ui.err, f"endpoint {endpoint.name} {status.state.value}: {status.message}", style="red")
        return EXIT_FAILED


def _cmd_endpoints(ui: _Ui, args: argparse.Namespace) -> int:
    with _cluster(args) as cluster:
        statuses = cluster.endpoints()
        if not statuses:
            _plain(ui.out, "no endpoints; serve a model with: dsnb serve MODEL")
            return EXIT_OK
        ui.out.print(jobs_table(statuses))
        for status in statuses:
            if status.state == JobState.RUNNING:
                try:
                    _plain(ui.out, f"{status.name}: {cluster.endpoint(status.name).url}")
                except DsnbError:
                    continue
    return EXIT_OK


def _model_arg(model: str | None) -> object:
    """A ``--model`` argument: a parameter count when it reads as a number, else a model directory."""
    try:
        return float(model) if model is not None else None
    except ValueError:
        return model


def _cmd_estimate(ui: _Ui, args: argparse.Namespace) -> int:
    from dsnb.fit import estimate

    model = _model_arg(args.model)
    gpu = int(args.gpu_gib * 2**30) if args.gpu_gib is not None else None
    try:
        fit = estimate(model, zero_stage=args.zero_stage, offload_optimizer=args.offload_optimizer,
                       offload_params=args.offload_params, gpus_per_node=args.procs, nodes=args.nodes,
                       sequence_length=args.seq_len, micro_batch=args.micro_batch, gpu_memory=gpu)
    except InvalidSpecError as e:
        _error(ui, str(e))
        return EXIT_USAGE
    _plain(ui.out, str(fit))
    return 0 if fit.verdict != "does not fit" else 1


def _cmd_rbac(ui: _Ui, args: argparse.Namespace) -> int:
    backend_class = load_backend("kuberay" if args.backend == "ray" else args.backend)  # on Kubernetes, Ray is KubeRay
    permissions = getattr(backend_class, "permissions", ())
    if permissions and args.kueue:
        from dsnb.backends.kubernetes.rbac import KUEUE_PERMISSIONS

        permissions = (*permissions, *KUEUE_PERMISSIONS)
    if not permissions:
        _error(ui, f"backend {args.backend!r} creates nothing on Kubernetes, so it needs no Role; "
                   "name a Kubernetes backend, e.g. --backend statefulset")
        return EXIT_USAGE
    namespace = args.namespace
    if namespace is None:
        backend = backend_class()
        try:
            namespace = backend.namespace  # the kubeconfig context's; reading it contacts no cluster
        finally:
            backend.close()
    from dsnb.backends.kubernetes.rbac import DEFAULT_ACCOUNT_WARNING, render_rbac

    if args.user is not None:
        kind, who = "User", args.user
    elif args.group is not None:
        kind, who = "Group", args.group
    elif args.service_account is not None:
        kind, who = "ServiceAccount", args.service_account
    else:
        _error(ui, "name who gets the Role: --user NAME (you, as your kubeconfig logs in), --group NAME, or "
                   "--service-account NAME (the account your notebook server runs as); dsnb binds no one by default")
        return EXIT_USAGE
    if kind == "ServiceAccount" and who == "default":
        ui.err.print(f"[yellow]warning:[/] {escape(DEFAULT_ACCOUNT_WARNING)}", soft_wrap=True)
    try:
        text = render_rbac(permissions, namespace, kind, who, name=args.name, backend=args.backend)
    except ValueError as e:
        _error(ui, str(e))
        return EXIT_USAGE
    _plain(ui.out, text.rstrip("\n"))
    return EXIT_OK


def _split_script_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    """Run the ``dsnb`` command line.

    Args:
        argv: the arguments after ``dsnb`` (``sys.argv[1:]`` if None).
        console: where to print, both output and errors (stdout and stderr if None).

    Returns:
        The exit code (see the module docstring).

    Raises:
        Nothing on purpose: dsnb errors are printed and become exit code 1 (2 for invalid input).

    Example:
        >>> main(["dryrun", "train.py", "--procs", "2"])  # doctest: +SKIP
        0
    """
    ui = _Ui(out=console or Console(highlight=False), err=console or Console(stderr=True, highlight=False))
    parsed = _parse(ui, list(sys.argv[1:] if argv is None else argv))
    if isinstance(parsed, int):
        return parsed
    args, rest = parsed
    try:
        return _dispatch(ui, args, rest)
    except DsnbError as e:
        _error(ui, str(e))
        return EXIT_USAGE if isinstance(e, ImportError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``dsnb logs NAME | head``): silence the flush at exit.
        if console is None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _parse(ui: _Ui, argv: list[str]) -> tuple[argparse.Namespace, list[str]] | int:
    """The parsed arguments and the script's own ones, or the exit code of a usage error or ``--help``."""
    head, tail = _split_script_args(argv)
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(head)
        if args.command is None:
            parser.print_help(ui.out.file)
            return EXIT_USAGE
        if args.command in ("run", "dryrun"):
            if args.script is None and tail:
                args.script = tail.pop(0)
        elif extras or tail:
            parser.error(f"unrecognized arguments: {' '.join(extras + tail)}")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    return args, extras + tail


def _dispatch(ui: _Ui, args: argparse.Namespace, rest: list[str]) -> int:
    """Run the chosen command."""
    if args.command in ("run", "dryrun"):
        if args.script is None:
            _error(ui, f"dsnb {args.command}: give the SCRIPT to run, e.g. dsnb {args.command} train.py --procs 2")
            return EXIT_USAGE
        return _cmd_run(ui, args, rest)
    command = {"jobs": _cmd_jobs, "logs": _cmd_logs, "status": _cmd_status, "cancel": _cmd_cancel, "demo": _cmd_demo,
               "check": _cmd_check, "rbac": _cmd_rbac, "serve": _cmd_serve, "endpoints": _cmd_endpoints,
               "estimate": _cmd_estimate}
    return command[args.command](ui, args)

if __name__ == "__main__":
    sys.exit(main())
