"""Train a tiny GPT-style byte-level language model with DeepSpeed ZeRO-2, on CPU or GPU.

The model (4 layers, hidden 256, 4 heads, 256 byte tokens, 128-token context) is built
in code with plain torch, and the data is ``data.txt`` next to this script read as
bytes, so nothing is downloaded. Rank 0 reports loss and throughput with
:func:`dsnb.report` (a notebook sees them live) and prints a plain line as well.

The same script runs under dsnb, ``torchrun`` and the ``deepspeed`` launcher.

Example, from the repository root::

    # dsnb, from Python or a notebook
    from dsnb import Cluster, JobSpec
    job = Cluster().submit(JobSpec(name="tiny-gpt", script="examples/tiny_gpt/train.py",
                                   procs_per_node=2, deepspeed="examples/tiny_gpt/ds_config.json"))
    job.wait(timeout=600)

    # torchrun (reads ds_config.json next to this script)
    torchrun --nproc_per_node 2 examples/tiny_gpt/train.py --steps 60

    # the DeepSpeed launcher, on CPU
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 examples/tiny_gpt/train.py

A second run with the same ``--checkpoint-dir`` and a larger ``--steps`` resumes where the
first one stopped and prints ``resumed from step N``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

import dsnb

HERE = Path(__file__).resolve().parent
# DeepSpeed's ZeRO-2 calls this deprecated torch API; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


class GPTConfig:
    """Model shape. Small enough for a minute of CPU training."""

    vocab_size = 256  # bytes: no tokenizer to download
    seq_len = 128
    n_layer = 4
    n_head = 4
    hidden = 256
    dropout = 0.0


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden, 4 * cfg.hidden), nn.GELU(), nn.Linear(4 * cfg.hidden, cfg.hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Decoder-only language model; ``forward(ids, targets)`` returns the mean cross-entropy."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # At std 0.02 (GPT-2's value) the token embeddings are so small that the first attention
        # layer's output dominates the residual stream, and at the learning rate that makes a
        # one-minute demo the loss jumps to ~10 for a step now and then; 0.1 trains smoothly.
        nn.init.normal_(self.tok.weight, std=0.1)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The next-byte logits at every position: ``[batch, length, vocab_size]`` (``serve_model.py`` serves them)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(ids)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


class ByteWindows(Dataset):
    """Overlapping windows of ``seq_len + 1`` bytes of a text file: (input, next-byte target)."""

    def __init__(self, path: Path, seq_len: int, stride: int) -> None:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        if len(data) < seq_len + 2:
            raise ValueError(f"{path} has {len(data)} bytes; it needs more than {seq_len + 1}")
        self.data, self.seq_len = data, seq_len
        self.starts = list(range(0, len(data) - seq_len - 1, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.data[self.starts[index]: self.starts[index] + self.seq_len + 1]
        return window[:-1], window[1:]


def micro_batches(dataset: ByteWindows, batch: int, rank: int, world: int, seed: int, skip: int):
    """Endless micro-batches of this rank's share of the data, reshuffled every epoch.

    ``skip`` micro-batches are passed over first, so a resumed run sees the data it would
    have seen had it never stopped.
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} windows cannot fill a micro-batch of {batch} on each of {world} ranks")
    epoch, index = divmod(skip, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for i in range(index, per_epoch):
            items = [dataset[j] for j in order[i * batch:(i + 1) * batch]]
            yield torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        epoch, index = epoch + 1, 0


def load_config(path: str | None) -> dict:
    """The DeepSpeed config: dsnb's (under dsnb), else ``path``, else ``ds_config.json`` here."""
    config = dsnb.deepspeed_config()
    if config is not None:
        return config
    with open(path or HERE / "ds_config.json") as f:
        return json.load(f)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a tiny byte-level GPT with DeepSpeed ZeRO-2 (CPU or GPU).")
    parser.add_argument("--steps", type=int, default=60, help="total optimizer steps to reach; a resumed run continues up to it (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for model initialisation and data order (default: %(default)s)")
    parser.add_argument("--report-every", type=int, default=1, help="report loss and tokens/s every N steps; the first and last step always (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every N steps; 0 saves only at the end (default: %(default)s)")
    parser.add_argument("--checkpoint-dir", default=dsnb.checkpoint_dir("./checkpoints/tiny-gpt"),
                        help="where checkpoints are saved and resumed from (default: %(default)s; on Ray, a directory Ray Train keeps)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch even if a checkpoint exists")
    parser.add_argument("--no-save", dest="save", action="store_false", help="save no checkpoint at all (for benchmarks)")
    parser.add_argument("--data", default=str(HERE / "data.txt"), help="text file to train on, read as bytes (default: data.txt next to this script)")
    parser.add_argument("--deepspeed-config", default=None,
                        help="DeepSpeed JSON config when not run by dsnb (default: ds_config.json next to this script)")
    parser.add_argument("--fail-at-step", type=int, default=None, metavar="K",
                        help="test aid: rank 1 (rank 0 when alone) raises an exception at step K, to exercise the crash path")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.report_every < 1 or args.save_every < 0:
        parser.error("--steps and --report-every must be >= 1, --save-every >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import deepspeed  # imported here so that --help answers at once

    default_backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=os.environ.get("DSNB_DIST_BACKEND", default_backend))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    cfg = GPTConfig()
    model = TinyGPT(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=load_config(args.deepspeed_config))
    micro, accumulate = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    step = 0
    ckpt = Path(args.checkpoint_dir)
    if args.resume and (ckpt / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(ckpt))
        step = int((client_state or {}).get("step", engine.global_steps))
        if rank == 0:
            print(f"resumed from step {step} ({ckpt})", flush=True)
    if step >= args.steps:
        if rank == 0:
            print(f"checkpoint is at step {step}, --steps is {args.steps}: nothing to do", flush=True)
        return 0

    dataset = ByteWindows(Path(args.data), cfg.seq_len, stride=cfg.seq_len // 2)
    batches = micro_batches(dataset, micro, rank, world, args.seed, skip=step * accumulate)
    tokens_per_step = micro * accumulate * world * cfg.seq_len
    fail_rank = 1 if world > 1 else 0
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"tiny-gpt: {params / 1e6:.2f}M parameters, {world} ranks, {len(dataset)} windows, "
              f"{tokens_per_step} tokens/step, steps {step + 1}..{args.steps}", flush=True)

    started = last_time = time.time()
    last_step = step
    first_step = step + 1
    engine.train()
    while step < args.steps:
        step += 1
        if args.fail_at_step == step and rank == fail_rank:
            raise RuntimeError(f"--fail-at-step {step}: rank {rank} fails on purpose")
        loss_sum = 0.0
        for _ in range(accumulate):
            ids, targets = next(batches)
            loss = engine(ids.to(engine.device), targets.to(engine.device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.item()

        if step == first_step or step % args.report_every == 0 or step == args.steps:
            # The mean over ranks, so the number does not depend on which shard rank 0 drew.
            mean = torch.tensor([loss_sum / accumulate], device=engine.device)
            dist.all_reduce(mean)
            now = time.time()
            tokens_per_s = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            if rank == 0:
                loss_value = mean.item() / world
                dsnb.report(step=step, loss=loss_value, tokens_per_s=tokens_per_s, total_steps=args.steps)
                print(f"step {step}/{args.steps} loss {loss_value:.3f} tokens/s {tokens_per_s:.0f}", flush=True)
                if step == first_step:
                    # Read by benchmarks/bench_local.py: launch -> first step, whatever the launcher.
                    print(f"first step done at t_wall={now:.3f}", flush=True)

        if args.save and (step == args.steps or (args.save_every and step % args.save_every == 0)):
            engine.save_checkpoint(str(ckpt), client_state={"step": step})
            if rank == 0:
                print(f"saved checkpoint at step {step} to {ckpt}", flush=True)

    if rank == 0:
        print(f"done: {step} steps in {time.time() - started:.1f} s", flush=True)
    return 0


def end_distributed() -> None:
    """Close the process group: a rank that exits with gloo's threads still running can abort."""
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    end_distributed()
    sys.exit(code)
