"""Opt-in hooks that report a framework's metrics with their true steps.

Without them, dsnb reads what a framework prints where it prints metrics at all (the Hugging
Face Trainer does, see :mod:`dsnb.metrics`), numbered by line; with them, every sample
carries the framework's own step. Each module imports
its framework only when used, so ``import dsnb`` needs none of them.

- :mod:`dsnb.integrations.transformers`: ``DsnbCallback`` for the Hugging Face Trainer.
- :mod:`dsnb.integrations.accelerate`: ``DsnbTracker`` for ``Accelerator(log_with=...)``
  (Accelerate prints no metric, so this is the only way its values reach dsnb).
- :mod:`dsnb.integrations.lightning`: ``DsnbLogger`` for the Lightning ``Trainer`` and
  ``Fabric`` (Lightning prints metrics only in its progress bar, which is not parsed).

See docs/frameworks.md.
"""
