"""DeepSpeed configs written for the Hugging Face Trainer and Accelerate, with ``"auto"`` values.

The configs in ``tests/ds_configs/`` follow the ZeRO-2 and ZeRO-3 (with offload) examples of
the Hugging Face DeepSpeed guide and Accelerate's ZeRO-2 template: the framework replaces each
``"auto"`` with a value of its own before DeepSpeed reads the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsnb import Cluster, InvalidSpecError, JobSpec
from dsnb.ds_config import check_deepspeed_config, framework_filled

CONFIGS = Path(__file__).parent / "ds_configs"
BATCH = ["gradient_accumulation_steps", "train_batch_size", "train_micro_batch_size_per_gpu"]


def load(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


@pytest.mark.parametrize("name", ["hf_zero2.json", "hf_zero3_offload.json", "accelerate_zero2.json"])
def test_framework_configs_are_accepted_and_their_auto_values_kept(name: str) -> None:
    spec = JobSpec(name="hf", script="train.py", procs_per_node=2, deepspeed=str(CONFIGS / name))
    config = spec.deepspeed_config
    assert config == load(name)  # nothing filled: the framework sets the batch triple from its arguments
    assert config["train_batch_size"] == "auto" and config["train_micro_batch_size_per_gpu"] == "auto"


def test_the_values_the_framework_fills_are_listed() -> None:
    assert framework_filled(load("hf_zero3_offload.json")) == [
        "fp16.enabled", "bf16.enabled", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
        "optimizer.params.weight_decay", "scheduler.params.warmup_min_lr", "scheduler.params.warmup_max_lr",
        "scheduler.params.warmup_num_steps", "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
        "gradient_accumulation_steps", "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
    ]
    assert sorted(k for k in framework_filled(load("accelerate_zero2.json")) if k in BATCH) == BATCH[1:]


def test_the_dry_run_names_what_the_framework_fills(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text("pass\n")
    plan = Cluster("local", home=str(tmp_path / "jobs")).dryrun(
        JobSpec(name="hf", script="train.py", working_dir=str(tmp_path), procs_per_node=2, deepspeed=load("hf_zero2.json")))
    note = next(n for n in plan.notes if '"auto"' in n)
    assert "train_batch_size" in note and "optimizer.params.lr" in note and "zero_optimization.reduce_bucket_size" in note
    assert note in str(plan)
    plain = Cluster("local", home=str(tmp_path / "jobs")).dryrun(
        JobSpec(name="plain", script="train.py", working_dir=str(tmp_path), deepspeed={"train_micro_batch_size_per_gpu": 2}))
    assert not any('"auto"' in n for n in plain.notes)


def test_the_checks_that_do_not_depend_on_auto_values_are_still_made() -> None:
    zero2_with_param_offload = load("hf_zero2.json")
    zero2_with_param_offload["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(InvalidSpecError, match="parameter offload needs ZeRO stage 3") as info:
        check_deepspeed_config(zero2_with_param_offload, world_size=2)
    assert info.value.field == "deepspeed.zero_optimization.offload_param"

    removed = {**load("hf_zero2.json"), "elasticity": {"enabled": True}}
    with pytest.raises(InvalidSpecError) as info:
        check_deepspeed_config(removed, world_size=2)
    assert info.value.field == "deepspeed.elasticity"

    bad_member = {**load("hf_zero2.json"), "gradient_accumulation_steps": 0}
    with pytest.raises(InvalidSpecError, match="must be a positive integer") as info:
        check_deepspeed_config(bad_member, world_size=2)
    assert info.value.field == "deepspeed.gradient_accumulation_steps"


def test_fp16_with_bf16_is_refused_only_when_both_are_explicit() -> None:
    both_auto = load("hf_zero2.json")
    assert check_deepspeed_config(both_auto, world_size=2)["fp16"]["enabled"] == "auto"
    explicit = {**load("accelerate_zero2.json"), "bf16": {"enabled": True}}
    with pytest.raises(InvalidSpecError, match="fp16 and bf16 are both enabled"):
        check_deepspeed_config(explicit, world_size=2)
    one_auto = {**load("accelerate_zero2.json"), "bf16": {"enabled": "auto"}}
    check_deepspeed_config(one_auto, world_size=2)


def test_a_batch_triple_without_auto_is_filled_and_checked_as_before() -> None:
    assert check_deepspeed_config({"train_micro_batch_size_per_gpu": 4}, world_size=2)["train_batch_size"] == 8
    with pytest.raises(InvalidSpecError, match="neither train_batch_size nor train_micro_batch_size_per_gpu is set"):
        check_deepspeed_config({"gradient_accumulation_steps": 2}, world_size=2)
    with pytest.raises(InvalidSpecError, match=r"16 != train_micro_batch_size_per_gpu 4"):
        check_deepspeed_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1},
                               world_size=2)


def test_a_partial_optimizer_offload_ratio_left_auto_is_not_compared() -> None:
    config = load("hf_zero2.json")
    config["zero_optimization"]["offload_optimizer"]["ratio"] = "auto"
    check_deepspeed_config(config, world_size=2)


def test_the_form_keeps_auto_values_and_says_which_the_framework_fills() -> None:
    from dsnb.widgets.form import LaunchForm

    spec = JobSpec(name="hf", script="train.py", procs_per_node=2, deepspeed=load("hf_zero2.json"))
    form = LaunchForm(Cluster(), spec=spec)
    try:
        assert form.spec() == spec
        assert form.problems == {}
        preview = form.config_preview.value
        assert "fill at run time" in preview and "train_micro_batch_size_per_gpu" in preview and "optimizer.params.lr" in preview
    finally:
        form.close()


def test_dsnb_dryrun_accepts_the_config_and_prints_what_the_framework_fills(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.console import Console

    from dsnb.console.cli import main

    (tmp_path / "train.py").write_text("pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DSNB_HOME", str(tmp_path / "home"))
    out = io.StringIO()
    code = main(["dryrun", "train.py", "--procs", "2", "--deepspeed", str(CONFIGS / "hf_zero3_offload.json")],
                console=Console(file=out, width=400))
    assert code == 0, out.getvalue()
    assert 'left "auto" for the Trainer or Accelerate' in out.getvalue()
    assert "stage3_prefetch_bucket_size" in out.getvalue()
