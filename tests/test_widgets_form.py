"""The launch form, driven the way a person drives it: set values, click buttons, read the widgets."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ipywidgets")

from dsnb import Cluster, InvalidSpecError, JobSpec, JobState, Resources  # noqa: E402
from dsnb.backends.base import register_backend, unregister_backend  # noqa: E402
from dsnb.backends.local import LocalBackend  # noqa: E402
from dsnb.widgets.form import LaunchForm, field_key, parse_env, split_deepspeed, structured_deepspeed  # noqa: E402


@pytest.fixture
def form() -> Iterator[LaunchForm]:
    f = LaunchForm(Cluster())
    yield f
    if f.job is not None and not f.job.status().state.is_terminal():
        f.job.cancel()
    f.close()


def shown_errors(form: LaunchForm) -> dict[str, str]:
    return {key: label.value for key, label in form.errors.items() if label.value}


def write_script(tmp_path: Path) -> Path:
    script = tmp_path / "hello.py"
    script.write_text(textwrap.dedent("""
        import os
        print("hello from rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"])
    """))
    return script


def fill_runnable(form: LaunchForm, tmp_path: Path, procs: int = 2) -> None:
    script = write_script(tmp_path)
    form.name.value = "hello"
    form.script.value = script.name
    form.working_dir.value = str(tmp_path)
    form.procs_per_node.value = procs


@dataclass(frozen=True)
class BadValue:
    """Setting ``values`` shows an error next to ``key`` that mentions ``word``; ``fix`` clears it."""

    id: str
    values: dict[str, Any]
    key: str
    word: str
    fix: dict[str, Any]


BAD_VALUES = [
    BadValue("zero nodes", {"nodes": 0}, "nodes", "&gt;= 1", {"nodes": 1}),
    BadValue("zero processes", {"procs_per_node": 0}, "procs_per_node", "&gt;= 1", {"procs_per_node": 2}),
    BadValue("name with capitals", {"name": "My_Job"}, "name", "my-job", {"name": "my-job"}),
    BadValue("param offload on stage 2", {"zero_stage": 2, "offload_param": "cpu"}, "offload_param", "stage 3", {"zero_stage": 3}),
    BadValue("optimizer offload on stage 0", {"offload_optimizer": "cpu"}, "offload_optimizer", "stage 1, 2 or 3", {"zero_stage": 1}),
    BadValue("env line without =", {"env": "A=1\nNCCL_DEBUG"}, "env", "no '='", {"env": "A=1\nNCCL_DEBUG=WARN"}),
    BadValue("env sets RANK", {"env": "RANK=3"}, "env", "set by dsnb", {"env": ""}),
    BadValue("unbalanced quote in args", {"args": "--msg 'hi"}, "args", "cannot split", {"args": "--msg 'hi'"}),
    BadValue("more ranks than GPUs", {"gpus": 1, "procs_per_node": 2}, "procs_per_node", "GPUs", {"gpus": 2}),
    BadValue("negative GPUs", {"gpus": -1}, "gpus", "&gt;= 0", {"gpus": 0}),
    BadValue("memory in GB", {"memory": "4GB"}, "memory", "quantity", {"memory": "4Gi"}),
    BadValue("timeout not a number", {"timeout": "soon"}, "timeout", "seconds", {"timeout": "600"}),
    BadValue("hang timeout negative", {"hang_timeout": "-5"}, "hang_timeout", "positive", {"hang_timeout": "300"}),
    BadValue("micro-batch zero and no batch", {"micro_batch": 0}, "micro_batch", "neither", {"micro_batch": 2}),
    BadValue("extra JSON broken", {"extra_config": "{"}, "extra_config", "not valid JSON", {"extra_config": '{"steps_per_print": 5}'}),
    BadValue("extra JSON removed key", {"extra_config": '{"elasticity": {}}'}, "extra_config", "removed", {"extra_config": ""}),
    BadValue("script and command", {"command": "python -c pass"}, "script", "exactly one", {"command": ""}),
    BadValue("negative restarts", {"max_restarts": -1}, "max_restarts", "&gt;= 0", {"max_restarts": 1}),
]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda b: b.id)
def test_bad_value_shows_next_to_its_field_and_disables_launch(form: LaunchForm, bad: BadValue) -> None:
    assert shown_errors(form) == {} and not form.launch_button.disabled
    for key, value in bad.values.items():
        getattr(form, key).value = value
    errors = shown_errors(form)
    assert list(errors) == [bad.key], errors
    assert bad.word in errors[bad.key]
    assert "Fix:" in errors[bad.key]
    assert form.launch_button.disabled
    with pytest.raises(InvalidSpecError):
        form.spec()
    for key, value in bad.fix.items():
        getattr(form, key).value = value
    assert shown_errors(form) == {}
    assert not form.launch_button.disabled
    form.spec()


def test_several_bad_fields_are_shown_at_once(form: LaunchForm) -> None:
    form.name.value = "My_Job"
    form.nodes.value = 0
    form.env.value = "FOO"
    form.zero_stage.value = 2
    form.offload_param.value = "cpu"
    assert set(shown_errors(form)) == {"name", "nodes", "env", "offload_param"}
    with pytest.raises(InvalidSpecError) as info:
        form.spec()
    assert info.value.field == "name"  # the first field of the form


def test_preview_shows_the_filled_batch_triple(form: LaunchForm) -> None:
    form.micro_batch.value = 4
    form.procs_per_node.value = 2
    assert form.filled_config is not None and form.filled_config["train_batch_size"] == 8
    assert '"train_batch_size": 8' in form.config_preview.value
    form.grad_accum.value = 3
    form.nodes.value = 2
    assert '"train_batch_size": 48' in form.config_preview.value
    assert '"gradient_accumulation_steps": 3' in form.config_preview.value
    form.precision.value = "bf16"
    form.zero_stage.value = 3
    form.extra_config.value = '{"zero_optimization": {"overlap_comm": true}, "steps_per_print": 5}'
    config = form.spec().deepspeed_config
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert config["bf16"] == {"enabled": True} and config["steps_per_print"] == 5
    assert '"overlap_comm": true' in form.config_preview.value
    form.extra_config.value = '{"gradient_accumulation_steps": 1, "bf16": {"enabled": false}}'
    assert form.spec().deepspeed_config["gradient_accumulation_steps"] == 3  # the fields win
    assert form.spec().deepspeed_config["bf16"] == {"enabled": True}
    form.use_deepspeed.value = False
    assert form.spec().deepspeed is None and form.zero_stage.disabled
    assert "no DeepSpeed config" in form.config_preview.value


def test_dry_run_shows_the_commands_and_creates_nothing(form: LaunchForm, tmp_path: Path, dsnb_home: Path) -> None:
    fill_runnable(form, tmp_path)
    form.dryrun_button.click()
    assert "RANK=0" in form.plan_view.value and "RANK=1" in form.plan_view.value
    assert "hello.py" in form.plan_view.value
    assert "nothing was created" in form.message.value
    assert form.job is None and form.cluster.jobs() == []
    assert not (dsnb_home / "jobs").exists() or not any((dsnb_home / "jobs").iterdir())


def test_dry_run_of_a_missing_script_shows_it_next_to_script(form: LaunchForm, tmp_path: Path) -> None:
    form.working_dir.value = str(tmp_path)
    form.script.value = "nope.py"
    form.dryrun_button.click()
    assert "not found" in form.errors["script"].value
    assert "Dry run failed" in form.message.value


def test_launch_runs_one_job_to_success(form: LaunchForm, tmp_path: Path) -> None:
    fill_runnable(form, tmp_path)
    form.launch_button.click()
    form.launch_button.click()  # a second click right away is the same launch, not a second job
    assert "not launching the same job twice" in form.message.value
    assert form.job is not None and form.job.name.startswith("hello-")
    assert [s.name for s in form.cluster.jobs()] == [form.job.name]
    assert form.job.wait(timeout=30).state == JobState.SUCCEEDED
    assert sorted(line.text for line in form.job.logs()) == ["hello from rank 0 of 2", "hello from rank 1 of 2"]
    assert form.panel is not None and len(form.output.outputs) == 1
    assert not form.launch_button.disabled


def test_launch_shows_the_jobs_own_panel(form: LaunchForm, tmp_path: Path) -> None:
    from dsnb.widgets.display import panel_for

    fill_runnable(form, tmp_path, procs=1)
    form.launch_button.click()
    assert form.panel is panel_for(form.job)  # displaying form.job later shows this same panel
    (shown,) = form.output.outputs
    assert shown["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == form.panel.widget.model_id
    assert f"Launched {form.job.name} on local" in form.message.value
    form.job.wait(timeout=30)
    panel = form.panel
    form.close()
    assert panel.closed


def test_launch_shows_the_job_when_its_panel_fails(form: LaunchForm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(job):
        raise RuntimeError("no frontend")

    monkeypatch.setattr("dsnb.widgets.form.panel_for", broken)
    fill_runnable(form, tmp_path, procs=1)
    form.launch_button.click()
    assert form.panel is form.job
    assert "live panel failed to start: no frontend" in form.message.value
    (shown,) = form.output.outputs
    assert form.job.name in shown["data"]["text/plain"]
    form.job.wait(timeout=30)


def test_failed_launch_shows_the_error_and_creates_nothing(form: LaunchForm, tmp_path: Path) -> None:
    form.working_dir.value = str(tmp_path)
    form.script.value = "missing.py"
    form.launch_button.click()
    assert form.job is None and form.cluster.jobs() == []
    assert "Launch failed" in form.message.value and "not found" in form.errors["script"].value
    assert not form.launch_button.disabled  # write the file, click again


def test_export_writes_the_plan_yaml_and_the_spec_json(form: LaunchForm, tmp_path: Path) -> None:
    fill_runnable(form, tmp_path)
    form.env.value = "HF_TOKEN=hf_secret\nNCCL_DEBUG=WARN"
    assert form.export_path.value == "hello.yaml"  # follows the name until edited
    target = tmp_path / "out" / "hello.yaml"
    form.export_path.value = str(target)
    form.name.value = "hello2"
    assert form.export_path.value == str(target)
    form.export_button.click()
    docs = list(yaml.safe_load_all(target.read_text()))
    (plan,) = docs
    assert plan["backend"] == "local" and plan["job"].startswith("hello2-")
    assert [r["rank"] for r in plan["ranks"]] == [0, 1]
    assert all(r["argv"][-1].endswith("hello.py") for r in plan["ranks"])
    assert "hf_secret" not in target.read_text()
    spec_path = tmp_path / "out" / "hello.spec.json"
    data = json.loads(spec_path.read_text())
    assert data["env"] == {"HF_TOKEN": "***", "NCCL_DEBUG": "WARN"}
    assert JobSpec.from_dict({**data, "env": {"NCCL_DEBUG": "WARN"}}) == JobSpec.from_dict(
        {**form.spec().to_dict(), "env": {"NCCL_DEBUG": "WARN"}})
    assert str(target) in form.message.value and str(spec_path) in form.message.value
    assert form.cluster.jobs() == []


def test_export_path_defaults_to_the_cwd(form: LaunchForm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fill_runnable(form, tmp_path)
    monkeypatch.chdir(tmp_path)
    form.export_button.click()
    assert yaml.safe_load((tmp_path / "hello.yaml").read_text())["job"].startswith("hello-")
    assert json.loads((tmp_path / "hello.spec.json").read_text())["name"] == "hello"


ROUND_TRIP = [
    JobSpec(name="a", script="train.py"),
    JobSpec(name="plain", script="train.py", deepspeed=None, nodes=3, timeout=12.5, hang_timeout=300),
    JobSpec(
        name="full", script="train.py", args=["--epochs", "3", "--title", "two words", "--q='x'"],
        working_dir="/tmp/somewhere", nodes=2, procs_per_node=2, resources=Resources(cpu=4, memory="8Gi"),
        image="ghcr.io/org/train:1.0", env={"A": "1", "B": "x=y", "NCCL_DEBUG": "WARN"}, max_restarts=2, timeout=3600,
        deepspeed={
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "steps_per_print": 10,
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                  "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
            "bf16": {"enabled": True},
        },
    ),
    JobSpec(name="cmd", command=["python", "-m", "pkg.train"], resources=Resources(cpu="500m"),
            deepspeed={"train_batch_size": 32, "gradient_accumulation_steps": 1}),
    JobSpec(name="gpu", script="t.py", procs_per_node=2, resources=Resources(gpus=2, cpu=0.5),
            deepspeed={"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "loss_scale": 0},
                       "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}),
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=lambda s: s.name)
def test_round_trip(spec: JobSpec) -> None:
    form = LaunchForm(Cluster(), spec=spec)
    try:
        assert shown_errors(form) == {}
        assert form.spec() == spec
        other = LaunchForm(Cluster())
        other.load(spec)
        assert other.spec() == spec
        other.close()
    finally:
        form.close()


def test_a_loaded_default_in_the_extra_json_does_not_shadow_its_field(form: LaunchForm) -> None:
    form.load(ROUND_TRIP[3])  # an explicit "gradient_accumulation_steps": 1 lands in the extra JSON
    assert json.loads(form.extra_config.value)["gradient_accumulation_steps"] == 1
    form.grad_accum.value = 2
    assert form.spec().deepspeed_config["gradient_accumulation_steps"] == 2


def test_load_fills_the_fields(form: LaunchForm) -> None:
    form.load(ROUND_TRIP[2])
    assert (form.name.value, form.nodes.value, form.procs_per_node.value) == ("full", 2, 2)
    assert (form.zero_stage.value, form.precision.value, form.offload_param.value, form.offload_optimizer.value) == (3, "bf16", "cpu", "nvme")
    assert (form.micro_batch.value, form.grad_accum.value) == (4, 2)
    assert json.loads(form.extra_config.value) == {
        "steps_per_print": 10, "zero_optimization": {"offload_optimizer": {"nvme_path": "/nvme"}}}
    assert parse_env(form.env.value) == {"A": "1", "B": "x=y", "NCCL_DEBUG": "WARN"}
    assert form.multi_node.value is True


def test_a_function_job_is_not_loaded_into_the_form_and_the_fields_stay(form: LaunchForm) -> None:
    form.load(ROUND_TRIP[2])

    def train():
        return 1

    with pytest.raises(TypeError, match="train is a function job: submit it with cluster.submit"):
        form.load(JobSpec(name="fn", function=train))
    assert form.name.value == "full"


@pytest.mark.parametrize("config", [spec.deepspeed for spec in ROUND_TRIP if spec.deepspeed])
def test_deepspeed_split_and_merge_round_trip(config: dict[str, Any]) -> None:
    from dsnb.ds_fields import merge_config

    fields, extra = split_deepspeed(config)
    assert merge_config(extra, structured_deepspeed(**fields)) == config


@pytest.mark.parametrize(
    ("spec_field", "key"),
    [
        ("nodes", "nodes"), ("procs_per_node", "procs_per_node"), ("name", "name"), ("args", "args"),
        ("env", "env"), ("env.RANK", "env"), ("script/command/function", "script"), ("resources.gpus", "gpus"),
        ("deepspeed.zero_optimization.offload_param", "offload_param"),
        ("deepspeed.zero_optimization.offload_optimizer.nvme_path", "offload_optimizer"),
        ("deepspeed.zero_optimization.stage", "zero_stage"), ("deepspeed.fp16", "precision"),
        ("deepspeed", "micro_batch"), ("deepspeed.train_micro_batch_size_per_gpu", "micro_batch"),
        ("deepspeed.train_batch_size", "extra_config"), ("deepspeed.sparse_attention", "extra_config"),
        ("something.new", "form"),
    ],
)
def test_error_fields_map_to_widgets(spec_field: str, key: str) -> None:
    assert field_key(spec_field) == key


@pytest.mark.parametrize(
    ("workload", "multi_node", "platform", "headline", "first"),
    [
        ("batch", False, "laptop", "recommended: Local", "Local"),
        ("batch", False, "ray", "recommended: Ray Train</b>", "Ray Train"),
        ("serving", True, "any", "recommended: Kubeflow Trainer</b>", "Kubeflow Trainer"),
    ],
)
def test_recommendations_follow_the_choices(form: LaunchForm, workload: str, multi_node: bool, platform: str,
                                            headline: str, first: str) -> None:
    form.workload.value = workload
    form.multi_node.value = multi_node
    form.platform.value = platform
    assert headline in form.recommendations.value
    assert form.recommended[0].profile.label == first
    assert "ease" in form.recommendations.value


def test_nodes_field_moves_the_multi_node_choice(form: LaunchForm) -> None:
    form.nodes.value = 3
    assert form.multi_node.value is True
    form.nodes.value = 1
    assert form.multi_node.value is False


def test_backend_list_marks_what_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsnb.backends import base

    monkeypatch.setitem(base._EXTRA_PACKAGES, "ray", "no_such_ray_zz")  # an install without the ray package
    form = LaunchForm(Cluster())
    labels = dict((key, label) for label, key in form.backend.options)
    assert set(labels) == {"local", "ray-train", "ray-serve", "kuberay-train", "kuberay-serve", "trainjob", "mpijob",
                           "statefulset"}
    assert labels["ray-train"] == "Ray Train — ease 5/5 — batch, 1..n nodes — not available here"
    assert "not available" not in labels["local"]
    assert form.backend.value == "local"
    form.backend.value = "ray-train"
    assert "cannot run in this install" in form.backend_note.value and "dsnb[ray]" in form.backend_note.value
    assert "stay on <code>local</code>" in form.backend_note.value
    assert form.cluster.backend.name == "local"
    form.close()


class _FakeTrainer(LocalBackend):
    name = "trainjob"


def test_choosing_an_available_backend_switches_the_cluster() -> None:
    register_backend("trainjob", _FakeTrainer, clobber=True)
    try:
        form = LaunchForm(Cluster())
        assert "not available" not in dict((k, label) for label, k in form.backend.options)["trainjob"]
        form.backend.value = "trainjob"
        assert form.cluster.backend.name == "trainjob"
        assert "Cluster(backend='trainjob')" in form.cluster_label.value
        assert "Kubeflow Trainer" in form.backend_note.value
        form.close()
    finally:
        unregister_backend("trainjob")


def test_the_backend_options_come_from_the_backend_and_remake_the_cluster(form: LaunchForm, tmp_path: Path) -> None:
    before = form.cluster
    assert list(form.backend_options.fields) == ["home"]
    form.backend_options.fields["home"].value = str(tmp_path / "jobs")
    form.connect_button.click()
    assert form.cluster is not before
    assert form.cluster.backend.name == "local" and form.cluster.backend.root == tmp_path / "jobs"


def test_a_bad_backend_option_is_named_and_the_cluster_is_kept(form: LaunchForm) -> None:
    form.backend.value = "statefulset"  # made lazily: no API server is asked until a job is
    switched = form.cluster
    assert switched.backend.name == "statefulset"
    fields = form.backend_options.fields
    assert {"namespace", "context", "kubeconfig", "launcher", "peer_timeout"} <= set(fields)
    assert not {"configuration", "pod_options", "in_cluster"} & set(fields)  # objects and secrets stay in code
    assert "torchrun, deepspeed" in fields["launcher"].placeholder
    fields["peer_timeout"].value = "soon"
    form.connect_button.click()
    assert "Cluster.peer_timeout: &#x27;soon&#x27; is not a float" in form.backend_note.value
    assert form.cluster is switched


def test_every_resource_problem_is_shown_beside_its_own_field(form: LaunchForm) -> None:
    form.cpu.value = "-1"
    form.memory.value = "4GB"
    form.gpus.value = 1
    form.procs_per_node.value = 2
    errors = shown_errors(form)
    assert set(errors) == {"cpu", "memory", "procs_per_node"}
    assert "positive" in errors["cpu"] and "'4Gi'" in errors["memory"] and "GPUs" in errors["procs_per_node"]
    assert set(form.problems) == set(errors)


def test_the_fit_box_estimates_as_the_user_types_and_follows_the_zero_stage(form: LaunchForm) -> None:
    pytest.importorskip("deepspeed")
    from dsnb.fit import estimate

    assert form.fit.estimate is None and "give a model" in form.fit.view.value
    form.procs_per_node.value = 2
    form.fit.model.value = "7e9"
    first = form.fit.estimate
    there = Cluster().backend.memory_there(form.spec())
    assert first is not None and first.verdict == "does not fit" and first.gpus_per_node == 2
    assert (first.gpu_memory, first.cpu_memory) == (there.gpu, there.cpu)
    assert "does not fit" in form.fit.view.value and "7,000.0 M parameters" in form.fit.view.value
    form.zero_stage.value = 3  # the estimate follows the DeepSpeed fields
    third = form.fit.estimate
    assert third.zero_stage == 3 and third.gpu_model_states < first.gpu_model_states
    assert third.gpu_model_states == estimate(7e9, form.spec(), gpu_memory=0).gpu_model_states
    form.fit.model.value = "1e6"
    assert form.fit.estimate.verdict == "fits" and ">fits</b>" in form.fit.view.value
    form.fit.model.value = "/no/such/dir"
    assert form.fit.estimate is None and "model: &#x27;/no/such/dir&#x27; is not a parameter count" in form.fit.view.value
    form.fit.model.value = "1e6"
    form.procs_per_node.value = 0  # a bad field: no estimate until it is fixed
    assert form.fit.estimate is None and "fix the fields marked above" in form.fit.view.value
