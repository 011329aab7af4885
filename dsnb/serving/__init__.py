"""Serving: what to serve (:class:`ServeSpec`), and the model server every job backend runs.

``python -m dsnb.serving`` (:mod:`dsnb.serving.server`) is the multi-rank server; its parts are
the model runner (:mod:`~dsnb.serving.model`), the batch loop shared by the ranks
(:mod:`~dsnb.serving.engine`), the HTTP routes (:mod:`~dsnb.serving.app`) with the OpenAI
(:mod:`~dsnb.serving.openai_api`) and KServe v2 (:mod:`~dsnb.serving.kserve`) protocols, and the
counters (:mod:`~dsnb.serving.stats`). Importing this package needs none of them.
"""

from dsnb.serving.spec import ServeSpec

__all__ = ["ServeSpec"]
