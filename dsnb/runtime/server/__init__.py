"""The model server every rank of a served model runs: ``python -m dsnb.runtime.server``.

Its parts are the command line and rank wiring (:mod:`~dsnb.runtime.server.server`), the model
runner (:mod:`~dsnb.runtime.server.model`), the batch loop shared by the ranks
(:mod:`~dsnb.runtime.server.engine`), the HTTP routes (:mod:`~dsnb.runtime.server.app`) with the
OpenAI (:mod:`~dsnb.runtime.server.openai_api`) and KServe v2 (:mod:`~dsnb.runtime.server.kserve`)
protocols, the client connections (:mod:`~dsnb.runtime.server.connections`) and the counters
(:mod:`~dsnb.runtime.server.stats`). Importing this package needs none of them.
"""
