"""Unpack a job's code in its pod (standard library only; Python 3.8 or later).

dsnb packs a spec's local ``working_dir`` into a tar.gz that travels in the ConfigMap
``<job>-code``, with this file beside it as ``unpack.py``; every pod that runs the job's code
mounts that ConfigMap read-only. Whatever starts first in the pod (the StatefulSet's entry, the
rank shim that ``mpirun`` starts, the Ray Train worker loop) calls :func:`unpack_from_environment`
(or runs ``python3 unpack.py BUNDLE DEST``), which extracts the bundle into a writable directory
(an emptyDir) once per pod: the ranks of one node that call it together wait for the first, and a
restarted container finds it done, its outputs kept. A bundle holds plain files only; a member that
is anything else, or that would land outside the directory, is refused.

Example:
    >>> import io, os, tarfile, tempfile
    >>> scratch = tempfile.TemporaryDirectory(); folder = scratch.name
    >>> member = tarfile.TarInfo("pkg/hello.txt"); member.size = 2
    >>> with tarfile.open(os.path.join(folder, "code.tar.gz"), "w:gz") as archive:
    ...     archive.addfile(member, io.BytesIO(b"hi"))
    >>> dest = unpack(os.path.join(folder, "code.tar.gz"), os.path.join(folder, "work"))
    >>> with open(os.path.join(dest, "pkg", "hello.txt")) as f:
    ...     f.read()
    'hi'
    >>> scratch.cleanup()
"""

import fcntl
import hashlib
import io
import os
import posixpath
import shutil
import sys
import tarfile
import zlib

#: The file in the destination that says which bundle is unpacked there (and serialises unpacking).
MARKER = ".dsnb-code"
#: What a bundle may hold once unpacked, in bytes (the packer allows less; this bounds a damaged one).
MAX_UNPACKED = 512 * 1024 * 1024


def _target(dest, name):
    """Where member ``name`` goes in ``dest``; refused when it would land outside."""
    path = posixpath.normpath(name)
    if path.startswith("/") or path == ".." or path.startswith("../") or path in (".", MARKER):
        raise ValueError(f"refusing bundle member {name!r}: it is not a relative path inside the working directory")
    return os.path.join(dest, *path.split("/"))


def _extract(data, dest):
    try:
        _extract_members(data, dest)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ValueError(f"the bundle is not a readable tar.gz ({e})") from e


def _extract_members(data, dest):
    total = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive:
            target = _target(dest, member.name)
            if not member.isfile():
                raise ValueError(f"refusing bundle member {member.name!r}: only plain files are unpacked")
            total += member.size
            if total > MAX_UNPACKED:
                raise ValueError(f"the bundle unpacks to more than {MAX_UNPACKED} bytes")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            source = archive.extractfile(member)
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)


def unpack(bundle, dest):
    """Extract the tar.gz ``bundle`` into ``dest`` unless that bundle is there already; return ``dest``.

    Files the job wrote in ``dest`` stay; files of the bundle are written again only when ``dest``
    holds another bundle (or none).

    Raises:
        ValueError: a bundle that is no readable tar.gz, or a member that is not a plain file or would
            land outside ``dest``.
        OSError: the bundle cannot be read or ``dest`` written.
    """
    with open(bundle, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, MARKER), "a+") as marker:
        fcntl.flock(marker, fcntl.LOCK_EX)  # the other ranks of this pod wait here
        marker.seek(0)
        if marker.read().strip() == digest:
            return dest
        _extract(data, dest)
        marker.seek(0)
        marker.truncate()
        marker.write(digest + "\n")
        marker.flush()
    return dest


def unpack_from_environment(environ=None):
    """Unpack ``$DSNB_CODE_BUNDLE`` into ``$DSNB_CODE_DIR`` and return that directory; None when the job
    ships no code (the variables are unset).

    Raises:
        ValueError, OSError: as :func:`unpack`.
    """
    environ = os.environ if environ is None else environ
    bundle, dest = environ.get("DSNB_CODE_BUNDLE"), environ.get("DSNB_CODE_DIR")
    if not bundle or not dest:
        return None
    return unpack(bundle, dest)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 unpack.py BUNDLE DEST")
    print(unpack(sys.argv[1], sys.argv[2]))
