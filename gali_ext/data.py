"""Data sets in their real formats (DESIGN.md section 8) and a resumable batch stream.

- ``digits``: scikit-learn's 1797 handwritten 8 x 8 digits (ships with scikit-learn, no
  download), upscaled to 16 x 16; the embedded default.
- ``svhn``: ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat`` (MATLAB v5), key ``X``
  uint8 ``(32, 32, 3, N)``, key ``y`` ``(N, 1)`` with label 10 for digit 0.
- ``celeba``: ``img_align_celeba/*.jpg``, ``list_eval_partition.txt``, ``list_attr_celeba.txt``;
  short side resized to 64, centre-cropped to 64 x 64 (authors' code).

Images come out as float ``[C, H, W]`` in [-1, 1]. Missing or malformed files raise one
:class:`~gali_ext.errors.DataError` naming the file and the expected layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError

__all__ = [
    "BatchStream",
    "ImageData",
    "data_mean",
    "load_celeba",
    "load_dataset",
    "load_digits",
    "load_svhn",
]

DIGITS_SPLITS = {"train": (0, 1297), "val": (1297, 1497), "test": (1497, 1797)}
SVHN_LAYOUT = (
    "expected SVHN's MATLAB files train_32x32.mat and test_32x32.mat (extra_32x32.mat for the "
    "extra split) in --data-dir, each with X uint8 of shape (32, 32, 3, N) and y of shape (N, 1)"
)
CELEBA_LAYOUT = (
    "expected CelebA in --data-dir: img_align_celeba/*.jpg, list_eval_partition.txt "
    "('000001.jpg 0' lines; 0 train, 1 valid, 2 test) and list_attr_celeba.txt (a count line, "
    "the 40 attribute names, then '000001.jpg -1 1 ...' lines)"
)


class ImageData(Dataset):
    """Images with labels: item i is ``(image [C, H, W] float in [-1, 1], label)``.

    Holds either a uint8 tensor ``[N, C, H, W]`` in memory, or image files read on demand
    (CelebA) through ``load_image``. ``labels`` are class ids ``[N]`` or attribute vectors
    ``[N, 40]`` of 0/1.
    """

    def __init__(
        self,
        name: str,
        labels: Tensor,
        num_classes: int,
        channels: int,
        image_size: int,
        images: Tensor | None = None,
        files: Sequence[Path] | None = None,
    ) -> None:
        self.name = name
        self.labels = labels
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.images = images
        self.files = list(files) if files is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def uint8_image(self, index: int) -> Tensor:
        """Image ``index`` as uint8 ``[C, H, W]``."""
        if self.images is not None:
            return self.images[index]
        return _load_celeba_image(self.files[index], self.image_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return _to_float(self.uint8_image(index)), self.labels[index]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[n, C, H, W]`` in [-1, 1] and labels of the given indices."""
        if self.images is not None:
            images = self.images[indices]
        else:
            images = torch.stack([self.uint8_image(int(i)) for i in indices])
        return _to_float(images), self.labels[indices]

    def images_tensor(self, limit: int | None = None) -> Tensor:
        """The first ``limit`` (default all) images, ``[N, C, H, W]`` in [-1, 1]."""
        count = len(self) if limit is None else min(limit, len(self))
        return self.batch(torch.arange(count))[0]

    def labels_tensor(self) -> Tensor:
        """All labels."""
        return self.labels


def _to_float(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


def load_digits(split: str = "train", image_size: int = 16) -> ImageData:
    """scikit-learn's digits, upscaled bilinearly to ``image_size`` and split by a fixed
    permutation (numpy seed 0): 1297 train, 200 val, 300 test images."""
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in DIGITS_SPLITS:
        raise DataError(f"digits has splits {list(DIGITS_SPLITS)}, not {split!r}")
    bunch = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    start, stop = DIGITS_SPLITS[split]
    chosen = order[start:stop]
    pixels = torch.tensor(bunch.images[chosen], dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)  # fmt: skip
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.tensor(bunch.target[chosen], dtype=torch.long)
    return ImageData("digits", labels, 10, 1, image_size, images=images)


def _read_svhn_file(path: Path) -> tuple[Tensor, Tensor]:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"missing SVHN file {str(path)!r}: {SVHN_LAYOUT}")
    try:
        mat = loadmat(str(path))
    except Exception as error:  # scipy raises several types on malformed files
        raise DataError(
            f"{str(path)!r} is not a readable MATLAB file ({error}): {SVHN_LAYOUT}"
        ) from error
    for key in ("X", "y"):
        if key not in mat:
            raise DataError(f"{str(path)!r} has no key {key!r}: {SVHN_LAYOUT}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(
            f"{str(path)!r}: X is {x.dtype} of shape {x.shape}, expected uint8 (32, 32, 3, N)"
        )
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{str(path)!r}: X holds {x.shape[3]} images but y {y.shape[0]} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{str(path)!r}: labels must lie in 1..10 (10 for digit 0)")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    labels = torch.from_numpy(y.astype(np.int64) % 10)
    return images, labels


def load_svhn(data_dir: str | Path, split: str = "train") -> ImageData:
    """SVHN from its ``.mat`` files. Splits: ``train``, ``test``, ``extra``, ``train+extra``,
    and ``val`` (5000 train images drawn with numpy seed 0, for choosing the SVM's C)."""
    folder = Path(data_dir)
    files = {"train": ["train"], "test": ["test"], "extra": ["extra"],
             "train+extra": ["train", "extra"], "val": ["train"]}  # fmt: skip
    if split not in files:
        raise DataError(f"SVHN has splits {list(files)}, not {split!r}")
    parts = [_read_svhn_file(folder / f"{name}_32x32.mat") for name in files[split]]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    if split == "val":
        chosen = torch.from_numpy(np.random.default_rng(0).permutation(len(labels))[:5000])
        images, labels = images[chosen], labels[chosen]
    return ImageData("svhn", labels, 10, 3, 32, images=images)


def _load_celeba_image(path: Path, size: int) -> Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            image = image.resize(new, Image.BILINEAR)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.uint8)
    except OSError as error:
        raise DataError(f"cannot read CelebA image {str(path)!r}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"missing {str(path)!r}: {CELEBA_LAYOUT}")
    return [line for line in path.read_text().splitlines() if line.strip()]


def load_celeba(data_dir: str | Path, split: str = "train", image_size: int = 64) -> ImageData:
    """CelebA's aligned images with their 40 attributes (0/1), read lazily from disk."""
    folder = Path(data_dir)
    codes = {"train": "0", "val": "1", "test": "2"}
    if split not in codes:
        raise DataError(f"CelebA has splits {list(codes)}, not {split!r}")
    images_dir = folder / "img_align_celeba"
    if not images_dir.is_dir():
        raise DataError(f"missing folder {str(images_dir)!r}: {CELEBA_LAYOUT}")
    partition = {}
    for number, line in enumerate(_read_lines(folder / "list_eval_partition.txt"), start=1):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"list_eval_partition.txt line {number} is malformed: {line!r}")
        partition[parts[0]] = parts[1]
    lines = _read_lines(folder / "list_attr_celeba.txt")
    if len(lines) < 2 or len(lines[1].split()) != 40:
        raise DataError("list_attr_celeba.txt must start with a count and 40 attribute names")
    names, labels = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if len(parts) != 41 or any(v not in ("-1", "1") for v in parts[1:]):
            raise DataError(
                f"list_attr_celeba.txt line {number}: expected a file name and 40 values of -1/1"
            )
        if partition.get(parts[0]) == codes[split]:
            names.append(parts[0])
            labels.append([v == "1" for v in parts[1:]])
    files = [images_dir / n for n in names]
    missing = [n for n, f in zip(names, files) if not f.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} CelebA image(s) listed but missing from {str(images_dir)!r}, "
            f"e.g. {missing[:3]}"
        )
    label_tensor = torch.tensor(labels, dtype=torch.long).reshape(-1, 40)
    return ImageData("celeba", label_tensor, 40, 3, image_size, files=files)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
) -> ImageData:
    """A split of ``digits``, ``svhn`` or ``celeba``; the last two need ``data_dir``."""
    if name == "digits":
        return load_digits(split, image_size or 16)
    if name not in ("svhn", "celeba"):
        raise DataError(f"unknown data set {name!r}; data sets: digits, svhn, celeba")
    if not data_dir:
        layout = SVHN_LAYOUT if name == "svhn" else CELEBA_LAYOUT
        raise DataError(f"{name} needs --data-dir (nothing is downloaded): {layout}")
    if not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {str(data_dir)!r} is not a folder")
    if name == "svhn":
        return load_svhn(data_dir, split)
    return load_celeba(data_dir, split, image_size or 64)


def data_mean(data: ImageData, chunk: int = 4096, limit: int = 20000) -> float:
    """Mean pixel value in [0, 1] over (at most ``limit``) images, read in chunks."""
    count = min(len(data), limit)
    total = 0.0
    for start in range(0, count, chunk):
        index = torch.arange(start, min(start + chunk, count))
        images = data.images[index] if data.images is not None else torch.stack(
            [data.uint8_image(int(i)) for i in index])  # fmt: skip
        total += images.double().sum().item() / 255.0
    return total / (count * data.channels * data.image_size**2)


class BatchStream:
    """Shuffled batches forever, epoch after epoch, resumable exactly.

    Epoch e's order is ``randperm(N)`` from a generator seeded with ``seed + e``, so the stream
    is a function of ``(seed, epoch, position)``, which :meth:`state_dict` holds.
    """

    def __init__(self, dataset: ImageData, batch_size: int, seed: int = 0) -> None:
        if batch_size > len(dataset):
            raise DataError(f"batch size {batch_size} exceeds the {len(dataset)} images")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per pass over the data (the last partial batch is dropped)."""
        return len(self.dataset) // self.batch_size

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=g)
        return self._order

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        start = self.position * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return self.dataset.batch(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = None
