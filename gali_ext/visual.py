"""Image grids as PNG files: samples, and real images beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["save_image_grid", "interleave_rows"]


def save_image_grid(images: Tensor, path: str | Path, columns: int = 8, padding: int = 2) -> Path:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one PNG grid, ``columns`` per row.

    Written to a temporary file and renamed, so a crash never leaves a half-written PNG.
    """
    from PIL import Image

    images = images.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    image.save(temporary, format="PNG")
    temporary.replace(path)
    return path


def interleave_rows(top: Tensor, bottom: Tensor, columns: int = 8) -> Tensor:
    """Rows of ``top`` images each followed by the matching row of ``bottom`` images
    (originals over their reconstructions)."""
    chunks = []
    for start in range(0, top.shape[0], columns):
        chunks += [top[start : start + columns], bottom[start : start + columns]]
    return torch.cat(chunks)
