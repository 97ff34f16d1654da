"""Small modules and builders shared by the tests."""

import torch
from torch import nn

from gali_ext import MultiClassJointDiscriminatorHead, SpectralMLP


class CountingModule(nn.Module):
    """Wraps a module and counts its calls and the rows it saw."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0
        self.rows = 0
        self.out_features = getattr(module, "out_features", None)

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        return self.module(x)


class TinyImageFeatures(nn.Module):
    """A spectrally normalised conv feature net for 1 x 8 x 8 images."""

    def __init__(self, channels: int = 1, out_features: int = 16):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, 8, 3, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(8, out_features, 4)),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.out_features = out_features

    def forward(self, x):
        return self.net(x)


# A small digits-ali run for the reliability tests: batch 16, a checkpoint every 2 steps, every
# step logged, no grids, no progress bar (`gali-ext recipe *TINY_RUN --steps N --out DIR`).
TINY_RUN = [
    "digits-ali",
    "--set",
    "batch_size=16",
    "--set",
    "checkpoint_every=2",
    "--set",
    "log_every=1",
    "--set",
    "sample_every=1000",
    "--no-progress",
]


def make_head(spec, latent_dim=6, extra_dim=5, counting=False):
    dx = TinyImageFeatures()
    dz = SpectralMLP(latent_dim, (12,), 10, activate_output=True)
    extras = {
        k: SpectralMLP(extra_dim, (8,), 7, activate_output=True)
        for k in spec.kinds
        if k not in ("image", "latent")
    }
    if counting:
        dx, dz = CountingModule(dx), CountingModule(dz)
        extras = {k: CountingModule(v) for k, v in extras.items()}
    return MultiClassJointDiscriminatorHead(spec, dx, dz, extras, joint_hidden=(32,))


def random_variables(spec, batch=5, latent_dim=6, extra_dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = {}
    for name in spec.nodes:
        from gali_ext import parse_node

        kind = parse_node(name).kind
        shape = {"image": (1, 8, 8), "latent": (latent_dim,)}.get(kind, (extra_dim,))
        values[name] = torch.randn(batch, *shape, generator=g)
    return values


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``gali-ext ARGS`` in this process: (exit status, stdout, stderr)."""
    import sys
    import warnings

    from gali_ext.recipes.cli import main

    argv, format_warning = sys.argv, warnings.formatwarning
    capsys.readouterr()
    sys.argv = ["gali-ext", *args]
    try:
        main()
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    finally:
        sys.argv, warnings.formatwarning = argv, format_warning
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of a command's stderr."""
    return [line for line in err.splitlines() if line.startswith("error:")]


def one_error(code: int, err: str) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def train_run(run, args) -> None:
    """``gali-ext recipe ARGS --out RUN`` in this process, which must end well (for module-scoped
    fixtures, which cannot take ``capsys``)."""
    import sys

    import pytest

    from gali_ext.recipes.cli import main

    patch = pytest.MonkeyPatch()
    patch.setattr(sys, "argv", ["gali-ext", "recipe", *args, "--out", str(run)])
    try:
        main()
    except SystemExit as exit:
        assert not exit.code
    finally:
        patch.undo()


# ------------------------------------------------------------------------------ SVHN files


def write_svhn(folder, counts=None, seed=0):
    """SVHN's real layout (MATLAB v5, ``{split}_32x32.mat``): X uint8 (32, 32, 3, N), y uint8
    (N, 1) with labels 1..10 (10 for digit 0); random pixels. ``counts``: images per split
    (default train 7, test 4). Returns ``{split: (X, y)}``."""
    import numpy as np
    from scipy.io import savemat

    counts = counts or {"train": 7, "test": 4}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in counts.items():
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, so some 10s
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


SVHN_DIGITS_COUNTS = {"train": 64, "test": 48, "extra": 96}


def write_svhn_digits(folder, counts=None):
    """SVHN-format files of real digits, for the SVHN recipes on a CPU: scikit-learn's digits
    upscaled bilinearly to 32 x 32 (``load_digits(image_size=32)``), three channels that
    differ (red the digit, green its inverse, blue half the digit plus 64), labels 1..10 with
    10 for digit 0. train and extra take disjoint digits of the digits' training split, test
    its test split. ``counts``: images per split (default :data:`SVHN_DIGITS_COUNTS`).
    Returns ``{split: (X, y)}`` as written."""
    import numpy as np
    from scipy.io import savemat

    from gali_ext.recipes.data import load_digits

    counts = {**SVHN_DIGITS_COUNTS, **(counts or {})}
    train, test = load_digits("train", image_size=32), load_digits("test", image_size=32)
    sources = {
        "train": (train, 0),
        "extra": (train, counts["train"]),
        "test": (test, 0),
    }
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in counts.items():
        data, start = sources[split]
        if start + n > len(data):
            raise ValueError(f"{split}: {n} images from {start} exceed the {len(data)} digits")
        v = data.images[start : start + n, 0].numpy().astype(np.int64)  # [N, 32, 32]
        rgb = np.stack([v, 255 - v, v // 2 + 64], axis=-1)  # [N, 32, 32, 3]
        x = np.ascontiguousarray(rgb.transpose(1, 2, 3, 0)).astype(np.uint8)  # (32, 32, 3, N)
        digits = data.labels[start : start + n].numpy()
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written
