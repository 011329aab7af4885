"""Backend registry (lazy import, install hints, plugins) and dsnb's import without optional extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsnb import BackendUnavailable, Cluster
from dsnb.backends import base
from dsnb.backends.base import available_backends, load_backend, register_backend, unregister_backend
from dsnb.backends.local import LocalBackend


def test_local_is_the_default() -> None:
    assert isinstance(Cluster().backend, LocalBackend)
    assert repr(Cluster()) == "Cluster(backend='local')"


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(BackendUnavailable, match=r"backend 'slurm': unknown backend; available: .*local") as info:
        Cluster("slurm")
    assert isinstance(info.value, ImportError)


def test_missing_dependency_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_missing.py").write_text("import kubernetes_not_installed_xyz\nclass B: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_backend("needy", "needs_missing:B", extra="k8s")
    try:
        with pytest.raises(BackendUnavailable) as info:
            load_backend("needy")
        assert info.value.hint == "pip install 'dsnb[k8s]'"
        assert "kubernetes_not_installed_xyz" in str(info.value) and "pip install 'dsnb[k8s]'" in str(info.value)
    finally:
        unregister_backend("needy")


def test_registered_class_is_used_and_options_reach_it(tmp_path: Path) -> None:
    register_backend("mine", LocalBackend)
    try:
        cluster = Cluster("mine", home=tmp_path)
        assert "mine" in available_backends()
        assert cluster.backend.root == tmp_path
    finally:
        unregister_backend("mine")
    assert "mine" not in available_backends()


def test_entry_point_plugins_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution that declares a backend in the entry-point group, as pip would lay it out."""
    (tmp_path / "dsnb_plugged_demo.py").write_text(
        "from dsnb.backends.local import LocalBackend\n\nclass PluggedBackend(LocalBackend):\n    name = 'plugged'\n")
    info = tmp_path / "dsnb_plugged_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsnb-plugged-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{base.ENTRY_POINT_GROUP}]\nplugged = dsnb_plugged_demo:PluggedBackend\n")
    assert "plugged" not in available_backends()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugged" in available_backends()
    plugged = load_backend("plugged")
    assert plugged.__name__ == "PluggedBackend" and issubclass(plugged, LocalBackend)
    assert Cluster("plugged").backend.name == "plugged"


def test_kuberay_is_a_backend_of_its_own_and_the_old_spelling_still_reaches_it() -> None:
    pytest.importorskip("kubernetes")
    from dsnb.backends.kubernetes.kuberay import KubeRayBackend

    assert "kuberay" in available_backends() and load_backend("kuberay") is KubeRayBackend
    with Cluster("kuberay", namespace="ml") as cluster, Cluster("ray", kuberay=True, namespace="ml") as old:
        assert type(cluster.backend) is type(old.backend) is KubeRayBackend and cluster.backend.name == "kuberay"


def test_a_name_in_use_is_not_taken_over_silently() -> None:
    with pytest.raises(ValueError, match="a backend named 'local' exists already; pass clobber=True"):
        register_backend("local", "somewhere:Else")
    assert load_backend("local") is LocalBackend
    register_backend("local", "dsnb.backends.local:LocalBackend", clobber=True)
    unregister_backend("local")  # the built-in one again
    assert load_backend("local") is LocalBackend


@pytest.mark.parametrize("name", sorted(base._BUILTIN))
def test_each_backends_options_are_its_constructors_keywords(name: str) -> None:
    import inspect

    try:
        backend = load_backend(name)
    except BackendUnavailable:
        pytest.skip(f"{name}'s extra is not installed")
    keywords: set[str] = set()
    for cls in backend.__mro__:  # **options pass on to the parent's constructor
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        keywords |= {p.name for p in parameters.values() if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    assert {option.name for option in backend.options} == keywords
    assert base.backend_options(name) == backend.options


def test_backend_options_are_checked() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'namespace'"):
        Cluster("local", namespace="ml")


NO_EXTRAS = textwrap.dedent("""
    import sys
    for name in ("torch", "deepspeed", "kubernetes", "ray", "ipywidgets"):
        sys.modules[name] = None  # any import of them now fails, as when not installed
    import dsnb
    from dsnb import Cluster, JobSpec
    spec = JobSpec(name="x", command=["true"], procs_per_node=2, deepspeed={"train_micro_batch_size_per_gpu": 4})
    print("plan", Cluster().dryrun(spec).name.startswith("x-"))
    print("config", spec.deepspeed_config["train_batch_size"])
    job = Cluster().submit(JobSpec(name="y", command=[sys.executable, "-c", "print('ran')"]))
    print("local", job.wait(timeout=60).state.value, [line.text for line in job.logs()])
    try:
        Cluster("statefulset")
    except dsnb.BackendUnavailable as e:
        print("statefulset:", e)
    try:
        Cluster("ray")
    except dsnb.BackendUnavailable as e:
        print("ray:", e)
    try:
        Cluster("kuberay")
    except dsnb.BackendUnavailable as e:
        print("kuberay:", e)
""")


def test_import_without_torch_kubernetes_or_ray() -> None:
    run = subprocess.run([sys.executable, "-c", NO_EXTRAS], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "plan True" in run.stdout and "config 8" in run.stdout
    assert "local SUCCEEDED ['ran']" in run.stdout
    assert "statefulset: backend 'statefulset': needs the 'kubernetes' package" in run.stdout
    assert "pip install 'dsnb[k8s]'" in run.stdout
    assert "ray: backend 'ray': needs the 'ray' package" in run.stdout and "pip install 'dsnb[ray]'" in run.stdout
    assert "kuberay: backend 'kuberay': needs the 'kubernetes' package" in run.stdout


def test_import_is_light() -> None:
    code = "import sys, dsnb; print(sorted(m for m in ('torch', 'deepspeed', 'kubernetes', 'ray') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "[]"


def test_the_notebook_widgets_import_no_command_line() -> None:
    """Widgets share the text formatting with the console through dsnb.formatting, not through the CLI."""
    code = ("import sys; import dsnb.widgets.panel, dsnb.widgets.display, dsnb.widgets.cluster_view, dsnb.widgets.form, "
            "dsnb.widgets.endpoint_panel, dsnb.widgets.plots, dsnb.widgets.markup, dsnb.widgets.ticker; "
            "print(sorted(m for m in sys.modules if m.startswith('dsnb.console')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
