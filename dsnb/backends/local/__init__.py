"""The local backend: ranks as processes on this machine (see :mod:`.backend`)."""

from dsnb.backends.local.backend import LocalBackend

__all__ = ["LocalBackend"]
