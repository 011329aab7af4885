"""JobSpec, Resources and the DeepSpeed config checks: good input is accepted, bad input is refused clearly."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dsnb import InvalidSpecError, JobSpec, Resources
from dsnb.ds_config import check_deepspeed_config, removed_keys

OK_DS = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}


def base(**changes: Any) -> dict[str, Any]:
    return {"name": "tiny-gpt", "command": ["python", "-c", "pass"], "procs_per_node": 2, **changes}


@dataclass(frozen=True)
class BadInput:
    """One invalid spec: the keyword arguments, the field the error must name, a word of the fix."""

    id: str
    kwargs: dict[str, Any]
    field: str
    fix_word: str


BAD_INPUTS = [
    BadInput("empty name", base(name=""), "name", "name="),
    BadInput("upper-case name", base(name="Tiny-GPT"), "name", "'tiny-gpt'"),
    BadInput("name with underscore", base(name="tiny_gpt"), "name", "'tiny-gpt'"),
    BadInput("name starting with a digit", base(name="1gpt"), "name", "'gpt'"),
    BadInput("name ending with a dash", base(name="gpt-"), "name", "'gpt'"),
    BadInput("name too long", base(name="a" * 59), "name", "use"),
    BadInput("script and command", base(script="t.py"), "script", "command=["),
    BadInput("neither script nor command", {"name": "x", "procs_per_node": 1}, "script/command/function", "script="),
    BadInput("kwargs without a function", base(kwargs={"lr": 0.1}), "kwargs", "function=train"),
    BadInput("function not callable", base(command=None, function="train"), "function", "function=train"),
    BadInput("command as one string", base(command="python train.py"), "command", "['python', 'train.py']"),
    BadInput("empty command", base(command=[]), "command", "command="),
    BadInput("args as one string", base(args="--epochs 3"), "args", "['--epochs', '3']"),
    BadInput("args with a number", base(args=["--epochs", 3]), "args", "strings"),
    BadInput("zero nodes", base(nodes=0), "nodes", "nodes=1"),
    BadInput("zero procs", base(procs_per_node=0), "procs_per_node", "procs_per_node=1"),
    BadInput("fractional nodes", base(nodes=1.5), "nodes", "1 or more"),
    BadInput("resources as a string", base(resources="4 cpus"), "resources", "Resources("),
    BadInput("more procs than gpus", base(procs_per_node=4, resources={"gpus": 2}), "procs_per_node", "procs_per_node=2"),
    BadInput("env value not a string", base(env={"N": 3}), "env.N", "'3'"),
    BadInput("env key invalid", base(env={"1X": "a"}), "env", "letters"),
    BadInput("env sets RANK", base(env={"RANK": "0"}), "env.RANK", "remove"),
    BadInput("env sets MASTER_PORT", base(env={"MASTER_PORT": "1"}), "env.MASTER_PORT", "remove"),
    BadInput("image with a space", base(image="my image"), "image", "ghcr.io"),
    BadInput("negative restarts", base(max_restarts=-1), "max_restarts", "max_restarts=0"),
    BadInput("zero timeout", base(timeout=0), "timeout", "timeout=3600"),
    BadInput("negative hang timeout", base(hang_timeout=-5), "hang_timeout", "hang_timeout=600"),
    BadInput("deepspeed not a dict", base(deepspeed=[1, 2]), "deepspeed", "dict"),
    BadInput("deepspeed file missing", base(deepspeed="/nonexistent/ds.json"), "deepspeed", "existing JSON"),
    BadInput("no batch size", base(deepspeed={"zero_optimization": {"stage": 2}}), "deepspeed", "train_micro_batch_size_per_gpu"),
    BadInput("micro batch zero", base(deepspeed={"train_micro_batch_size_per_gpu": 0}), "deepspeed.train_micro_batch_size_per_gpu", "1 or more"),
    BadInput("inconsistent triple", base(deepspeed={"train_batch_size": 30, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}),
             "deepspeed.train_batch_size", "32"),
    BadInput("batch not divisible", base(deepspeed={"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}), "deepspeed.train_batch_size", "multiple of 8"),
    BadInput("batch not divisible by world", base(deepspeed={"train_batch_size": 3}), "deepspeed.train_batch_size", "multiple of 2"),
    BadInput("zero stage 4", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 4}}), "deepspeed.zero_optimization.stage", "0 to 3"),
    BadInput("zero stage as string", base(deepspeed={**OK_DS, "zero_optimization": {"stage": "2"}}), "deepspeed.zero_optimization.stage", "0 to 3"),
    BadInput("param offload on stage 2", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}),
             "deepspeed.zero_optimization.offload_param", '"stage": 3'),
    BadInput("optimizer offload on stage 0", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}),
             "deepspeed.zero_optimization.offload_optimizer", '"stage": 2'),
    BadInput("offload to gpu", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}),
             "deepspeed.zero_optimization.offload_param.device", "cpu"),
    BadInput("nvme without path", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
             "deepspeed.zero_optimization.offload_param.nvme_path", "nvme_path"),
    BadInput("partial offload on stage 2", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}}),
             "deepspeed.zero_optimization.offload_optimizer.ratio", "stage 3"),
    BadInput("fp16 and bf16", base(deepspeed={**OK_DS, "fp16": {"enabled": True}, "bf16": {"enabled": True}}), "deepspeed.fp16", "one of them"),
    BadInput("removed elasticity", base(deepspeed={**OK_DS, "elasticity": {"enabled": True}}), "deepspeed.elasticity", "delete 'elasticity'"),
    BadInput("removed sparse_attention", base(deepspeed={**OK_DS, "sparse_attention": {}}), "deepspeed.sparse_attention", "delete"),
    BadInput("removed zero key", base(deepspeed={**OK_DS, "zero_optimization": {"stage": 3, "mics_shard_size": 8}}),
             "deepspeed.zero_optimization.mics_shard_size", "delete"),
    BadInput("cpu negative", base(resources={"cpu": -1}), "resources.cpu", "'2'"),
    BadInput("memory in GB", base(resources={"memory": "4GB"}), "resources.memory", "'4Gi'"),
    BadInput("memory as a number", base(resources={"memory": 4}), "resources.memory", "'4Gi'"),
    BadInput("negative gpus", base(resources={"gpus": -1}), "resources.gpus", "gpus=0"),
    BadInput("fractional gpus", base(resources={"gpus": 1.5}), "resources.gpus", "gpus=0"),
]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.id for b in BAD_INPUTS])
def test_bad_input_names_field_and_fix(bad: BadInput) -> None:
    with pytest.raises(InvalidSpecError) as info:
        JobSpec(**bad.kwargs)
    error = info.value
    assert error.field == bad.field
    assert bad.fix_word in error.fix, error.fix
    assert str(error).startswith(f"JobSpec.{bad.field}: ")
    assert isinstance(error, ValueError)


#: JobSpec fields whose problems only a backend can see (the conformance suite's refused specs cover them).
CHECKED_BY_BACKENDS = {"working_dir"}


def test_every_field_of_jobspec_has_a_bad_input_row() -> None:
    """A field added to JobSpec without a refusal row here fails this test."""
    covered = {part for bad in BAD_INPUTS for part in bad.field.split(".")[0].split("/")}
    assert {f.name for f in dataclasses.fields(JobSpec)} - covered == CHECKED_BY_BACKENDS
    assert {f.name for f in dataclasses.fields(Resources)} <= {bad.field.split(".")[1] for bad in BAD_INPUTS
                                                               if bad.field.startswith("resources.")}


def test_negative_gpus_refused_by_resources() -> None:
    with pytest.raises(InvalidSpecError, match="resources.gpus"):
        Resources(gpus=-1)


@pytest.mark.parametrize(
    ("config", "world", "expected"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, 2, (8, 4, 1)),
        ({"train_batch_size": 32}, 4, (32, 8, 1)),
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, (12, 2, 3)),
        ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
    ],
)
def test_batch_triple_filled_as_deepspeed_does(config: dict, world: int, expected: tuple[int, int, int]) -> None:
    filled = check_deepspeed_config(config, world)
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == expected
    assert "train_batch_size" not in config or config["train_batch_size"] == expected[0]  # the input is not mutated


TRIPLES = [
    ({"train_batch_size": 48, "gradient_accumulation_steps": 3}, 4),
    ({"train_micro_batch_size_per_gpu": 5}, 3),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, 4),
    ({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 2),
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, 2),
]

_DEEPSPEED_SIDE = """
import json, sys
import deepspeed.comm
from deepspeed.runtime.config import DeepSpeedConfig

# No process group here: report rank 0 so that DeepSpeed takes the world size from the unit below.
deepspeed.comm.get_rank = lambda group=None: 0

class DataParallel:  # stands in for a model-parallel unit that reports the data-parallel size
    def __init__(self, n): self.n = n
    def get_data_parallel_world_size(self): return self.n
    def get_data_parallel_rank(self): return 0
    def get_model_parallel_world_size(self): return 1

out = []
for config, world in json.loads(sys.argv[1]):
    try:
        c = DeepSpeedConfig(config, mpu=DataParallel(world))
        out.append([c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps])
    except (AssertionError, ValueError) as e:
        out.append(None)
print(json.dumps(out))
"""


def test_filled_triple_agrees_with_installed_deepspeed() -> None:
    """Our arithmetic and refusals match DeepSpeed's own for the same inputs."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_SIDE, json.dumps(TRIPLES)],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for (config, world), expected in zip(TRIPLES, theirs):
        try:
            filled = check_deepspeed_config(config, world)
            ours = [filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]]
        except InvalidSpecError:
            ours = None
        assert ours == expected, (config, world)


def test_removed_keys_come_from_installed_deepspeed() -> None:
    top, zero = removed_keys()
    assert "elasticity" in top and "mics_shard_size" in zero
    ds_runtime_config = pytest.importorskip("deepspeed.runtime.config")
    assert set(top) == set(ds_runtime_config._REMOVED_TOP_LEVEL_CONFIG_KEYS)


def test_deepspeed_from_json_file_is_inlined(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(OK_DS))
    spec = JobSpec(**base(deepspeed=str(path)))
    assert spec.deepspeed == OK_DS
    assert spec.deepspeed_config["train_batch_size"] == 16


def test_invalid_json_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8,\n}')
    with pytest.raises(InvalidSpecError, match="not valid JSON.*line 2"):
        JobSpec(**base(deepspeed=path))


def test_repr_shows_non_default_fields_and_hides_secrets() -> None:
    spec = JobSpec(name="a", script="t.py", nodes=2, env={"HF_TOKEN": "hf_secret", "NCCL_DEBUG": "WARN"})
    text = repr(spec)
    assert text == "JobSpec(name='a', script='t.py', nodes=2, env={'HF_TOKEN': '***', 'NCCL_DEBUG': 'WARN'})"
    assert "hf_secret" not in text


def test_round_trip_through_dict() -> None:
    spec = JobSpec(**base(deepspeed=OK_DS, resources=Resources(cpu=2, memory="4Gi"), env={"A": "1"}, timeout=60.0))
    again = JobSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.resources == Resources(cpu=2, memory="4Gi")


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(InvalidSpecError, match="procs"):
        JobSpec.from_dict({"name": "a", "script": "t.py", "procs": 2})


def test_unique_names_are_valid_and_differ() -> None:
    spec = JobSpec(name="a" * 58, script="t.py")
    names = {spec.with_unique_name().name for _ in range(20)}
    assert len(names) > 1
    assert all(len(n) == 63 and n.startswith("a" * 58 + "-") for n in names)
    assert spec.name == "a" * 58


def test_a_stored_spec_with_the_longest_name_and_its_suffix_reads_back() -> None:
    from dsnb import ServeSpec
    from dsnb.spec import MAX_NAME_LEN

    job = JobSpec(name="a" * MAX_NAME_LEN, script="t.py").with_unique_name()
    assert len(job.name) == 63 and JobSpec.from_dict(job.to_dict()) == job
    served = ServeSpec(name="s" * MAX_NAME_LEN, model="m:build").with_unique_name()
    assert ServeSpec.from_dict(served.to_dict()).name == served.name
    with pytest.raises(InvalidSpecError, match="at most 58 fit"):  # a long name without a suffix is still refused
        JobSpec.from_dict({**job.to_dict(), "name": "a" * 61})
