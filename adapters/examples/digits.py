"""Batches of scikit-learn's digits for the worked examples: ``(x [B, 1, 16, 16] in [-1, 1],
y [B] class ids)``, as a class-conditional project's data loader yields them."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["digits_batches"]


@lru_cache(maxsize=1)
def _train_split():
    from gali_ext.recipes.data import load_digits

    return load_digits("train")


def digits_batches(steps: int, batch_size: int = 32, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``steps`` shuffled batches ``(x, y)`` of the digits' training split."""
    data = _train_split()
    g = torch.Generator().manual_seed(seed)
    return [data.batch(torch.randperm(len(data), generator=g)[:batch_size]) for _ in range(steps)]
