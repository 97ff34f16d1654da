"""Evaluation of a trained encoder-generator pair (DESIGN.md section 6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .chains import latent_mean

__all__ = ["reconstruct", "reconstruction_mse"]


@torch.no_grad()
def reconstruct(
    encoder: Callable[[Tensor], Any],
    generator: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = 500,
) -> Tensor:
    """``G(E(x))`` with E's mean for a stochastic encoder (a deterministic reconstruction)."""
    parts = [
        generator(latent_mean(encoder(images[i : i + batch_size])))
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts)


@torch.no_grad()
def reconstruction_mse(
    encoder: Callable[[Tensor], Any],
    generator: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = 500,
) -> float:
    """Pixel MSE between x and ``G(E(x))`` with pixels mapped from [-1, 1] to [0, 1].

    ``mean(((x - G(E(x))) / 2)^2)`` over every pixel of every image (DESIGN.md section 6).
    The networks are put in eval mode for the measurement and restored after.
    """
    modules = [m for m in (encoder, generator) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        total, count = 0.0, 0
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size]
            recon = reconstruct(encoder, generator, x, batch_size)
            total += ((x.float() - recon.float()) / 2).pow(2).sum().item()
            count += x.numel()
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return total / count
