"""Opt-in hooks that report a framework's metrics with their true steps.

Without them, dsnb still reads what the frameworks print (see :mod:`dsnb.metrics`), numbered
by line; with them, every sample carries the framework's global step. Each module imports
its framework only when used, so ``import dsnb`` needs none of them.

- :mod:`dsnb.integrations.transformers`: ``DsnbCallback`` for the Hugging Face Trainer.
"""
