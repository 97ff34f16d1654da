"""Image grids as PNG files: samples, and real images beside their reconstructions; and the
plot of a run's metrics against steps (``metrics.png``).

The layout is torchvision's ``make_grid`` and the file its ``save_image``; what this module adds is
the [-1, 1] pixel range of the recipes, pixel-block enlargement and a label left of each row. The
plot is drawn with Pillow (a dependency of the recipes; matplotlib is not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gali_ext.errors import ShapeError
from gali_ext.recipes.files import atomic_output

__all__ = [
    "MIN_GRID_WIDTH",
    "image_grid",
    "interleave_rows",
    "metric_plot",
    "save_image_grid",
    "save_metric_plot",
]

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


def _labels(values: Sequence[float]) -> list[str]:
    """Tick labels with the fewest significant digits (3 to 8) that tell them apart."""
    for digits in range(3, 9):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            break
    return labels


def _ticks(low: float, high: float, most: int = 6) -> list[float]:
    """At most ``most`` round values in ``[low, high]``, spaced by 1, 2, 2.5 or 5 times a power
    of ten (``0, 500, 1000, ...``)."""
    span = high - low
    power = 10 ** math.floor(math.log10(span / (most - 1)))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if span / (m * power) <= most - 1)
    first = math.ceil(low / step - 1e-9)
    return [(first + i) * step for i in range(most + 1) if (first + i) * step <= high + 1e-9 * step]


def metric_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    marks: Mapping[str, tuple[float, float]] | None = None,
    width: int = 760,
    panel_height: int = 220,
) -> Any:
    """One line plot per entry of ``series`` (a title to its ``(step, value)`` points), stacked
    in that order, as a ``PIL.Image``: steps on the x axis (from 0, or the first step if it is
    negative, to the last: one range for all panels), values on the y axis (each panel its own
    range), both with round labelled ticks and an axis label (``step``; the title); every point
    is a dot, and ``marks`` rings one point of a panel (the best one)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    left, right, top, bottom = 92, 24, 30, 44
    panels = [(title, list(points)) for title, points in series.items() if points]
    canvas = Image.new("RGB", (width, max(1, len(panels)) * panel_height), "white")
    draw = ImageDraw.Draw(canvas)
    steps = [s for _, points in panels for s, _ in points]
    if not steps:
        return canvas
    x_low, x_high = min(0, min(steps)), max(steps)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    for row, (title, points) in enumerate(panels):
        y0 = row * panel_height
        box = (left, y0 + top, width - right, y0 + panel_height - bottom)
        values = [v for _, v in points]
        y_low, y_high = min(values), max(values)
        pad = (y_high - y_low) * 0.08 or abs(y_high) * 0.05 or 1.0
        y_low, y_high = y_low - pad, y_high + pad

        def at(step: float, value: float, box=box, y_low=y_low, y_high=y_high) -> tuple:
            x = box[0] + (step - x_low) / (x_high - x_low) * (box[2] - box[0])
            y = box[3] - (value - y_low) / (y_high - y_low) * (box[3] - box[1])
            return x, y

        y_ticks, x_ticks = _ticks(y_low, y_high), _ticks(x_low, x_high, most=7)
        for value, text in zip(y_ticks, _labels(y_ticks)):
            _, y = at(x_low, value)
            draw.line([(box[0], y), (box[2], y)], fill=(232, 232, 232))
            draw.text((box[0] - 6, y), text, fill="black", anchor="rm", font=font)
        whole = x_high - x_low >= 8  # steps as whole numbers
        x_text = [str(round(s)) for s in x_ticks] if whole else _labels(x_ticks)
        for step, text in zip(x_ticks, x_text):
            x, _ = at(step, y_low)
            draw.line([(x, box[1]), (x, box[3])], fill=(232, 232, 232))
            draw.text((x, box[3] + 5), text, fill="black", anchor="mt", font=font)
        draw.rectangle(box, outline="black")
        draw.text(
            ((box[0] + box[2]) / 2, box[3] + 24), "step", fill="black", anchor="mt", font=font
        )
        label = Image.new("RGB", (box[3] - box[1], 16), "white")
        ImageDraw.Draw(label).text(
            (label.width / 2, 8), title.split(" (")[0], fill="black", anchor="mm", font=font
        )
        canvas.paste(label.rotate(90, expand=True), (4, box[1]))
        draw.text((box[0], y0 + 8), title, fill="black", font=font)
        line = [at(s, v) for s, v in points]
        if len(line) > 1:
            draw.line(line, fill=(31, 119, 180), width=2)
        for x, y in line:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(31, 119, 180))
        mark = (marks or {}).get(title)
        if mark is not None:
            x, y = at(*mark)
            draw.ellipse((x - 7, y - 7, x + 7, y + 7), outline=(214, 39, 40), width=2)
    return canvas


def save_metric_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    marks: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Write :func:`metric_plot` as a PNG, atomically (:func:`.files.atomic_output`)."""
    path = Path(path)
    image = metric_plot(series, marks)
    with atomic_output(path) as temporary:
        image.save(temporary, format="png")
    return path
