"""What dsnb keeps about jobs holds no secret, stays private, and cannot be turned against its user.

Local: no secret value in ``spec.json`` or ``plan.json`` (the supervisor gets them through a
pipe; a served model's token is in a 0600 file of its own); ``DSNB_HOME`` and ``jobs/`` are 0700
and the user's; a name given to ``attach`` cannot leave ``DSNB_HOME``. Kubernetes: a record this
dsnb cannot read is listed as such instead of breaking ``jobs()``; ending a job deletes only the
objects it created (by uid), not whatever else has their names.
"""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import pytest
from k8s.fixtures import IMAGE, NAMESPACE, emulator, make_cluster, sim, workload  # noqa: F401 - fixtures
from k8s.sandbox import sandbox_problem

from dsnb import Cluster, ClusterError, InvalidSpecError, JobSpec, JobState, Secret

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=sandbox_problem() or "")
VALUES = {"HF_TOKEN": "hf_recordleak1", "DB_URL": "postgres://app:recordleak2@db/app", "PLAIN": Secret("recordleak3")}


def test_local_records_hold_no_secret_value_and_the_ranks_still_get_them(tmp_path: Path, dsnb_home: Path) -> None:
    (tmp_path / "check.py").write_text(textwrap.dedent("""
        import os
        expected = {"HF_TOKEN": "hf_recordleak1", "DB_URL": "postgres://app:recordleak2@db/app", "PLAIN": "recordleak3"}
        print("all values arrived" if all(os.environ[k] == v for k, v in expected.items()) else "a value is missing", flush=True)
    """))
    job = Cluster().submit(JobSpec(name="secrets", script="check.py", working_dir=str(tmp_path), env=VALUES))
    assert job.wait(timeout=60).state == JobState.SUCCEEDED
    assert [line.text for line in job.logs()] == ["all values arrived"]
    folder = dsnb_home / "jobs" / job.name
    for path in folder.iterdir():
        assert "recordleak" not in path.read_text(errors="replace"), path.name
    assert json.loads((folder / "plan.json").read_text())["ranks"][0]["env"]["HF_TOKEN"] == "***"


def test_a_served_models_token_is_kept_in_a_file_only_its_owner_reads(dsnb_home: Path) -> None:
    from dsnb import ServeSpec
    from dsnb.backends.local.backend import SERVE_TOKEN_FILE, LocalBackend

    backend = LocalBackend()
    plan = backend.serve_plan(ServeSpec(name="tiny", model="tiny_models:tiny_mlp", token="tok-recordleak4"))
    backend.apply(plan)
    try:
        folder = dsnb_home / "jobs" / plan.name
        token = folder / SERVE_TOKEN_FILE
        assert token.read_text() == "tok-recordleak4" and stat.S_IMODE(token.stat().st_mode) == 0o600
        for name in ("spec.json", "plan.json", "status.json"):
            assert "recordleak4" not in (folder / name).read_text(), name
        assert LocalBackend().endpoint_headers(plan.name) == {"Authorization": "Bearer tok-recordleak4"}  # another kernel
    finally:
        backend.cancel(plan.name)


def test_dsnb_home_is_private_and_a_shared_one_is_refused(tmp_path: Path, dsnb_home: Path, monkeypatch) -> None:
    (tmp_path / "t.py").write_text("")
    job = Cluster().submit(JobSpec(name="private", script="t.py", working_dir=str(tmp_path)))
    job.wait(timeout=60)
    for folder in (dsnb_home, dsnb_home / "jobs"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    shared = tmp_path / "shared-home"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("DSNB_HOME", str(shared))
    with pytest.raises(ClusterError, match="others may write in it") as info:
        Cluster().submit(JobSpec(name="private", script="t.py", working_dir=str(tmp_path)))
    assert "DSNB_HOME" in info.value.fix and not (shared / "jobs").exists() or not any((shared / "jobs").iterdir())


@pytest.mark.parametrize("name", ["/tmp/evil", "../evil", "evil/../../x", "Evil", "job\n"])
def test_a_name_that_is_a_path_is_refused(name: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        Cluster().attach(name).status()
    assert info.value.field == "name"


def test_a_record_this_dsnb_cannot_read_is_listed_without_hiding_the_others(emulator) -> None:  # noqa: F811
    with make_cluster(emulator) as cluster:
        plan = cluster.dryrun(workload("ok"))
        newer = plan.manifests[0]
        spec = json.loads(newer["data"]["spec.json"])
        newer["data"]["spec.json"] = json.dumps({**spec, "priority": "high"})  # a field of a newer dsnb
        newer["metadata"]["name"] = "from-a-newer-dsnb"
        newer["metadata"]["labels"]["dsnb.io/job"] = "from-a-newer-dsnb"
        emulator.create({**newer, "metadata": {**newer["metadata"], "namespace": NAMESPACE}})
        cluster.backend.apply(cluster.dryrun(workload("sleep")))
        listed = {s.name: s for s in cluster.jobs()}
    assert len(listed) == 2
    odd = listed["from-a-newer-dsnb"]
    assert odd.state == JobState.FAILED and "cannot read the job's record" in odd.message and "priority" in odd.message


@needs_sandbox
def test_ending_a_job_deletes_only_what_it_created(emulator, sim) -> None:  # noqa: F811
    with make_cluster(emulator, cancel_wait=30) as cluster:
        job = cluster.submit(workload("sleep"))
        # Someone else's Service now has the name dsnb would delete at the end (say the job's was replaced).
        emulator.delete("v1", "Service", NAMESPACE, job.name)
        emulator.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": job.name, "namespace": NAMESPACE},
                         "spec": {"ports": [{"port": 80}]}})
        assert job.cancel().state == JobState.CANCELLED
    assert emulator.get("v1", "Service", NAMESPACE, job.name) is not None  # left alone: not the one the job made
    assert emulator.get("apps/v1", "StatefulSet", NAMESPACE, job.name) is None  # what it made is gone
    assert emulator.get("v1", "ConfigMap", NAMESPACE, f"{job.name}-code") is None  # its shipped working_dir too
    made = json.loads(emulator.get("v1", "ConfigMap", NAMESPACE, job.name)["data"]["objects.json"])
    assert set(made) == {f"ServiceAccount/{job.name}", f"Role/{job.name}", f"RoleBinding/{job.name}", f"Service/{job.name}",
                         f"StatefulSet/{job.name}", f"ConfigMap/{job.name}-code"}
