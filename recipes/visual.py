"""Image grids as PNG files: samples, and real images beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["save_image_grid", "interleave_rows"]


def save_image_grid(
    images: Tensor,
    path: str | Path,
    columns: int = 8,
    padding: int = 2,
    scale: int = 1,
    row_labels: list[str] | None = None,
) -> Path:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one PNG grid, ``columns`` per row.

    ``scale`` enlarges every pixel to a ``scale x scale`` block (small images stay sharp);
    ``row_labels`` writes one label left of each row. Written to a temporary file and renamed,
    so a crash never leaves a half-written PNG.
    """
    from PIL import Image, ImageDraw, ImageFont

    from gali_ext.errors import ShapeError

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
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    if row_labels:
        if len(row_labels) != rows:
            raise ShapeError(f"expected {rows} row labels, got {len(row_labels)}")
        font = ImageFont.load_default(size=max(10, h * scale // 3))
        draw = ImageDraw.Draw(image)
        width = max(int(draw.textlength(label, font=font)) for label in row_labels)
        margin = width + 2 * padding * scale
        labelled = Image.new(image.mode, (image.width + margin, image.height), "white")
        labelled.paste(image, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        row_height = (h + padding) * scale
        for r, label in enumerate(row_labels):
            middle = padding * scale + r * row_height + h * scale // 2
            draw.text((padding * scale, middle), label, fill="black", anchor="lm", font=font)
        image = labelled
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
