"""Serving: what to serve (:class:`ServeSpec`) and the model runner every serving backend uses."""

from dsnb.serving.spec import ServeSpec

__all__ = ["ServeSpec"]
