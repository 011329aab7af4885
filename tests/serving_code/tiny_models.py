"""Loaders for serving tests: small deterministic models, built the same in every process."""

import torch


def tiny_mlp() -> torch.nn.Module:
    """A 4 -> 16 -> 3 MLP with fixed weights (seeded), so two processes build the same model."""
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def not_a_model() -> str:
    """A broken loader: returns a string."""
    return "oops"


def slow_mlp() -> torch.nn.Module:
    """``tiny_mlp`` that takes 0.3 s per batch, to fill a server's queue."""
    import time

    class Slow(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.3)
            return self.inner(x)

    return Slow()
