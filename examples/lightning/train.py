"""A PyTorch Lightning script with DeepSpeed ZeRO-2 that runs unchanged under every dsnb backend.

It trains a small regression network on random data with the Lightning ``Trainer`` and its
DeepSpeed strategy. Nothing in it is dsnb's: Lightning sees that the launcher started the
ranks (``LOCAL_RANK`` is set; under torchrun also ``TORCHELASTIC_RUN_ID``) and spawns none
of its own; ``devices`` and ``num_nodes`` come from the launcher's ``LOCAL_WORLD_SIZE`` and
``WORLD_SIZE``. ``--logger`` adds dsnb's logger, which reports the logged loss at Lightning's
step; without it dsnb sees no metric (Lightning prints none outside its progress bar).

On a GPU it uses ``strategy="deepspeed_stage_2"``. On CPU it needs :class:`CPUDeepSpeedStrategy`:
Lightning 2.6.6 refuses DeepSpeed on anything but CUDA ("The DeepSpeed strategy is only
supported on CUDA GPUs but `CPUAccelerator` is used."), though DeepSpeed itself runs on CPU
(``DS_ACCELERATOR=cpu``, gloo).

    dsnb run train.py --procs 2 -- --steps 8 --logger
"""

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--logger", action="store_true", help="report the logged metrics at Lightning's step with dsnb's logger")
parser.add_argument("--output-dir", default="out")
parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it; LOCAL_RANK says the same
options = parser.parse_args()


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy on CPU ranks (Lightning 2.6.6, lightning/pytorch/strategies/deepspeed.py).

    Two changes: ``setup_environment`` skips the check that the accelerator is CUDA, and the
    devices carry an index (``cpu:0``, ``cpu:1``...) because Lightning hands
    ``root_device.index`` to DeepSpeed as the rank's device, where an unindexed ``cpu`` fails
    (``'>=' not supported between instances of 'NoneType' and 'int'``). Tensors on ``cpu:1``
    live on the one CPU device, so nothing else changes.
    """

    def __init__(self, devices: int, **kwargs):
        super().__init__(parallel_devices=[torch.device("cpu", i) for i in range(devices)], **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy does after its CUDA check


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        features, target = batch
        loss = torch.nn.functional.mse_loss(self.net(features).squeeze(-1), target)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


torch.manual_seed(0)
features = torch.randn(256, 16)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, features.sum(dim=1)), batch_size=4)
devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the launcher's ranks on this node
num_nodes = int(os.environ.get("WORLD_SIZE", str(devices))) // devices
on_gpu = torch.cuda.is_available()
loggers = []
if options.logger:
    from dsnb.integrations.lightning import DsnbLogger

    loggers.append(DsnbLogger())
trainer = L.Trainer(
    accelerator="gpu" if on_gpu else "cpu", devices=devices, num_nodes=num_nodes,
    strategy="deepspeed_stage_2" if on_gpu else CPUDeepSpeedStrategy(devices, stage=2),
    max_steps=options.steps, log_every_n_steps=2, logger=loggers or False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, default_root_dir=options.output_dir,
)
trainer.fit(Regressor(), loader)
print(f"rank {trainer.global_rank} of {trainer.world_size}: {trainer.global_step} steps, "
      f"{type(trainer.strategy).__name__} with ZeRO stage {trainer.strategy.config['zero_optimization']['stage']}", flush=True)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()  # a rank that exits with gloo's threads running can abort
