"""Frozen specs change through dataclasses.replace, which checks again; problems() lists every problem at once."""

from __future__ import annotations

import dataclasses

import pytest

from dsnb import InvalidSpecError, JobSpec, Resources, ServeSpec
from dsnb.backends.kubernetes.pod_options import PodOptions
from dsnb.devices import collective_backend, threads_per_rank
from dsnb.ds_config import check_deepspeed_config
from dsnb.spec_problems import Problem

DS = {"train_micro_batch_size_per_gpu": 4}


def spec(**changes: object) -> JobSpec:
    return JobSpec(**{"name": "tiny", "script": "t.py", "procs_per_node": 2, "deepspeed": DS, **changes})


@pytest.mark.parametrize(
    ("obj", "field", "value"),
    [
        (spec(), "procs_per_node", 8),
        (spec(), "nodes", 0),
        (Resources(cpu=2), "gpus", 1),
        (ServeSpec(name="m", model="m:f"), "replicas", 2),
        (PodOptions(), "network_policy", True),
    ],
    ids=["JobSpec", "JobSpec.nodes", "Resources", "ServeSpec", "PodOptions"],
)
def test_fields_cannot_be_assigned_after_construction(obj: object, field: str, value: object) -> None:
    before = getattr(obj, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, value)
    assert getattr(obj, field) == before


def test_replace_derives_the_batch_sizes_for_the_new_world_size() -> None:
    small = spec()
    assert small.deepspeed_config["train_batch_size"] == 8
    large = dataclasses.replace(small, procs_per_node=8)
    assert large.world_size == 8 and large.deepspeed_config["train_batch_size"] == 32
    assert dataclasses.replace(large, nodes=3).deepspeed_config["train_batch_size"] == 96
    assert small.deepspeed_config["train_batch_size"] == 8  # the original is unchanged


@pytest.mark.parametrize(("field", "value"), [("nodes", 0), ("procs_per_node", -1), ("name", "Bad_Name")])
def test_replace_checks_again(field: str, value: object) -> None:
    with pytest.raises(InvalidSpecError) as info:
        dataclasses.replace(spec(), **{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"JobSpec.{field}: ")


def test_replace_checks_the_config_for_the_new_world_size() -> None:
    fixed = spec(deepspeed={"train_batch_size": 8})
    with pytest.raises(InvalidSpecError, match="not divisible by the world size 3"):
        dataclasses.replace(fixed, procs_per_node=3)


def test_the_derived_config_is_not_cached_state() -> None:
    s = spec()
    config = s.deepspeed_config
    config["train_batch_size"] = 999
    assert s.deepspeed_config["train_batch_size"] == 8
    assert s.deepspeed == DS and "train_batch_size" not in s.deepspeed
    assert s == spec() and repr(s) == repr(spec())


def test_problems_lists_every_problem_in_field_order() -> None:
    problems = JobSpec.problems(name="Bad_Name", command="python t.py", nodes=0, resources={"cpu": -1, "memory": "4GB"},
                                env={"RANK": "0"}, timeout=0, deepspeed={**DS, "zero_optimization": {"stage": 7}})
    assert [p.field for p in problems] == [
        "name", "command", "nodes", "resources.cpu", "resources.memory", "env.RANK", "timeout",
        "deepspeed.zero_optimization.stage"]
    assert all(isinstance(p, Problem) and p.spec == "JobSpec" for p in problems)
    with pytest.raises(InvalidSpecError) as info:
        JobSpec(name="Bad_Name", command="python t.py", nodes=0)
    assert str(info.value) == problems[0].message


def test_problems_of_a_valid_spec_is_empty() -> None:
    assert JobSpec.problems(name="ok", script="t.py", deepspeed=DS) == []
    assert Resources.problems(cpu="500m", gpus=1) == []
    assert ServeSpec.problems(name="m", model="m:f") == []
    assert PodOptions.problems() == []


def test_a_check_that_needs_an_invalid_field_waits_for_it() -> None:
    # Ranks against GPUs needs both counts; the batch sizes need a world size. Neither reports twice.
    problems = JobSpec.problems(name="ok", script="t.py", procs_per_node=0, resources={"gpus": 1},
                                deepspeed={"train_batch_size": 3})
    assert [p.field for p in problems] == ["procs_per_node"]
    problems = JobSpec.problems(name="ok", script="t.py", procs_per_node=4, resources={"gpus": 1},
                                deepspeed={"train_batch_size": 3})
    assert [p.field for p in problems] == ["procs_per_node", "deepspeed.train_batch_size"]


def test_problems_refuses_unknown_fields_as_the_constructor_does() -> None:
    with pytest.raises(TypeError, match="procs"):
        JobSpec.problems(name="ok", script="t.py", procs=2)


def test_serve_and_pod_problems_are_named_for_their_spec() -> None:
    problems = ServeSpec.problems(name="Bad", model="m:f", replicas=0, port=80, env={"DSNB_SERVE_TOKEN": "x"})
    assert [p.field for p in problems] == ["name", "replicas", "port", "env.DSNB_SERVE_TOKEN"]
    assert {p.spec for p in problems} == {"ServeSpec"}
    with pytest.raises(InvalidSpecError, match=r"^ServeSpec\.name: "):
        ServeSpec(name="Bad", model="m:f")
    assert [p.field for p in PodOptions.problems(shm_size="lots", run_as_user=0, security_profile="x")] == [
        "options.shm_size", "options.run_as_user", "options.security_profile"]


def test_world_size_free_config_checks_run_without_a_world_size() -> None:
    config = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}
    with pytest.raises(InvalidSpecError) as info:
        check_deepspeed_config(config, world_size=None)
    assert info.value.field == "deepspeed.zero_optimization.offload_param"
    assert check_deepspeed_config({"train_batch_size": 3}, world_size=None) == {"train_batch_size": 3}


@pytest.mark.parametrize(
    ("resources", "procs", "backend", "accelerator", "threads"),
    [
        (Resources(), 1, "gloo", "cpu", None),
        (Resources(cpu="500m"), 1, "gloo", "cpu", None),
        (Resources(cpu=0.5), 1, "gloo", "cpu", 1),
        (Resources(cpu=7.9, gpus=2), 2, "nccl", "gpu", 3),
        (Resources(cpu=16, gpus=4), 4, "nccl", "gpu", 4),
    ],
)
def test_derived_device_values(resources: Resources, procs: int, backend: str, accelerator: str, threads: int | None) -> None:
    s = JobSpec(name="d", script="t.py", procs_per_node=procs, resources=resources)
    assert (s.dist_backend, s.accelerator, s.threads_per_rank) == (backend, accelerator, threads)
    assert collective_backend(on_gpu=resources.gpus > 0) == backend
    assert threads_per_rank(resources.cpu, procs) == threads


def test_unique_name_copy_keeps_the_original() -> None:
    s = spec(env={"A": "1"})
    unique = s.with_unique_name()
    assert unique.name.startswith("tiny-") and s.name == "tiny"
    unique.env["B"] = "2"  # containers stay the spec's own, but a copy's are not the original's
    assert s.env == {"A": "1"}
