"""The backend contract, the plan a dry run returns, and the backend registry.

A backend turns a :class:`~dsnb.spec.JobSpec` into running work. ``submit`` is always
``dryrun`` followed by ``apply`` (as in torchx), so every backend can be inspected,
golden-tested and exported without running anything.

Backends are found by name: the built-in ones are imported only when asked for, a
missing optional dependency becomes :class:`~dsnb.errors.BackendUnavailable` with the
``pip install`` line, and other packages add backends through the ``dsnb.backends``
entry-point group (``name = "package.module:Class"``).

Example:
    >>> "local" in available_backends()
    True
    >>> load_backend("local").name
    'local'
"""

from __future__ import annotations

import abc
import collections
import functools
import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from dsnb import function_job
from dsnb.backends.options import BUILTIN_OPTIONS, Option
from dsnb.backends.profiles import BUILTIN_PROFILES, BackendProfile
from dsnb.ds_config import framework_filled
from dsnb.errors import BackendUnavailable, InvalidSpecError
from dsnb.spec import JobSpec, redact_env
from dsnb.status import JobStatus, LogLine, MetricSample

if TYPE_CHECKING:
    from dsnb.preflight import PreflightReport
    from dsnb.serving.spec import ServeSpec


@dataclass(frozen=True)
class RankCommand:
    """One process a process-based backend starts: what, where, with which environment.

    ``env`` holds only what dsnb adds to the caller's environment.
    """

    rank: int
    argv: tuple[str, ...]
    cwd: str
    env: dict[str, str] = field(repr=False)  # may hold secrets; str(plan) shows it redacted


@dataclass
class Plan:
    """What ``submit`` would create, without creating it.

    ``str(plan)`` is what a person reads: the YAML of the resources for cluster backends,
    shell command lines for process backends. Secret-looking environment values are
    shown as ``***``, and a ConfigMap's ``binaryData`` (a shipped ``working_dir``) by its size
    only; ``to_yaml()`` has it all.

    Attributes:
        backend: the backend name.
        spec: the spec, already carrying its unique job name.
        commands: processes to start (process backends).
        manifests: resources to create (Kubernetes backends), in creation order.
        notes: human remarks shown above the plan (e.g. what is chosen at launch).
        extra: backend-private data that ``apply`` needs (such as secret values, which
            ``manifests`` shows only as ``***``).
    """

    backend: str
    spec: JobSpec
    commands: list[RankCommand] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold secret values

    @property
    def name(self) -> str:
        """The job name this plan creates."""
        return self.spec.name

    def to_yaml(self) -> str:
        """The plan as YAML: the manifests, or the commands as a list of mappings."""
        if self.manifests:
            return yaml.dump_all([_redact_manifest(m) for m in self.manifests], Dumper=_ReadableDumper, sort_keys=False)
        return yaml.safe_dump(
            {
                "backend": self.backend,
                "job": self.name,
                "ranks": [
                    {"rank": c.rank, "cwd": c.cwd, "env": redact_env(c.env), "argv": list(c.argv)}
                    for c in self.commands
                ],
            },
            sort_keys=False,
        )

    def __str__(self) -> str:
        head = "".join(f"# {note}\n" for note in self.notes)
        shown = self._shown
        if self.manifests:
            manifests = [shown(_binary_by_size(_redact_manifest(m))) for m in self.manifests]
            return head + yaml.dump_all(manifests, Dumper=_ReadableDumper, sort_keys=False)
        lines = []
        for c in self.commands:
            env = " ".join(f"{k}={_shell_quote(v)}" for k, v in redact_env(c.env).items())
            argv = " ".join(_shell_quote(a) for a in shown(list(c.argv)))
            lines.append(f"(cd {_shell_quote(c.cwd)} && env {env} {argv}) &")
        return head + "\n".join(lines) + ("\nwait\n" if lines else "")

    def _shown(self, value: Any) -> Any:
        """``value`` as a person reads it: a function job's runner and packed call by name (``to_yaml`` has them whole)."""
        packed = getattr(self.spec, "function", None)  # a serving plan's ServeSpec has none
        return value if packed is None else function_job.abbreviated(value, packed)

    def _repr_markdown_(self) -> str:
        lang = "yaml" if self.manifests else "bash"
        return f"```{lang}\n{self}\n```"


class _ReadableDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml's is ~10x faster
    """Writes multi-line strings (scripts, JSON files in ConfigMaps) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_ReadableDumper.add_representer(str, _represent_str)


def _binary_by_size(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest with its ``binaryData`` values replaced by their size, for reading.

    >>> _binary_by_size({"kind": "ConfigMap", "binaryData": {"code.tar.gz": "aGk="}})["binaryData"]
    {'code.tar.gz': '<2 bytes, base64; plan.to_yaml() has them>'}
    """
    if not manifest.get("binaryData"):
        return manifest
    sizes = {k: f"<{len(v) * 3 // 4 - v.count('=')} bytes, base64; plan.to_yaml() has them>" for k, v in manifest["binaryData"].items()}
    return {**manifest, "binaryData": sizes}


def _redact_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Secret with its values shown as ``***``; any other manifest unchanged."""
    if manifest.get("kind") != "Secret":
        return manifest
    hidden = {key: {k: "***" for k in manifest[key]} for key in ("data", "stringData") if manifest.get(key)}
    return {**manifest, **hidden}


def _shell_quote(text: str) -> str:
    import shlex

    if text.startswith("$") and text[1:].replace("_", "").isalnum():
        return text  # a variable the launcher fills in
    return shlex.quote(text)


@dataclass(frozen=True)
class LogChunk:
    """New log lines and the cursor to pass next time (opaque to callers)."""

    lines: list[LogLine]
    cursor: Any


@dataclass(frozen=True)
class MetricChunk:
    """New metric samples and the cursor to pass next time (opaque to callers)."""

    samples: list[MetricSample]
    cursor: Any


class Backend(abc.ABC):
    """The contract every backend fulfils; ``tests/conformance`` checks it for each one.

    **A backend implements** what differs from one place of running to another:

    - ``render(spec) -> Plan``: what would be created or run for ``spec``, which already
      carries its unique name. Pure: it starts and creates nothing, and refuses what cannot
      run there with :class:`~dsnb.errors.InvalidSpecError`.
    - ``apply(plan)``: create or start what the plan says.
    - ``status(name)``, ``jobs()``, ``spec_of(name)``: read the state back, from the running
      system or the job's record, so that any process can attach.
    - ``read_logs(name, cursor, rank)`` and ``read_metrics(name, cursor)``: what is new since
      ``cursor``; bounded and non-blocking.
    - ``stop_running(name, status)``: stop a job that has not ended, and delete what it holds.

    Optionally: ``options`` (its constructor's keywords as data: the CLI's flags and the form's
    fields), ``profiles`` (what it suits, for the advisor), ``unique_spec`` (a name unique in
    its own namespace), ``read_log_tail``, ``check`` (a preflight report), ``close``, and
    serving (``serve_plan``, ``apply_serve``, ``endpoint_*``, ``stop_endpoint``, ``endpoints``),
    which a backend that runs jobs gets by serving a model as an always-on job.

    **A backend gets**, written once here: ``dryrun`` (a unique name, then ``render``),
    ``submit`` (``dryrun`` then ``apply``), ``cancel`` (an ended job is returned as it is,
    without a call to ``stop_running``), registration by name (:func:`register_backend`,
    which refuses to overwrite unless told), and :class:`dsnb.job.Job`'s following, tails,
    waits and views on top of the cursors.

    Example:
        >>> from dsnb.backends.local import LocalBackend
        >>> issubclass(LocalBackend, Backend), [option.name for option in LocalBackend.options]
        (True, ['home'])

    Raises:
        TypeError: from the constructor, for an option the backend does not declare.
    """

    #: Registry name, e.g. ``"local"``.
    name: str = ""
    #: The constructor's keyword arguments, as the CLI and the form offer them.
    options: ClassVar[tuple[Option, ...]] = ()
    profiles: ClassVar[tuple[BackendProfile, ...]] = ()
    #: Whether this backend enforces ``JobSpec.hang_timeout`` (a backend that does not refuses it).
    watches_hangs: ClassVar[bool] = False
    #: Whether this backend's statuses carry ``stragglers`` (else the views find them in the logs they read).
    reports_stragglers: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"backend {self.name!r} takes no options, got {sorted(options)}")

    def dryrun(self, spec: JobSpec) -> Plan:
        """Render what ``submit`` would do, with a unique job name; create nothing.

        The name comes from :meth:`unique_spec`, the plan from :meth:`render`; a note lists the
        DeepSpeed values left ``"auto"`` for the framework (:func:`dsnb.ds_config.framework_filled`).

        Raises:
            InvalidSpecError: the spec cannot run on this backend (the field and fix named).
        """
        if spec.hang_timeout is not None and not self.watches_hangs:
            raise InvalidSpecError("hang_timeout", f"backend {self.name!r} does not enforce it",
                                   "leave hang_timeout=None here and set timeout= for a limit (stuck ranks still show in "
                                   "the job's panel and in dsnb logs), or run on a backend that enforces it "
                                   "(docs/stragglers.md)")
        plan = self.render(self.unique_spec(spec))
        later = framework_filled(spec.deepspeed_config) if spec.deepspeed is not None else []
        if later:
            plan.notes.append(f'DeepSpeed values left "auto" for the Trainer or Accelerate to fill at run time: {", ".join(later)}')
        return plan

    def unique_spec(self, spec: JobSpec) -> JobSpec:
        """``spec`` under the name its job will have: the name and a random suffix (``tiny-x7k2``)."""
        return spec.with_unique_name()

    @abc.abstractmethod
    def render(self, spec: JobSpec) -> Plan:
        """The plan for ``spec``, which carries its job's unique name already; create nothing.

        Raises:
            InvalidSpecError: the spec cannot run on this backend (the field and fix named).
        """

    @abc.abstractmethod
    def apply(self, plan: Plan) -> None:
        """Start or create what ``plan`` describes.

        Raises:
            DsnbError: the backend refused; nothing of the job is left behind.
        """

    def submit(self, spec: JobSpec) -> str:
        """``dryrun`` then ``apply``; returns the unique job name."""
        plan = self.dryrun(spec)
        self.apply(plan)
        return plan.name

    @abc.abstractmethod
    def status(self, name: str) -> JobStatus:
        """Current status. Raises: JobNotFound."""

    @abc.abstractmethod
    def read_logs(self, name: str, cursor: Any = None, rank: int | None = None) -> LogChunk:
        """Log lines written since ``cursor`` (None: from the start), bounded per call.

        Raises:
            JobNotFound: no such job.
        """

    def read_log_tail(self, name: str, count: int, rank: int | None = None) -> LogChunk:
        """The last ``count`` lines written so far, and the cursor just after them.

        This generic version reads everything once through a bounded buffer; backends that
        can read from the end (files, Kubernetes ``tailLines``) override it.

        Raises:
            JobNotFound: no such job.
        """
        last: collections.deque[LogLine] = collections.deque(maxlen=max(0, count))
        chunk = self.read_logs(name, None, rank)
        while chunk.lines:
            last.extend(chunk.lines)
            chunk = self.read_logs(name, chunk.cursor, rank)
        return LogChunk(lines=list(last), cursor=chunk.cursor)

    @abc.abstractmethod
    def read_metrics(self, name: str, cursor: Any = None) -> MetricChunk:
        """Metric samples since ``cursor`` (None: from the start). Raises: JobNotFound."""

    def cancel(self, name: str) -> JobStatus:
        """Stop the job and everything it started; idempotent: a job that has ended is left as it is.

        Raises:
            JobNotFound: no such job.
        """
        status = self.status(name)
        return status if status.state.is_terminal() else self.stop_running(name, status)

    @abc.abstractmethod
    def stop_running(self, name: str, status: JobStatus) -> JobStatus:
        """Stop job ``name``, which had ``status`` (not ended) a moment ago, and everything it started;
        returns its final status. Raises: JobNotFound."""

    @abc.abstractmethod
    def jobs(self) -> list[JobStatus]:
        """Statuses of the jobs this backend can see, newest first."""

    @abc.abstractmethod
    def spec_of(self, name: str) -> JobSpec:
        """The spec a job was submitted with (used by ``attach``). Raises: JobNotFound."""

    def check(self, spec: JobSpec | None = None) -> PreflightReport:
        """Preflight: whether this backend can run jobs (and ``spec`` in particular), checked now.

        Backends with something to check (cluster access, permissions, GPUs) override this;
        the default has one passing line. Nothing is created or started.

        Args:
            spec: the job to check resources for; None checks only access.

        Raises:
            Nothing on purpose: problems are failed lines of the report
            (``report.raise_for_problems()`` turns the first into a ClusterError).

        Example:
            >>> class Nothing(Backend):
            ...     name = "nothing"
            ...     render = apply = status = read_logs = read_metrics = stop_running = jobs = spec_of = None
            >>> print(Nothing().check())
            ✓ backend: 'nothing' needs no preflight
        """
        from dsnb.preflight import CheckResult, PreflightReport

        return PreflightReport(self.name, [CheckResult("backend", True, f"{self.name!r} needs no preflight")])

    def memory_there(self, spec: JobSpec | None = None) -> Any:
        """The GPU and CPU memory a node of ``spec`` offers here, as a :class:`dsnb.fit.MemoryThere` (what
        ``cluster.check(spec, model=...)`` compares the estimate with). The default knows nothing.

        Raises:
            Nothing on purpose: what cannot be known is None, with the reason in ``source``.

        Example:
            >>> class Nothing(Backend):
            ...     name = "nothing"
            ...     render = apply = status = read_logs = read_metrics = stop_running = jobs = spec_of = None
            >>> Nothing().memory_there().source
            "backend 'nothing' cannot tell"
        """
        from dsnb.fit import MemoryThere

        return MemoryThere(source=f"backend {self.name!r} cannot tell")

    # -- serving (optional: backends that serve override these) ---------------------------

    def _cannot_serve(self) -> Exception:
        from dsnb.errors import ClusterError

        return ClusterError(f"backend {self.name!r}", "cannot serve models", "serve with Cluster('ray') (Ray Serve)")

    def serve_plan(self, spec: ServeSpec) -> Plan:
        """What ``serve`` would deploy for ``spec``, with a unique name; nothing is deployed.

        Raises:
            ClusterError: this backend does not serve.
            InvalidSpecError: the spec cannot be served here.
        """
        raise self._cannot_serve()

    def apply_serve(self, plan: Plan) -> None:
        """Deploy what ``serve_plan`` rendered. Raises: ClusterError."""
        raise self._cannot_serve()

    def endpoint_url(self, name: str) -> str:
        """Where the endpoint answers. Raises: JobNotFound, ClusterError."""
        raise self._cannot_serve()

    def endpoint_headers(self, name: str) -> dict[str, str]:
        """HTTP headers a request to the endpoint needs (e.g. auth); none by default."""
        return {}

    def endpoint_status(self, name: str) -> JobStatus:
        """The endpoint's status. Raises: JobNotFound, ClusterError."""
        raise self._cannot_serve()

    def stop_endpoint(self, name: str) -> JobStatus:
        """Remove the endpoint; idempotent. Raises: JobNotFound, ClusterError."""
        raise self._cannot_serve()

    def endpoints(self) -> list[JobStatus]:
        """Statuses of the endpoints this backend serves (none where it cannot serve)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless a backend holds resources
        """Release clients and background threads; running jobs keep running."""


# -- registry ------------------------------------------------------------------------------

#: name -> ("module:Class", extra that provides its dependencies)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "local": ("dsnb.backends.local:LocalBackend", None),
    "statefulset": ("dsnb.backends.kubernetes.statefulset:StatefulSetBackend", "k8s"),
    "mpijob": ("dsnb.backends.kubernetes.mpijob:MPIJobBackend", "k8s"),
    "trainjob": ("dsnb.backends.kubernetes.trainjob:TrainJobBackend", "k8s"),
    "ray": ("dsnb.backends.ray.backend:RayBackend", "ray"),
    "kuberay": ("dsnb.backends.kubernetes.kuberay:KubeRayBackend", "k8s"),
}
_registered: dict[str, tuple[str | type[Backend], str | None]] = {}
ENTRY_POINT_GROUP = "dsnb.backends"


def register_backend(name: str, target: str | type[Backend], extra: str | None = None, clobber: bool = False) -> None:
    """Make a backend available under ``name``.

    Args:
        name: what ``Cluster(name)`` takes.
        target: the class, or ``"module:Class"`` imported on first use.
        extra: the dsnb extra that installs its dependencies, for the install hint.
        clobber: replace a backend already known by that name (a built-in one included).

    Raises:
        ValueError: ``name`` is taken and ``clobber`` is False.

    Example:
        >>> register_backend("mine", "dsnb.backends.local:LocalBackend")
        >>> load_backend("mine").__name__
        'LocalBackend'
        >>> register_backend("local", "mine.module:Faster")
        Traceback (most recent call last):
        ValueError: a backend named 'local' exists already; pass clobber=True to replace it
        >>> unregister_backend("mine")
    """
    if not clobber and (name in _BUILTIN or name in _registered or name in _entry_points()):
        raise ValueError(f"a backend named {name!r} exists already; pass clobber=True to replace it")
    _registered[name] = (target, extra)


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (a no-op if absent)."""
    _registered.pop(name, None)


def _entry_points() -> dict[str, str]:
    # Scanned once per sys.path (about 10 ms a scan), not on every lookup: a path added later
    # (a plugin installed into it, or put on it) is scanned then.
    return _entry_points_on(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _entry_points_on(path: tuple[str, ...]) -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve_name(name: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The backend name and options that older spellings stand for: ``Cluster("ray", kuberay=True)``
    is ``Cluster("kuberay")``.

    Example:
        >>> resolve_name("ray", {"kuberay": True, "namespace": "ml"})
        ('kuberay', {'namespace': 'ml'})
    """
    if name == "ray" and "kuberay" in options:
        rest = {k: v for k, v in options.items() if k != "kuberay"}
        return ("kuberay" if options["kuberay"] else "ray"), rest
    return name, options


def available_backends() -> list[str]:
    """Names ``Cluster`` accepts: built-in, registered and entry-point backends."""
    return sorted({*_BUILTIN, *_registered, *_entry_points()})


def backend_options(name: str) -> tuple[Option, ...]:
    """The options backend ``name`` takes; a built-in backend's without importing it.

    Raises:
        BackendUnavailable: unknown name, or a plugin whose dependencies are missing.

    Example:
        >>> [option.name for option in backend_options("local")]
        ['home']
    """
    if name in BUILTIN_OPTIONS and name not in _registered:
        return BUILTIN_OPTIONS[name]
    return tuple(load_backend(name).options)


def backend_profiles(name: str) -> tuple[BackendProfile, ...]:
    """What backend ``name`` is like to use (for the advisor); a built-in backend's without importing it.

    Raises:
        BackendUnavailable: unknown name, or a plugin whose dependencies are missing.

    Example:
        >>> [p.key for p in backend_profiles("kuberay")]
        ['kuberay-train', 'kuberay-serve']
    """
    if name in BUILTIN_PROFILES and name not in _registered:
        return BUILTIN_PROFILES[name]
    # A subclass registered under another name inherits profiles that describe its parent.
    declared = tuple(p for p in load_backend(name).profiles if p.backend == name)
    return declared or BUILTIN_PROFILES.get(name, ())


#: The package each extra brings, whose presence says the extra is installed.
_EXTRA_PACKAGES = {"k8s": "kubernetes", "ray": "ray"}


def backend_installed(name: str) -> bool:
    """Whether backend ``name`` is registered and the packages of its extra are installed
    (found without importing them).

    Example:
        >>> backend_installed("local"), backend_installed("slurm")
        (True, False)
    """
    if name in _registered:
        return True
    if name in _BUILTIN:
        package = _EXTRA_PACKAGES.get(_BUILTIN[name][1] or "")
        return package is None or importlib.util.find_spec(package) is not None
    return name in _entry_points()


def builtin_backends() -> tuple[str, ...]:
    """The backends dsnb itself provides, in the order the docs list them.

    Example:
        >>> builtin_backends()[0]
        'local'
    """
    return tuple(_BUILTIN)


def load_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name``, importing it now.

    Raises:
        BackendUnavailable: unknown name, or its optional dependencies are missing
            (the message carries the ``pip install`` line).
    """
    if name in _registered:
        target, extra = _registered[name]
    elif name in _BUILTIN:
        target, extra = _BUILTIN[name]
    else:
        points = _entry_points()
        if name not in points:
            raise BackendUnavailable(
                name,
                f"unknown backend; available: {', '.join(available_backends())}",
                "a package that provides it (entry point group 'dsnb.backends')",
            )
        target, extra = points[name], None
    if not isinstance(target, str):
        return target
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing and missing != module_name.split(".")[0]:
            hint = f"pip install 'dsnb[{extra}]'" if extra else f"pip install {missing}"
            raise BackendUnavailable(name, f"needs the {missing!r} package, which is not installed", hint) from e
        raise
    return getattr(module, class_name)
