"""PNG grids: layout, pixel values, enlargement and row labels."""

import numpy as np
import pytest
import torch
from PIL import Image

from gali_ext.errors import ShapeError
from gali_ext.recipes.visual import interleave_rows, save_image_grid


def test_grid_layout_and_pixel_values(tmp_path):
    images = torch.stack([torch.full((1, 2, 3), v) for v in (-1.0, 0.0, 1.0)])
    path = save_image_grid(images, tmp_path / "g.png", columns=2, padding=1, scale=1)
    pixels = np.asarray(Image.open(path))
    # 2 rows of 2 cells, each 2 x 3 pixels, 1 pixel of white padding around each; grey images
    # are written as RGB with three equal channels
    assert pixels.shape == (2 * 3 + 1, 2 * 4 + 1, 3)
    assert (pixels == pixels[..., :1]).all()
    pixels = pixels[..., 0]
    assert pixels[1, 1] == 0 and pixels[1, 5] == 128 and pixels[4, 1] == 255  # -1, 0, 1
    assert pixels[0].min() == 255  # padding is white


def test_scale_enlarges_every_pixel_and_labels_widen_the_image(tmp_path):
    images = torch.rand(4, 1, 4, 4) * 2 - 1
    small = np.asarray(Image.open(save_image_grid(images, tmp_path / "a.png", columns=2, scale=1)))
    big = np.asarray(Image.open(save_image_grid(images, tmp_path / "b.png", columns=2, scale=3)))
    assert big.shape == (3 * small.shape[0], 3 * small.shape[1], 3)
    np.testing.assert_array_equal(big[::3, ::3], small)
    labelled = Image.open(
        save_image_grid(
            images, tmp_path / "c.png", columns=2, scale=3, row_labels=["originals", "model"]
        )
    )
    assert labelled.height == big.shape[0] and labelled.width > big.shape[1]
    # the images sit right of the labels, unchanged; the labels are dark text on white
    np.testing.assert_array_equal(np.asarray(labelled)[:, -big.shape[1] :], big)
    margin = np.asarray(labelled)[:, : labelled.width - big.shape[1]]
    assert margin.max() == 255 and margin.min() < 100
    assert margin[: margin.shape[0] // 2].min() < 100 and margin[margin.shape[0] // 2 :].min() < 100
    with pytest.raises(ShapeError, match="2 row labels, got 1"):
        save_image_grid(images, tmp_path / "d.png", columns=2, row_labels=["one"])


def test_interleave_rows_puts_each_row_over_its_reconstruction():
    top, bottom = torch.zeros(5, 1, 1, 1), torch.ones(5, 1, 1, 1)
    rows = interleave_rows(top, bottom, columns=3).flatten().tolist()
    assert rows == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]


def test_grids_are_enlarged_by_whole_pixel_blocks_to_at_least_512_pixels(tmp_path):
    images = torch.rand(16, 1, 16, 16) * 2 - 1  # 8 columns: 8 * 18 + 2 = 146 px at scale 1
    one = np.asarray(Image.open(save_image_grid(images, tmp_path / "a.png", scale=1)))
    grid = np.asarray(Image.open(save_image_grid(images, tmp_path / "b.png")))
    assert one.shape[1] == 146 and grid.shape[1] == 4 * 146  # ceil(512 / 146) = 4
    np.testing.assert_array_equal(grid[::4, ::4], one)  # nearest neighbour: each pixel a block
    wide = torch.rand(2, 1, 16, 600) * 2 - 1  # already wider than 512: left as it is
    assert Image.open(save_image_grid(wide, tmp_path / "c.png")).size[0] == 2 * 602 + 2
