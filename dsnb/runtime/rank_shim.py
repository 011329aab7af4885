"""What ``mpirun`` starts on every rank of an MPIJob: ``python3 -c <this file's text> ARGS``.

Open MPI's variables become torch.distributed's (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``NODE_RANK``; ``MASTER_ADDR`` comes from the launcher), so a training script runs unchanged.
``--run SCRIPT ARGS`` runs a Python script in this interpreter with line-buffered output:
mpirun forwards each write as it comes, so a line written in two parts could interleave with
another rank's. Anything else is executed as given. The launcher passes this file's text, not
its module name, so the workers need Python but not dsnb.

When the job ships its ``working_dir`` (``DSNB_CODE_BUNDLE``, mounted on the pod with its
``unpack.py`` beside it), the shim first unpacks it into ``DSNB_CODE_DIR`` (once per pod: the
pod's other ranks wait for the first) and starts the rank there.
"""
import os
import runpy
import sys

MASTER_PORT = 29500


def set_torch_distributed_env(env):
    """Fill torch.distributed's variables in ``env`` from Open MPI's ``OMPI_COMM_WORLD_*``."""
    env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
    env["LOCAL_RANK"] = env["OMPI_COMM_WORLD_LOCAL_RANK"]
    env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
    env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"] = env["OMPI_COMM_WORLD_LOCAL_SIZE"]
    env["NODE_RANK"] = env["GROUP_RANK"] = str(int(env["RANK"]) // int(env["LOCAL_SIZE"]))
    env.setdefault("MASTER_PORT", str(MASTER_PORT))


def enter_code(env):
    """Unpack the job's shipped working directory and go there, if it ships one."""
    bundle = env.get("DSNB_CODE_BUNDLE")
    if not bundle:
        return
    try:
        unpacker = runpy.run_path(os.path.join(os.path.dirname(bundle), "unpack.py"))
        os.chdir(unpacker["unpack_from_environment"](env))
    except (OSError, ValueError) as e:
        sys.exit(f"dsnb: rank {env.get('RANK')} could not unpack the job's working_dir from {bundle}: {e}")


def main(argv):
    """Run ``--run SCRIPT ARGS`` as a script here, or exec ``argv`` as a command."""
    set_torch_distributed_env(os.environ)
    enter_code(os.environ)
    if argv[0] == "--run":
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=False)
        sys.argv = argv[1:]
        sys.path[0] = os.path.dirname(os.path.abspath(argv[1]))
        runpy.run_path(argv[1], run_name="__main__")
    else:
        os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
