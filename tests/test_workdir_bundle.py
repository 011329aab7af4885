"""A spec's local working_dir travels to the pods of every Kubernetes backend in a ConfigMap.

The packer (``dsnb/backends/kubernetes/workdir_bundle.py``) and the unpacker the pods run
(``dsnb/runtime/code_unpack.py``) are tested directly; the plans of each backend for what they
mount and tell the pods; the limit against the API emulator, which refuses a ConfigMap past
1 MiB as kube-apiserver does. The real runs are in the multi-node tests (test_k8s_multinode.py,
test_k8s_mpi_multinode.py), which train from a working_dir the pods' image has not.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import tarfile
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kubernetes")

import yaml  # noqa: E402
from k8s.fixtures import NAMESPACE, emulator, make_cluster  # noqa: E402, F401
from kubernetes.client.exceptions import ApiException  # noqa: E402

from dsnb import Cluster, InvalidSpecError, JobSpec  # noqa: E402
from dsnb.backends.kubernetes import workdir_bundle  # noqa: E402
from dsnb.backends.kubernetes.workdir_bundle import (  # noqa: E402
    BUNDLE_KEY,
    CODE_MOUNT,
    CONFIGMAP_LIMIT,
    UNPACKER_KEY,
    WORKDIR,
    CodeBundle,
    bundle_limit,
    local_directory,
    pack,
)
from dsnb.runtime.code_unpack import unpack  # noqa: E402

IMAGE = "registry.example/train:1"


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def members(bundle: CodeBundle) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(bundle.archive), mode="r:gz") as archive:
        return archive.getmembers()


# -- what is packed -------------------------------------------------------------------------------

def test_gitignore_files_are_honoured_with_git_semantics(tmp_path: Path) -> None:
    repo = tree(tmp_path / "repo", {
        ".gitignore": "*.ckpt\n/top-only.txt\n",  # the repository's top: applies to the shipped folder below it
        "project/.gitignore": "data/\n*.log\n!keep.log\n",
        "project/train.py": "", "project/keep.log": "", "project/run.log": "", "project/model.ckpt": "",
        "project/data/big.bin": "", "project/pkg/__init__.py": "", "project/pkg/.gitignore": "generated.py\n",
        "project/pkg/generated.py": "", "project/pkg/data/real.py": "",  # data/ of the parent matches here too
        "project/top-only.txt": "",  # anchored to the repository's top, not this folder
    })
    (repo / ".git").mkdir()
    assert pack(repo / "project").files == (".gitignore", "keep.log", "pkg/.gitignore", "pkg/__init__.py", "top-only.txt", "train.py")
    # Outside a repository only the folder's own .gitignore files count.
    (repo / ".git").rmdir()
    assert "model.ckpt" in pack(repo / "project").files


def test_what_is_always_left_out_and_what_looks_secret(tmp_path: Path) -> None:
    folder = tree(tmp_path, {
        "train.py": "", "nb.ipynb": "{}", "mod.pyc": "", "__pycache__/mod.cpython-311.pyc": "",
        ".ipynb_checkpoints/nb-checkpoint.ipynb": "", ".venv/bin/python": "", ".git/HEAD": "",
        ".env": "HF_TOKEN=x", ".env.local": "x", "keys/id_rsa": "x", "tls/server.pem": "x", ".ssh/config": "x",
        ".aws/credentials": "x", "id_rsa.pub": "public",
    })
    bundle = pack(folder)
    assert bundle.files == ("id_rsa.pub", "train.py")
    assert bundle.secret_like == (".aws/", ".env", ".env.local", ".ssh/", "keys/id_rsa", "tls/server.pem")
    (folder / ".git").rename(folder / "git-dir")
    (folder / ".git").write_text("gitdir: /elsewhere\n")  # a worktree's .git is a file
    assert ".git" not in pack(folder).files


def test_links_leading_out_and_other_files_are_left_out(tmp_path: Path) -> None:
    folder = tree(tmp_path / "code", {"train.py": "", "lib/util.py": "x = 1\n"})
    tree(tmp_path, {"outside.txt": "secret"})
    (folder / "inside").symlink_to(folder / "lib" / "util.py")
    (folder / "escape").symlink_to(tmp_path / "outside.txt")
    (folder / "dangling").symlink_to(tmp_path / "nothing")
    (folder / "dirlink").symlink_to(tmp_path)
    bundle = pack(folder)
    assert bundle.files == ("inside", "lib/util.py", "train.py")


def test_the_archive_is_deterministic_and_keeps_only_the_executable_bit(tmp_path: Path) -> None:
    folder = tree(tmp_path, {"b.py": "b", "a/run.sh": "#!/bin/sh\n", "a/z.py": "z"})
    os.chmod(folder / "a" / "run.sh", 0o750)
    first = pack(folder)
    os.utime(folder / "b.py", (1, 1))  # times, owners and modes other than x do not count
    os.chmod(folder / "b.py", 0o600)
    assert pack(folder).archive == first.archive
    assert [(m.name, m.mtime, m.uid, m.gid, m.uname, oct(m.mode)) for m in members(first)] == [
        ("a/run.sh", 0, 0, 0, "", "0o755"), ("a/z.py", 0, 0, 0, "", "0o644"), ("b.py", 0, 0, 0, "", "0o644")]
    assert first.archive[4:8] == b"\0\0\0\0"  # gzip's own time stamp


# -- unpacking ------------------------------------------------------------------------------------

def test_the_pods_unpack_it_once_and_keep_what_the_job_wrote(tmp_path: Path) -> None:
    folder = tree(tmp_path / "code", {"train.py": "print(1)\n", "pkg/run.sh": "#!/bin/sh\n"})
    os.chmod(folder / "pkg" / "run.sh", 0o755)
    bundle_file = tmp_path / BUNDLE_KEY
    bundle_file.write_bytes(pack(folder).archive)
    dest = tmp_path / "work"
    assert unpack(str(bundle_file), str(dest)) == str(dest)
    assert (dest / "train.py").read_text() == "print(1)\n" and os.access(dest / "pkg" / "run.sh", os.X_OK)
    (dest / "train.py").write_text("changed by the job\n")
    (dest / "out.txt").write_text("output")
    unpack(str(bundle_file), str(dest))  # a restarted container, or another rank of the pod: nothing is redone
    assert (dest / "train.py").read_text() == "changed by the job\n" and (dest / "out.txt").exists()


@pytest.mark.parametrize("name, kind", [("../escape.py", tarfile.REGTYPE), ("/etc/passwd", tarfile.REGTYPE),
                                        ("link", tarfile.SYMTYPE), ("dev", tarfile.CHRTYPE)])
def test_the_unpacker_refuses_what_the_packer_never_makes(tmp_path: Path, name: str, kind: bytes) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        member = tarfile.TarInfo(name)
        member.type = kind
        member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
        archive.addfile(member, io.BytesIO(b""))
    (tmp_path / "bad.tar.gz").write_bytes(raw.getvalue())
    with pytest.raises(ValueError, match="refusing bundle member"):
        unpack(str(tmp_path / "bad.tar.gz"), str(tmp_path / "work"))
    assert not (tmp_path / "escape.py").exists()


# -- limits and refusals --------------------------------------------------------------------------

def test_past_the_configmap_limit_the_error_names_the_field_the_size_and_the_other_ways(tmp_path: Path) -> None:
    folder = tree(tmp_path, {"train.py": "", "weights.bin": os.urandom(CONFIGMAP_LIMIT)})  # does not compress
    with pytest.raises(InvalidSpecError) as info:
        pack(folder)
    error = info.value
    assert error.field == "working_dir" and str(folder) in error.problem and str(bundle_limit()) in error.problem
    assert "1048576" in error.problem
    for way in ("image", "PersistentVolumeClaim", "fsspec", ".gitignore"):
        assert way in error.fix
    tree(folder, {".gitignore": "*.bin\n"})  # the fix it names
    assert pack(folder).files == (".gitignore", "train.py")


def test_too_many_files_or_bytes_are_refused_before_packing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tree(tmp_path, {f"f{i}.py": "x" for i in range(5)})
    monkeypatch.setattr(workdir_bundle, "MAX_FILES", 3)
    with pytest.raises(InvalidSpecError, match="more than 3 files"):
        pack(folder)
    monkeypatch.setattr(workdir_bundle, "MAX_FILES", 10)
    monkeypatch.setattr(workdir_bundle, "MAX_UNPACKED", 2)
    with pytest.raises(InvalidSpecError, match="more than 2 bytes unpacked"):
        pack(folder)


def test_unreadable_files_and_bad_patterns_are_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tree(tmp_path, {"train.py": "", ".gitignore": "!\n"})
    with pytest.raises(InvalidSpecError) as pattern:
        pack(folder)
    assert pattern.value.field == "working_dir" and str(folder / ".gitignore") in pattern.value.problem
    (folder / ".gitignore").write_text("*.log\n")
    read = Path.read_bytes

    def refused(path: Path) -> bytes:  # what a file of another user's gives (the suite runs as root, who reads all)
        if path.name == "train.py":
            raise PermissionError(13, "Permission denied", str(path))
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(InvalidSpecError) as unreadable:
        pack(folder)
    assert str(folder / "train.py") in unreadable.value.problem and "Permission denied" in unreadable.value.problem


def test_which_working_dir_is_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    assert local_directory("code") == tmp_path / "code"  # relative to where the notebook runs
    assert local_directory(str(tmp_path / "code"), "never") is None  # a path in the image, whatever is here
    assert local_directory("/app") is None  # not here: a path in the image, as before
    with pytest.raises(InvalidSpecError) as relative:
        local_directory("missing")
    assert relative.value.field == "working_dir" and "not a directory relative to" in relative.value.problem
    with pytest.raises(InvalidSpecError) as always:
        local_directory("/app", "always")
    assert "ship_working_dir='never'" in always.value.fix
    with pytest.raises(InvalidSpecError) as mode:
        Cluster("statefulset", namespace="ml", ship_working_dir="sometimes")
    assert mode.value.field == "ship_working_dir"


def test_a_refused_working_dir_creates_nothing(emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.chdir(tmp_path)
    big = tree(tmp_path / "big", {"train.py": "", "weights.bin": os.urandom(CONFIGMAP_LIMIT)})
    ignored = tree(tmp_path / "ignored", {"train.py": "", ".gitignore": "train.py\n", "other.py": ""})
    before = emulator.inventory()
    with make_cluster(emulator, "mpijob") as cluster:
        for folder, field in ((big, "working_dir"), (ignored, "script"), ("nothing", "working_dir")):
            with pytest.raises(InvalidSpecError) as info:
                cluster.submit(JobSpec(name="code", script="train.py", working_dir=str(folder), image=IMAGE))
            assert info.value.field == field
    assert emulator.inventory() == before


def test_the_limit_is_the_api_servers(emulator, tmp_path: Path) -> None:  # noqa: F811
    """The most dsnb packs, with its unpacker, is a ConfigMap the API server takes; a byte more is refused."""
    for size, taken in ((bundle_limit(), True), (bundle_limit() + 1, False)):
        manifest = CodeBundle("/x", b"\0" * size, ("x",)).config_map(f"limit-{size}", {})
        try:
            emulator.create({**manifest, "metadata": {**manifest["metadata"], "namespace": NAMESPACE}})
        except Exception as e:  # noqa: BLE001 - the emulator's 422
            assert not taken and "Too long" in str(e)
        else:
            assert taken


# -- the plans of every backend ---------------------------------------------------------------------

def pod_specs(backend: str, manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """role -> the pod spec of the pods that run the job's code."""
    last = manifests[-1]
    if backend == "statefulset":
        return {"node": last["spec"]["template"]["spec"]}
    if backend == "mpijob":
        return {"worker": last["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]}
    if backend == "trainjob":
        jobs = last["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        return {job["name"]: job["template"]["spec"]["template"]["spec"] for job in jobs}
    cluster = last["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": cluster["workerGroupSpecs"][0]["template"]["spec"]}


def code_env_of(backend: str, manifests: list[dict[str, Any]]) -> dict[str, str]:
    """What the ranks are told about the code."""
    last = manifests[-1]
    if backend == "statefulset":
        return {e["name"]: e.get("value") for e in last["spec"]["template"]["spec"]["containers"][0]["env"]}
    if backend == "kuberay":
        return yaml.safe_load(last["spec"]["runtimeEnvYAML"])["env_vars"]
    container = (last["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0] if backend == "mpijob"
                 else last["spec"]["trainer"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    exported = [a for prev, a in zip(container["command"], container["command"][1:]) if prev == "-x"]  # mpirun -x
    return {k: v for k, v in env.items() if k in exported}


@pytest.mark.parametrize("backend, roles", [("statefulset", {"node"}), ("mpijob", {"worker"}), ("trainjob", {"launcher", "node"}),
                                            ("kuberay", {"head", "worker"})])
def test_every_backend_ships_the_code_to_the_pods_that_run_it(tmp_path: Path, backend: str, roles: set[str]) -> None:
    folder = tree(tmp_path, {"train.py": "print('hi')\n", ".env": "TOKEN=x"})
    spec = JobSpec(name="code", script="train.py", working_dir=str(folder), nodes=2, image=IMAGE)
    plan = Cluster(backend, namespace="ml").dryrun(spec)
    code = next(m for m in plan.manifests if m["metadata"]["name"] == f"{plan.name}-code")
    assert [m["metadata"]["name"] for m in plan.manifests].index(code["metadata"]["name"]) == 1  # owned by the record
    assert code["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "dsnb", "dsnb.io/job": plan.name, "dsnb.io/kind": "code"}
    assert code["immutable"] is True and code["data"][UNPACKER_KEY].startswith('"""Unpack a job\'s code')
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(code["binaryData"][BUNDLE_KEY])), mode="r:gz") as archive:
        assert archive.getnames() == ["train.py"]  # .env left out
    for role, pod in pod_specs(backend, plan.manifests).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dsnb-code"]["configMap"]["name"] == f"{plan.name}-code" and "emptyDir" in volumes["dsnb-workdir"], role
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert (mounts["dsnb-code"]["mountPath"], mounts["dsnb-code"].get("readOnly")) == (CODE_MOUNT, True), role
        assert mounts["dsnb-workdir"]["mountPath"] == WORKDIR and not mounts["dsnb-workdir"].get("readOnly"), role
    assert set(pod_specs(backend, plan.manifests)) == roles
    env = code_env_of(backend, plan.manifests)
    assert (env["DSNB_CODE_BUNDLE"], env["DSNB_CODE_DIR"]) == (f"{CODE_MOUNT}/{BUNDLE_KEY}", WORKDIR)
    assert str(folder) not in yaml.safe_dump(plan.manifests[1:])  # this machine's path reaches no pod
    assert any("left out of working_dir as secret-looking: .env" in note for note in plan.notes)


def test_without_shipped_code_the_plans_are_as_before(tmp_path: Path) -> None:
    for backend in ("statefulset", "mpijob", "trainjob", "kuberay"):
        for working_dir, options in ((None, {}), ("/app", {}), (str(tmp_path), {"ship_working_dir": "never"})):
            spec = JobSpec(name="code", script="train.py", working_dir=working_dir, image=IMAGE)
            plan = Cluster(backend, namespace="ml", **options).dryrun(spec)
            assert not any(m["metadata"]["name"].endswith("-code") for m in plan.manifests)
            pods = yaml.safe_dump(plan.manifests[1:])
            assert "name: dsnb-code" not in pods and CODE_MOUNT not in pods and WORKDIR not in pods
            if working_dir:
                assert any(f"working_dir {working_dir!r} is a path in the image" in note for note in plan.notes)
    spec = JobSpec(name="code", script="train.py", working_dir="/app", image=IMAGE)
    statefulset = Cluster("statefulset", namespace="ml").dryrun(spec).manifests[-1]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["workingDir"] == "/app"
    mpijob = Cluster("mpijob", namespace="ml").dryrun(spec).manifests[-1]
    assert "--wdir /app" in shlex.join(mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"])


def test_the_ranks_start_where_the_code_is_unpacked(tmp_path: Path) -> None:
    tree(tmp_path, {"train.py": ""})
    spec = JobSpec(name="code", script="train.py", working_dir=str(tmp_path), image=IMAGE)
    statefulset = Cluster("statefulset", namespace="ml").dryrun(spec).manifests[-1]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["workingDir"] == WORKDIR
    launcher = Cluster("mpijob", namespace="ml").dryrun(spec).manifests[-1]["spec"]["mpiReplicaSpecs"]["Launcher"]
    assert "--wdir" not in launcher["template"]["spec"]["containers"][0]["command"]  # the shim goes there itself


def test_a_person_reads_the_plan_by_size_and_kubectl_gets_it_all(tmp_path: Path) -> None:
    tree(tmp_path, {"train.py": "print('hi')\n"})
    plan = Cluster("statefulset", namespace="ml").dryrun(JobSpec(name="code", script="train.py", working_dir=str(tmp_path), image=IMAGE))
    archive = next(m for m in plan.manifests if m["metadata"]["name"].endswith("-code"))["binaryData"][BUNDLE_KEY]
    assert archive not in str(plan) and f"<{len(base64.b64decode(archive))} bytes, base64" in str(plan)
    exported = next(d for d in yaml.safe_load_all(plan.to_yaml()) if d["metadata"]["name"].endswith("-code"))
    assert exported["binaryData"][BUNDLE_KEY] == archive


def test_a_refused_code_config_map_undoes_the_job(emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Were dsnb's limit wrong, the API server's refusal would still leave nothing behind."""
    monkeypatch.setattr(workdir_bundle, "bundle_limit", lambda: 2 * CONFIGMAP_LIMIT)
    tree(tmp_path, {"train.py": "", "weights.bin": os.urandom(CONFIGMAP_LIMIT)})
    before = emulator.inventory()
    with make_cluster(emulator) as cluster:
        with pytest.raises(Exception) as info:
            cluster.submit(JobSpec(name="code", script="train.py", working_dir=str(tmp_path), image=IMAGE))
    assert "Too long" in str(info.value) and not isinstance(info.value, ApiException)
    assert emulator.inventory() == before


# -- what starts first in a pod unpacks it --------------------------------------------------------

def mounted(tmp_path: Path, files: dict[str, str | bytes], archive: bytes | None = None) -> dict[str, str]:
    """The code ConfigMap of ``files`` as a pod has it mounted (unpack.py beside the archive), and the variables
    that say where it is and where to unpack it."""
    source = tree(tmp_path / "source", files)
    code = CodeBundle("/x", pack(source).archive if archive is None else archive, ()).config_map("j", {})
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / UNPACKER_KEY).write_text(code["data"][UNPACKER_KEY])
    (mount / BUNDLE_KEY).write_bytes(base64.b64decode(code["binaryData"][BUNDLE_KEY]))
    return {"DSNB_CODE_BUNDLE": str(mount / BUNDLE_KEY), "DSNB_CODE_DIR": str(tmp_path / "work")}


SHOW = "import os; print('in', os.getcwd(), open('data/hello.txt').read())"


def test_the_statefulset_entry_starts_the_launcher_in_the_unpacked_code(tmp_path: Path) -> None:
    import subprocess
    import sys

    from dsnb.runtime import pod_entry

    def run(state: Path, env: dict[str, str]) -> tuple[int, str]:
        variables = {**os.environ, "DSNB_SET": "j", "DSNB_POD_NAME": "j-0", "DSNB_STATE_DIR": str(state),
                     "DSNB_TERMINATION_LOG": str(state / "termination-log"), **env}
        done = subprocess.run([sys.executable, pod_entry.__file__, sys.executable, "-c", SHOW], env=variables,
                              capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout

    env = mounted(tmp_path / "good", {"data/hello.txt": "hello"})
    code, out = run(tmp_path / "good" / "state", env)
    assert code == 0 and f"in {env['DSNB_CODE_DIR']} hello" in out, out
    env = mounted(tmp_path / "bad", {"x.py": ""}, archive=b"not a tar.gz")
    code, out = run(tmp_path / "bad" / "state", env)
    assert code == pod_entry.EXIT_NO_CODE and "could not unpack the job's working_dir" in out
    assert env["DSNB_CODE_BUNDLE"] in json.loads((tmp_path / "bad" / "state" / "termination-log").read_text())["message"]


def test_the_rank_shim_starts_each_rank_in_the_unpacked_code(tmp_path: Path) -> None:
    import subprocess
    import sys

    from dsnb.backends.kubernetes.mpijob import RANK_SHIM

    ranks = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
             "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    env = mounted(tmp_path / "good", {"data/hello.txt": "hello", "show.py": SHOW})
    done = subprocess.run([sys.executable, "-c", RANK_SHIM, "--run", "show.py"], env={**os.environ, **ranks, **env},
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and f"in {env['DSNB_CODE_DIR']} hello" in done.stdout, done.stderr
    env = mounted(tmp_path / "bad", {"x.py": ""}, archive=b"not a tar.gz")
    done = subprocess.run([sys.executable, "-c", RANK_SHIM, "--run", "x.py"], env={**os.environ, **ranks, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "rank 1 could not unpack the job's working_dir" in done.stderr


def test_a_ray_train_worker_on_kuberay_starts_in_the_unpacked_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dsnb.runtime.ray_train_entry import enter_code

    monkeypatch.chdir(tmp_path)  # restored afterwards
    for name in ("DSNB_CODE_BUNDLE", "DSNB_CODE_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert enter_code() is None and os.getcwd() == str(tmp_path)  # no shipped code: where Ray started it
    for name, value in mounted(tmp_path, {"data/hello.txt": "hello"}).items():
        monkeypatch.setenv(name, value)
    assert enter_code() == os.getcwd() == str(tmp_path / "work")
    assert Path("data/hello.txt").read_text() == "hello"
