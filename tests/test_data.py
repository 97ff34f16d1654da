"""gali_ext.recipes.data: data sets built from small files in their real formats
(docs/design.md, section 8), the resumable batch stream and the data mean, checked against hand
computations."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from gali_ext.errors import DataError
from gali_ext.recipes.data import (
    BatchStream,
    ImageData,
    ImageFiles,
    data_mean,
    endless_batches,
    load_celeba,
    load_dataset,
    load_digits,
    load_svhn,
    training_loader,
)
from tests._helpers import write_svhn

# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def raw_digits():
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images, bunch.target


@pytest.fixture(scope="module")
def digits():
    return {split: load_digits(split) for split in ("train", "val", "test")}


def test_digits_splits_sizes_shapes_and_range(digits):
    assert [len(digits[s]) for s in ("train", "val", "test")] == [1297, 200, 300]
    train = digits["train"]
    assert (train.name, train.channels, train.image_size, train.num_classes) == (
        "digits",
        1,
        16,
        10,
    )
    assert train.images.dtype == torch.uint8 and train.images.shape == (1297, 1, 16, 16)
    image, label = train[5]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert label.dtype == torch.long and label.shape == () and 0 <= int(label) <= 9
    everything = train.images_tensor()
    assert everything.shape == (1297, 1, 16, 16) and everything.dtype == torch.float32
    assert everything.min() == -1.0 and everything.max() == 1.0
    torch.testing.assert_close(everything[5], image, rtol=0, atol=0)
    assert torch.equal(train.labels_tensor(), train.labels) and train.labels.shape == (1297,)
    assert Counter(train.labels.tolist()).keys() == set(range(10))


def test_digits_splits_are_disjoint_and_cover_the_data(raw_digits):
    images, targets = raw_digits
    splits = [load_digits(s, image_size=8) for s in ("train", "val", "test")]
    # at the native size the stored bytes are round(v / 16 * 255) of the raw values 0..16
    expected = Counter(
        (np.round(img / 16 * 255).astype(np.uint8).tobytes(), int(t))
        for img, t in zip(images, targets)
    )
    seen = [
        Counter((d.images[i, 0].numpy().tobytes(), int(d.labels[i])) for i in range(len(d)))
        for d in splits
    ]
    assert sum(seen, Counter()) == expected  # together the splits are the data set, once
    # and no (image, label) of one split appears in another (up to duplicates in sklearn's data)
    duplicated = {key for key, n in expected.items() if n > 1}
    for a in range(3):
        for b in range(a + 1, 3):
            assert not (set(seen[a]) & set(seen[b])) - duplicated


def test_digits_split_is_the_fixed_permutation(raw_digits):
    images, targets = raw_digits
    order = np.random.default_rng(0).permutation(1797)
    test = load_digits("test", image_size=8)
    assert test.labels.tolist() == targets[order[1497:]].tolist()
    first = images[order[1497]]
    # 0 -> -1 and 16 -> 1
    torch.testing.assert_close(
        test[0][0][0], torch.tensor(first / 8 - 1, dtype=torch.float32), atol=0.5 / 127.5, rtol=0
    )


def test_digits_bilinear_upscale_closed_form(raw_digits):
    images, _ = raw_digits
    order = np.random.default_rng(0).permutation(1797)
    x = images[order[0]] / 8 - 1  # [-1, 1]
    up = load_digits("train", image_size=16)[0][0][0].double().numpy()
    tol = 0.51 / 127.5  # uint8 storage
    # align_corners=False, factor 2: output 0 repeats input 0 (edge clamp), output 2i+1 is
    # 0.75 x[i] + 0.25 x[i + 1] along each axis
    assert up[0, 0] == pytest.approx(x[0, 0], abs=tol)
    assert up[15, 15] == pytest.approx(x[7, 7], abs=tol)
    for i, j in [(1, 1), (3, 5), (9, 11)]:
        a, b = i // 2, j // 2
        expected = (
            0.5625 * x[a, b] + 0.1875 * (x[a, b + 1] + x[a + 1, b]) + 0.0625 * x[a + 1, b + 1]
        )
        assert up[i, j] == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("bad", ["valid", "all", ""])
def test_digits_unknown_split(bad):
    with pytest.raises(DataError, match=r"digits has splits \['train', 'val', 'test'\]"):
        load_digits(bad)


# ------------------------------------------------------------------ SVHN


def test_svhn_pixel_layout_and_labels(tmp_path):
    x = np.zeros((32, 32, 3, 6), dtype=np.uint8)
    x[5, 7, 2, 3] = 200  # row 5, column 7, channel 2 (blue) of image 3
    x[0, 31, 0, 5] = 255  # row 0, column 31, red, image 5
    y = np.array([[10], [1], [2], [10], [9], [3]], dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    data = load_svhn(tmp_path, "train")
    assert (len(data), data.channels, data.image_size, data.num_classes) == (6, 3, 32, 10)
    assert data.images.shape == (6, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.images[3, 2, 5, 7] == 200 and data.images[5, 0, 0, 31] == 255
    assert data.images.sum() == 455  # nothing else is lit
    assert data.labels.tolist() == [0, 1, 2, 0, 9, 3]  # label 10 stands for digit 0
    image, label = data[3]
    assert image.shape == (3, 32, 32) and label.dtype == torch.long and int(label) == 0
    assert image[2, 5, 7].item() == pytest.approx(200 / 127.5 - 1)
    assert image[0, 5, 7].item() == -1.0


def test_svhn_random_images_match_the_transpose(tmp_path):
    written = write_svhn(tmp_path)
    x, y = written["test"]
    data = load_dataset("svhn", "test", tmp_path)
    for n in range(4):
        for c in range(3):
            assert np.array_equal(data.images[n, c].numpy(), x[:, :, c, n])
    assert data.labels.tolist() == [1, 2, 3, 4]


def test_svhn_train_extra_and_val_splits(tmp_path):
    written = write_svhn(tmp_path, {"train": 12, "test": 3, "extra": 5})
    train = load_svhn(tmp_path, "train")
    both = load_svhn(tmp_path, "train+extra")
    assert len(both) == 17 and torch.equal(both.images[:12], train.images)
    assert np.array_equal(both.images[12, 1].numpy(), written["extra"][0][:, :, 1, 0])
    assert both.labels[12:].tolist() == [1, 2, 3, 4, 5]
    assert len(load_svhn(tmp_path, "extra")) == 5
    # val: min(5000, N) train images at the first positions of default_rng(0)'s permutation
    val = load_svhn(tmp_path, "val")
    order = np.random.default_rng(0).permutation(12)
    assert len(val) == 12 and torch.equal(val.images, train.images[torch.from_numpy(order)])
    assert torch.equal(load_svhn(tmp_path, "val").images, val.images)  # deterministic
    with pytest.raises(DataError, match="SVHN has splits"):
        load_svhn(tmp_path, "valid")


def test_svhn_val_takes_5000_of_a_large_train_file(tmp_path):
    x = np.zeros((32, 32, 3, 5003), dtype=np.uint8)
    x[0, 0, 0, :] = np.arange(5003) % 251  # a per-image tag
    y = np.ones((5003, 1), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    val = load_svhn(tmp_path, "val")
    order = np.random.default_rng(0).permutation(5003)[:5000]
    assert len(val) == 5000
    assert val.images[:, 0, 0, 0].tolist() == (order % 251).tolist()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "no key 'y'"),
        ({"x": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))}, "no key 'X'"),
        ({"X": np.zeros((32, 32, 2), np.uint8), "y": np.ones((2, 1))}, "expected uint8"),
        ({"X": np.zeros((3, 32, 32, 2), np.uint8), "y": np.ones((2, 1))}, "expected uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.float32), "y": np.ones((2, 1))}, "expected uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "3 labels"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 2))}, r"expected \(2, 1\)"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 11)}, "1..10"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.zeros((2, 1))}, "1..10"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 1.5)}, "non-integer"),
    ],
)
def test_malformed_svhn_names_the_file_and_layout(tmp_path, content, message):
    savemat(tmp_path / "train_32x32.mat", content)
    with pytest.raises(DataError, match=f"train_32x32.mat.*{message}") as caught:
        load_dataset("svhn", "train", tmp_path)
    assert "(32, 32, 3, N)" in str(caught.value)  # the expected layout


def test_missing_or_unreadable_svhn(tmp_path):
    write_svhn(tmp_path, {"train": 2})
    with pytest.raises(DataError, match="missing SVHN file.*test_32x32.mat.*train_32x32.mat"):
        load_dataset("svhn", "test", tmp_path)
    with pytest.raises(DataError, match="missing SVHN file.*extra_32x32.mat"):
        load_dataset("svhn", "train+extra", tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="train_32x32.mat' is not a readable MATLAB file"):
        load_dataset("svhn", "train", tmp_path)


# ---------------------------------------------------------------- CelebA

BODY = (200, 40, 90)  # the colour of the middle of every test face


def face(index):
    """A 178 x 218 image: black bands on the top and bottom 12 rows (the centre crop drops them),
    a white line across the centre row 109 and a green stripe in the leftmost 6 columns."""
    pixels = np.empty((218, 178, 3), dtype=np.uint8)
    pixels[:] = BODY
    pixels[:12] = 0
    pixels[-12:] = 0
    pixels[107:112, 6:] = 255
    pixels[12:-12, :6] = (0, 255, 0)
    pixels[0, 0] = index  # keeps the files distinct
    return pixels


def attribute_values(i):
    return [1 if (i + j) % 3 == 0 else -1 for j in range(40)]


def write_celeba(folder, partitions=(0, 0, 0, 1, 2)):
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for i, name in enumerate(names):
        Image.fromarray(face(i)).save(images / name, quality=95)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, partitions))
    )
    # the real file: a count, 40 names ending in a space, values right-aligned in width 2
    header = " ".join(f"Attr_{j}" for j in range(40)) + " \n"
    rows = "".join(
        f"{n} " + " ".join(f"{v:>2}" for v in attribute_values(i)) + "\n"
        for i, n in enumerate(names)
    )
    (folder / "list_attr_celeba.txt").write_text(f"{len(names)}\n{header}{rows}")
    return names


def test_celeba_splits_and_attributes(tmp_path):
    write_celeba(tmp_path, partitions=(0, 1, 0, 2, 0, 1))
    sizes = {s: len(load_dataset("celeba", s, tmp_path)) for s in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 2, "test": 1}
    train = load_celeba(tmp_path, "train")
    assert isinstance(train, ImageFiles) and train.images is None
    assert (train.name, train.channels, train.image_size, train.num_classes) == (
        "celeba",
        3,
        64,
        40,
    )
    assert [f.name for f in train.files] == ["000001.jpg", "000003.jpg", "000005.jpg"]
    assert train.label_names == [f"Attr_{j}" for j in range(40)]
    expected = torch.tensor([[int(v == 1) for v in attribute_values(i)] for i in (0, 2, 4)])
    assert train.labels_tensor().dtype == torch.long and torch.equal(train.labels, expected)
    _, label = train[1]
    assert label.shape == (40,) and label.dtype == torch.long
    assert label.tolist() == [int((2 + j) % 3 == 0) for j in range(40)]
    with pytest.raises(DataError, match="CelebA has splits"):
        load_celeba(tmp_path, "valid")


def test_celeba_centre_crop(tmp_path):
    write_celeba(tmp_path)
    image, _ = load_celeba(tmp_path, "train")[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0
    pixels = (image + 1) * 127.5
    # 178 x 218 -> 64 x 78, crop rows 7..70: the ~4-row black bands fall outside the crop
    assert pixels[:, [0, 63], 10:].min() > 20
    body = pixels[:, 10:25, 10:].reshape(3, -1).mean(1)
    torch.testing.assert_close(body, torch.tensor(BODY, dtype=torch.float32), atol=4, rtol=0)
    # the white centre line (row 109 of 218) lands in the middle of the crop: row 109 * 78/218
    # - 7 = 32
    brightest = pixels[:, :, 10:].mean(dim=(0, 2)).argmax().item()
    assert brightest in (31, 32)
    # the width is not cropped: the green left stripe (6 of 178 columns) is at columns 0..1
    red, green, blue = pixels[:, 10:25, 0].mean(1)  # column 0, channels in RGB order
    assert green > 200 and red < 60 and blue < 60
    stacked = load_celeba(tmp_path, "train").images_tensor()
    assert stacked.shape == (3, 3, 64, 64)
    torch.testing.assert_close(stacked[0], image, rtol=0, atol=0)


def test_celeba_image_size(tmp_path):
    write_celeba(tmp_path)
    data = load_dataset("celeba", "test", tmp_path, image_size=32)
    assert data.image_size == 32 and data[0][0].shape == (3, 32, 32)


def _replace_line(path, number, text):
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            lambda d: (d / "list_attr_celeba.txt").unlink(),
            "missing CelebA file '.*list_attr_celeba.txt'",
        ),
        (
            lambda d: (d / "list_eval_partition.txt").unlink(),
            "missing CelebA file '.*list_eval_partition.txt'",
        ),
        (
            lambda d: (
                [p.unlink() for p in (d / "img_align_celeba").iterdir()]
                and (d / "img_align_celeba").rmdir()
            ),
            "missing CelebA folder '.*img_align_celeba'",
        ),
        (
            lambda d: _replace_line(d / "list_eval_partition.txt", 2, "000002.jpg 7"),
            "list_eval_partition.txt': line 2 is '000002.jpg 7'",
        ),
        (
            lambda d: _replace_line(d / "list_eval_partition.txt", 2, "000001.jpg 0"),
            "list_eval_partition.txt': line 2 lists '000001.jpg' a second time",
        ),
        (
            lambda d: _replace_line(d / "list_attr_celeba.txt", 1, "6"),
            "list_attr_celeba.txt': line 1 says 6 images but 5 are listed",
        ),
        (
            lambda d: _replace_line(d / "list_attr_celeba.txt", 1, "five"),
            "list_attr_celeba.txt': line 1 must be the image count",
        ),
        (
            lambda d: _replace_line(d / "list_attr_celeba.txt", 2, "A B C"),
            "list_attr_celeba.txt': line 2 must hold the 40 attribute names, found 3",
        ),
        (
            lambda d: _replace_line(d / "list_attr_celeba.txt", 4, "000002.jpg" + " 1" * 39),
            "list_attr_celeba.txt': line 4 must be a file name and 40 values of -1/1, got 39",
        ),
        (
            lambda d: _replace_line(d / "list_attr_celeba.txt", 3, "000001.jpg 0" + " 1" * 39),
            "list_attr_celeba.txt': line 3 must be a file name and 40 values of -1/1",
        ),
        (
            lambda d: _replace_line(d / "list_attr_celeba.txt", 7, "000099.jpg" + " 1" * 40),
            "lists 5 images and .*list_attr_celeba.txt' 5; 1 have no attributes "
            r"\(e.g. \['000005.jpg'\]\) and 1 no partition \(e.g. \['000099.jpg'\]\)",
        ),
    ],
)
def test_malformed_celeba_names_the_file_and_layout(tmp_path, breakage, message):
    write_celeba(tmp_path)
    breakage(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset("celeba", "train", tmp_path)
    assert "img_align_celeba/*.jpg" in str(caught.value)  # the expected layout


def test_celeba_missing_images_are_counted_up_front(tmp_path):
    write_celeba(tmp_path, partitions=(0,) * 8)
    for name in ("000002.jpg", "000005.jpg", "000006.jpg", "000007.jpg", "000008.jpg", "0.jpg"):
        (tmp_path / "img_align_celeba" / name).unlink(missing_ok=True)
    with pytest.raises(DataError, match="5 CelebA image") as caught:
        load_celeba(tmp_path, "train")
    text = str(caught.value)
    assert "list_eval_partition.txt" in text and "img_align_celeba" in text
    assert "['000002.jpg', '000005.jpg', '000006.jpg', '000007.jpg', '000008.jpg']" in text
    assert len(load_celeba(tmp_path, "val")) == 0  # other splits are unaffected


def test_celeba_unreadable_jpeg_names_the_file(tmp_path):
    write_celeba(tmp_path)
    (tmp_path / "img_align_celeba" / "000002.jpg").write_bytes(b"not a jpeg")
    data = load_celeba(tmp_path, "train")
    assert data[0][0].shape == (3, 64, 64)
    with pytest.raises(DataError, match="cannot read image '.*000002.jpg'"):
        data[1]


# ---------------------------------------------------------- load_dataset


def test_load_dataset_names_and_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the default data_dir
    data = load_dataset("digits", "val", image_size=8)
    assert data.image_size == 8 and len(data) == 200
    with pytest.raises(
        DataError, match="unknown data set 'mnist'; data sets: digits, svhn, celeba"
    ):
        load_dataset("mnist")
    with pytest.raises(
        DataError, match="gali-ext/svhn' is not a folder: pass --download.*train_32x32.mat"
    ):
        load_dataset("svhn", "train")
    with pytest.raises(
        DataError, match="gali-ext/celeba' is not a folder: pass --download.*list_attr_celeba.txt"
    ):
        load_dataset("celeba", "train", data_dir=None)
    with pytest.raises(DataError, match="--data-dir '.*nowhere' is not a folder"):
        load_dataset("svhn", "train", tmp_path / "nowhere")
    write_svhn(tmp_path, {"train": 2})
    with pytest.raises(DataError, match="SVHN images are 32 x 32"):
        load_dataset("svhn", "train", tmp_path, image_size=64)
    with pytest.raises(DataError, match="positive int"):
        load_dataset("digits", "train", image_size=0)


# ----------------------------------------------------------- BatchStream


def toy_data(n=10):
    """Image i is filled with the value i, label i % 10, so a batch shows its indices."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ImageData("toy", "train", images, torch.arange(n) % 10, 10)


def test_batch_stream_follows_the_documented_permutations():
    data = toy_data(10)
    stream = BatchStream(data, 3, seed=5)
    assert stream.steps_per_epoch == 3  # 10 // 3, the last image of each epoch is dropped
    for epoch in range(3):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch))
        for step in range(3):
            assert stream.epoch == (epoch if step or not epoch else epoch - 1)
            images, labels = next(stream)
            expected = order[3 * step : 3 * step + 3]
            assert images.shape == (3, 1, 2, 2) and images.dtype == torch.float32
            torch.testing.assert_close(images[:, 0, 0, 0], expected.float() / 127.5 - 1)
            assert labels.tolist() == expected.tolist()
        assert stream.epoch == epoch


def test_batch_stream_is_reproducible_and_seeded(digits):
    data = digits["val"]
    a, b = BatchStream(data, 16, seed=1), BatchStream(data, 16, seed=1)
    for _ in range(20):  # across epoch boundaries too (12 steps per epoch)
        (images_a, labels_a), (images_b, labels_b) = next(a), next(b)
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    one, two = BatchStream(data, 50, seed=1), BatchStream(data, 50, seed=2)
    assert not torch.equal(next(one)[0], next(two)[0])
    # one epoch visits every image once: its labels are the split's labels, reordered
    stream = BatchStream(data, 50, seed=0)
    labels = torch.cat([next(stream)[1] for _ in range(stream.steps_per_epoch)])
    assert stream.epoch == 0 and Counter(labels.tolist()) == Counter(data.labels.tolist())


@pytest.mark.parametrize("stop", [1, 3, 4, 7])  # mid-epoch and exactly at epoch ends
def test_batch_stream_resumes_exactly(digits, stop):
    data = digits["val"]
    whole = BatchStream(data, 64, seed=3)
    assert whole.steps_per_epoch == 3
    uninterrupted = [next(whole) for _ in range(10)]  # crosses three epoch boundaries
    first = BatchStream(data, 64, seed=3)
    for _ in range(stop):
        next(first)
    saved = first.state_dict()
    assert saved == {
        "seed": 3,
        "epoch": (stop - 1) // 3,
        "position": (stop - 1) % 3 + 1,
        "batch_size": 64,
        "num_images": 200,
    }
    resumed = BatchStream(data, 64, seed=99)
    resumed.load_state_dict(saved)
    for step in range(stop, 10):
        images, labels = next(resumed)
        assert torch.equal(images, uninterrupted[step][0])
        assert torch.equal(labels, uninterrupted[step][1])
    assert resumed.epoch == whole.epoch == 3


def test_batch_stream_rejects_bad_sizes_and_states():
    data = toy_data(10)
    with pytest.raises(DataError, match="batch size 11 exceeds the 10 images"):
        BatchStream(data, 11)
    with pytest.raises(DataError, match="positive int"):
        BatchStream(data, 0)
    stream = BatchStream(data, 2)
    with pytest.raises(DataError, match="saved with batch size 4 over 10 images"):
        stream.load_state_dict({**stream.state_dict(), "batch_size": 4})
    with pytest.raises(DataError, match="'seed', 'epoch' and 'position'"):
        stream.load_state_dict({"seed": 0, "epoch": 1})
    stream.load_state_dict({"seed": 7, "epoch": 2, "position": 1})  # older states: no sizes
    assert (stream.seed, stream.epoch, stream.position) == (7, 2, 1)


def test_batch_stream_over_lazy_celeba(tmp_path):
    write_celeba(tmp_path)
    data = load_celeba(tmp_path, "train")
    stream = BatchStream(data, 2, seed=0)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(0))[:2]
    images, labels = next(stream)
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 40)
    assert torch.equal(labels, data.labels[order])
    torch.testing.assert_close(images, data.images_tensor()[order], rtol=0, atol=0)


# ------------------------------------------------- training_loader, endless_batches


@pytest.fixture
def accelerator(tmp_path):
    """The recipe loop's Accelerator (seed 5), on one CPU process."""
    from accelerate.state import AcceleratorState

    from gali_ext import recipes
    from gali_ext.recipes.build import make_accelerator

    yield make_accelerator(recipes.get("digits-ali").with_overrides({"seed": "5"}), tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)


def indices(batch):
    """The image indices of a toy_data batch (image i is filled with the value i)."""
    return ((batch[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_epochs_follow_the_seeded_permutations(accelerator, workers):
    loader = accelerator.prepare(training_loader(toy_data(10), 3, seed=5, num_workers=workers))
    assert len(loader) == 3  # 10 // 3 full batches; the last image of each epoch waits
    batches = endless_batches(loader, accelerator)
    for epoch in range(3):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        for step in range(3):
            assert indices(next(batches)) == order[3 * step : 3 * step + 3]


@pytest.mark.parametrize("start", [1, 3, 4, 8])  # mid-epoch and exactly at epoch ends
def test_endless_batches_resume_at_any_batch(accelerator, start):
    loader = accelerator.prepare(training_loader(toy_data(10), 3, seed=5, num_workers=2))
    whole = endless_batches(loader, accelerator)
    uninterrupted = [indices(next(whole)) for _ in range(10)]
    resumed = endless_batches(loader, accelerator, start=start)
    assert [indices(next(resumed)) for _ in range(start, 10)] == uninterrupted[start:]


def test_loader_reads_whole_batches_and_draws_nothing_from_the_global_rng(accelerator):
    data = toy_data(10)
    calls = []
    data.batch = lambda i, batch=data.batch: calls.append(list(i)) or batch(i)
    loader = accelerator.prepare(training_loader(data, 4, seed=0))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batch = next(endless_batches(loader, accelerator))
    assert batch.shape == (4, 1, 2, 2) and calls[0] == indices(batch)  # one read per batch
    assert torch.equal(torch.rand(3), expected)


def test_loader_rejects_batches_larger_than_the_data(accelerator):
    with pytest.raises(DataError, match="batch size 11 exceeds the 10 images"):
        training_loader(toy_data(10), 11, seed=0)
    with pytest.raises(DataError, match="positive int"):
        training_loader(toy_data(10), 0, seed=0)


# -------------------------------------------------------------- data_mean


def test_data_mean_by_hand():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    images[0, 0, 0, 0] = images[1, 0, 1, 1] = images[3, 0, 0, 1] = 255
    images[2, 0, 1, 0] = 51
    data = ImageData("toy", "train", images, torch.zeros(4, dtype=torch.long), 10)
    # (3 * 255 + 51) / (255 * 16) = 816 / 4080
    assert data_mean(data) == pytest.approx(0.2, abs=1e-15)
    assert data_mean(data, chunk=1) == pytest.approx(0.2, abs=1e-15)
    # limit 2 takes images 0 and 3 (evenly spaced): 510 / (255 * 8)
    assert data_mean(data, limit=2) == pytest.approx(0.25, abs=1e-15)


def test_data_mean_of_digits_and_celeba(digits, tmp_path):
    data = digits["test"]
    expected = data.images.numpy().astype(np.float64).mean() / 255
    assert data_mean(data, chunk=7) == pytest.approx(expected, rel=1e-12)
    write_celeba(tmp_path)
    faces = load_celeba(tmp_path, "train")
    expected = ((faces.images_tensor().double() + 1) / 2).mean().item()
    assert data_mean(faces, chunk=2) == pytest.approx(expected, abs=1e-6)
