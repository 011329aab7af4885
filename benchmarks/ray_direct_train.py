"""The anchor of ``bench_ray.py``: the tiny GPT example under a hand-written TorchTrainer, no dsnb.

This is what one writes following Ray Train's own DeepSpeed guide: a ``train_loop_per_worker``
that runs the training code, ``ScalingConfig(num_workers=2, use_gpu=False)``, gloo. It is
submitted as a Ray job exactly like dsnb's driver, so the two differ only by dsnb's layer.

Usage (as a Ray job's entrypoint): ``python ray_direct_train.py <run name> <storage path> <train.py args...>``
"""

from __future__ import annotations

import sys


def train_loop(config: dict) -> None:
    sys.path.insert(0, config["example_dir"])
    import train  # examples/tiny_gpt/train.py, shipped as the job's working directory

    code = train.main(config["args"])
    if code:
        raise RuntimeError(f"train.main returned {code}")


def main() -> None:
    import os

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_name, storage, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    TorchTrainer(
        train_loop,
        train_loop_config={"example_dir": os.getcwd(), "args": args},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage),
    ).fit()


if __name__ == "__main__":
    main()
