"""The on-disk record of one local job, shared by the supervisor and any Python process.

Layout of ``$DSNB_HOME/jobs/<name>/`` (``DSNB_HOME`` defaults to ``~/.dsnb``)::

    spec.json        the submitted JobSpec (unique name, DeepSpeed config inlined)
    plan.json        the rendered rank commands
    ds_config.json   the checked DeepSpeed config (``DSNB_DEEPSPEED_CONFIG`` points here)
    status.json      the latest JobStatus, written atomically by the supervisor
    rank-<i>.log     each rank's output, one "<epoch seconds> <text>" line per line
    metrics.jsonl    metric samples parsed from the output
    supervisor.log   the supervisor's own output (empty unless something is wrong)
    cancel           present once a cancel was requested

Example:
    >>> import tempfile
    >>> d = JobDir(Path(tempfile.mkdtemp()) / "jobs" / "demo-x1y2")
    >>> d.rank_log(3).name
    'rank-3.log'
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnb.status import JobStatus


def dsnb_home() -> Path:
    """Root of dsnb's local state: ``$DSNB_HOME`` or ``~/.dsnb``."""
    return Path(os.environ.get("DSNB_HOME") or Path.home() / ".dsnb")


def jobs_root() -> Path:
    """Directory holding one sub-directory per local job."""
    return dsnb_home() / "jobs"


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) a directory only its owner may enter (0700); refuse one that
    belongs to someone else or that others may write in (they could swap a job's files).

    Raises:
        ClusterError: the directory is another user's, or writable by others.
    """
    from dsnb.errors import ClusterError

    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ClusterError(str(path), f"belongs to user id {info.st_uid}, not to you ({os.getuid()})",
                           "use a directory of your own: set DSNB_HOME")
    if info.st_mode & 0o022:
        raise ClusterError(str(path), f"others may write in it (mode {oct(info.st_mode & 0o777)})",
                           f"chmod 700 {path}, or set DSNB_HOME to a directory of your own")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file that only its owner may read (0600), atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_log_line(when: float, text: str) -> str:
    """One line of a rank log file."""
    return f"{when:.6f} {text}\n"


def parse_log_line(line: str) -> tuple[float, str]:
    """Inverse of :func:`format_log_line` (tolerates a line written by something else)."""
    stamp, _, text = line.rstrip("\n").partition(" ")
    try:
        return float(stamp), text
    except ValueError:
        return 0.0, line.rstrip("\n")


def parse_log_lines(data: bytes) -> list[tuple[float, str]]:
    """Parse whole log lines (``data`` ends at a newline); a ``\\r`` stays inside its line.

    Example:
        >>> parse_log_lines(b"1.5 a\\rb\\n2.0 c\\n")
        [(1.5, 'a\\rb'), (2.0, 'c')]
    """
    return [parse_log_line(raw.decode("utf-8", "replace")) for raw in data.split(b"\n")[:-1]]


TAIL_BLOCK_BYTES = 256 * 1024


def read_last_lines(
    path: Path, count: int, keep: Callable[[str], bool] = lambda text: True
) -> tuple[list[tuple[float, str]], int]:
    """The last ``count`` whole lines of a log file that ``keep`` accepts, and the offset after them.

    Reads backwards a block at a time, so the cost follows ``count``, not the file's size.
    A missing file gives ``([], 0)``; a partial last line is left for the next forward read.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "rank-0.log"
        >>> _ = p.write_bytes(b"1.0 a\\n2.0 b\\n3.0 c\\n4.0 par")
        >>> read_last_lines(p, 2)
        ([(2.0, 'b'), (3.0, 'c')], 18)
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start, data = size, b""
            while True:
                end = data.rfind(b"\n") + 1
                lines = parse_log_lines(data[:end])
                if start > 0 and lines:
                    lines = lines[1:]  # the first one was cut by the seek
                kept = [line for line in lines if keep(line[1])]
                if start == 0 or (start < size and len(kept) >= count):
                    break
                start = max(0, start - TAIL_BLOCK_BYTES)
                f.seek(start)
                data = f.read(size - start)
    except FileNotFoundError:
        return [], 0
    return (kept[-count:] if count > 0 else []), start + end


@dataclass(frozen=True)
class JobDir:
    """Paths of one job's directory."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def spec(self) -> Path:
        return self.path / "spec.json"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def ds_config(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def status(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def cancel_request(self) -> Path:
        return self.path / "cancel"

    def rank_log(self, rank: int) -> Path:
        return self.path / f"rank-{rank}.log"

    def read_status(self) -> JobStatus | None:
        """The last written status, or None before the first one."""
        return self.read_status_and_extra()[0]

    def read_status_and_extra(self) -> tuple[JobStatus | None, dict[str, Any]]:
        """Status and bookkeeping from one read of status.json (they must agree)."""
        try:
            data = json.loads(self.status.read_text())
        except FileNotFoundError:
            return None, {}
        return JobStatus.from_dict(data), data.get("_extra", {})

    def write_status(self, status: JobStatus, **extra: Any) -> None:
        """Atomically replace status.json; ``extra`` keys (pids) ride along."""
        write_json_atomic(self.status, {**status.to_dict(), "_extra": extra})

    def read_status_extra(self) -> dict[str, Any]:
        """The bookkeeping stored beside the status (supervisor and rank process ids)."""
        return self.read_status_and_extra()[1]
