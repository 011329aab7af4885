"""Every ``Example:`` in dsnb's docstrings runs and shows what it claims.

Docstring examples are the first code a reader copies; a stale one (a renamed module, a
changed message) is caught here rather than by a user.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import dsnb

MODULES = sorted(m.name for m in pkgutil.walk_packages(dsnb.__path__, "dsnb.") if not m.name.endswith("__main__"))


def test_the_walk_finds_the_package_layout():
    assert {"dsnb.runtime.pod_entry", "dsnb.runtime.server.server", "dsnb.serving.endpoint",
            "dsnb.backends.kubernetes.kuberay"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail: run python -m doctest -v on it"
