"""ALI's encoder, generator and discriminator parts (Dumoulin et al. 2017, appendix tables),
with GALI's changes (DESIGN.md section 4): a tanh generator and a discriminator with spectral
normalisation instead of batch norm and dropout.

Three sizes: ``"svhn"`` (3 x 32 x 32), ``"celeba"`` (3 x 64 x 64), both following ALI's tables,
and ``"digits"`` (1 x 16 x 16), a small net of the same shape that trains in minutes on a CPU.
Weights start from N(0, 0.02) as in DCGAN and ALI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from .errors import ConfigError

__all__ = [
    "ALIModels",
    "GaussianEncoder",
    "Generator",
    "ImageFeatures",
    "LatentFeatures",
    "arch_image_shape",
    "available_archs",
    "build_ali_models",
]

# (kernel, out channels, stride, padding) per layer, from ALI's appendix tables.
_ARCHS = {
    "svhn": {
        "image": (3, 32),
        "latent": 256,
        "encoder": [(4, 32, 1, 0), (4, 64, 2, 0), (4, 128, 1, 0), (4, 256, 2, 0), (4, 512, 1, 0),
                    (1, 512, 1, 0)],
        "generator_in": (256, 1),  # channels and size of the first feature map
        "generator": [(4, 256, 1, 0), (4, 128, 2, 0), (4, 64, 1, 0), (4, 32, 2, 0), (5, 32, 1, 0),
                      (1, 32, 1, 0)],
        "dx": [(4, 32, 1, 0), (4, 64, 2, 0), (4, 128, 1, 0), (4, 256, 2, 0), (4, 512, 1, 0)],
        "dz": (512, 512),
        "joint": (1024, 1024),
        "slope": 0.01,
    },
    "celeba": {
        "image": (3, 64),
        "latent": 256,
        "encoder": [(2, 64, 1, 0), (7, 128, 2, 0), (5, 256, 2, 0), (7, 256, 2, 0), (4, 512, 1, 0)],
        "generator_in": (256, 1),
        "generator": [(4, 512, 1, 0), (7, 256, 2, 0), (5, 256, 2, 0), (7, 128, 2, 0),
                      (2, 64, 1, 0)],
        "dx": [(2, 64, 1, 0), (7, 128, 2, 0), (5, 256, 2, 0), (7, 256, 2, 0), (4, 512, 1, 0)],
        "dz": (1024, 1024),
        "joint": (2048, 2048),
        "slope": 0.02,
    },
    "digits": {
        "image": (1, 16),
        "latent": 32,
        "encoder": [(3, 32, 1, 1), (4, 64, 2, 1), (4, 128, 2, 1), (4, 256, 1, 0)],
        "generator_in": (32, 1),
        "generator": [(4, 128, 1, 0), (4, 64, 2, 1), (4, 32, 2, 1), (3, 32, 1, 1)],
        "dx": [(3, 32, 1, 1), (4, 64, 2, 1), (4, 128, 2, 1), (4, 256, 1, 0)],
        "dz": (256, 256),
        "joint": (512, 512),
        "slope": 0.2,
    },
}  # fmt: skip


def available_archs() -> list[str]:
    """Names accepted by :func:`build_ali_models`."""
    return sorted(_ARCHS)


def _arch(name: str) -> dict:
    if name not in _ARCHS:
        raise ConfigError(
            f"unknown architecture {name!r}; available: {', '.join(available_archs())}"
        )
    return _ARCHS[name]


def arch_image_shape(name: str, channels: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images an architecture takes."""
    c, size = _arch(name)["image"]
    return (channels or c, size, size)


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class GaussianEncoder(nn.Module):
    """ALI's encoder ``G_z(x)``: convolutions with batch norm and leaky ReLUs.

    ``forward(x)`` returns ``(mu, log_sigma)``, each ``[B, latent_dim]`` (the library samples
    ``z = mu + exp(log_sigma) * eps``), or ``z`` itself when ``deterministic`` (BiGAN).
    """

    def __init__(
        self,
        channels: int,
        layers: Sequence[tuple[int, int, int, int]],
        latent_dim: int,
        slope: float,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        blocks = []
        for kernel, width, stride, padding in layers:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, kernel, stride, padding, bias=False),
                    nn.BatchNorm2d(width),
                    nn.LeakyReLU(slope),
                )
            )
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.deterministic = deterministic
        self.latent_dim = latent_dim
        self.out = nn.Conv2d(channels, latent_dim if deterministic else 2 * latent_dim, 1)
        _init(self)

    def _run(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return hidden, self.out(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        _, out = self._run(x)
        if self.deterministic:
            return out
        mu, log_sigma = out.chunk(2, dim=1)
        return mu, log_sigma

    def hidden_features(self, x: Tensor) -> list[Tensor]:
        """The last three hidden layers' activations and the output mean, each ``[B, d]``
        (the representation the linear SVM evaluation reads, DESIGN.md section 6)."""
        hidden, out = self._run(x)
        mean = out if self.deterministic else out.chunk(2, dim=1)[0]
        return [h.flatten(1) for h in hidden[-3:]] + [mean]


class Generator(nn.Module):
    """ALI's generator ``G_x(z)``: transposed convolutions with batch norm, ending in tanh."""

    def __init__(
        self,
        channels: int,
        layers: Sequence[tuple[int, int, int, int]],
        latent_dim: int,
        input_map: tuple[int, int],
        image_size: int,
        slope: float,
    ) -> None:
        super().__init__()
        map_channels, map_size = input_map
        self.latent_dim = latent_dim
        self.project = (
            nn.Identity() if (map_channels, map_size) == (latent_dim, 1)
            else nn.Linear(latent_dim, map_channels * map_size * map_size)
        )  # fmt: skip
        self.input_map = input_map
        blocks: list[nn.Module] = []
        width_in = map_channels
        for kernel, width, stride, padding in layers:
            blocks += [
                nn.ConvTranspose2d(width_in, width, kernel, stride, padding, bias=False),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(slope),
            ]
            width_in = width
        self.body = nn.Sequential(*blocks)
        self.output = nn.Conv2d(width_in, channels, 1)
        self.image_size = image_size
        _init(self)

    def forward(self, z: Tensor) -> Tensor:
        c, s = self.input_map
        x = self.project(z.flatten(1)).view(z.shape[0], c, s, s)
        return torch.tanh(self.output(self.body(x)))

    def init_output_bias(self, data_mean: float) -> None:
        """Set the output bias to ``0.5 * logit(data_mean)`` (authors' code), so that
        ``tanh`` of it is ``2 * data_mean - 1``, the data's mean on the [-1, 1] scale."""
        m = min(max(float(data_mean), 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.output.bias.fill_(0.5 * math.log(m / (1 - m)))


class ImageFeatures(nn.Module):
    """``Dx``: spectrally normalised convolutions, ``[N, C, H, W] -> [N, out_features]``.

    No batch-dependent layers, so it can run once over many concatenated image tensors.
    """

    def __init__(
        self,
        channels: int,
        layers: Sequence[tuple[int, int, int, int]],
        image_size: int,
        slope: float,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for kernel, width, stride, padding in layers:
            blocks += [
                spectral_norm(nn.Conv2d(channels, width, kernel, stride, padding)),
                nn.LeakyReLU(slope),
            ]
            channels = width
        blocks.append(nn.Flatten())
        self.net = nn.Sequential(*blocks)
        _init(self)
        with torch.no_grad():
            self.out_features = int(
                self.net(torch.zeros(1, blocks[0].in_channels, image_size, image_size)).shape[1]
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LatentFeatures(nn.Module):
    """``Dz``: a spectrally normalised MLP, ``[N, latent_dim] -> [N, out_features]``."""

    def __init__(self, latent_dim: int, widths: Sequence[int], slope: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = latent_dim
        for width in widths:
            layers += [spectral_norm(nn.Linear(width_in, width)), nn.LeakyReLU(slope)]
            width_in = width
        self.net = nn.Sequential(*layers)
        self.out_features = width_in
        _init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


@dataclass
class ALIModels:
    """The networks of one architecture; the joint MLP is built by the head from
    ``joint_hidden``."""

    encoder: GaussianEncoder
    generator: Generator
    image_features: ImageFeatures
    latent_features: LatentFeatures
    joint_hidden: tuple[int, ...]
    image_shape: tuple[int, int, int]
    latent_dim: int


def build_ali_models(
    arch: str,
    latent_dim: int | None = None,
    channels: int | None = None,
    deterministic: bool = False,
) -> ALIModels:
    """E, G, ``Dx`` and ``Dz`` of ``arch`` (``"digits"``, ``"svhn"``, ``"celeba"``)."""
    spec = _arch(arch)
    c, size = spec["image"]
    c = channels or c
    latent = latent_dim or spec["latent"]
    slope = spec["slope"]
    generator_in = spec["generator_in"]
    if generator_in[1] == 1:
        generator_in = (latent, 1)
    models = ALIModels(
        encoder=GaussianEncoder(c, spec["encoder"], latent, slope, deterministic),
        generator=Generator(c, spec["generator"], latent, generator_in, size, slope),
        image_features=ImageFeatures(c, spec["dx"], size, slope),
        latent_features=LatentFeatures(latent, spec["dz"], slope),
        joint_hidden=tuple(spec["joint"]),
        image_shape=(c, size, size),
        latent_dim=latent,
    )
    with torch.no_grad():
        out = models.generator(torch.zeros(2, latent))
    if tuple(out.shape[1:]) != (c, size, size):
        raise ConfigError(f"arch {arch!r} generates {list(out.shape[1:])}, not {[c, size, size]}")
    return models
