"""Inpainting self-supervision: masks ``M(x)`` and mixed images ``Mix(x, M)``
(docs/design.md, section 5)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..chains import Chains, NodeFunction
from ..errors import ShapeError
from ..spec import IMAGE, Node
from .base import FeedbackProvider

__all__ = ["MaskMix", "sample_box_masks"]

_MASK = re.compile(r"Mask(\d+)")
_MIX = re.compile(r"Mix(\d+)")


def sample_box_masks(
    batch: int,
    height: int,
    width: int,
    rng: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw one box mask per image from P(M): ``[B, 1, H, W]`` bool, true inside the box.

    Height ``h ~ U{1..H}`` and width ``w ~ U{1..W}`` independently, then the top-left corner
    uniformly among the ``(H - h + 1) * (W - w + 1)`` positions where the box fits.
    """
    if batch < 1 or height < 1 or width < 1:
        raise ShapeError(f"cannot draw masks for batch={batch}, H={height}, W={width}")
    u = torch.rand(4, batch, generator=rng, device=device)
    h = (u[0] * height).long() + 1
    w = (u[1] * width).long() + 1
    top = (u[2] * (height - h + 1)).long()
    left = (u[3] * (width - w + 1)).long()
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    inside_rows = (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
    inside_cols = (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))
    return (inside_rows & inside_cols).unsqueeze(1)


class MaskMix(FeedbackProvider):
    """Makes the node functions ``Mask{k}`` and ``Mix{k}`` of GALI-mix.

    ``Mask{k}(a)`` is image ``a`` with box ``k`` blacked out (filled with ``fill``, the image
    range's minimum); ``Mix{k}(a)`` is ``a`` outside box ``k`` and ``G(E(Mask{k}(a)))`` inside.
    Each step draws a fresh box per image for every k (M1..M4 independent), and the same box k
    wherever ``Mask{k}`` and ``Mix{k}`` appear in that step, as the classes of section 5 need.

    Args:
        fill: the value of blacked-out pixels (-1 for images in [-1, 1]).
        rng: a ``torch.Generator`` for the masks; else the step's rng, else the
            global one.
    """

    signatures = {"Mask<k>": (IMAGE, IMAGE), "Mix<k>": (IMAGE, IMAGE)}

    def __init__(self, fill: float = -1.0, rng: torch.Generator | None = None) -> None:
        super().__init__()
        self.fill = fill
        self.rng = rng

    def box(self, k: int, image: Tensor, chains: Chains) -> Tensor:
        """Box ``k`` of this step, ``[B, 1, H, W]`` bool, drawn on first use."""
        if image.dim() != 4:
            raise ShapeError(f"masks need images [B, C, H, W], got {list(image.shape)}")
        key = f"MaskMix.box{k}"
        box = chains.scratch.get(key)
        if box is None:
            rng = self.rng if self.rng is not None else chains.rng
            b, _, h, w = image.shape
            box = sample_box_masks(b, h, w, rng, image.device)
            chains.scratch[key] = box
        elif box.shape[-2:] != image.shape[-2:]:
            raise ShapeError(
                f"box {k} was drawn for {list(box.shape[-2:])} images, now applied to "
                f"{list(image.shape[-2:])}"
            )
        return box

    def _mask(self, node: Node, chains: Chains) -> Tensor:
        k = int(node.fn[4:])  # "Mask{k}"
        image = chains[node.arg.name]
        return image.masked_fill(self.box(k, image, chains), self.fill)

    def _mix(self, node: Node, chains: Chains) -> Tensor:
        k = int(node.fn[3:])  # "Mix{k}"
        image = chains[node.arg.name]
        inpainted = chains[f"G(E(Mask{k}({node.arg.name})))"]
        return torch.where(self.box(k, image, chains), inpainted, image)

    def function_for(self, name: str) -> NodeFunction | None:
        if _MASK.fullmatch(name):
            return self._mask
        if _MIX.fullmatch(name):
            return self._mix
        return None

    def extra_repr(self) -> str:
        return f"fill={self.fill}"
