"""Data sets in their real formats (docs/design.md, section 8) and a resumable batch stream.

- ``digits``: scikit-learn's 1797 handwritten 8 x 8 digits (ships with scikit-learn, no
  download), upscaled bilinearly to 16 x 16; the embedded default. Fixed split from a numpy
  ``default_rng(0)`` permutation: 1297 train, 200 val, 300 test images.
- ``svhn``: ``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat`` (MATLAB v5), key ``X``
  uint8 ``(32, 32, 3, N)``, key ``y`` ``(N, 1)`` with label 10 for digit 0.
- ``celeba``: ``img_align_celeba/*.jpg`` (178 x 218), ``list_eval_partition.txt``,
  ``list_attr_celeba.txt``; short side resized to 64, centre-cropped to 64 x 64 (authors' code).

Every split is an :class:`ImageData`: item ``i`` is ``(image [C, H, W] float32 in [-1, 1],
label)``, with pixel ``p`` in 0..255 mapped to ``p / 127.5 - 1``. Digits and SVHN sit in memory as
a uint8 tensor ``[N, C, H, W]``; CelebA is an :class:`ImageFiles` that reads its JPEGs on demand.

The training loop reads a split through :func:`training_loader`, a ``torch.utils.data.DataLoader``
that Accelerate prepares (one shard of every epoch per process), and :func:`endless_batches`,
which crosses epochs and skips, on resume, the batches already trained on. :class:`BatchStream`
is the single-process stream the evaluator classifier trains on.

Files live in ``data_dir`` (``--data-dir``), by default :func:`default_data_dir`:
``~/.cache/gali-ext/svhn`` or ``~/.cache/gali-ext/celeba`` (``$XDG_CACHE_HOME`` honoured).
:func:`prepare_data` resolves that folder once per run and, with ``download=True``
(``gali-ext recipe --download``), fetches what is missing with torchvision's machinery (its URLs
and MD5 checksums, ``download_url`` with a progress bar, Google Drive through ``gdown`` for
CelebA). A download goes to ``NAME.part`` and takes its final name only once its checksum
matches, so an interrupted or corrupted download is never loaded; running again fetches it
again. Missing or malformed files raise one :class:`~gali_ext.errors.DataError` naming the file,
the expected layout and ``--download``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gali_ext.errors import DataError
from gali_ext.recipes.outputs import check_output_path

__all__ = [
    "check_batch_size",
    "DATASETS",
    "DATASET_SPLITS",
    "BatchStream",
    "ImageData",
    "ImageFiles",
    "Source",
    "celeba_sources",
    "data_mean",
    "default_data_dir",
    "download_celeba",
    "download_svhn",
    "endless_batches",
    "fetch",
    "load_celeba",
    "load_dataset",
    "load_digits",
    "load_svhn",
    "prepare_data",
    "svhn_sources",
    "training_loader",
]

DATASETS = ("digits", "svhn", "celeba")
"""The data set names :func:`load_dataset` knows."""

DIGITS_SPLITS = {"train": (0, 1297), "val": (1297, 1497), "test": (1497, 1797)}
SVHN_FILES = {
    "train": ("train",),
    "test": ("test",),
    "extra": ("extra",),
    "train+extra": ("train", "extra"),
    "val": ("train",),
}
SVHN_VAL_SIZE = 5000
CELEBA_SPLITS = {"train": "0", "val": "1", "test": "2"}
DATASET_SPLITS = {
    "digits": tuple(DIGITS_SPLITS),
    "svhn": tuple(SVHN_FILES),
    "celeba": tuple(CELEBA_SPLITS),
}
"""The splits of each data set (:func:`load_dataset`'s ``split``)."""
CELEBA_ATTRIBUTES = 40
LAZY_MEAN_LIMIT = 20000
DIGIT_NAMES = [str(d) for d in range(10)]

SVHN_LAYOUT = (
    "pass --download to fetch SVHN there (checksums verified), or put SVHN's MATLAB files "
    "train_32x32.mat and test_32x32.mat (extra_32x32.mat for the extra split) in --data-dir, "
    "each with key X, uint8 of shape (32, 32, 3, N), and key y of shape (N, 1) holding labels "
    "1..10 (10 for digit 0)"
)
CELEBA_LAYOUT = (
    "pass --download to fetch CelebA there (checksums verified), or put CelebA in --data-dir: "
    "img_align_celeba/*.jpg, list_eval_partition.txt "
    "('000001.jpg 0' lines; 0 train, 1 valid, 2 test) and list_attr_celeba.txt (line 1 the image "
    "count, line 2 the 40 attribute names, then '000001.jpg -1 1 ...' lines of 40 values -1/1)"
)


def _to_float(images: Tensor) -> Tensor:
    """uint8 pixels 0..255 to float32 in [-1, 1]: ``p / 127.5 - 1``."""
    return images.float() / 127.5 - 1.0


class ImageData(Dataset):
    """A split of a data set: item ``i`` is ``(image [C, H, W] float32 in [-1, 1], label)``.

    This base class holds its images in memory as ``images``, uint8 ``[N, C, H, W]``, and
    converts one item (or one batch) at a time; :class:`ImageFiles` reads them from disk instead.

    Attributes:
        name: the data set (``"digits"``, ``"svhn"``, ``"celeba"``).
        split: the split it was loaded as (``"train"``, ``"val"``, ...).
        images: uint8 ``[N, C, H, W]``, or ``None`` for data read from disk.
        labels: long class ids ``[N]`` (``num_classes`` classes) or 0/1 attribute vectors
            ``[N, num_classes]`` (CelebA's 40 attributes).
        num_classes: 10 for digits and SVHN, 40 for CelebA.
        label_names: what each class id or attribute column means.
        channels, image_size: images are ``[channels, image_size, image_size]``.
    """

    images: Tensor | None

    def __init__(
        self,
        name: str,
        split: str,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        label_names: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise DataError(
                f"{name} images must be uint8 of shape [N, C, S, S], "
                f"got {images.dtype} of shape {list(images.shape)}"
            )
        self._init(name, split, labels, num_classes, images.shape[1], images.shape[2], label_names)
        if len(images) != len(labels):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.images = images

    def _init(
        self,
        name: str,
        split: str,
        labels: Tensor,
        num_classes: int,
        channels: int,
        image_size: int,
        label_names: Sequence[str] | None,
    ) -> None:
        self.name = name
        self.split = split
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.label_names = list(label_names) if label_names is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"channels={self.channels}, image_size={self.image_size}, "
            f"num_classes={self.num_classes})"
        )

    def uint8_batch(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Images ``indices`` as uint8 ``[n, C, H, W]`` (pixels 0..255)."""
        return self.images[torch.as_tensor(indices, dtype=torch.long)]

    def batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images ``[n, C, H, W]`` float32 in [-1, 1] and the labels of ``indices``."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return _to_float(self.uint8_batch(indices)), self.labels[indices]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """Items ``indices`` read as one batch (one indexing of the uint8 tensor, or the batch's
        files); a ``DataLoader`` calls this instead of ``__getitem__`` once per image."""
        images, labels = self.batch(indices)
        return list(zip(images, labels))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(image [C, H, W] float32 in [-1, 1], label)``; the label is a long scalar class
        id, or a long ``[40]`` 0/1 vector for CelebA."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, label = self.batch([index % len(self)])
        return image[0], label[0]

    def images_tensor(self, limit: int | None = None) -> Tensor:
        """The first ``limit`` (default all) images, float32 ``[N, C, H, W]`` in [-1, 1]."""
        count = len(self) if limit is None else min(int(limit), len(self))
        return _to_float(self.uint8_batch(torch.arange(count)))

    def labels_tensor(self) -> Tensor:
        """All labels: long ``[N]`` class ids or ``[N, 40]`` 0/1 attributes."""
        return self.labels


class ImageFiles(ImageData):
    """An :class:`ImageData` whose images are image files read on demand (CelebA).

    Each file is opened with PIL, converted to RGB, resized so that its short side is
    ``image_size`` (bilinear, antialiased when shrinking) and centre-cropped to
    ``image_size x image_size``: 178 x 218 CelebA originals become 64 x 78, cropped at rows 7..70.
    ``images`` is ``None``; ``files`` lists the paths.
    """

    def __init__(
        self,
        name: str,
        split: str,
        files: Sequence[Path],
        labels: Tensor,
        num_classes: int,
        image_size: int = 64,
        label_names: Sequence[str] | None = None,
    ) -> None:
        self._init(name, split, labels, num_classes, 3, image_size, label_names)
        self.files = [Path(f) for f in files]
        if len(self.files) != len(labels):
            raise DataError(f"{name}: {len(self.files)} image files but {len(labels)} labels")
        self.images = None

    def uint8_batch(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Images ``indices`` read from disk, uint8 ``[n, 3, image_size, image_size]``."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(indices) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.stack([_read_image(self.files[int(i)], self.image_size) for i in indices])


def _read_image(path: Path, size: int) -> Tensor:
    """One RGB image file, short side resized to ``size`` and centre-cropped: uint8
    ``[3, size, size]``."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {str(path)!r} ({error}): {CELEBA_LAYOUT}") from error
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), Image.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _check_split(dataset: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise DataError(f"{dataset} has splits {list(splits)}, not {split!r}")


def load_digits(split: str = "train", image_size: int = 16) -> ImageData:
    """scikit-learn's handwritten digits (1797 images, 8 x 8, values 0..16), 1 channel.

    Values ``v`` are scaled to ``v / 8 - 1`` in [-1, 1], upscaled bilinearly
    (``align_corners=False``) to ``image_size x image_size`` and stored as uint8
    ``round((x + 1) * 127.5)``. The split is a fixed permutation (numpy ``default_rng(0)``):
    the first 1297 images are ``train``, the next 200 ``val``, the last 300 ``test``.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_split("digits", split, DIGITS_SPLITS)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"digits image_size must be a positive int, got {image_size!r}")
    bunch = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    start, stop = DIGITS_SPLITS[split]
    chosen = order[start:stop]
    pixels = torch.tensor(bunch.images[chosen], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if image_size != pixels.shape[-1]:
        size = (image_size, image_size)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    images = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    labels = torch.tensor(bunch.target[chosen], dtype=torch.long)
    return ImageData("digits", split, images, labels, 10, DIGIT_NAMES)


def _read_svhn_file(path: Path) -> tuple[Tensor, Tensor]:
    """``X`` as uint8 ``[N, 3, 32, 32]`` and ``y`` as long digits ``[N]`` (10 becomes 0)."""
    from scipy.io import loadmat

    where = repr(str(path))
    if not path.is_file():
        raise DataError(f"missing SVHN file {where}: {SVHN_LAYOUT}")
    try:
        mat = loadmat(str(path))
    except Exception as error:  # scipy raises several types on malformed files
        raise DataError(
            f"{where} is not a readable MATLAB file ({type(error).__name__}: {error}): "
            f"{SVHN_LAYOUT}"
        ) from error
    for key in ("X", "y"):
        if key not in mat:
            keys = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{where} has no key {key!r} (keys: {keys}): {SVHN_LAYOUT}")
    x, y = mat["X"], np.asarray(mat["y"])
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(
            f"{where}: X is {x.dtype} of shape {x.shape}, expected uint8 (32, 32, 3, N): "
            f"{SVHN_LAYOUT}"
        )
    count = x.shape[3]
    if y.ndim != 2 or y.shape[1] != 1 or y.shape[0] != count:
        raise DataError(
            f"{where}: X holds {count} images but y has shape {y.shape} "
            f"({y.shape[0] if y.ndim else 0} labels), expected ({count}, 1): {SVHN_LAYOUT}"
        )
    y = y[:, 0]
    if not np.issubdtype(y.dtype, np.number) or np.iscomplexobj(y):
        raise DataError(f"{where}: y is {y.dtype}, expected integer labels 1..10: {SVHN_LAYOUT}")
    if count and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise DataError(f"{where}: y holds non-integer labels, expected 1..10: {SVHN_LAYOUT}")
    if count and (y.min() < 1 or y.max() > 10):
        raise DataError(
            f"{where}: labels must lie in 1..10 (10 for digit 0), "
            f"found {y.min():g}..{y.max():g}: {SVHN_LAYOUT}"
        )
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    labels = torch.from_numpy(y.astype(np.int64) % 10)
    return images, labels


def load_svhn(data_dir: str | Path, split: str = "train") -> ImageData:
    """SVHN from its ``.mat`` files in ``data_dir``, 3 x 32 x 32, labels 0..9.

    Splits: ``train`` (all of ``train_32x32.mat``, as in the paper), ``test``, ``extra``,
    ``train+extra`` (the two concatenated) and ``val``: ``min(5000, N)`` images of the train file
    at the first positions of a numpy ``default_rng(0)`` permutation, used for model selection
    (e.g. the SVM's C). ``val`` overlaps ``train``; it is a fixed subset, not held out.
    """
    _check_split("SVHN", split, SVHN_FILES)
    folder = Path(data_dir)
    parts = [_read_svhn_file(folder / f"{part}_32x32.mat") for part in SVHN_FILES[split]]
    images = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
    labels = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
    if split == "val":
        order = np.random.default_rng(0).permutation(len(labels))[:SVHN_VAL_SIZE]
        chosen = torch.from_numpy(order)
        images, labels = images[chosen], labels[chosen]
    return ImageData("svhn", split, images, labels, 10, DIGIT_NAMES)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a text file with their 1-based line numbers."""
    if not path.is_file():
        raise DataError(f"missing CelebA file {str(path)!r}: {CELEBA_LAYOUT}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {str(path)!r} ({error}): {CELEBA_LAYOUT}") from error
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _celeba_error(path: Path, problem: str) -> DataError:
    return DataError(f"{str(path)!r}: {problem}; {CELEBA_LAYOUT}")


def _read_partition(path: Path) -> dict[str, str]:
    """``list_eval_partition.txt`` as ``{file name: "0" | "1" | "2"}``."""
    partition: dict[str, str] = {}
    for number, line in _read_lines(path):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise _celeba_error(
                path, f"line {number} is {line!r}, expected a file name and 0, 1 or 2"
            )
        if parts[0] in partition:
            raise _celeba_error(path, f"line {number} lists {parts[0]!r} a second time")
        partition[parts[0]] = parts[1]
    if not partition:
        raise _celeba_error(path, "the file lists no images")
    return partition


def _read_attributes(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """``list_attr_celeba.txt`` as the 40 attribute names and ``{file name: 40 "-1"/"1"}``."""
    lines = _read_lines(path)
    if len(lines) < 2 or not lines[0][1].strip().isdigit():
        raise _celeba_error(path, "line 1 must be the image count and line 2 the attribute names")
    names = lines[1][1].split()
    if len(names) != CELEBA_ATTRIBUTES:
        raise _celeba_error(
            path, f"line 2 must hold the 40 attribute names, found {len(names)} names"
        )
    rows: dict[str, list[str]] = {}
    allowed = {"-1", "1"}
    for number, line in lines[2:]:
        parts = line.split()
        if len(parts) != CELEBA_ATTRIBUTES + 1 or not allowed.issuperset(parts[1:]):
            raise _celeba_error(
                path,
                f"line {number} must be a file name and 40 values of -1/1, "
                f"got {len(parts) - 1} fields: {line[:80]!r}",
            )
        if parts[0] in rows:
            raise _celeba_error(path, f"line {number} lists {parts[0]!r} a second time")
        rows[parts[0]] = parts[1:]
    declared = int(lines[0][1])
    if declared != len(rows):
        raise _celeba_error(path, f"line 1 says {declared} images but {len(rows)} are listed")
    return names, rows


def load_celeba(data_dir: str | Path, split: str = "train", image_size: int = 64) -> ImageFiles:
    """CelebA's aligned faces with their 40 attributes as long 0/1 vectors (1 where -1/1 is 1).

    Splits follow ``list_eval_partition.txt``: ``train`` (0), ``val`` (1), ``test`` (2), in that
    file's order. The files are checked up front: both lists must name the same images, every
    image of the split must exist under ``img_align_celeba/``. Images are read lazily, short side
    resized to ``image_size`` and centre-cropped (see :class:`ImageFiles`).
    """
    _check_split("CelebA", split, CELEBA_SPLITS)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"CelebA image_size must be a positive int, got {image_size!r}")
    folder = Path(data_dir)
    images_dir = folder / "img_align_celeba"
    if not images_dir.is_dir():
        raise DataError(f"missing CelebA folder {str(images_dir)!r}: {CELEBA_LAYOUT}")
    partition_path = folder / "list_eval_partition.txt"
    attributes_path = folder / "list_attr_celeba.txt"
    partition = _read_partition(partition_path)
    attribute_names, rows = _read_attributes(attributes_path)
    unlisted = [n for n in partition if n not in rows]
    extra = [n for n in rows if n not in partition]
    if unlisted or extra:
        raise DataError(
            f"{str(partition_path)!r} lists {len(partition)} images and {str(attributes_path)!r} "
            f"{len(rows)}; {len(unlisted)} have no attributes (e.g. {unlisted[:3]}) and "
            f"{len(extra)} no partition (e.g. {extra[:3]}): {CELEBA_LAYOUT}"
        )
    names = [n for n, code in partition.items() if code == CELEBA_SPLITS[split]]
    on_disk = set(os.listdir(images_dir))
    missing = [n for n in names if n not in on_disk]
    if missing:
        raise DataError(
            f"{len(missing)} CelebA image(s) of the {split} split listed in "
            f"{str(partition_path)!r} but missing from {str(images_dir)!r}, "
            f"e.g. {missing[:5]}: {CELEBA_LAYOUT}"
        )
    values = [[v == "1" for v in rows[n]] for n in names]
    labels = torch.tensor(values, dtype=torch.long).reshape(-1, CELEBA_ATTRIBUTES)
    files = [images_dir / n for n in names]
    return ImageFiles(
        "celeba", split, files, labels, CELEBA_ATTRIBUTES, image_size, attribute_names
    )


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
) -> ImageData:
    """A split of ``digits`` (embedded, 16 x 16 by default), ``svhn`` (32 x 32) or ``celeba``
    (64 x 64 by default). ``svhn`` and ``celeba`` read ``data_dir`` (``--data-dir``; by default
    :func:`default_data_dir`); nothing is downloaded here (:func:`prepare_data` does that).
    ``image_size`` overrides the default size where the data set allows it."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; data sets: {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits(split, 16 if image_size is None else image_size)
    layout = SVHN_LAYOUT if name == "svhn" else CELEBA_LAYOUT
    if data_dir is None or str(data_dir) == "":
        data_dir = default_data_dir(name)
    if not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {str(data_dir)!r} is not a folder: {layout}")
    if name == "svhn":
        if image_size not in (None, 32):
            raise DataError(f"SVHN images are 32 x 32; image_size={image_size!r} is not offered")
        return load_svhn(data_dir, split)
    return load_celeba(data_dir, split, 64 if image_size is None else image_size)


# ------------------------------------------------------------------------------- downloads

CACHE_FOLDER = "gali-ext"
"""The folder under the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``) for data sets."""
SVHN_URL_ENV = "GALI_EXT_SVHN_URL"
"""Environment variable: a URL base (``http://...``, ``file://...``) serving SVHN's files by
name in place of torchvision's (a mirror; the tests' local server). Checksums stay torchvision's."""
CELEBA_URL_ENV = "GALI_EXT_CELEBA_URL"
"""Environment variable: a URL base serving CelebA's files by name in place of Google Drive."""
SVHN_DOWNLOAD_SPLITS = ("train", "test")
"""The SVHN splits every run reads (training, evaluation), so the files ``--download`` fetches;
a run's ``train_split`` is fetched too (``extra``, 1.3 GB, for the SVHN recipes)."""
CELEBA_FILES = ("img_align_celeba.zip", "list_attr_celeba.txt", "list_eval_partition.txt")
"""The files of torchvision's ``CelebA.file_list`` the loader needs."""
CELEBA_MANUAL = (
    "Google Drive refuses files that were downloaded too often in the last day (its quota): "
    "try again later, or fetch img_align_celeba.zip (Align&Cropped Images), "
    "list_attr_celeba.txt and list_eval_partition.txt (Anno, Eval) from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into that folder by hand and run with "
    "--download again (files with the right checksum are kept, the zip is unpacked)"
)


@dataclass(frozen=True)
class Source:
    """One file to fetch: from ``url``, or from Google Drive file ``drive_id`` when set; its
    name in the data folder and its MD5 checksum (torchvision's)."""

    url: str
    filename: str
    md5: str
    drive_id: str | None = None


def default_data_dir(dataset: str) -> Path:
    """Where ``dataset``'s files go when no ``--data-dir`` is given:
    ``$XDG_CACHE_HOME/gali-ext/DATASET``, or ``~/.cache/gali-ext/DATASET`` when that variable is
    unset or not an absolute path (the XDG Base Directory rule)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / CACHE_FOLDER / dataset


def _url_base(variable: str) -> str:
    return os.environ.get(variable, "").strip().rstrip("/")


def svhn_sources(splits: Sequence[str] = SVHN_DOWNLOAD_SPLITS) -> list[Source]:
    """The ``.mat`` files behind ``splits`` with torchvision's URLs and MD5 checksums
    (``torchvision.datasets.SVHN.split_list``); the URL base is ``$GALI_EXT_SVHN_URL`` when set."""
    from torchvision.datasets import SVHN

    base = _url_base(SVHN_URL_ENV)
    sources = []
    for split in splits:
        _check_split("SVHN", split, SVHN_FILES)
    for key in dict.fromkeys(f for split in splits for f in SVHN_FILES[split]):
        url, filename, md5 = SVHN.split_list[key]
        sources.append(Source(f"{base}/{filename}" if base else url, filename, md5))
    return sources


def celeba_sources() -> list[Source]:
    """:data:`CELEBA_FILES` with torchvision's Google Drive ids and MD5 checksums
    (``torchvision.datasets.CelebA.file_list``); fetched from ``$GALI_EXT_CELEBA_URL/NAME``
    instead when that variable is set."""
    from torchvision.datasets import CelebA

    base = _url_base(CELEBA_URL_ENV)
    sources = []
    for drive_id, md5, filename in CelebA.file_list:
        if filename in CELEBA_FILES:
            if base:
                sources.append(Source(f"{base}/{filename}", filename, md5))
            else:
                sources.append(Source(f"Google Drive file {drive_id}", filename, md5, drive_id))
    return sources


@contextlib.contextmanager
def _download_lock(folder: Path) -> Iterator[None]:
    """One download into ``folder`` at a time: the processes of one launch and runs started
    together wait for the first (``fcntl.flock`` on ``folder/.download.lock``; no lock where
    ``fcntl`` is missing, as on Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".download.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def fetch(
    source: Source,
    folder: Path,
    dataset: str,
    echo: Callable[[str], None] = print,
    hint: str = "",
) -> bool:
    """Make ``folder / source.filename`` the file whose MD5 is ``source.md5``; returns whether
    it was downloaded (``False``: already there and verified).

    torchvision's ``download_url`` (or ``download_file_from_google_drive``) writes
    ``NAME.part`` with a progress bar and checks its MD5; only a verified file is renamed to
    ``NAME``. A wrong checksum, a truncated file or a failed connection removes the ``.part``
    file and raises one :class:`DataError` (``hint`` appended); an interrupted run leaves the
    ``.part`` file, which the next run fetches again. A file under ``NAME`` with another MD5
    (a corrupted copy) is fetched again too.
    """
    from torchvision.datasets.utils import (
        calculate_md5,
        check_integrity,
        download_file_from_google_drive,
        download_url,
    )

    target = folder / source.filename
    if check_integrity(target, source.md5):
        return False
    if target.exists():
        echo(f"{target} does not have the expected MD5 {source.md5}; fetching it again")
    part = folder / f"{source.filename}.part"
    echo(f"downloading {dataset} {source.filename} from {source.url} to {folder}")
    try:
        if source.drive_id is None:
            download_url(source.url, str(folder), part.name, source.md5)
        else:
            download_file_from_google_drive(source.drive_id, str(folder), part.name, source.md5)
    except Exception as error:  # urllib, http.client, OSError, gdown and checksum errors
        received = part.stat().st_size if part.is_file() else 0
        digest = calculate_md5(part) if part.is_file() else None
        part.unlink(missing_ok=True)
        if digest is not None and digest != source.md5:
            problem = (
                f"received {received} bytes with MD5 {digest}, expected MD5 {source.md5} "
                "(a truncated or corrupted download)"
            )
        else:
            problem = f"the download failed after {received} bytes ({_one_line(error)})"
        raise DataError(
            f"{dataset} {source.filename} from {source.url}: {problem}; nothing was loaded and "
            f"the partial file was removed: run again with --download to fetch it again"
            + (f". {hint}" if hint else "")
        ) from error
    os.replace(part, target)
    return True


def download_svhn(
    folder: str | Path,
    splits: Sequence[str] = SVHN_DOWNLOAD_SPLITS,
    echo: Callable[[str], None] = print,
) -> Path:
    """Fetch and verify SVHN's ``.mat`` files for ``splits`` into ``folder`` (see
    :func:`fetch`); files already there with the right MD5 are kept. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _download_lock(folder):
        for source in svhn_sources(splits):
            fetch(source, folder, "SVHN", echo)
    return folder


def download_celeba(folder: str | Path, echo: Callable[[str], None] = print) -> Path:
    """Fetch and verify CelebA's aligned images and lists into ``folder`` as torchvision's
    ``CelebA(download=True)`` does (Google Drive through ``gdown``; :data:`CELEBA_MANUAL` says
    what to do when Drive refuses), then unpack ``img_align_celeba.zip``.

    The zip is unpacked into ``img_align_celeba.part/`` and renamed to ``img_align_celeba/``
    once complete, then deleted (1.4 GB); a folder ``img_align_celeba/`` already there is kept
    and the zip not fetched. Returns the folder.
    """
    from torchvision.datasets.utils import extract_archive

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "img_align_celeba"
    with _download_lock(folder):
        for source in celeba_sources():
            if source.filename.endswith(".zip") and images.is_dir():
                continue
            fetch(source, folder, "CelebA", echo, hint=CELEBA_MANUAL)
        if images.is_dir():
            return folder
        archive, staging = folder / "img_align_celeba.zip", folder / "img_align_celeba.part"
        shutil.rmtree(staging, ignore_errors=True)
        echo(f"unpacking {archive}")
        try:
            extract_archive(archive, staging)
        except Exception as error:  # zipfile.BadZipFile, OSError
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"cannot unpack {str(archive)!r} ({_one_line(error)})") from error
        if not (staging / "img_align_celeba").is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"{str(archive)!r} holds no folder img_align_celeba/: {CELEBA_LAYOUT}")
        os.replace(staging / "img_align_celeba", images)
        shutil.rmtree(staging)
        archive.unlink()
    return folder


def prepare_data(
    dataset: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    echo: Callable[[str], None] = print,
    splits: Sequence[str] = (),
) -> str:
    """The data folder of a run, resolved once where the run is built (:func:`.train.train`):
    ``data_dir``, or :func:`default_data_dir` when it is empty; with ``download``, the folder is
    checked as every output path is (:func:`.outputs.check_output_path`), then SVHN's train and
    test files (and those of ``splits``, e.g. a run's ``extra``) or CelebA are fetched there and
    verified (:func:`download_svhn`, :func:`download_celeba`). Digits need no folder
    (``data_dir`` is returned as given)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; data sets: {', '.join(DATASETS)}")
    if dataset == "digits":
        return str(data_dir or "")
    folder = Path(data_dir).expanduser() if data_dir else default_data_dir(dataset)
    if download:
        check_output_path(folder, "--data-dir")  # before anything is fetched
        if dataset == "svhn":
            download_svhn(folder, (*SVHN_DOWNLOAD_SPLITS, *splits), echo=echo)
        else:
            download_celeba(folder, echo=echo)
    return str(folder)


def data_mean(data: ImageData, chunk: int = 4096, limit: int | None = None) -> float:
    """Mean pixel value mapped to [0, 1]: ``sum(p) / (255 * N * C * H * W)`` over uint8 pixels.

    Summed exactly in int64 ``chunk`` images at a time, so no float copy of the data is made.
    ``limit`` caps the number of images (evenly spaced); by default every in-memory image is
    used, and at most 20000 images of data read from disk (:class:`ImageFiles`). The generator's
    output bias starts at ``logit(mean) / 2`` so that ``tanh(bias)`` maps to this mean.
    """
    if len(data) == 0:
        raise DataError(f"{data.name} {data.split} split holds no images; no mean to take")
    if limit is None:
        limit = len(data) if data.images is not None else LAZY_MEAN_LIMIT
    count = min(len(data), int(limit))
    if count < len(data):
        indices = torch.linspace(0, len(data) - 1, count).round().long()
    else:
        indices = torch.arange(len(data))
    total = 0
    for start in range(0, count, chunk):
        total += int(data.uint8_batch(indices[start : start + chunk]).sum(dtype=torch.int64))
    return total / (255.0 * count * data.channels * data.image_size**2)


def check_batch_size(dataset: ImageData, batch_size: int) -> None:
    """Refuse a ``batch_size`` that is not a positive int or exceeds the images of ``dataset``
    (no full batch to draw), with a :class:`DataError`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size > len(dataset):
        raise DataError(
            f"batch size {batch_size} exceeds the {len(dataset)} images of the "
            f"{dataset.name} {dataset.split} split"
        )


def training_loader(
    dataset: ImageData,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Shuffled full batches ``[images [B, C, H, W] in [-1, 1], labels]`` of ``dataset``, for
    ``accelerator.prepare``.

    Prepared by an Accelerator with ``DataLoaderConfiguration(use_seedable_sampler=True,
    data_seed=seed)`` (as :func:`gali_ext.recipes.train.make_accelerator` makes it), epoch ``e``
    visits the images in the order
    ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))``: a function of
    ``(seed, e)`` only, the same on every process. With ``P`` processes, process ``r`` takes the
    batches ``r, r + P, r + 2P, ...`` of that order, so together they see each image at most once
    per epoch; the ``N mod B`` images left over, and the batches left over when fewer than ``P``
    remain, wait for the next epoch's order. ``num_workers`` processes read and convert the
    batches (``persistent_workers`` keeps them across epochs); ``pin_memory`` speeds copies to a
    GPU. The loader has its own ``torch.Generator``: making an iterator draws nothing from the
    global RNG, so a resumed run's noise stays the uninterrupted run's.
    """
    check_batch_size(dataset, batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def endless_batches(
    loader: DataLoader,
    accelerator: Any,
    start: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format,
    with_labels: bool = False,
) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
    """The images of a prepared :func:`training_loader`'s batches, epoch after epoch, from this
    process's batch number ``start`` on (counted from the start of training); with
    ``with_labels``, ``(images, labels)`` pairs, as a class-conditional objective takes them.

    Batch ``k`` is batch ``k mod len(loader)`` of epoch ``k // len(loader)``, so a resumed run
    continues with the very batch the interrupted one would have drawn next; the batches before
    it are skipped without being read (``accelerator.skip_first_batches``).
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        processes = accelerator.num_processes
        raise DataError(
            f"the {len(loader.dataset)} training images make fewer full batches of "
            f"{loader.total_batch_size // processes} than there are processes ({processes})"
        )
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)
        for images, labels in accelerator.skip_first_batches(loader, skip) if skip else loader:
            images = images.to(memory_format=memory_format)
            yield (images, labels) if with_labels else images
        epoch, skip = epoch + 1, 0


class BatchStream:
    """Shuffled batches ``(images [B, C, H, W] in [-1, 1], labels)`` forever, epoch after epoch,
    resumable exactly.

    Epoch ``e`` visits the images in the order
    ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))`` in
    ``steps_per_epoch = N // batch_size`` full batches (the remainder is dropped), so the stream
    is a function of ``(seed, epoch, position)``: :meth:`state_dict` holds them and
    :meth:`load_state_dict` continues exactly where a saved stream left off. In-memory data is
    indexed as one uint8 tensor; :class:`ImageFiles` data reads its batch's files.
    """

    def __init__(self, dataset: ImageData, batch_size: int, seed: int = 0) -> None:
        check_batch_size(dataset, batch_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order: Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per pass over the data (the last partial batch is dropped)."""
        return len(self.dataset) // self.batch_size

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator)
        return self._order

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        """The next batch; crosses into the next epoch (a new permutation) when one ends."""
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        start = self.position * self.batch_size
        indices = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return self.dataset.batch(indices)

    def state_dict(self) -> dict[str, Any]:
        """``seed``, ``epoch``, ``position`` (batches drawn this epoch), and ``batch_size`` and
        ``num_images`` to check that a resumed stream reads the same data."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "num_images": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next batch is the one the saved stream would
        have drawn next."""
        try:
            seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                f"a BatchStream state must hold integers 'seed', 'epoch' and 'position', "
                f"got {state!r}"
            ) from error
        if epoch < 0 or position < 0:
            raise DataError(f"a BatchStream state needs epoch, position >= 0, got {state!r}")
        size = len(self.dataset)
        saved = (state.get("batch_size", self.batch_size), state.get("num_images", size))
        if tuple(int(v) for v in saved) != (self.batch_size, size):
            raise DataError(
                f"the stream was saved with batch size {saved[0]} over {saved[1]} images, this "
                f"one has batch size {self.batch_size} over {size} images; "
                "it cannot resume exactly"
            )
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = None
