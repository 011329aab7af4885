"""A stand-in ``dsnb`` package for the ranks of the Kubernetes serving tests (see ``runtime/server/__main__.py``).

The tests make this folder the ranks' working directory (the ServeSpec's ``working_dir``),
so ``python -m dsnb.runtime.server`` in a rank runs the stand-in instead of dsnb's real server.
"""
