"""Skips are loud: in CI a skipped test fails the run with its reason; locally the summary counts them.

CI (``CI=true``, as ``.ci/run`` is called, or ``DSNB_NO_SKIPS=1``) is meant to run every test: a
missing prerequisite there (``unshare``, ``ip netns``, Open MPI, chromium, strace, an optional
package) would otherwise turn a whole group of end-to-end tests into skips while the run stays
green. So a skip, whether raised in a test, by a ``skipif`` mark or at module level by
``importorskip``, becomes a failure that names what is missing. Locally a skip stays a skip, and
the end of the run says how many were skipped and why.

Example (in a shell)::

    CI=true python -m pytest tests/test_browser.py   # fails if chromium is missing
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

FIX = "install what it needs (.ci/run installs every prerequisite of the suite)"


def skips_are_failures() -> bool:
    """Whether this run is one where every test must run (CI, or ``DSNB_NO_SKIPS=1``)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes") or os.environ.get("DSNB_NO_SKIPS") == "1"


def skip_reason(report: Any) -> str:
    """The reason of a skipped report, as pytest's ``-rs`` summary would show it."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _refuse(report: Any, where: str) -> None:
    report.outcome = "failed"
    report.longrepr = f"{where} skipped where every test must run (CI=true): {skip_reason(report)}; {FIX}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and skips_are_failures():
        _refuse(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if report.outcome == "skipped" and skips_are_failures():
        _refuse(report, collector.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    reasons = Counter(skip_reason(r) for r in skipped)
    terminalreporter.section(f"{len(skipped)} skipped, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:4d} x {reason}")
    terminalreporter.write_line("CI (CI=true) fails on any of these; install the missing prerequisites to run them.")
