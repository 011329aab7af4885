"""The dsnb error family.

Every error dsnb raises on purpose derives from :class:`DsnbError`, and each
message names the field or resource at fault and says how to fix it.

Example:
    >>> from dsnb.errors import InvalidSpecError
    >>> try:
    ...     raise InvalidSpecError("nodes", "must be at least 1", "set nodes=1 or more")
    ... except ValueError as e:
    ...     print(e)
    JobSpec.nodes: must be at least 1. Fix: set nodes=1 or more
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsnb.status import JobStatus


class DsnbError(Exception):
    """Root of every error raised by dsnb."""


class InvalidSpecError(DsnbError, ValueError):
    """A JobSpec (or one of its parts) is invalid; nothing was started.

    Attributes:
        field: dotted name of the offending field, e.g. ``"deepspeed.zero_optimization.stage"``.
        problem: what is wrong.
        fix: how to fix it.
        spec: the spec class the field belongs to, e.g. ``"ServeSpec"``.
    """

    def __init__(self, field: str, problem: str, fix: str, *, spec: str = "JobSpec") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        self.spec = spec
        super().__init__(f"{spec}.{field}: {problem}. Fix: {fix}")


class BackendUnavailable(DsnbError, ImportError):
    """A backend is unknown, or its optional dependencies are not installed.

    Attributes:
        backend: the backend name asked for.
        hint: the command that installs what is missing, if any.
    """

    def __init__(self, backend: str, message: str, hint: str = "") -> None:
        self.backend = backend
        self.hint = hint
        text = f"backend {backend!r}: {message}"
        if hint:
            text += f". Install it with: {hint}"
        super().__init__(text)


class ClusterError(DsnbError, ConnectionError):
    """The cluster cannot be used as asked: no config, unreachable, or a request refused.

    Attributes:
        what: the cluster, file or resource concerned.
        fix: what to do about it.

    Example:
        >>> print(ClusterError("namespace 'ml'", "does not exist", "create it: kubectl create namespace ml"))
        namespace 'ml': does not exist. Fix: create it: kubectl create namespace ml
    """

    def __init__(self, what: str, problem: str, fix: str) -> None:
        self.what = what
        self.fix = fix
        super().__init__(f"{what}: {problem}. Fix: {fix}")


class JobNotFound(DsnbError, LookupError):
    """No job (or, with ``kind="endpoint"``, no served model) of that name exists on the backend.

    Example:
        >>> print(JobNotFound("mlp-x7k2", "ray", ["mlp-a1b2"], kind="endpoint"))
        endpoint 'mlp-x7k2' not found on backend 'ray'; list endpoints with cluster.endpoints() (known: mlp-a1b2)
    """

    def __init__(self, name: str, backend: str, known: list[str] | None = None, *, kind: str = "job") -> None:
        self.name = name
        self.backend = backend
        hint = f"list {kind}s with cluster.{kind}s()"
        if known:
            shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
            hint += f" (known: {shown})"
        super().__init__(f"{kind} {name!r} not found on backend {backend!r}; {hint}")


class JobFailed(DsnbError):
    """A job ended in FAILED; :attr:`status` carries the diagnosis.

    The message names the failing rank, its exit code and its last log lines.
    """

    def __init__(self, status: JobStatus) -> None:
        self.status = status
        super().__init__(status.diagnosis())


class WaitTimeout(DsnbError, TimeoutError):
    """``Job.wait`` ran out of time; the job itself keeps running."""

    def __init__(self, name: str, timeout: float, state: str) -> None:
        self.name = name
        self.timeout = timeout
        super().__init__(
            f"job {name!r} still {state} after waiting {timeout:g} s; it keeps running. "
            f"Wait again, or stop it with job.cancel()"
        )
