"""Loaders for serving tests: small deterministic models, built the same in every process."""

import torch


def tiny_mlp() -> torch.nn.Module:
    """A 4 -> 16 -> 3 MLP with fixed weights (seeded), so two processes build the same model."""
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


def not_a_model() -> str:
    """A broken loader: returns a string."""
    return "oops"
