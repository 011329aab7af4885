"""What every rank of a function job runs: ``python3 -c <this file's text> PAYLOAD PYTHON``.

``PAYLOAD`` is the function and its keyword arguments as :mod:`dsnb.function_job` packed them
(cloudpickle, zlib, URL-safe base64); ``PYTHON`` is the ``major.minor`` version that packed
them. Each rank calls ``function(**kwargs)``; rank 0 then prints its return value as result
lines (``DSNB_RESULT <digest> <i>/<n> <chunk>``) that :meth:`dsnb.job.Job.result` reads back
from the job's logs. The digest is the payload's, so only this job's lines are read.

The text, not a module name, is passed so that a rank needs Python and cloudpickle, not dsnb.
An exception in the function propagates: the rank exits 1 with its traceback, as a script would.
A return value that cannot be pickled, or is larger than :data:`MAX_RESULT_BYTES`, is reported by
a ``DSNB_RESULT_ERROR`` line; the job still succeeds (its work is done), and ``job.result()``
raises with the reason.
"""
import base64
import hashlib
import os
import pickle
import sys
import zlib

RESULT_TAG = "DSNB_RESULT"
ERROR_TAG = "DSNB_RESULT_ERROR"
#: Characters of base64 per result line, below the 16 KiB at which container runtimes split a log line.
CHUNK_CHARS = 8000
#: The largest pickled return value a job reports (its lines must fit in a job's kept log tail).
MAX_RESULT_BYTES = 192 * 1024


def digest(payload):
    """The name of a job's result lines: the first 16 hex digits of the payload's SHA-256."""
    return hashlib.sha256(payload.encode("ascii")).hexdigest()[:16]


def result_lines(value, payload_digest):
    """The lines that carry ``value``; a ``DSNB_RESULT_ERROR`` line when it cannot be carried."""
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception as error:  # any object's __reduce__ may raise anything
        return [f"{ERROR_TAG} {payload_digest} the return value ({type(value).__name__}) cannot be pickled: {error}"]
    if len(data) > MAX_RESULT_BYTES:
        return [f"{ERROR_TAG} {payload_digest} the return value is {len(data)} bytes pickled, more than the "
                f"{MAX_RESULT_BYTES} a job reports: save it to a file or storage and return its path"]
    text = base64.urlsafe_b64encode(zlib.compress(data)).decode("ascii")
    chunks = [text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
    return [f"{RESULT_TAG} {payload_digest} {i + 1}/{len(chunks)} {chunk}" for i, chunk in enumerate(chunks)]


def python_version():
    """This interpreter's ``major.minor``, as a packed function records the one that packed it."""
    return "{}.{}".format(*sys.version_info[:2])


def load(payload, packed_on):
    """The function and its keyword arguments; exits 1 with the reason when this Python cannot load them."""
    here = python_version()
    if here != packed_on:
        sys.exit(f"dsnb: the function was packed on Python {packed_on} and this rank runs Python {here}; "
                 f"cloudpickle needs the same version: use an image with Python {packed_on}, or a script")
    try:
        import cloudpickle  # noqa: F401  (pickle.loads imports it by name)
    except ImportError:
        sys.exit("dsnb: a function job needs cloudpickle on every rank: add it to the image (pip install cloudpickle)")
    return pickle.loads(zlib.decompress(base64.urlsafe_b64decode(payload)))


def main(argv, own_process=False):
    """Call the packed function on this rank; rank 0 prints its result lines.

    ``own_process``: this rank's process is the runner's (not a Ray Train worker, whose process
    group Ray owns), so a process group the function left open is destroyed before it exits; a
    process that exits with gloo's threads still running may abort ("terminate called without an
    active exception") after its work is done.
    """
    payload, packed_on = argv[0], argv[1]
    function, kwargs = load(payload, packed_on)
    value = function(**kwargs)
    if os.environ.get("RANK", "0") == "0":
        sys.stdout.flush()
        for line in result_lines(value, digest(payload)):
            print(line, flush=True)
    distributed = sys.modules.get("torch.distributed")
    if own_process and distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:], own_process=True)
