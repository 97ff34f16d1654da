"""Data sets loaded from small files written in the real formats (DESIGN.md section 8)."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from gali_ext.data import BatchStream, data_mean, load_dataset, load_digits
from gali_ext.errors import DataError


def test_digits_splits():
    splits = {s: load_digits(s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1297, 200, 300]
    image, label = splits["train"][0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0 and 0 <= label < 10
    # disjoint: no test image equals a train image's bytes and label together
    train = {(bytes(splits["train"].images[i].numpy()), int(splits["train"].labels[i]))
             for i in range(len(splits["train"]))}  # fmt: skip
    overlap = sum((bytes(splits["test"].images[i].numpy()), int(splits["test"].labels[i])) in train
                  for i in range(300))  # fmt: skip
    assert overlap == 0
    with pytest.raises(DataError, match="splits"):
        load_digits("valid")


def test_digits_pixel_scaling_at_native_size():
    from sklearn.datasets import load_digits as raw

    data = load_digits("train", image_size=8)
    order = np.random.default_rng(0).permutation(1797)
    first = raw().images[order[0]]
    expected = torch.tensor(first / 16 * 2 - 1, dtype=torch.float32)
    torch.testing.assert_close(data[0][0][0], expected, atol=1 / 127.5, rtol=0)


def write_svhn(folder, n=6, label_ten_at=2):
    folder.mkdir(parents=True, exist_ok=True)
    x = np.zeros((32, 32, 3, n), dtype=np.uint8)
    x[5, 7, 2, 3] = 200  # row 5, column 7, channel 2 (blue) of image 3
    y = np.arange(1, n + 1).reshape(n, 1) % 10 + 1
    y[label_ten_at, 0] = 10
    for split in ("train", "test"):
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y


def test_svhn_layout_and_labels(tmp_path):
    _, y = write_svhn(tmp_path)
    data = load_dataset("svhn", "train", tmp_path)
    assert len(data) == 6 and data.channels == 3 and data.image_size == 32
    assert data.images[3, 2, 5, 7] == 200 and data.images.sum() == 200
    assert data.labels[2] == 0  # label 10 stands for digit 0
    assert data.labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert data[3][0][2, 5, 7].item() == pytest.approx(200 / 127.5 - 1)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, "no key 'y'"),
        ({"X": np.zeros((32, 32, 2), np.uint8), "y": np.ones((2, 1))}, "expected uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.float32), "y": np.ones((2, 1))}, "expected uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "3 labels"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 11)}, "1..10"),
    ],
)
def test_malformed_svhn_names_the_file(tmp_path, content, message):
    savemat(tmp_path / "train_32x32.mat", content)
    with pytest.raises(DataError, match=f"train_32x32.mat.*{message}"):
        load_dataset("svhn", "train", tmp_path)


def test_missing_svhn_and_data_dir(tmp_path):
    with pytest.raises(DataError, match="missing SVHN file.*test_32x32.mat"):
        load_dataset("svhn", "test", tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("svhn", "train")
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        load_dataset("svhn", "train", tmp_path)


def write_celeba(folder, partitions=(0, 0, 0, 1, 2)):
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for name in names:
        pixels = np.full((218, 178, 3), 255, dtype=np.uint8)  # white
        pixels[:12] = 0  # black bands at top and bottom: the centre crop drops them
        pixels[-12:] = 0
        Image.fromarray(pixels).save(images / name, quality=95)
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, partitions))
    )
    attributes = [f"Attr{i}" for i in range(40)]
    rows = [f"{n} " + " ".join("1" if (i + j) % 3 == 0 else "-1" for j in range(40))
            for i, n in enumerate(names)]  # fmt: skip
    (folder / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n" + " ".join(attributes) + "\n" + "\n".join(rows) + "\n"
    )
    return names


def test_celeba_splits_attributes_and_centre_crop(tmp_path):
    write_celeba(tmp_path)
    train = load_dataset("celeba", "train", tmp_path)
    assert len(train) == 3 and len(load_dataset("celeba", "test", tmp_path)) == 1
    image, attributes = train[1]
    assert image.shape == (3, 64, 64)
    assert attributes.shape == (40,) and set(attributes.tolist()) <= {0, 1}
    assert attributes.tolist() == [1 if (1 + j) % 3 == 0 else 0 for j in range(40)]
    # 178 -> 64 wide, 218 -> 78 high, crop rows 7..71: the 12-px black bands become ~4 px
    # and fall outside the crop, so the crop is white
    assert image.min() > 0.8


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "list_attr_celeba.txt").unlink(), "missing.*list_attr_celeba.txt"),
        (lambda d: (d / "img_align_celeba" / "000002.jpg").unlink(), "1 CelebA image"),
        (lambda d: (d / "list_attr_celeba.txt").write_text("1\nA B\n000001.jpg 1 1\n"),
         "40 attribute names"),
        (lambda d: (d / "list_eval_partition.txt").write_text("000001.jpg 7\n"), "line 1"),
    ],
)  # fmt: skip
def test_malformed_celeba(tmp_path, breakage, message):
    write_celeba(tmp_path)
    breakage(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset("celeba", "train", tmp_path)


def test_celeba_bad_attribute_value(tmp_path):
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    path.write_text(path.read_text().replace(" -1", " 0", 1))
    with pytest.raises(DataError, match="line 3.*-1/1"):
        load_dataset("celeba", "train", tmp_path)


def test_batch_stream_resumes_exactly():
    data = load_digits("val")
    stream = BatchStream(data, 64, seed=3)
    assert stream.steps_per_epoch == 3
    whole = [next(stream)[1] for _ in range(8)]  # crosses two epoch boundaries
    first = BatchStream(data, 64, seed=3)
    part = [next(first)[1] for _ in range(4)]
    resumed = BatchStream(data, 64, seed=99)
    resumed.load_state_dict(first.state_dict())
    part += [next(resumed)[1] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(whole, part))
    # an epoch visits distinct images
    epoch = BatchStream(data, 50, seed=0)
    seen = torch.cat([epoch._epoch_order()[:200]])
    assert len(set(seen.tolist())) == 200


def test_data_mean_by_hand():
    data = load_digits("test")
    expected = data.images.double().mean().item() / 255
    assert data_mean(data, chunk=7) == pytest.approx(expected, rel=1e-12)
