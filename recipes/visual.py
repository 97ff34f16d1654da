"""Image grids as PNG files: samples, and real images beside their reconstructions.

The layout is torchvision's ``make_grid`` and the file its ``save_image``; what this module adds is
the [-1, 1] pixel range of the recipes, pixel-block enlargement and a label left of each row.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gali_ext.errors import ShapeError
from gali_ext.recipes.files import atomic_output

__all__ = ["MIN_GRID_WIDTH", "image_grid", "interleave_rows", "save_image_grid"]

MIN_GRID_WIDTH = 512
"""The width in pixels that a grid is enlarged to at least, by whole pixel blocks (``scale``
None): a 16x16 digit grid of 8 columns is 144 px wide at scale 1, too small to judge a digit."""


def image_grid(
    images: Tensor,
    columns: int = 8,
    padding: int = 2,
    scale: int | None = None,
    row_labels: list[str] | None = None,
) -> Tensor:
    """``[N, C, H, W]`` images in [-1, 1] as one RGB grid ``[3, H', W']`` in [0, 1].

    ``torchvision.utils.make_grid`` lays the images out ``columns`` per row on white padding;
    ``scale`` enlarges every pixel to a ``scale x scale`` block, nearest neighbour, so that
    small images stay sharp and each pixel stays one value; None (the default) takes the
    smallest whole scale that makes the grid at least :data:`MIN_GRID_WIDTH` pixels wide.
    ``row_labels`` puts one label left of each row.
    """
    from torchvision.utils import make_grid

    images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(images, nrow=columns, padding=padding, pad_value=1.0)
    if scale is None:
        scale = max(1, -(-MIN_GRID_WIDTH // grid.shape[2]))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    if row_labels is None:
        return grid
    rows = -(-images.shape[0] // min(columns, images.shape[0]))
    if len(row_labels) != rows:
        raise ShapeError(f"expected {rows} row labels, got {len(row_labels)}")
    height = images.shape[2] * scale
    labels = _label_column(row_labels, grid.shape[1], height, padding * scale)
    return torch.cat([labels, grid], dim=2)


def _label_column(labels: list[str], total_height: int, height: int, padding: int) -> Tensor:
    """White ``[3, total_height, W]`` with ``labels[r]`` written level with row ``r`` of a grid
    whose cells are ``height`` high with ``padding`` between them."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import pil_to_tensor

    font = ImageFont.load_default(size=max(10, height // 3))
    width = max(
        int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in labels
    )
    canvas = Image.new("RGB", (width + 2 * padding, total_height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        middle = padding + r * (height + padding) + height // 2
        draw.text((padding, middle), label, fill="black", anchor="lm", font=font)
    return pil_to_tensor(canvas).float() / 255


def save_image_grid(
    images: Tensor,
    path: str | Path,
    columns: int = 8,
    padding: int = 2,
    scale: int | None = None,
    row_labels: list[str] | None = None,
) -> Path:
    """Write :func:`image_grid` of ``[N, C, H, W]`` images in [-1, 1] as a PNG
    (``torchvision.utils.save_image``: pixel ``p`` in [-1, 1] becomes ``round((p + 1) / 2 * 255)``).

    Written to a temporary file and renamed (:func:`.rundir.atomic_output`), so a crash never
    leaves a half-written PNG.
    """
    from torchvision.utils import save_image

    grid = image_grid(images, columns, padding, scale, row_labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        save_image(grid, temporary, format="png")
    return path


def interleave_rows(top: Tensor, bottom: Tensor, columns: int = 8) -> Tensor:
    """Rows of ``top`` images each followed by the matching row of ``bottom`` images
    (originals over their reconstructions)."""
    chunks = []
    for start in range(0, top.shape[0], columns):
        chunks += [top[start : start + columns], bottom[start : start + columns]]
    return torch.cat(chunks)
