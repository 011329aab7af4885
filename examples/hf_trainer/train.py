"""A Hugging Face Trainer script that runs unchanged under every dsnb backend.

It trains a tiny GPT-2 (built from a config, nothing downloaded) on random tokens, with
DeepSpeed ZeRO-2 from ``ds_zero2.json``, whose values are ``"auto"``: the Trainer fills them
from its arguments. Nothing in it is dsnb's: the launcher's ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` are what the Trainer reads, and its printed
logs become dsnb metrics. ``--callback`` adds dsnb's callback, which reports them at the
Trainer's global step.

    dsnb run train.py --procs 2 -- --steps 8
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--deepspeed", default="ds_zero2.json")
parser.add_argument("--callback", action="store_true", help="report metrics at the global step with dsnb's callback")
parser.add_argument("--output-dir", default="out")
parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it; LOCAL_RANK says the same
options = parser.parse_args()

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2))
tokens = torch.randint(0, 256, (64, 32))
data = [{"input_ids": row, "labels": row} for row in tokens]
on_gpu = torch.cuda.is_available()
args = TrainingArguments(
    output_dir=options.output_dir, max_steps=options.steps, per_device_train_batch_size=2, learning_rate=1e-3,
    logging_steps=2, save_strategy="no", report_to=[], deepspeed=options.deepspeed or None,
    use_cpu=not on_gpu, ddp_backend=None if on_gpu else "gloo",  # on CPU the Trainer needs both to count every rank
)
callbacks = []
if options.callback:
    from dsnb.integrations.transformers import DsnbCallback

    callbacks.append(DsnbCallback())
Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()  # a rank that exits with gloo's threads running can abort
