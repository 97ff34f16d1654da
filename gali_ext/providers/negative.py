"""Negative data augmentation: real images made out of distribution, ``Jigsaw(x)`` and
``Cutout(x)``, as tuple classes of their own (Sinha et al., "Negative Data Augmentation",
ICLR 2021; docs/design.md, section 2.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..chains import Chains, NodeFunction
from ..errors import ConfigError, ShapeError
from ..spec import IMAGE, LATENT, Node
from .base import FeedbackProvider

__all__ = ["NegativeAugmentation", "StopGradient", "cutout", "jigsaw"]


def _draw(rng: torch.Generator | None, device: torch.device) -> torch.device:
    """Where to draw: the generator's device (a CPU generator draws on the CPU), else the
    images'."""
    return rng.device if rng is not None else device


def jigsaw(images: Tensor, grid: int = 2, rng: torch.Generator | None = None) -> Tensor:
    """Each image cut into ``grid x grid`` tiles put back in a random order other than the
    original one, one order per image: ``[B, C, H, W] -> [B, C, H, W]``, H and W multiples of
    ``grid``."""
    if images.dim() != 4:
        raise ShapeError(f"Jigsaw takes images [B, C, H, W], got {list(images.shape)}")
    b, c, h, w = images.shape
    if h % grid or w % grid:
        raise ShapeError(
            f"Jigsaw with grid={grid} needs H and W divisible by {grid}, got {h} x {w}: pick "
            "a grid that divides the image size"
        )
    n = grid * grid
    order = torch.rand(b, n, generator=rng, device=_draw(rng, images.device)).argsort(dim=1)
    identity = (order == torch.arange(n, device=order.device)).all(dim=1, keepdim=True)
    order = torch.where(identity, order.roll(1, dims=1), order).to(images.device)
    th, tw = h // grid, w // grid
    tiles = images.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, -1)
    shuffled = tiles.gather(1, order.unsqueeze(-1).expand(-1, -1, tiles.shape[-1]))
    shuffled = shuffled.reshape(b, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    return shuffled.reshape(b, c, h, w)


def cutout(
    images: Tensor, size: int, fill: float = -1.0, rng: torch.Generator | None = None
) -> Tensor:
    """Each image with a ``size x size`` square set to ``fill``, centred on a pixel drawn
    uniformly and clipped at the borders (DeVries and Taylor, 2017): ``[B, C, H, W]``."""
    if images.dim() != 4:
        raise ShapeError(f"Cutout takes images [B, C, H, W], got {list(images.shape)}")
    b, _, h, w = images.shape
    u = torch.rand(2, b, generator=rng, device=_draw(rng, images.device)).to(images.device)
    top = (u[0] * h).long() - size // 2
    left = (u[1] * w).long() - size // 2
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + size).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + size).view(-1, 1, 1))
    )
    return images.masked_fill(inside.unsqueeze(1), fill)


class StopGradient(FeedbackProvider):
    """Makes ``Detach``, latent -> latent: the same code without its gradient, so that a tuple
    class holding ``Detach(z0)`` gives E no feedback, e.g. negatives for D alone,
    ``(Jigsaw(x0), Detach(z0))`` (docs/design.md, section 2.4)."""

    signatures = {"Detach": (LATENT, LATENT)}

    def _detach(self, node: Node, chains: Chains) -> Tensor:
        return chains[node.arg.name].detach()

    def function_for(self, name: str) -> NodeFunction | None:
        return self._detach if name == "Detach" else None


class NegativeAugmentation(FeedbackProvider):
    """Makes ``Jigsaw`` and ``Cutout``, two image -> image functions that take a real image out
    of the data distribution while keeping its local statistics, so that tuple classes such as
    ``(Jigsaw(x0), z0)`` and ``(Cutout(x0), z0)`` give D negatives to tell apart from the real
    pair ``(x0, z0)`` (the ``gali_nda`` preset).

    Each node draws its own tile orders or squares from the step's generator (``chains.rng``;
    ``rng`` overrides it). The real images ``x0`` carry no gradient, so through
    ``(Jigsaw(x0), z0)`` only E gets feedback, through ``z0`` (``Detach(z0)``,
    :class:`StopGradient`, leaves such a class to D alone).

    Args:
        grid: Jigsaw's tiles per side (2: four tiles, as the paper's 2 x 2 jigsaw).
        cutout_fraction: Cutout's square side as a fraction of the image side.
        fill: the value of cut-out pixels (-1 for images in [-1, 1]).
        rng: a ``torch.Generator`` for the draws; else the step's, else the global one.
    """

    signatures = {"Jigsaw": (IMAGE, IMAGE), "Cutout": (IMAGE, IMAGE)}

    def __init__(
        self,
        grid: int = 2,
        cutout_fraction: float = 0.5,
        fill: float = -1.0,
        rng: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(grid, int) or grid < 2:
            raise ConfigError(f"NegativeAugmentation grid must be an int >= 2, got {grid!r}")
        if not 0 < cutout_fraction <= 1:
            raise ConfigError(
                f"NegativeAugmentation cutout_fraction must lie in (0, 1], got {cutout_fraction!r}"
            )
        self.grid = grid
        self.cutout_fraction = cutout_fraction
        self.fill = fill
        self.rng = rng

    def _rng(self, chains: Chains) -> torch.Generator | None:
        return self.rng if self.rng is not None else chains.rng

    def _jigsaw(self, node: Node, chains: Chains) -> Tensor:
        return jigsaw(chains[node.arg.name], self.grid, self._rng(chains))

    def _cutout(self, node: Node, chains: Chains) -> Tensor:
        images = chains[node.arg.name]
        size = max(1, round(self.cutout_fraction * min(images.shape[-2:])))
        return cutout(images, size, self.fill, self._rng(chains))

    def function_for(self, name: str) -> NodeFunction | None:
        return {"Jigsaw": self._jigsaw, "Cutout": self._cutout}.get(name)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, cutout_fraction={self.cutout_fraction}, fill={self.fill}"
