"""Will it fit: the estimates are DeepSpeed's own estimators' for the spec's ZeRO stage, offload and world size;
a model directory is sized without its weights, as DeepSpeed sizes the loaded model; the activations' range
and the verdict follow; bad input is refused naming the field; ``dsnb estimate`` prints it."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

from deepspeed.runtime.zero import stage3, stage_1_and_2  # noqa: E402
from rich.console import Console  # noqa: E402

from dsnb import JobSpec  # noqa: E402
from dsnb.console.cli import main  # noqa: E402
from dsnb.errors import InvalidSpecError  # noqa: E402
from dsnb.fit import GIB, ModelSize, estimate, model_size  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "serving_code"))
from tiny_llama import save_tiny_llama  # noqa: E402

SEVEN_B = ModelSize(params=6_738_415_616, largest_layer=131_072_000, layers=32, hidden=4096, heads=32)


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero_2_is_deepspeeds_estimate(gpus_per_node: int, nodes: int, offload: bool) -> None:
    fit = estimate(SEVEN_B, zero_stage=2, offload_optimizer=offload, gpus_per_node=gpus_per_node, nodes=nodes, gpu_memory=0)
    cpu, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(SEVEN_B.params, num_gpus_per_node=gpus_per_node,
                                                                   num_nodes=nodes, cpu_offload=offload)
    assert (fit.gpu_model_states, fit.cpu_model_states) == (gpu, cpu)


@pytest.mark.parametrize("gpus_per_node,nodes", [(1, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero_3_is_deepspeeds_estimate(gpus_per_node: int, nodes: int, offload_optimizer: bool, offload_params: bool) -> None:
    fit = estimate(SEVEN_B, zero_stage=3, offload_optimizer=offload_optimizer, offload_params=offload_params,
                   gpus_per_node=gpus_per_node, nodes=nodes, gpu_memory=0)
    cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
        SEVEN_B.params, SEVEN_B.largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=offload_optimizer, cpu_offload_params=offload_params)
    assert (fit.gpu_model_states, fit.cpu_model_states) == (gpu, cpu)


def test_each_stage_partitions_more_and_stage_0_and_1_count_what_they_hold() -> None:
    per_gpu = [estimate(SEVEN_B, zero_stage=stage, gpus_per_node=8, gpu_memory=0).gpu_model_states for stage in range(4)]
    assert per_gpu[0] == 20 * SEVEN_B.params  # fp16 params + grads, fp32 grads, params, momentum, variance
    assert per_gpu[1] == per_gpu[2] + 2 * SEVEN_B.params  # stage 1 keeps the whole fp16 gradients
    assert per_gpu[0] > per_gpu[1] > per_gpu[2] > per_gpu[3]


def test_a_model_directory_is_sized_without_its_weights_as_deepspeed_sizes_the_loaded_model(tmp_path: Path) -> None:
    directory = save_tiny_llama(tmp_path / "llama")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    size = model_size(directory)
    assert (size.params, size.largest_layer) == stage3.model_to_params(loaded)
    assert (size.layers, size.hidden, size.heads) == (2, 64, loaded.config.num_attention_heads)
    assert model_size(loaded).params == size.params == model_size(lambda: loaded).params
    assert "config.json" not in size.source and str(directory) in size.source


def test_the_spec_gives_the_stage_offload_world_and_micro_batch_and_keywords_override() -> None:
    spec = JobSpec(name="big", command=["python", "train.py"], nodes=2, procs_per_node=4,
                   deepspeed={"train_micro_batch_size_per_gpu": 2,
                              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                    "offload_param": {"device": "cpu"}}})
    fit = estimate(SEVEN_B, spec, sequence_length=2048, gpu_memory=80 * GIB)
    assert (fit.zero_stage, fit.offload_optimizer, fit.offload_params, fit.gpus_per_node, fit.nodes) == (3, True, True, 4, 2)
    s, b, h, a, layers = 2048, 2, 4096, 32, 32
    assert fit.activations == (2 * s * b * h * layers, int(s * b * h * (34 + 5 * a * s / h)) * layers)
    assert estimate(SEVEN_B, spec, zero_stage=2, nodes=1, gpu_memory=0).zero_stage == 2
    assert "offload_param applies to ZeRO stage 3 only" in " ".join(estimate(SEVEN_B, spec, zero_stage=2, gpu_memory=0).notes)


def test_the_verdict_compares_the_range_with_the_gpu() -> None:
    fit = estimate(SEVEN_B, zero_stage=3, gpus_per_node=8, sequence_length=4096, micro_batch=1, gpu_memory=0)
    low, high = fit.gpu_needed
    assert low < high
    verdicts = [estimate(SEVEN_B, zero_stage=3, gpus_per_node=8, sequence_length=4096, gpu_memory=there).verdict
                for there in (high, (low + high) // 2, low - 1, None)]
    assert verdicts == ["fits", "fits with activation checkpointing", "does not fit", "unknown"] or (
        torch.cuda.is_available() and verdicts[:3] == ["fits", "fits with activation checkpointing", "does not fit"])
    bare = estimate(6.7e9, zero_stage=3, gpus_per_node=8, gpu_memory=80 * GIB)
    assert bare.activations is None and "largest layer is unknown" in " ".join(bare.notes)
    assert "give sequence_length" in " ".join(bare.notes) and "per GPU there is: 80.00 GiB -> fits" in str(bare)


@pytest.mark.parametrize("model,says", [(-5, "not a parameter count"), (True, "not a parameter count"),
                                        (float("inf"), "not a parameter count"), (float("nan"), "not a parameter count"),
                                        (object(), "not a parameter count, a model directory"),
                                        ({"hidden_size": 8}, "no model_type")])
def test_what_cannot_be_sized_is_refused_naming_the_field(model: object, says: str) -> None:
    with pytest.raises(InvalidSpecError, match=f"model.*{says}"):
        estimate(model, zero_stage=2, gpu_memory=0)
    with pytest.raises(InvalidSpecError, match="zero_stage: 4 is not a ZeRO stage"):
        estimate(SEVEN_B, zero_stage=4, gpu_memory=0)


def run_cli(*argv: str) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=300, color_system=None)
    return main(list(argv), console=console), console.file.getvalue()


def test_dsnb_estimate_prints_the_estimate_and_fails_when_it_cannot_fit(tmp_path: Path) -> None:
    dsnb = run_cli
    code, out = dsnb("estimate", "6.7e9", "--zero-stage", "3", "--procs", "8", "--gpu-gib", "80")
    assert code == 0 and "ZeRO stage 3, offload: none, 1 node(s) x 8 GPU(s)" in out and "-> fits" in out
    code, out = dsnb("estimate", "6.7e9", "--gpu-gib", "24")
    assert code == 1 and "-> does not fit" in out  # stage 0: 20 bytes a parameter on each GPU
    code, out = dsnb("estimate", save_tiny_llama(tmp_path / "llama"), "--seq-len", "128", "--gpu-gib", "1")
    assert code == 0 and "activations:" in out and "the config in" in out


# -- cluster.check(spec, model=...) ------------------------------------------------------------
def zero_spec(stage: int, procs: int = 2, **options: object) -> JobSpec:
    return JobSpec(name="fit", command=["true"], procs_per_node=procs,
                   deepspeed={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}, **options)


def test_check_with_a_model_adds_the_estimate_against_this_machines_memory() -> None:
    import psutil

    from dsnb import Cluster

    spec = zero_spec(2)
    report = Cluster().check(spec, model=SEVEN_B)
    line, fit = report["memory fit"], report.fit
    total = psutil.virtual_memory().total
    assert (fit.gpu_memory, fit.cpu_memory) == (total // 2, total)  # 2 CPU ranks share this machine as device memory
    assert fit.gpu_model_states == estimate(SEVEN_B, spec, gpu_memory=0).gpu_model_states
    assert fit.verdict == "does not fit" and line.status == "failed" and not report.ok
    assert line.detail.startswith(f"{fit.gpu_model_states / GIB:.2f} GiB per GPU") and "(ZeRO 2)" in line.detail
    assert "use ZeRO stage 3" in line.fix and "resources.memory" in line.fix
    small = Cluster().check(spec, model=1_000_000, sequence_length=64)
    assert small.ok and small["memory fit"].status == "passed" and small["memory fit"].detail.endswith(": fits")
    assert small.fit.activations is None  # a bare count has no shape: no activations, said in a note
    assert Cluster().check(spec).fit is None and "memory fit" not in [r.name for r in Cluster().check(spec).results]


def test_check_with_a_model_that_cannot_be_sized_is_a_failed_line_naming_model() -> None:
    from dsnb import Cluster

    report = Cluster().check(zero_spec(2), model="/no/such/model")
    line = report["memory fit"]
    assert line.status == "failed" and report.fit is None
    assert line.detail.startswith("model: '/no/such/model' is not a parameter count") and "7e9" in line.fix


def test_dsnb_check_with_a_model_prints_the_fit_and_fails_when_it_does_not() -> None:
    code, text = run_cli("check", "--model", "7e9", "--procs", "2", "--zero-stage", "3")
    assert code == 1 and "✗ memory fit:" in text and "(ZeRO 3)" in text
    code, text = run_cli("check", "--model", "1e6", "--procs", "2")
    assert code == 0 and "✓ memory fit:" in text and ": fits" in text
