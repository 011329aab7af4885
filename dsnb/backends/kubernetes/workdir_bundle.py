"""A spec's local ``working_dir``, packed so that it travels to the pods without an image build.

On the Kubernetes backends a ``working_dir`` that is a directory on this machine is packed into
a deterministic tar.gz and shipped in a ConfigMap ``<job>-code`` (beside the few lines that
unpack it, :mod:`dsnb.runtime.code_unpack`); every pod that runs the job's code mounts it
read-only and unpacks it into an emptyDir at :data:`WORKDIR`, where the ranks start. A
``working_dir`` that is no directory here is a path in the image, as before.

What is packed: every plain file under the directory, except

- what ``.gitignore`` files leave out (those in the directory and its subdirectories, and, when
  the directory is inside a git repository, those of its parents up to the repository's top),
  read with ``pathspec``'s git semantics (a deeper file's pattern wins; ``!`` re-includes);
- always: ``.git``, ``__pycache__``, ``.ipynb_checkpoints``, ``.venv``, ``*.pyc``, ``*.ipynb``
  (notebooks and their outputs are not the job's code, as Ray leaves them out too);
- always, as secret-looking (named in the plan's notes): ``.env`` and ``.env.*``, ``.netrc``,
  ``.pypirc``, ``.git-credentials``, ``*.pem``, ``*.key``, ssh private keys (``id_rsa``...), and
  the folders ``.ssh``, ``.aws``, ``.kube``, ``.gnupg``;
- links that lead out of the directory, and anything that is not a file (sockets, devices).

Limits: the ConfigMap is one object, and kube-apiserver refuses a ConfigMap whose ``data`` and
``binaryData`` hold more than 1 MiB (``k8s.io/kubernetes`` ``pkg/apis/core/validation``
``ValidateConfigMap``: ``totalSize > core.MaxSecretSize``, 1048576 bytes, counting
``binaryData`` decoded); the bundle may use what the unpacker leaves of it. Before compressing,
at most :data:`MAX_FILES` files and :data:`MAX_UNPACKED` bytes are read. Past any limit the job is
refused (:class:`~dsnb.errors.InvalidSpecError` naming ``working_dir``) before anything is created.

Example:
    >>> import pathlib, tempfile
    >>> scratch = tempfile.TemporaryDirectory(); folder = pathlib.Path(scratch.name)
    >>> _ = (folder / "train.py").write_text("print('hi')")
    >>> _ = (folder / ".env").write_text("HF_TOKEN=hf_x")
    >>> bundle = pack(folder)
    >>> bundle.files, bundle.secret_like
    (('train.py',), ('.env',))
    >>> pack(folder).sha256 == bundle.sha256
    True
    >>> scratch.cleanup()
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import gzip
import hashlib
import io
import os
import stat
import tarfile
from importlib import resources
from pathlib import Path
from typing import Any

import pathspec  # a k8s extra: missing, the backend is unavailable with its install hint

from dsnb.backends.kubernetes.pod_template import ExtraVolume
from dsnb.errors import InvalidSpecError

#: kube-apiserver's limit on a ConfigMap's ``data`` plus ``binaryData`` (``core.MaxSecretSize``).
CONFIGMAP_LIMIT = 1024 * 1024
#: Files read at most, and bytes before compression.
MAX_FILES = 20_000
MAX_UNPACKED = 64 * 1024 * 1024
BUNDLE_KEY = "code.tar.gz"
UNPACKER_KEY = "unpack.py"
#: Where pods mount the ConfigMap, and the emptyDir the code is unpacked into (the ranks' working directory).
CODE_MOUNT = "/var/run/dsnb/code"
WORKDIR = "/var/run/dsnb/workdir"
CODE_VOLUME = "dsnb-code"
WORKDIR_VOLUME = "dsnb-workdir"
SHIP_MODES = ("auto", "always", "never")
ALTERNATIVES = ("build an image with the code and set working_dir to its path there; put the code on a PersistentVolumeClaim "
                "(PodOptions(checkpoint_pvc=...) mounts one) and set working_dir to a path on it; or keep it in an object "
                "store (an fsspec URL such as s3://...) and fetch it in the job")
_LEFT_OUT_NAMES = frozenset({".git", "__pycache__", ".ipynb_checkpoints", ".venv"})  # files or folders (a worktree's .git is a file)
_LEFT_OUT_FILES = ("*.pyc", "*.ipynb")
_SECRET_DIRS = frozenset({".ssh", ".aws", ".kube", ".gnupg"})
_SECRET_FILES = (".env", ".env.*", ".netrc", ".pypirc", ".git-credentials", "*.pem", "*.key",
                 "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")


@dataclasses.dataclass(frozen=True)
class CodeBundle:
    """A packed working directory.

    Attributes:
        source: the directory packed (absolute).
        archive: the tar.gz (deterministic: sorted names, no times, owners or modes but the executable bit).
        files: the paths packed, relative to ``source``, sorted.
        secret_like: the secret-looking paths left out.
    """

    source: str
    archive: bytes = dataclasses.field(repr=False)
    files: tuple[str, ...]
    secret_like: tuple[str, ...] = ()

    @property
    def sha256(self) -> str:
        """The archive's digest."""
        return hashlib.sha256(self.archive).hexdigest()

    def config_map(self, job: str, labels: dict[str, str]) -> dict[str, Any]:
        """The ConfigMap ``<job>-code``: the archive and its unpacker (immutable: the code of a job does not change)."""
        return {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": code_config_map(job), "labels": labels,
                         "annotations": {"dsnb.io/code-sha256": self.sha256, "dsnb.io/code-files": str(len(self.files))}},
            "immutable": True,
            "data": {UNPACKER_KEY: unpacker_text()},
            "binaryData": {BUNDLE_KEY: base64.b64encode(self.archive).decode()},
        }

    def notes(self, job: str) -> list[str]:
        """What the plan of job ``job`` says about the code it ships."""
        said = [f"working_dir {self.source!r} travels in ConfigMap {code_config_map(job)}: {len(self.files)} file(s), "
                f"{len(self.archive)} bytes packed (of {bundle_limit()} allowed), unpacked in each pod to {WORKDIR}; "
                "anyone who may read ConfigMaps in the namespace may read it; print(plan) shows its size only, "
                "plan.to_yaml() all of it"]
        if self.secret_like:
            said.append(f"left out of working_dir as secret-looking: {', '.join(self.secret_like)} "
                        "(give secrets as env values, which go to a Secret, or as SecretRef)")
        return said


def code_config_map(job: str) -> str:
    """The name of a job's code ConfigMap."""
    return f"{job}-code"


def unpacker_text() -> str:
    """The unpacker shipped beside the archive (:mod:`dsnb.runtime.code_unpack`)."""
    return resources.files("dsnb.runtime").joinpath("code_unpack.py").read_text()


def bundle_limit() -> int:
    """The bytes the archive may have: the ConfigMap's limit less the unpacker's text."""
    return CONFIGMAP_LIMIT - len(unpacker_text().encode())


def code_volumes(job: str) -> list[ExtraVolume]:
    """The ConfigMap (read-only) and the emptyDir it is unpacked into, for a pod that runs the job's code."""
    return [ExtraVolume({"name": CODE_VOLUME, "configMap": {"name": code_config_map(job), "defaultMode": 0o444}}, CODE_MOUNT, read_only=True),
            ExtraVolume({"name": WORKDIR_VOLUME, "emptyDir": {}}, WORKDIR)]


def code_env() -> dict[str, str]:
    """What tells a pod's entry (or rank) where the archive is and where to unpack it."""
    return {"DSNB_CODE_BUNDLE": f"{CODE_MOUNT}/{BUNDLE_KEY}", "DSNB_CODE_DIR": WORKDIR}


def local_directory(working_dir: str | None, mode: str = "auto") -> Path | None:
    """The directory on this machine to ship for ``working_dir``, or None when it is a path in the image.

    ``mode`` ``"auto"``: a directory here is shipped, an absolute path that is no directory here is
    a path in the image, a relative one must be a directory here; ``"always"``: it must be a
    directory here; ``"never"``: it is always a path in the image.

    Example:
        >>> local_directory("/no/such/app") is None, local_directory(None) is None
        (True, True)

    Raises:
        InvalidSpecError: ``working_dir`` names no directory here where one is needed.
    """
    if not working_dir or mode == "never":
        return None
    path = Path(working_dir).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() and mode == "auto":
        return None
    where = f"relative to {os.getcwd()!r}" if not path.is_absolute() else "on this machine"
    raise InvalidSpecError("working_dir", f"{working_dir!r} is not a directory {where}, so it cannot be shipped to the pods",
                           "pass an existing directory with your code, or the absolute path of the code in the image "
                           "(Cluster(..., ship_working_dir='never') takes every working_dir as a path in the image)")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _gitignore(folder: Path) -> Any:
    """The compiled ``.gitignore`` of ``folder``, or None."""
    try:
        lines = (folder / ".gitignore").read_text(errors="replace").splitlines()
    except OSError:
        return None
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except ValueError as e:  # pathspec's GitWildMatchPatternError
        raise InvalidSpecError("working_dir", f"{str(folder / '.gitignore')!r} has a pattern git would not take ({e})",
                               "fix or remove that line") from e


def _outer_rules(root: Path) -> list[tuple[Path, Any]]:
    """The ``.gitignore`` files of ``root``'s parents up to its git repository's top (none outside a repository)."""
    top = next((p for p in root.parents if (p / ".git").exists()), None)
    if top is None:
        return []
    folders = [p for p in root.parents if p == top or top in p.parents]
    return [(p, spec) for p in reversed(folders) if (spec := _gitignore(p)) is not None]


def _ignored(path: Path, is_dir: bool, rules: list[tuple[Path, Any]]) -> bool:
    """Whether the ``.gitignore`` rules leave ``path`` out; the deepest file that has a say decides."""
    for base, spec in reversed(rules):
        relative = path.relative_to(base).as_posix() + ("/" if is_dir else "")
        said = spec.check_file(relative).include
        if said is not None:
            return bool(said)
    return False


class _Walk:
    """The files to pack under ``root``, in sorted order, and the secret-looking ones left out."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[tuple[str, Path]] = []
        self.secret_like: list[str] = []
        self.size = 0

    def run(self) -> None:
        self._visit(self.root, _outer_rules(self.root))

    def _visit(self, folder: Path, rules: list[tuple[Path, Any]]) -> None:
        own = _gitignore(folder)
        if own is not None:
            rules = [*rules, (folder, own)]
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise InvalidSpecError("working_dir", f"{str(folder)!r} cannot be read ({e.strerror})", "make it readable, or leave it out with .gitignore") from e
        for entry in entries:
            path = Path(entry.path)
            relative = path.relative_to(self.root).as_posix()
            is_dir = entry.is_dir(follow_symlinks=False)
            if (is_dir and entry.name in _SECRET_DIRS) or (not is_dir and _matches(entry.name, _SECRET_FILES)):
                self.secret_like.append(relative + ("/" if is_dir else ""))
                continue
            if entry.name in _LEFT_OUT_NAMES or (not is_dir and _matches(entry.name, _LEFT_OUT_FILES)):
                continue
            if _ignored(path, is_dir, rules):
                continue
            if is_dir:
                self._visit(path, rules)
            elif self._is_packable(path):
                self._add(relative, path)

    def _is_packable(self, path: Path) -> bool:
        """A plain file, or a link to one inside the directory."""
        try:
            if path.is_symlink() and self.root not in path.resolve().parents:
                return False
            return stat.S_ISREG(path.stat().st_mode)
        except OSError:
            return False  # a dangling link

    def _add(self, relative: str, path: Path) -> None:
        self.files.append((relative, path))
        self.size += path.stat().st_size
        if len(self.files) > MAX_FILES or self.size > MAX_UNPACKED:
            what = f"more than {MAX_FILES} files" if len(self.files) > MAX_FILES else f"more than {MAX_UNPACKED} bytes unpacked"
            raise _too_big(self.root, what)


def _too_big(root: Path, what: str) -> InvalidSpecError:
    return InvalidSpecError("working_dir", f"{str(root)!r} is too big to ship in a ConfigMap: {what} (a ConfigMap holds at most "
                                           f"{CONFIGMAP_LIMIT} bytes, {bundle_limit()} of them packed code)",
                            f"leave data, checkpoints and environments out with .gitignore; or {ALTERNATIVES}")


def pack(directory: str | os.PathLike[str], limit: int | None = None) -> CodeBundle:
    """Pack ``directory`` as the pods will unpack it (see the module docstring for what is left out).

    Args:
        directory: an existing directory on this machine.
        limit: the most bytes the archive may have (default :func:`bundle_limit`).

    Raises:
        InvalidSpecError: the directory is past a limit (the message names its size and the other ways to
            bring code to the pods) or cannot be read.
    """
    root = Path(directory).resolve()
    limit = bundle_limit() if limit is None else limit
    walk = _Walk(root)
    walk.run()
    if not walk.files:
        raise InvalidSpecError("working_dir", f"{str(root)!r} has no file to ship: every one is left out (.gitignore, or left out "
                                              "always: see docs/jobspec.md)", "check its .gitignore files, or pass the directory of your code")
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for relative, path in walk.files:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise InvalidSpecError("working_dir", f"{str(path)!r} cannot be read ({e.strerror})",
                                       "make it readable, or leave it out with .gitignore") from e
            member = tarfile.TarInfo(relative)
            member.size, member.mtime, member.uname, member.gname = len(data), 0, "", ""
            member.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            archive.addfile(member, io.BytesIO(data))
            if raw.tell() > limit:  # already past it before the compressor's last bytes
                raise _too_big(root, f"{len(walk.files)} files of {walk.size} bytes pack to more than {limit} bytes")
    archive_bytes = raw.getvalue()
    if len(archive_bytes) > limit:
        raise _too_big(root, f"{len(walk.files)} files of {walk.size} bytes pack to {len(archive_bytes)} bytes, more than {limit}")
    return CodeBundle(str(root), archive_bytes, tuple(relative for relative, _ in walk.files), tuple(walk.secret_like))
