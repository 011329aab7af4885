"""Preflight reports: what ``cluster.check()`` and ``dsnb check`` found, one line per check.

A check passes (✓), fails (✗), warns (!) or was not run (-) because an earlier one
failed. A report is ``ok`` when no check failed; warnings and checks not run do not
count against it.

Example:
    >>> report = PreflightReport("statefulset", [
    ...     CheckResult("API reachable", True, "v1.31.2 at https://10.0.0.1:6443"),
    ...     CheckResult("namespace", False, "namespace 'ml' does not exist", fix="kubectl create namespace ml"),
    ... ])
    >>> report.ok
    False
    >>> print(report)
    ✓ API reachable: v1.31.2 at https://10.0.0.1:6443
    ✗ namespace: namespace 'ml' does not exist
        fix: kubectl create namespace ml
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from dsnb.errors import ClusterError

MARKS = {"passed": "✓", "failed": "✗", "warning": "!", "not run": "-"}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: what was checked, e.g. ``"namespace"``.
        ok: whether it passed.
        detail: what was found, in words.
        fix: what to do when it did not pass.
        warning: a problem that may not stop a job (e.g. GPU capacity unknown); never fails the report.
        skipped: not run, because an earlier check failed; never fails the report.

    Example:
        >>> CheckResult("GPUs", False, "no node offers nvidia.com/gpu", warning=True).status
        'warning'
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False
    skipped: bool = False

    @property
    def status(self) -> str:
        """``"passed"``, ``"failed"``, ``"warning"`` or ``"not run"``."""
        if self.skipped:
            return "not run"
        if self.warning:
            return "warning"
        return "passed" if self.ok else "failed"

    @property
    def failed(self) -> bool:
        """Whether this result makes the report fail."""
        return self.status == "failed"

    def __str__(self) -> str:
        line = f"{MARKS[self.status]} {self.name}: {self.detail}"
        if self.fix and self.status != "passed":
            line += f"\n    fix: {self.fix}"
        return line


@dataclass
class PreflightReport:
    """Every check a backend ran before a job, in order.

    Attributes:
        backend: the backend name.
        results: one :class:`CheckResult` per check.
        fit: the memory estimate, when ``cluster.check(spec, model=...)`` was given a model
            (a :class:`dsnb.fit.FitEstimate`).

    Example:
        >>> PreflightReport("local", [CheckResult("torch", True, "torch 2.4.0")]).ok
        True
    """

    backend: str
    results: list[CheckResult] = field(default_factory=list)
    fit: Any = None

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings and checks not run do not count)."""
        return not self.problems

    @property
    def problems(self) -> list[CheckResult]:
        """The failed checks."""
        return [r for r in self.results if r.failed]

    @property
    def warnings(self) -> list[CheckResult]:
        """The checks that warned."""
        return [r for r in self.results if r.status == "warning"]

    def __getitem__(self, name: str) -> CheckResult:
        """The first result called ``name``.

        Raises:
            KeyError: no check of that name; the message lists the checks run.
        """
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check {name!r} in this report; it has: {', '.join(r.name for r in self.results)}")

    def summary(self) -> str:
        """One line: how many checks passed, failed and warned.

        Example:
            >>> PreflightReport("local", [CheckResult("torch", True, "torch 2.4.0")]).summary()
            "backend 'local': 1 check(s) passed"
        """
        counts = {status: sum(r.status == status for r in self.results) for status in MARKS}
        parts = [f"{counts['passed']} check(s) passed"]
        parts += [f"{counts[s]} {word}" for s, word in (("failed", "failed"), ("warning", "warning(s)"),
                                                         ("not run", "not run")) if counts[s]]
        return f"backend {self.backend!r}: " + ", ".join(parts)

    def raise_for_problems(self) -> PreflightReport:
        """Raise for the first failed check; return the report when none failed.

        Raises:
            ClusterError: naming the backend and the check, with the check's fix.

        Example:
            >>> PreflightReport("statefulset", [
            ...     CheckResult("namespace", False, "namespace 'ml' does not exist", fix="kubectl create namespace ml"),
            ... ]).raise_for_problems()
            Traceback (most recent call last):
            ...
            dsnb.errors.ClusterError: backend 'statefulset', check 'namespace': namespace 'ml' does not exist. Fix: kubectl create namespace ml
        """
        if self.problems:
            result = self.problems[0]
            raise ClusterError(f"backend {self.backend!r}, check {result.name!r}", result.detail,
                               result.fix or "see the detail, then run the check again")
        return self

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.results)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td title='{r.status}'>{MARKS[r.status]}</td><td>{html.escape(r.name)}</td>"
            f"<td>{html.escape(r.detail)}</td>"
            f"<td>{html.escape(r.fix) if r.status != 'passed' else ''}</td></tr>"
            for r in self.results
        )
        verdict = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"<table><caption>dsnb preflight, backend {html.escape(self.backend)}: {verdict}</caption>"
                f"<tr><th></th><th>check</th><th>found</th><th>fix</th></tr>{rows}</table>")
