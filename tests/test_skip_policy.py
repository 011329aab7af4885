"""The suite's skip policy: in CI a skip fails the run with its reason; locally it is counted by reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPPING = '''
import pytest

pytest.importorskip("{module}")

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="the frobnicator is missing")
def test_needs_frobnicator():
    pass

def test_skips_inside():
    pytest.skip("no strace here")
'''


def run_pytest(tmp_path: Path, module: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(SKIPPING.format(module=module))
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                                          "from skip_policy import pytest_make_collect_report, pytest_runtest_makereport, "
                                          "pytest_terminal_summary  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DSNB_NO_SKIPS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_locally_a_skip_stays_a_skip_and_the_summary_counts_reasons(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "json", ci=None)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 2 skipped" in run.stdout
    assert "2 skipped, by reason" in run.stdout
    assert "1 x the frobnicator is missing" in run.stdout and "1 x no strace here" in run.stdout


def test_in_ci_every_skip_fails_with_its_reason(tmp_path: Path) -> None:
    run = run_pytest(tmp_path, "json", ci="true")
    assert run.returncode == 1, run.stdout
    # A skipif mark skips in setup, so it shows as an error; a skip inside the test as a failure.
    assert run.stdout.splitlines()[-1].startswith("1 failed, 1 passed, 1 error"), run.stdout
    assert "skipped where every test must run (CI=true): the frobnicator is missing" in run.stdout
    assert "skipped where every test must run (CI=true): no strace here" in run.stdout


@pytest.mark.parametrize("ci, code", [(None, 5), ("true", 2)])
def test_a_missing_optional_package_fails_the_collection_in_ci(tmp_path: Path, ci: str | None, code: int) -> None:
    run = run_pytest(tmp_path, "no_such_package_zz", ci=ci)
    assert run.returncode == code, run.stdout
    if ci:
        assert "could not import 'no_such_package_zz'" in run.stdout and "CI=true" in run.stdout
    else:
        assert "1 skipped" in run.stdout
