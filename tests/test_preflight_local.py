"""Preflight reports themselves, the default check of a backend, and the local backend's check."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dsnb import Cluster, JobSpec, Resources
from dsnb.backends.base import Backend, Plan
from dsnb.backends.local.backend import usable_cpus
from dsnb.console.cli import main
from dsnb.errors import ClusterError
from dsnb.preflight import CheckResult, PreflightReport


def mixed_report() -> PreflightReport:
    return PreflightReport("statefulset", [
        CheckResult("API reachable", True, "Kubernetes v1.32.0 at https://k8s:6443"),
        CheckResult("namespace", False, "cannot read namespace 'ml'", warning=True),
        CheckResult("permission <pods>", False, "cannot list & watch", fix="ask for the Role"),
        CheckResult("GPUs", False, "not run: the API server did not answer", skipped=True),
    ])


def run_cli(*argv: str) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    code = main(list(argv), console=console)
    return code, console.file.getvalue()


# -- the report --------------------------------------------------------------------------------------------
def test_report_lines_marks_and_verdict():
    report = mixed_report()
    assert not report.ok
    assert [r.status for r in report.results] == ["passed", "warning", "failed", "not run"]
    assert [r.name for r in report.problems] == ["permission <pods>"]
    assert [r.name for r in report.warnings] == ["namespace"]
    assert str(report).splitlines() == [
        "✓ API reachable: Kubernetes v1.32.0 at https://k8s:6443",
        "! namespace: cannot read namespace 'ml'",
        "✗ permission <pods>: cannot list & watch",
        "    fix: ask for the Role",
        "- GPUs: not run: the API server did not answer",
    ]
    assert report.summary() == "backend 'statefulset': 1 check(s) passed, 1 failed, 1 warning(s), 1 not run"


def test_warnings_and_checks_not_run_do_not_fail_a_report():
    report = PreflightReport("x", [r for r in mixed_report().results if r.status != "failed"])
    assert report.ok and report.raise_for_problems() is report


def test_raise_for_problems_names_the_first_failed_check_and_its_fix():
    with pytest.raises(ClusterError) as caught:
        mixed_report().raise_for_problems()
    assert str(caught.value) == "backend 'statefulset', check 'permission <pods>': cannot list & watch. Fix: ask for the Role"
    assert caught.value.fix == "ask for the Role"


def test_html_is_a_table_with_everything_escaped():
    page = mixed_report()._repr_html_()
    assert page.startswith("<table>") and page.endswith("</table>")
    assert "permission &lt;pods&gt;" in page and "list &amp; watch" in page and "<pods>" not in page
    assert page.count("<tr>") == 5  # the header and one row per check
    assert "1 problem(s)" in page


def test_looking_up_a_check_that_was_not_run_names_the_ones_that_were():
    with pytest.raises(KeyError, match="no check 'GPU Operator'.*API reachable, namespace"):
        mixed_report()["GPU Operator"]


# -- backends ----------------------------------------------------------------------------------------------
class Bare(Backend):
    """A backend with nothing to check before a job."""

    name = "bare"

    def render(self, spec: JobSpec) -> Plan:
        return Plan(backend=self.name, spec=spec)

    apply = status = read_logs = read_metrics = stop_running = jobs = spec_of = None  # type: ignore[assignment]


def test_a_backend_without_a_preflight_passes_with_one_line():
    report = Cluster(Bare()).check()
    assert report.ok and str(report) == "✓ backend: 'bare' needs no preflight"


def test_the_local_backend_passes_here(cluster):
    report = cluster.check(JobSpec(name="two", command=["true"], procs_per_node=min(2, usable_cpus())))
    assert report.ok, str(report)
    assert [r.name for r in report.results] == ["torch", "deepspeed", "CPU cores"]
    assert report["torch"].detail.startswith("torch 2.") and report["deepspeed"].detail.startswith("deepspeed 0.")
    assert report["CPU cores"].detail == f"{usable_cpus()} usable for {min(2, usable_cpus())} rank(s)"


def test_more_ranks_than_cores_is_a_warning(cluster):
    ranks = usable_cpus() + 1
    report = cluster.check(JobSpec(name="many", command=["true"], procs_per_node=ranks))
    assert report.ok and report["CPU cores"].status == "warning"
    assert f"! CPU cores: {usable_cpus()} usable for {ranks} rank(s)" in str(report)


def test_gpus_on_a_machine_without_them_fail_clearly(cluster, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    report = cluster.check(JobSpec(name="gpu", command=["true"], nodes=2, resources=Resources(gpus=1)))
    assert not report.ok
    assert str(report["GPUs"]) == ("✗ GPUs: 2 asked (1 per node x 2 node(s)), this machine shows 0\n"
                                   "    fix: set gpus=0 to run on CPU, or ask for fewer")


def test_a_missing_package_fails_with_the_install_line(cluster, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    report = cluster.check()
    assert report["deepspeed"].status == "failed" and report["deepspeed"].fix == "pip install 'dsnb[local]'"


# -- dsnb check on the local backend -----------------------------------------------------------------------
def test_dsnb_check_locally(monkeypatch):
    code, out = run_cli("check")
    assert code == 0 and "✓ torch: torch 2." in out and out.rstrip().endswith("backend 'local': 3 check(s) passed")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, out = run_cli("check", "--gpus", "1")
    assert code == 1 and "✗ GPUs: 1 asked (1 per node x 1 node(s)), this machine shows 0" in out


def test_dsnb_check_rejects_kubernetes_options_and_bad_counts_locally():
    code, out = run_cli("check", "--namespace", "ml")
    assert code == 2 and "backend 'local': takes no --namespace" in out
    code, out = run_cli("check", "--gpus", "2", "--procs", "3")
    assert code == 2 and "(option --procs)" in out
    code, out = run_cli("check", "--nodes", "0")
    assert code == 2 and "(option --nodes)" in out
