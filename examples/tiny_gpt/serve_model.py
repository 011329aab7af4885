"""Serve the tiny GPT that ``train.py`` trained: ``serve_model:build`` loads its last checkpoint.

:func:`build` makes the same model as ``train.py`` and loads the weights of the newest
DeepSpeed checkpoint in ``$TINY_GPT_CHECKPOINT`` (default ``./checkpoints/tiny-gpt``,
``train.py``'s own default, relative to the directory the server starts in). The served
module takes a batch of byte ids and answers the logits of the byte that comes next.

Example, from the repository root::

    from dsnb import Cluster
    from dsnb.serving import ServeSpec

    endpoint = Cluster("local").serve(ServeSpec(
        name="tiny-gpt", model="serve_model:build", working_dir="examples/tiny_gpt",
        env={"TINY_GPT_CHECKPOINT": "/tmp/tiny-gpt-checkpoints"}))
    logits = endpoint.predict({"inputs": [list(b"The ferry")]})["outputs"][0]   # 256 numbers
    chr(max(range(256), key=logits.__getitem__))                                 # the likeliest next byte

A DeepSpeed checkpoint keeps the model in ZeRO's layout, one set of files per rank;
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` turns the newest one
into a plain ``state_dict`` (fp32, whatever the ZeRO stage and the training precision).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from train import GPTConfig, TinyGPT

#: The variable that says where the checkpoints are (``train.py --checkpoint-dir``).
CHECKPOINT_ENV = "TINY_GPT_CHECKPOINT"
DEFAULT_CHECKPOINT_DIR = "./checkpoints/tiny-gpt"


def checkpoint_dir() -> Path:
    """``$TINY_GPT_CHECKPOINT``, else ``./checkpoints/tiny-gpt`` (``train.py``'s default)."""
    return Path(os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT_DIR)


def load(directory: str | Path | None = None) -> TinyGPT:
    """The tiny GPT with the weights of the newest checkpoint in ``directory`` (default :func:`checkpoint_dir`).

    Raises:
        FileNotFoundError: ``directory`` holds no DeepSpeed checkpoint (no ``latest`` file).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(directory) if directory is not None else checkpoint_dir()
    if not (directory / "latest").is_file():
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory.resolve()} (no 'latest' file): train first with "
                                f"`train.py --checkpoint-dir {directory}`, or set {CHECKPOINT_ENV} to where it saved")
    model = TinyGPT(GPTConfig())
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(directory)))
    return model.eval()


class NextByte(torch.nn.Module):
    """The served module: ``[batch, length]`` byte ids in, the next byte's ``[batch, 256]`` logits out.

    Only the last ``GPTConfig.seq_len`` (128) bytes of a longer input are read, the context the model was trained with.
    """

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt.logits(ids[:, -GPTConfig.seq_len:])[:, -1]


def build() -> NextByte:
    """What ``ServeSpec(model="serve_model:build")`` loads on every rank of the server.

    Raises:
        FileNotFoundError: no checkpoint where :func:`checkpoint_dir` points.
    """
    return NextByte(load())
