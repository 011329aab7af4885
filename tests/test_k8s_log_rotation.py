"""Logs after the kubelet rotated them: only the new file is served, and an open follow may stall.

The emulator rotates a container's log past ``log_rotate_bytes`` (the kubelet's
``containerLogMaxSize``) and stalls the follows that were open (kubernetes#115701). dsnb must not
claim completeness: it opens a silent follow again after ``STALL_S`` and marks where lines were lost.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("kubernetes")

from k8s.fixtures import IMAGE, NAMESPACE, emulator, leftovers, make_cluster, sim  # noqa: E402, F401 - fixtures
from k8s.sandbox import sandbox_problem  # noqa: E402

from dsnb import JobSpec, JobState  # noqa: E402
from dsnb.backends.kubernetes import logs as logs_module  # noqa: E402
from dsnb.backends.kubernetes.logs import GAP_MARK  # noqa: E402

pytestmark = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")

CHATTY = "import time\nfor i in range(120):\n    print(f'line {i:03d} ' + 'x' * 40, flush=True)\n    time.sleep(0.02)\n"


def test_a_rotated_log_is_followed_on_and_the_gap_is_marked(emulator, sim, tmp_path, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(logs_module, "STALL_S", 1.0)
    emulator.log_rotate_bytes = 2000  # about 35 lines a file
    (tmp_path / "chatty.py").write_text(CHATTY)
    spec = JobSpec(name="chatty", command=[sys.executable, str(tmp_path / "chatty.py")], procs_per_node=1,
                   working_dir=str(tmp_path), image=IMAGE)
    with make_cluster(emulator, cancel_wait=30) as cluster:
        job = cluster.submit(spec)
        texts = [line.text for line in job.logs(follow=True)]
        assert job.status().state == JobState.SUCCEEDED
        assert GAP_MARK in texts  # said where lines went missing, instead of claiming completeness
        numbered = [t for t in texts if t.startswith("line ")]
        assert 0 < len(numbered) < 120 and numbered[-1].startswith("line 119")  # followed on to the end
        assert numbered == sorted(numbered) and len(set(numbered)) == len(numbered)  # in order, none twice
        assert leftovers(emulator, sim, job.name) == []


def test_without_rotation_nothing_is_marked(emulator, sim, tmp_path, monkeypatch) -> None:  # noqa: F811
    """The control: silent stretches and reconnects alone do not make a gap."""
    monkeypatch.setattr(logs_module, "STALL_S", 0.5)
    (tmp_path / "chatty.py").write_text(CHATTY.replace("0.02", "0.05").replace("range(120)", "range(20)")
                                        + "time.sleep(2)\nprint('after a quiet while', flush=True)\n")
    spec = JobSpec(name="quiet", command=[sys.executable, str(tmp_path / "chatty.py")], procs_per_node=1,
                   working_dir=str(tmp_path), image=IMAGE)
    with make_cluster(emulator, cancel_wait=30) as cluster:
        job = cluster.submit(spec)
        texts = [line.text for line in job.logs(follow=True)]
        assert GAP_MARK not in texts and len([t for t in texts if t.startswith("line ")]) == 20
        assert texts[-1] == "after a quiet while" or "after a quiet while" in texts
