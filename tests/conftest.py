"""Shared fixtures: every test gets its own DSNB_HOME, and no job process may outlive a test."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# DeepSpeed runs on CPU in the tests (a GPU machine may set DS_ACCELERATOR=cuda). Set before anything imports it: its
# accelerator is chosen once per process, and without the variable it says so on standard output, which doctests see.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from helpers import job_processes, settled  # noqa: E402
from skip_policy import pytest_make_collect_report, pytest_runtest_makereport, pytest_terminal_summary  # noqa: E402,F401


@pytest.fixture(autouse=True)
def dsnb_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("dsnb-home")
    monkeypatch.setenv("DSNB_HOME", str(home))
    monkeypatch.setenv("DSNB_KILL_GRACE", "2")
    yield home
    # A test that leaves processes behind is a leak in dsnb or in the test: fail loudly, then clean up.
    leftovers = settled(lambda: job_processes(str(home)))
    for pid in leftovers:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not leftovers, f"job processes survived the test: {leftovers}"


@pytest.fixture
def cluster(dsnb_home: Path):
    """A local Cluster; any job a test leaves running is cancelled."""
    from dsnb import Cluster

    with Cluster() as c:
        yield c
        for status in c.jobs():
            if not status.state.is_terminal():
                c.attach(status.name).cancel()


@pytest.fixture
def shown(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, Any]]]:
    """What the display path hands to IPython's ``display`` (object and keyword arguments)."""
    import IPython.display

    calls: list[tuple[Any, dict[str, Any]]] = []

    def fake_display(obj: Any, **kwargs: Any) -> Any:
        calls.append((obj, kwargs))
        return None

    monkeypatch.setattr(IPython.display, "display", fake_display)
    return calls


@pytest.fixture
def emu():
    """A bare Kubernetes API emulator (namespaces ``default`` and ``ml``, no CRD schemas); its threads must end with it."""
    from k8s.emulator import KubeEmulator

    emulator = KubeEmulator(namespaces=("default", "ml")).start()
    try:
        yield emulator
    finally:
        emulator.stop()
    assert not emulator.threads, f"server threads outlived stop(): {emulator.threads}"
