"""What the step benchmark (:mod:`gali_ext.recipes.bench`) and the CUDA-graph benchmark
(:mod:`gali_ext.recipes.graph_bench`) share: the device they run on, the GALI objective of a
preset on the reference networks, built from a seed, and the wait for the device before a clock
is read."""

from __future__ import annotations

import torch
from torch import nn

from gali_ext.errors import ConfigError
from gali_ext.gali import GALI, build_gali
from gali_ext.head import MultiClassJointDiscriminatorHead
from gali_ext.presets import get_preset
from gali_ext.providers import PretrainedFeatures
from gali_ext.recipes.models import ALIModels, build_ali_models

__all__ = ["benchmark_device", "build_objective", "synchronize"]


def benchmark_device(device: str | torch.device | None = None) -> torch.device:
    """The device ``--device`` names, once it is one this machine has; None: CUDA when it is
    available, else the CPU. Raises :class:`~gali_ext.errors.ConfigError` for a name torch does
    not know, or a CUDA device (``cuda``, ``cuda:1``) the machine lacks, before anything runs."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ConfigError(
            f"--device {device!r} is not a device torch knows ({str(error).splitlines()[0]}): "
            "expected cpu or cuda (cuda:N)"
        ) from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"--device {device}: this machine has no CUDA device (torch.cuda.is_available() "
                "is False): pass --device cpu, or omit --device"
            )
        if chosen.index is not None and chosen.index >= count:
            raise ConfigError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return chosen


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run all the work queued on it (CUDA); nothing on the CPU,
    where every operation has finished when it returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FrozenFeatures(nn.Module):
    """A small frozen conv net standing in for a pretrained model M (no weights to download)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_objective(
    preset: str, arch: str, device: torch.device, seed: int = 0
) -> tuple[ALIModels, MultiClassJointDiscriminatorHead, GALI]:
    """The reference networks of architecture ``arch``, and the head and :class:`~gali_ext.GALI`
    objective of ``preset`` over them, on ``device``. The weights are drawn after
    ``torch.manual_seed(seed)``: the same seed gives every preset the same E, G, Dx and Dz
    weights. A preset that needs pretrained features gets a small frozen conv net in their
    place (nothing to download)."""
    torch.manual_seed(seed)
    models = build_ali_models(arch)
    features = None
    if get_preset(preset).needs_features:
        features = PretrainedFeatures(_FrozenFeatures(models.image_shape[0]))
    gali = build_gali(preset, models, features)
    return models, gali.head, gali.to(device)
