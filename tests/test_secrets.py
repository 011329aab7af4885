"""Secrets beyond a name pattern: ``dsnb.Secret``, ``dsnb.SecretRef``, wider names, values that look like
credentials, and DeepSpeed configs that hold one. None of them may reach a repr, a plan, an exported
YAML, a record, the form's widget state or an error message."""

from __future__ import annotations

import io
import json

import pytest
import yaml

from dsnb import Cluster, InvalidSpecError, JobSpec, Secret, SecretRef
from dsnb.secrets import credential_paths, is_secret, redact_env, redact_text

IMAGE = "registry.example/train:1"
LEAKS = {
    "OPENAI_KEY": "leak-openai-1", "WANDB_KEY": "leak-wandb-2", "DB_PASS": "leak-db-3", "SSH_KEY": "leak-ssh-4",
    "AUTH": "leak-auth-5", "DATABASE_URL": "postgres://app:leak-pw-6@db:5432/app",
    "CACHE_URL": "redis://cache:leak-pw-7@redis:6379", "HELPER": "hf_leakleakleak8", "OTHER": "sk-leakleakleakleak9",
    "GH": "ghp_leakleakleakleakleak10", "CLOUD": "AKIALEAKLEAKLEAK1111", "PLAIN_NAME": Secret("leak-wrapped-12"),
}
PLAIN = {"NCCL_DEBUG": "WARN", "KEYBOARD_LAYOUT": "us", "WANDB_PROJECT": "tiny", "PYTHONPATH": "/app"}


@pytest.mark.parametrize("name, value", LEAKS.items(), ids=LEAKS)
def test_credentials_are_secret_by_name_by_look_or_by_wrapper(name: str, value: str) -> None:
    assert is_secret(name, value)


@pytest.mark.parametrize("name, value", PLAIN.items(), ids=PLAIN)
def test_ordinary_settings_are_not(name: str, value: str) -> None:
    assert not is_secret(name, value)


def everything_shown(spec: JobSpec, backend: str, **options) -> str:
    """What a user can see or store of a spec: its repr, its dict for records, and a plan's text and YAML."""
    from dsnb.spec import redact_env

    plan = Cluster(backend, namespace="ml", **options).dryrun(spec)
    manifests = [m for m in plan.manifests if m.get("kind") != "Secret"]  # the Secret's values are *** in the plan anyway
    return "\n".join([repr(spec), json.dumps(redact_env(spec.to_dict()["env"])), str(plan), plan.to_yaml(), repr(plan),
                      json.dumps(manifests, default=str)])


@pytest.mark.parametrize("backend, options", [("statefulset", {}), ("mpijob", {}), ("trainjob", {}),
                                              ("ray", {"kuberay": True})], ids=["statefulset", "mpijob", "trainjob", "kuberay"])
def test_no_secret_value_is_shown_and_every_one_reaches_the_pods_through_the_jobs_secret(backend: str, options: dict) -> None:
    spec = JobSpec(name="tiny", script="train.py", image=IMAGE, env={**LEAKS, **PLAIN})
    shown = everything_shown(spec, backend, **options)
    for value in LEAKS.values():
        assert str(value) not in shown
    plan = Cluster(backend, namespace="ml", **options).dryrun(spec)
    assert sorted(plan.extra["secret_values"][f"{plan.name}-env"]) == sorted(LEAKS)  # apply puts them in the Secret
    assert "WARN" in shown  # plain settings stay readable


def test_local_plans_and_reprs_hide_them_too(tmp_path) -> None:
    spec = JobSpec(name="tiny", script="train.py", working_dir=str(tmp_path), env={**LEAKS, **PLAIN})
    (tmp_path / "train.py").write_text("")
    plan = Cluster().dryrun(spec)
    text = "\n".join([repr(spec), str(plan), repr(plan)])
    for value in LEAKS.values():
        assert str(value) not in text
    assert plan.commands[0].env["PLAIN_NAME"] == "leak-wrapped-12"  # the rank still gets the value


def test_a_secret_ref_never_passes_through_dsnb_on_kubernetes() -> None:
    spec = JobSpec(name="tiny", script="train.py", image=IMAGE, env={"DB_URL": SecretRef("db-credentials", "url")})
    plan = Cluster("statefulset", namespace="ml").dryrun(spec)
    assert plan.extra["secret_values"] == {}  # nothing for dsnb's own Secret
    stateful_set = next(m for m in plan.manifests if m["kind"] == "StatefulSet")
    env = {v["name"]: v for v in stateful_set["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DB_URL"] == {"name": "DB_URL", "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "url"}}}
    record = json.loads(next(m for m in plan.manifests if m["kind"] == "ConfigMap")["data"]["spec.json"])
    assert record["env"]["DB_URL"] == {"secretKeyRef": {"name": "db-credentials", "key": "url"}}
    assert JobSpec.from_dict(spec.to_dict()).env["DB_URL"] == SecretRef("db-credentials", "url")  # the record reads back
    rayjob = next(m for m in Cluster("kuberay", namespace="ml").dryrun(spec).manifests if m["kind"] == "RayJob")
    assert "DB_URL" not in rayjob["spec"].get("runtimeEnvYAML", "")  # the Ray processes get it from the pods' env
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "DB_URL", "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "url"}}} in head["env"]


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_secret_ref_off_kubernetes_is_refused_naming_the_variable(backend: str, tmp_path) -> None:
    (tmp_path / "train.py").write_text("")
    spec = JobSpec(name="tiny", script="train.py", working_dir=str(tmp_path), env={"DB_URL": SecretRef("db-credentials", "url")})
    with pytest.raises(InvalidSpecError) as info:
        Cluster(backend).dryrun(spec)
    assert info.value.field == "env.DB_URL" and "dsnb.Secret" in info.value.fix


def test_a_malformed_secret_ref_is_refused() -> None:
    with pytest.raises(InvalidSpecError, match="env.DB_URL"):
        JobSpec(name="tiny", script="t.py", env={"DB_URL": SecretRef("Not A Name", "url")})


def test_a_deepspeed_config_holding_a_credential_is_refused_with_where_to_put_it() -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "comet": {"enabled": True, "api_key": "leak-comet-13", "project": "p"}}
    with pytest.raises(InvalidSpecError) as info:
        JobSpec(name="tiny", script="t.py", deepspeed=config)
    assert info.value.field == "deepspeed.comet.api_key" and "COMET_API_KEY" in info.value.fix
    assert "leak-comet-13" not in str(info.value)
    assert credential_paths({"tokenizer": "gpt2", "wandb": {"project": "p"}, "comet": {"api_key": "auto"}}) == []


def test_error_messages_do_not_echo_a_secret() -> None:
    from rich.console import Console

    from dsnb.console.cli import main

    with pytest.raises(InvalidSpecError) as info:
        JobSpec(name="tiny", script="t.py", env={"HF_TOKEN": b"hf_live_secret"})
    assert "hf_live_secret" not in str(info.value) and info.value.field == "env.HF_TOKEN"
    console = Console(file=io.StringIO(), width=200)
    assert main(["dryrun", "train.py", "--env", "HF_TOKEN:hf_live_secret"], console=console) == 2
    out = console.file.getvalue()
    assert "hf_live_secret" not in out and "is not KEY=VALUE" in out
    assert redact_text("cannot reach postgres://app:hunter2@db/app") == "cannot reach postgres://app:***@db/app"


def test_the_forms_env_box_keeps_no_secret_value() -> None:
    pytest.importorskip("ipywidgets")
    from dsnb.widgets.form import LaunchForm

    form = LaunchForm(Cluster(), JobSpec(name="tiny", script="train.py"))
    form.env.value = "HF_TOKEN=hf_leakleakleak14\nDB_URL=postgres://u:leak-pw-15@db/x\nNCCL_DEBUG=WARN"
    assert form.env.value == "HF_TOKEN=***\nDB_URL=***\nNCCL_DEBUG=WARN"  # what the widget (and a saved notebook) holds
    spec = form.spec()
    assert spec.env["HF_TOKEN"] == "hf_leakleakleak14" and spec.env["DB_URL"] == "postgres://u:leak-pw-15@db/x"
    assert "leak" not in repr(spec)
    assert redact_env(spec.env) == {"HF_TOKEN": "***", "DB_URL": "***", "NCCL_DEBUG": "WARN"}


def test_yaml_of_a_plan_parses_and_keeps_secret_refs_readable() -> None:
    spec = JobSpec(name="tiny", script="train.py", image=IMAGE, env={"DB_URL": SecretRef("db", "url"), "HF_TOKEN": "hf_x"})
    documents = list(yaml.safe_load_all(Cluster("mpijob", namespace="ml").dryrun(spec).to_yaml()))
    secret = next(d for d in documents if d["kind"] == "Secret")
    assert secret["stringData"] == {"HF_TOKEN": "***"}
