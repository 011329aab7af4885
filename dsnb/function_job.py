"""A function as a job: ``JobSpec(function=train, kwargs={...})`` and its result.

The function and its keyword arguments are packed with cloudpickle when the spec is made
(:func:`pack`), so a function defined in a notebook cell travels by value: its code, the
globals it uses and its closure, while modules it imports are imported again on each rank.
Every rank runs ``python3 -c <dsnb.runtime.function_runner> PAYLOAD PYTHON`` (on Ray, the
worker calls the same runner), so the same spec runs on every backend and a rank needs
Python of the same ``major.minor`` version and cloudpickle, not dsnb.

Rank 0 prints its return value as result lines tagged with the payload's digest;
:func:`read_result` finds them in the job's logs (see :meth:`dsnb.job.Job.result`).

Limits, each refused when the spec is made, with the field and the way out:

- the packed call is at most :data:`MAX_PAYLOAD_CHARS` characters: it travels on each rank's
  command line (a global such as a dataset or a model is packed with the function: load it
  inside the function instead, or pass a path);
- a keyword argument that holds a credential (``token="hf_..."``) is refused: the payload is
  part of the job's plan and command line; put it in ``env``, which dsnb keeps secret;
- the return value is at most :data:`~dsnb.runtime.function_runner.MAX_RESULT_BYTES` pickled:
  save larger things to storage and return their path.

Example:
    >>> def add(a, b):
    ...     return a + b
    >>> packed = pack(add, {"a": 1, "b": 2})
    >>> packed
    PackedFunction(name='add', python='3.11', size='...')
    >>> read_result([*function_runner.result_lines(3, packed.digest)], packed)
    3
"""

from __future__ import annotations

import base64
import inspect
import pickle
import sys
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from dsnb import secrets
from dsnb.errors import DsnbError, InvalidSpecError
from dsnb.runtime import function_runner

#: The most characters of packed call a job carries (a command-line argument may be 128 KiB on Linux).
MAX_PAYLOAD_CHARS = 96 * 1024
#: The text every rank runs with ``python3 -c``.
RUNNER_TEXT = Path(function_runner.__file__).read_text()
_PYTHON = function_runner.python_version()


class ResultUnavailable(DsnbError, LookupError):
    """A function job has no result to give: it is not a function job, it returned a value
    that could not be carried, or its result lines are not in its logs.

    Attributes:
        job: the job's name.
        reason: why, and what to do.
        missing: the result lines were not found (the lines read may not have been all of rank 0's).
    """

    def __init__(self, job: str, reason: str, missing: bool = False) -> None:
        self.job = job
        self.reason = reason
        self.missing = missing
        super().__init__(f"job {job!r}: no result: {reason}")


@dataclass(frozen=True)
class PackedFunction:
    """A function and its keyword arguments, packed to run on every rank.

    Attributes:
        name: the function's qualified name, to show.
        payload: cloudpickle of ``(function, kwargs)``, zlib-compressed, URL-safe base64.
        python: the ``major.minor`` Python version that packed it (ranks must run the same).

    Example:
        >>> PackedFunction.from_dict(pack(len, {}).to_dict()).name
        'len'
    """

    name: str
    payload: str
    python: str

    @property
    def digest(self) -> str:
        """The tag of this call's result lines (16 hex digits)."""
        return function_runner.digest(self.payload)

    def argv(self, python: str = "python3") -> list[str]:
        """The command line each rank runs.

        Example:
            >>> argv = pack(len, {}).argv()
            >>> argv[:2], argv[3] == pack(len, {}).payload, argv[4] == _PYTHON
            (['python3', '-c'], True, True)
        """
        return [python, "-c", RUNNER_TEXT, self.payload, self.python]

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready dict for a job's record."""
        return {"name": self.name, "payload": self.payload, "python": self.python}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PackedFunction:
        """The packed function a record holds.

        Raises:
            InvalidSpecError: ``data`` is not what :meth:`to_dict` wrote.
        """
        if set(data) != {"name", "payload", "python"} or not all(isinstance(v, str) for v in data.values()):
            raise InvalidSpecError("function", "the stored function is not name, payload and python strings",
                                   "submit the job again from its function")
        return cls(**data)

    def __repr__(self) -> str:
        return f"PackedFunction(name={self.name!r}, python={self.python!r}, size='{len(self.payload) / 1024:.1f} KiB')"


def _check_kwargs(kwargs: Any) -> None:
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise InvalidSpecError("kwargs", f"must be a dict of keyword arguments, got {kwargs!r}",
                               "pass kwargs={'lr': 0.001, 'epochs': 3}")
    for where, key, value in _strings(kwargs, "kwargs"):
        if isinstance(value, secrets.Secret) or secrets.is_secret(key, value):
            raise InvalidSpecError(where, "holds a credential, which would travel in the job's plan and command line",
                                   f"put it in env (e.g. env={{'{key.upper()}': ...}}), which dsnb keeps secret, "
                                   "and read os.environ in the function")


def _strings(value: Any, where: str, key: str = "", depth: int = 0) -> Iterable[tuple[str, str, str]]:
    """Every string in plain dicts, lists and tuples of ``value``, with its dotted place and nearest key."""
    if isinstance(value, str):
        yield where, key, value
    elif depth < 8 and isinstance(value, Mapping):
        for name, item in value.items():
            yield from _strings(item, f"{where}.{name}", str(name), depth + 1)
    elif depth < 8 and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{where}[{index}]", key, depth + 1)


def _check_callable(function: Any) -> str:
    if not callable(function) or inspect.isclass(function):
        raise InvalidSpecError("function", f"must be a function, got {function!r}", "pass function=train (no parentheses)")
    if inspect.iscoroutinefunction(function) or inspect.isgeneratorfunction(function):
        raise InvalidSpecError("function", f"{function.__qualname__} is an async or generator function, which a rank "
                                           "cannot simply call", "pass a plain def function that returns its result")
    return getattr(function, "__qualname__", None) or type(function).__name__


def _is_users_own(module: ModuleType | None) -> bool:
    """Whether ``module`` is the user's code (a file outside the installed packages and the standard library)."""
    file = getattr(module, "__file__", None)
    if module is None or not file or module.__name__ == "__main__":
        return False
    installed = {Path(p).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if (p := sysconfig.get_paths().get(key))}
    where = Path(file).resolve()
    return not any(where.is_relative_to(root) for root in installed)


def _pickled(function: Callable[..., Any], kwargs: dict[str, Any]) -> bytes:
    """cloudpickle of ``(function, kwargs)``; a function of the user's own module travels by value
    with that module's code it uses, as one from a notebook cell does (the ranks may not have the file)."""
    import cloudpickle

    module = sys.modules.get(getattr(function, "__module__", None) or "")
    by_value = _is_users_own(module)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps((function, kwargs), protocol=4)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


def pack(function: Callable[..., Any], kwargs: Mapping[str, Any] | None) -> PackedFunction:
    """Pack ``function(**kwargs)`` to run on every rank.

    Raises:
        InvalidSpecError: naming ``function`` (not a plain function, not picklable, too large)
            or ``kwargs`` (not a dict of names, a credential, not picklable).

    Example:
        >>> pack(lambda: 1, {"token": "hf_abcdefghijkl"})
        Traceback (most recent call last):
        ...
        dsnb.errors.InvalidSpecError: JobSpec.kwargs.token: holds a credential, ...
    """
    name = _check_callable(function)
    kwargs = {} if kwargs is None else kwargs
    _check_kwargs(kwargs)
    kwargs = dict(kwargs)
    try:
        data = _pickled(function, kwargs)
    except Exception as error:  # cloudpickle raises whatever an object's __reduce__ raises
        raise InvalidSpecError("function", f"{name} or its kwargs cannot be pickled ({type(error).__name__}: {error})",
                               "make what it uses picklable, create it inside the function, or use a script") from error
    payload = base64.urlsafe_b64encode(zlib.compress(data, 9)).decode("ascii")
    if len(payload) > MAX_PAYLOAD_CHARS:
        raise InvalidSpecError("function", f"{name} with its kwargs packs to {len(payload) / 1024:.0f} KiB, more than the "
                                           f"{MAX_PAYLOAD_CHARS // 1024} KiB a job's command line carries (a global it "
                                           "uses, such as a dataset or a model, is packed with it)",
                               "load large objects inside the function or pass their path in kwargs; or use a script "
                               "with working_dir")
    return PackedFunction(name=name, payload=payload, python=_PYTHON)


def read_result(lines: Iterable[str], packed: PackedFunction, job: str = "job") -> Any:
    """The return value that rank 0 printed in ``lines`` (a job's log lines, in order).

    Raises:
        ResultUnavailable: the value could not be carried, or its lines are missing or incomplete.
    """
    tag = packed.digest
    chunks: dict[int, str] = {}
    total = 0
    for text in lines:
        parts = text.strip().split(" ")
        if len(parts) >= 3 and parts[0] == function_runner.ERROR_TAG and parts[1] == tag:
            raise ResultUnavailable(job, " ".join(parts[2:]))
        if len(parts) == 4 and parts[0] == function_runner.RESULT_TAG and parts[1] == tag:
            index, _, count = parts[2].partition("/")
            if index.isdigit() and count.isdigit():
                chunks[int(index)], total = parts[3], int(count)
    if not total or sorted(chunks) != list(range(1, total + 1)):
        raise ResultUnavailable(job, f"rank 0's result lines are not in its logs ({len(chunks)} of {total or '?'} found): "
                                     "did the function return on rank 0, and are the job's logs still kept?", missing=True)
    data = zlib.decompress(base64.urlsafe_b64decode("".join(chunks[i] for i in range(1, total + 1))))
    return pickle.loads(data)  # lines tagged with this job's own payload digest, from its rank 0


def abbreviated(value: Any, packed: PackedFunction) -> Any:
    """``value`` (a manifest, an argv) with the runner's text and the packed call named, for a plan a person reads.

    Example:
        >>> abbreviated(["python3", "-c", RUNNER_TEXT, pack(len, {}).payload, "3.11"], pack(len, {}))
        ['python3', '-c', '<dsnb.runtime.function_runner>', '<len, packed: 0.1 KiB>', '3.11']
    """
    if isinstance(value, dict):
        return {key: abbreviated(item, packed) for key, item in value.items()}
    if isinstance(value, list):
        return [abbreviated(item, packed) for item in value]
    if isinstance(value, str):
        if value == RUNNER_TEXT:
            return "<dsnb.runtime.function_runner>"
        return value.replace(packed.payload, f"<{packed.name}, packed: {len(packed.payload) / 1024:.1f} KiB>")
    return value


def is_result_line(text: str) -> bool:
    """Whether a log line carries a result (views leave these out).

    Example:
        >>> is_result_line("DSNB_RESULT 0123456789abcdef 1/1 gAR"), is_result_line("loss=1.0")
        (True, False)
    """
    return text.startswith((function_runner.RESULT_TAG + " ", function_runner.ERROR_TAG + " "))
