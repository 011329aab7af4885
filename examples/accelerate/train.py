"""An Accelerate training loop with DeepSpeed ZeRO-2 that runs unchanged under every dsnb backend.

A plain PyTorch loop (a small regression network on random data) prepared by ``Accelerator``
with its DeepSpeed plugin and ``ds_zero2.json``, whose batch sizes, accumulation and
clipping are ``"auto"``: Accelerate fills them in ``prepare`` from the data loader, the
plugin and the number of processes. Nothing in it is dsnb's: Accelerate reads the launcher's
``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.

On CPU Accelerate needs ``InitProcessGroupKwargs(backend="gloo")``: without it, it finds no
accelerator, picks no process-group backend and counts a world of one, so DeepSpeed stops on
``train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size
4 != 4 * 1 * 2``; ``Accelerator(cpu=True)`` would drop DeepSpeed for plain DDP.

``--tracker`` adds dsnb's tracker, which reports each ``accelerator.log(..., step=step)``
at that step; without it dsnb sees no metric (Accelerate prints none).

    dsnb run train.py --procs 2 -- --steps 8 --tracker
"""

import argparse

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--deepspeed", default="ds_zero2.json")
parser.add_argument("--tracker", action="store_true", help="report accelerator.log values at their step with dsnb's tracker")
parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it; LOCAL_RANK says the same
options = parser.parse_args()

on_gpu = torch.cuda.is_available()
trackers = []
if options.tracker:
    from dsnb.integrations.accelerate import DsnbTracker

    trackers.append(DsnbTracker())
accelerator = Accelerator(
    deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=options.deepspeed, gradient_clipping=1.0),
    kwargs_handlers=[] if on_gpu else [InitProcessGroupKwargs(backend="gloo")],
    log_with=trackers or None,
)
accelerator.init_trackers("accelerate-example")

torch.manual_seed(0)
features = torch.randn(256, 16)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(features, features.sum(dim=1)), batch_size=4, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

step = 0
while step < options.steps:
    for batch_features, target in loader:
        loss = torch.nn.functional.mse_loss(model(batch_features).squeeze(-1), target)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()  # over the ranks
        accelerator.log({"loss": mean_loss}, step=step)
        accelerator.print(f"step {step} loss {mean_loss:.4f}")
        if step == options.steps:
            break
config = accelerator.deepspeed_plugin.deepspeed_config
print(f"rank {accelerator.process_index} of {accelerator.num_processes}: {step} steps, {accelerator.distributed_type.value} "
      f"ZeRO stage {config['zero_optimization']['stage']}, train_batch_size {config['train_batch_size']}", flush=True)
accelerator.end_training()
