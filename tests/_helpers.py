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
