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


def named_outputs() -> torch.nn.Module:
    """``tiny_mlp`` whose answer is a namedtuple (as some libraries' models return), to split per request."""
    import collections

    Output = collections.namedtuple("Output", ["logits", "hidden"])

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_mlp()

        def forward(self, x: torch.Tensor) -> tuple:
            logits = self.inner(x)
            return Output(logits, logits * 2)

    return Named()


def nan_mlp() -> torch.nn.Module:
    """A model whose every answer is NaN."""

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * float("nan")

    return Broken()


def counting_mlp(seconds: float = 0.2) -> torch.nn.Module:
    """``tiny_mlp`` that prints each batch's row count (the test reads it from the log) and sleeps ``seconds`` per batch."""
    import time

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            print(f"batch of {x.shape[0]} rows", flush=True)
            time.sleep(seconds)
            return self.inner(x)

    return Counting()


def slow_counting_mlp() -> torch.nn.Module:
    """``counting_mlp`` at 3 s a batch: requests queue behind one long batch."""
    return counting_mlp(3.0)
