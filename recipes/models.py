"""ALI's encoder, generator and discriminator feature networks, with GALI's changes.

The networks of Adversarially Learned Inference (Dumoulin et al., ICLR 2017, appendix A, tables
"SVHN model hyperparameters" and "CelebA model hyperparameters"), as GALI uses them (Dandi et al.,
AAAI 2021, "Architecture and Setup"; docs/design.md, section 4):

- ``G_z(x)``, :class:`GaussianEncoder`: convolutions with batch norm and leaky ReLUs, giving the
  mean and log standard deviation of ``q(z | x) = N(mu(x), diag(exp(2 log_sigma(x))))``.
- ``G_x(z)``, :class:`Generator`: transposed convolutions with batch norm and leaky ReLUs, ending
  in ``tanh`` (ALI ends in a sigmoid; GALI uses tanh and images in [-1, 1]).
- ``D(x)``, :class:`ImageFeatures` and ``D(z)``, :class:`LatentFeatures`: the discriminator's
  feature networks, with spectral normalisation instead of ALI's batch norm and dropout.
- ``D(x, z)``: the joint MLP, built by :class:`gali_ext.head.MultiClassJointDiscriminatorHead`
  from :attr:`ALIModels.joint_hidden`.

Three sizes, by name in :func:`build_ali_models`: ``"svhn"`` (3 x 32 x 32) and ``"celeba"``
(3 x 64 x 64) follow ALI's tables; ``"digits"`` (1 x 16 x 16) is a small DCGAN-like net of the
same shape, small enough to train on a CPU.

Weights start from ``N(0, sigma^2)`` and biases from 0, as in DCGAN and ALI. ALI's tables give
``sigma = 0.01`` (used for ``"svhn"`` and ``"celeba"``); DCGAN's ``sigma = 0.02`` is used for
``"digits"``. Batch-norm layers keep PyTorch's (and Blocks') initialisation, scale 1 and shift 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from gali_ext.errors import ConfigError, ShapeError

__all__ = [
    "ALIModels",
    "Architecture",
    "ConvLayer",
    "GaussianEncoder",
    "Generator",
    "ImageFeatures",
    "LatentFeatures",
    "OUTPUT_BIASES",
    "arch_image_shape",
    "architecture",
    "available_archs",
    "build_ali_models",
    "init_weights",
]


class ConvLayer(NamedTuple):
    """One row of an architecture table: a convolution (or a transposed one) with its settings.

    Output size: ``(n + 2p - k) // s + 1`` for a convolution and ``(n - 1) s - 2p + k`` for a
    transposed convolution, with kernel ``k``, stride ``s`` and padding ``p``.
    """

    kernel: int
    channels: int
    stride: int = 1
    padding: int = 0
    transposed: bool = False

    def out_size(self, size: int) -> int:
        """Spatial size of the output for an input of spatial size ``size``."""
        k, s, p = self.kernel, self.stride, self.padding
        return (size - 1) * s - 2 * p + k if self.transposed else (size + 2 * p - k) // s + 1

    def build(self, in_channels: int, bias: bool) -> nn.Conv2d | nn.ConvTranspose2d:
        """The ``nn.Conv2d`` (or ``nn.ConvTranspose2d``) of this row."""
        cls = nn.ConvTranspose2d if self.transposed else nn.Conv2d
        return cls(in_channels, self.channels, self.kernel, self.stride, self.padding, bias=bias)


def _c(kernel: int, channels: int, stride: int = 1, padding: int = 0) -> ConvLayer:
    return ConvLayer(kernel, channels, stride, padding)


def _t(kernel: int, channels: int, stride: int = 1, padding: int = 0) -> ConvLayer:
    return ConvLayer(kernel, channels, stride, padding, transposed=True)


@dataclass(frozen=True)
class Architecture:
    """The layers of one reference architecture (ALI's appendix A tables): image shape, default
    latent size, E's and G's convolutions, D(x)'s convolutions, D(z)'s and the joint's widths,
    the leaky ReLU slope and the standard deviation of the initial weights."""

    image_shape: tuple[int, int, int]
    latent_dim: int
    encoder: tuple[ConvLayer, ...]
    generator: tuple[ConvLayer, ...]  # the 1x1 output convolution to C channels is implicit
    image_features: tuple[ConvLayer, ...]
    latent_features: tuple[int, ...]
    joint_hidden: tuple[int, ...]
    negative_slope: float
    init_std: float


# ALI, appendix A, table "SVHN model hyperparameters (unsupervised)"; the same layers are in the
# authors' experiments/ali_svhn.py. Leaky ReLU slope 0.01, N(0, 0.01) weights. D's dropout (0.2)
# and batch norm are replaced by spectral normalisation.
_SVHN = Architecture(
    image_shape=(3, 32, 32),
    latent_dim=256,
    encoder=(_c(5, 32), _c(4, 64, 2), _c(4, 128), _c(4, 256, 2), _c(4, 512), _c(1, 512)),
    generator=(
        _t(4, 256),
        _t(4, 128, 2),
        _t(4, 64),
        _t(4, 32, 2),
        _t(5, 32),
        _c(1, 32),
    ),
    image_features=(_c(5, 32), _c(4, 64, 2), _c(4, 128), _c(4, 256, 2), _c(4, 512)),
    latent_features=(512, 512),
    joint_hidden=(1024, 1024),
    negative_slope=0.01,
    init_std=0.01,
)

# ALI, appendix A, table "CelebA model hyperparameters (unsupervised)". Slope 0.02, N(0, 0.01).
# The table is not self-consistent about the latent size: G_z(x) ends in 512 linear channels
# (mean and log sigma, as the 512 = 2 x 256 of SVHN), while it gives G_x(z) and D(z) a 512 x 1 x 1
# input (and D(x, z) a 1024-wide one, copied from SVHN, where 512 + 1024 would be 1536). We read
# the encoder's row: a 256-dimensional latent, as ALI's released code (NLAT = 256) uses.
_CELEBA = Architecture(
    image_shape=(3, 64, 64),
    latent_dim=256,
    encoder=(_c(2, 64), _c(7, 128, 2), _c(5, 256, 2), _c(7, 256, 2), _c(4, 512)),
    generator=(
        _t(4, 512),
        _t(7, 256, 2),
        _t(5, 256, 2),
        _t(7, 128, 2),
        _t(2, 64),
    ),
    image_features=(_c(2, 64), _c(7, 128, 2), _c(5, 256, 2), _c(7, 256, 2), _c(4, 512)),
    latent_features=(1024, 1024),
    joint_hidden=(2048, 2048),
    negative_slope=0.02,
    init_std=0.01,
)

# Not in ALI: a DCGAN-like net for 16 x 16 digits, cheap enough for a CPU. Two 4 x 4 stride-2
# convolutions (16, 32 channels: 16 -> 8 -> 4), a 3 x 3 one (64), then a 4 x 4 one to a 128-wide
# 1 x 1 map, so that the encoder has ALI's shape and the three hidden layers the evaluation reads;
# the generator mirrors it, D(z) and D(x, z) are 128- and 256-wide MLPs. Half the width of the
# 32-64-128-256 variant used before (whose joint MLP alone made a quarter of a GALI-8 step's
# FLOPs): a quarter of its FLOPs and 2 to 2.4 times faster per step on two CPU cores, so that
# `gali-ext study digits` (15 runs) fits in half an hour on a 2-core machine.
_DIGITS = Architecture(
    image_shape=(1, 16, 16),
    latent_dim=32,
    encoder=(_c(4, 16, 2, 1), _c(4, 32, 2, 1), _c(3, 64, 1, 1), _c(4, 128)),
    generator=(_t(4, 64), _t(3, 32, 1, 1), _t(4, 16, 2, 1), _t(4, 16, 2, 1)),
    image_features=(_c(4, 16, 2, 1), _c(4, 32, 2, 1), _c(3, 64, 1, 1), _c(4, 128)),
    latent_features=(128, 128),
    joint_hidden=(256, 256),
    negative_slope=0.2,
    init_std=0.02,
)

_ARCHS: dict[str, Architecture] = {"svhn": _SVHN, "celeba": _CELEBA, "digits": _DIGITS}


def available_archs() -> list[str]:
    """Names accepted by :func:`build_ali_models`, sorted."""
    return sorted(_ARCHS)


def architecture(name: str) -> Architecture:
    """The :class:`Architecture` of a name of :func:`available_archs`; another name is a
    :class:`ConfigError` listing them."""
    if not isinstance(name, str) or name not in _ARCHS:
        raise ConfigError(
            f"unknown architecture {name!r}; available: {', '.join(available_archs())}"
        )
    return _ARCHS[name]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def arch_image_shape(name: str, channels: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images architecture ``name`` takes (``C`` replaced by ``channels``)."""
    c, h, w = architecture(name).image_shape
    return (c if channels is None else _positive_int("channels", channels), h, w)


def init_weights(module: nn.Module, std: float) -> None:
    """DCGAN/ALI initialisation: every convolution's and linear layer's weight from
    ``N(0, std^2)``, its bias 0.

    On a spectrally normalised layer it draws the unnormalised weight (``parametrizations.weight
    .original``); writing to ``layer.weight`` there would change a computed copy and nothing else.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            weight = (
                m.parametrizations.weight.original
                if parametrize.is_parametrized(m, "weight")
                else m.weight
            )
            nn.init.normal_(weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _spatial(layers: Sequence[ConvLayer], size: int) -> list[int]:
    sizes = [size]
    for layer in layers:
        sizes.append(layer.out_size(sizes[-1]))
        if sizes[-1] < 1:
            raise ConfigError(f"the layers {list(layers)} shrink a {size}-pixel side below 1")
    return sizes


def _check_images(who: str, x: Tensor, shape: tuple[int, int, int]) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise ShapeError(
            f"{who} expected images of shape [N, {', '.join(map(str, shape))}], got {list(x.shape)}"
        )


def _check_latents(who: str, z: Tensor, latent_dim: int) -> None:
    if tuple(z.shape[1:]) not in ((latent_dim,), (latent_dim, 1, 1)):
        raise ShapeError(f"{who} expected latents of shape [N, {latent_dim}], got {list(z.shape)}")


class GaussianEncoder(nn.Module):
    """ALI's stochastic encoder ``G_z(x)``: ``q(z | x) = N(mu(x), diag(exp(2 log_sigma(x))))``.

    Convolutions (no bias), each followed by batch norm and a leaky ReLU, mapping the image to a
    1 x 1 map; then a 1 x 1 convolution with bias to ``2 * latent_dim`` channels, split into
    ``mu`` and ``log_sigma``. The sample ``z = mu + exp(log_sigma) * eps`` is drawn by the
    library (:func:`gali_ext.chains.sample_latent`), not here.

    Args:
        image_shape: ``(C, H, W)`` of the input images.
        layers: the hidden convolutions; they must map ``H x W`` to ``1 x 1``.
        latent_dim: the size of ``z``.
        negative_slope: the leaky ReLUs' slope.
        deterministic: a BiGAN encoder instead: ``forward`` returns ``z`` itself, and the output
            convolution has ``latent_dim`` channels.
        init_std: the standard deviation of the initial weights.

    Shapes: ``forward(x: [B, C, H, W]) -> (mu, log_sigma)``, each ``[B, latent_dim]``, or
    ``z: [B, latent_dim]`` when ``deterministic``.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        layers: Sequence[ConvLayer],
        latent_dim: int,
        negative_slope: float = 0.2,
        deterministic: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        heights, widths = _spatial(layers, height), _spatial(layers, width)
        if (heights[-1], widths[-1]) != (1, 1):
            raise ConfigError(
                f"encoder layers map {height} x {width} images to "
                f"{heights[-1]} x {widths[-1]} maps, expected 1 x 1"
            )
        if len(layers) < 3:
            raise ConfigError(f"the encoder needs at least 3 hidden layers, got {len(layers)}")
        blocks = []
        for layer in layers:
            blocks.append(
                nn.Sequential(
                    layer.build(channels, bias=False),
                    nn.BatchNorm2d(layer.channels),
                    nn.LeakyReLU(negative_slope),
                )
            )
            channels = layer.channels
        self.blocks = nn.ModuleList(blocks)
        self.output = nn.Conv2d(channels, latent_dim * (1 if deterministic else 2), 1)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.deterministic = deterministic
        #: widths of :meth:`hidden_features`' four outputs
        self.hidden_dims: tuple[int, ...] = tuple(
            layer.channels * h * w for layer, h, w in zip(layers[-3:], heights[-3:], widths[-3:])
        ) + (latent_dim,)
        init_weights(self, init_std)

    def _run(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        _check_images(type(self).__name__, x, self.image_shape)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return hidden, self.output(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``(mu, log_sigma)``, each ``[B, latent_dim]``; ``z: [B, latent_dim]`` if
        ``deterministic``."""
        _, out = self._run(x)
        if self.deterministic:
            return out
        mu, log_sigma = out.chunk(2, dim=1)
        return mu, log_sigma

    def hidden_features(self, x: Tensor) -> list[Tensor]:
        """The representation the linear-SVM evaluation reads (docs/design.md, section 6).

        The activations of the last three hidden layers (after the leaky ReLU) and the output
        mean ``mu`` (``z`` when deterministic), each flattened to ``[B, d]`` with ``d`` in
        :attr:`hidden_dims`. Call it in eval mode, so that batch norm uses its running statistics.
        """
        hidden, out = self._run(x)
        mean = out if self.deterministic else out.chunk(2, dim=1)[0]
        return [h.flatten(1) for h in hidden[-3:]] + [mean]


OUTPUT_BIASES = ("channel", "pixel")
"""The forms of G's output bias: one per channel (the output convolution's bias) or one per
pixel (a ``[C, H, W]`` parameter added before the tanh, as the authors' SVHN generator)."""


class Generator(nn.Module):
    """ALI's generator ``G_x(z)``: ``x = tanh(a(z))``, images in [-1, 1].

    ``z`` is read as a ``latent_dim x 1 x 1`` map; (transposed) convolutions without bias, each
    followed by batch norm and a leaky ReLU, grow it to ``H x W``; a 1 x 1 convolution,
    :attr:`output`, gives the pre-activation ``a(z)`` with ``C`` channels. Its bias is the
    output convolution's, one per channel (``output_bias="channel"``), or, with
    ``output_bias="pixel"``, a ``[C, H, W]`` parameter :attr:`output_bias` added to a
    convolution without bias: ``x = tanh(conv(h) + b)``, the authors' SVHN generator
    (docs/design.md, section 4.8).

    Args:
        image_shape: ``(C, H, W)`` of the images made, square (``H == W``).
        layers: the hidden layers; they must map ``1 x 1`` to ``H x W``.
        latent_dim: the size of ``z``.
        negative_slope: the leaky ReLUs' slope.
        init_std: the standard deviation of the initial weights.

        num_classes: a class-conditional generator ``G(z, y)`` (docs/design.md, section 9.3):
            the condition, one-hot class ids ``y: [B]`` or float vectors ``[B, num_classes]``,
            is concatenated to ``z`` as ``num_classes`` more input channels.
        output_bias: ``"channel"`` or ``"pixel"`` (:data:`OUTPUT_BIASES`).

    Shapes: ``forward(z: [B, latent_dim]) -> [B, C, H, W]`` (``[B, latent_dim, 1, 1]`` works too);
    ``forward(z, y)`` when conditional.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        layers: Sequence[ConvLayer],
        latent_dim: int,
        negative_slope: float = 0.2,
        init_std: float = 0.02,
        num_classes: int | None = None,
        output_bias: str = "channel",
    ) -> None:
        super().__init__()
        if output_bias not in OUTPUT_BIASES:
            raise ConfigError(
                f"output_bias must be one of {', '.join(OUTPUT_BIASES)}, got {output_bias!r}"
            )
        out_channels, height, width = image_shape
        side = _spatial(layers, 1)[-1]
        if (side, side) != (height, width):
            raise ConfigError(
                f"generator layers map 1 x 1 to {side} x {side}, expected {height} x {width}"
            )
        blocks: list[nn.Module] = []
        channels = latent_dim + (num_classes or 0)
        for layer in layers:
            blocks += [
                layer.build(channels, bias=False),
                nn.BatchNorm2d(layer.channels),
                nn.LeakyReLU(negative_slope),
            ]
            channels = layer.channels
        self.body = nn.Sequential(*blocks)
        per_pixel = output_bias == "pixel"
        self.output = nn.Conv2d(channels, out_channels, 1, bias=not per_pixel)
        #: the per-pixel bias ``[C, H, W]`` (``output_bias="pixel"``), else None
        self.output_bias = nn.Parameter(torch.zeros(image_shape)) if per_pixel else None
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        #: ``"channel"`` or ``"pixel"``: where the output bias lives
        self.output_bias_mode = output_bias
        init_weights(self, init_std)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """``tanh(a(z))`` (``tanh(a(z, y))`` when conditional): ``[B, latent_dim] -> [B, C, H,
        W]``."""
        _check_latents(type(self).__name__, z, self.latent_dim)
        z = z.reshape(z.shape[0], self.latent_dim, 1, 1)
        if self.num_classes is not None:
            z = torch.cat([z, self._condition(y, z)], 1)
        elif y is not None:
            raise ShapeError("this generator is unconditional (num_classes=None); it takes no y")
        out = self.output(self.body(z))
        return torch.tanh(out if self.output_bias is None else out + self.output_bias)

    def _condition(self, y: Tensor | None, z: Tensor) -> Tensor:
        """The condition as ``[B, num_classes, 1, 1]`` input channels."""
        n = self.num_classes
        assert n is not None
        if y is None:
            raise ShapeError(
                f"this generator is class-conditional: call it as generator(z, y) "
                f"with y class ids [B] or vectors [B, {n}]"
            )
        if not y.is_floating_point():
            y = torch.nn.functional.one_hot(y.long(), n)
        if y.shape != (z.shape[0], n):
            raise ShapeError(
                f"expected the condition y as [{z.shape[0]}] class ids or "
                f"[{z.shape[0]}, {n}] vectors, got {list(y.shape)}"
            )
        return y.to(z.dtype).view(z.shape[0], n, 1, 1)

    def init_output_bias(self, data_mean: float | Tensor) -> None:
        """Start the output near the data's mean pixel (the authors' code does this).

        Sets the output bias to ``b = logit(m) / 2``, with ``m = data_mean`` the mean pixel on
        the [0, 1] scale: a number (every bias, clamped to ``[1e-3, 1 - 1e-3]``), or a tensor
        of the bias's shape (``[C]`` per channel, ``[C, H, W]`` per pixel; clamped to
        ``[1e-7, 1 - 1e-7]``, as the authors clamp theirs). Since ``tanh(logit(m) / 2) = 2 m -
        1``, a generator whose pre-activation is otherwise zero outputs the data's mean on the
        [-1, 1] scale (ALI's sigmoid output: ``sigmoid(logit(m)) = m``). See also
        :meth:`init_output_bias_from_batch`.
        """
        bias = self.output_bias if self.output_bias is not None else self.output.bias
        if isinstance(data_mean, Tensor):
            m = data_mean.detach().to(bias.device, torch.float64)
            if m.shape != bias.shape or not bool(((m >= 0) & (m <= 1)).all()):
                raise ShapeError(
                    f"data_mean must be the mean pixels in [0, 1] of shape {list(bias.shape)} "
                    f"(the {self.output_bias_mode} bias's), got {list(m.shape)}"
                )
            m = m.clamp(1e-7, 1.0 - 1e-7)
            with torch.no_grad():
                bias.copy_(0.5 * torch.log(m / (1.0 - m)))
            return
        m = float(data_mean)
        if not (0.0 <= m <= 1.0):  # also rejects NaN
            raise ShapeError(
                f"data_mean must be the mean pixel value in [0, 1], got {data_mean!r} "
                "(images in [-1, 1]? pass (mean + 1) / 2)"
            )
        m = min(max(m, 1e-3), 1.0 - 1e-3)
        with torch.no_grad():
            bias.fill_(0.5 * math.log(m / (1.0 - m)))

    def init_output_bias_from_batch(self, images: Tensor) -> Tensor:
        """The authors' initialisation of G's output bias from the first training batch:
        ``b = 0.5 log(p / (1 - p))`` with ``p`` the batch's mean of ``(x + 1) / 2`` (images
        ``x: [B, C, H, W]`` in [-1, 1]) per pixel (``output_bias="pixel"``) or per channel,
        clamped to ``[1e-7, 1 - 1e-7]`` (eq. 4.3 of docs/design.md). Returns ``p``."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ShapeError(
                f"expected images of shape [B, {', '.join(map(str, self.image_shape))}], got "
                f"{list(images.shape)}"
            )
        p = ((images.detach().double() + 1) / 2).mean(0)
        p = p if self.output_bias is not None else p.mean((1, 2))
        self.init_output_bias(p.clamp(0.0, 1.0))
        return p


class ImageFeatures(nn.Module):
    """``D(x)``: the discriminator's image features, ``[N, C, H, W] -> [N, out_features]``.

    ALI's ``D(x)`` convolutions, each followed by a leaky ReLU, with spectral normalisation
    (``W / sigma_max(W)``, Miyato et al. 2018) instead of batch norm and dropout, then flattened.
    There is no batch-dependent layer: the head runs it once on the concatenation of all the
    distinct images of a step, and each row's features depend on that row alone. (In training
    mode each call also runs one power iteration of every spectral norm, another reason to call
    it once per step.)

    Args:
        image_shape: ``(C, H, W)`` of the input images.
        layers: the convolutions.
        negative_slope: the leaky ReLUs' slope.
        init_std: the standard deviation of the initial weights (before normalisation).

    Attributes:
        out_features: ``d_x``, the width of the flattened output.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        layers: Sequence[ConvLayer],
        negative_slope: float = 0.2,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        h, w = _spatial(layers, height)[-1], _spatial(layers, width)[-1]
        blocks: list[nn.Module] = []
        for layer in layers:
            conv = layer.build(channels, bias=True)
            init_weights(conv, init_std)
            blocks += [spectral_norm(conv), nn.LeakyReLU(negative_slope)]
            channels = layer.channels
        self.net = nn.Sequential(*blocks, nn.Flatten())
        self.image_shape = tuple(image_shape)
        self.out_features: int = channels * h * w

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, out_features]``."""
        _check_images(type(self).__name__, x, self.image_shape)
        return self.net(x)


class LatentFeatures(nn.Module):
    """``D(z)``: the discriminator's latent features, ``[N, latent_dim] -> [N, out_features]``.

    ALI's ``D(z)`` (1 x 1 convolutions on a ``latent_dim x 1 x 1`` map, i.e. linear layers), each
    followed by a leaky ReLU, with spectral normalisation instead of dropout.

    Args:
        latent_dim: the size of ``z``.
        widths: the layers' output widths.
        negative_slope: the leaky ReLUs' slope.
        init_std: the standard deviation of the initial weights (before normalisation).

    Attributes:
        out_features: ``d_z``, the last width.
    """

    def __init__(
        self,
        latent_dim: int,
        widths: Sequence[int],
        negative_slope: float = 0.2,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not widths:
            raise ConfigError("LatentFeatures needs at least one layer width")
        layers: list[nn.Module] = []
        width_in = latent_dim
        for width in widths:
            linear = nn.Linear(width_in, width)
            init_weights(linear, init_std)
            layers += [spectral_norm(linear), nn.LeakyReLU(negative_slope)]
            width_in = width
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        self.out_features: int = width_in

    def forward(self, z: Tensor) -> Tensor:
        """``[N, latent_dim] -> [N, out_features]`` (``[N, latent_dim, 1, 1]`` works too)."""
        _check_latents(type(self).__name__, z, self.latent_dim)
        return self.net(z.flatten(1))


@dataclass
class ALIModels:
    """The networks of one architecture, from :func:`build_ali_models`.

    The joint MLP ``D(x, z)`` is built by the head from :attr:`joint_hidden` (and, to follow
    ALI, :attr:`negative_slope`); GALI-8 doubles its input width (paper, appendix).

    Attributes:
        encoder: ``G_z(x)``.
        generator: ``G_x(z)``.
        image_features: ``D(x)``, ``[N, C, H, W] -> [N, image_features.out_features]``.
        latent_features: ``D(z)``, ``[N, latent_dim] -> [N, latent_features.out_features]``.
        joint_hidden: the hidden widths of the joint MLP ``D(x, z)``.
        image_shape: ``(C, H, W)``.
        latent_dim: the size of ``z``.
        negative_slope: the leaky ReLU slope of the architecture's table.
        num_classes: the classes of a class-conditional generator ``G(z, y)``, and of the
            head's projection terms (``build_gali`` reads it); None when unconditional.
    """

    encoder: GaussianEncoder
    generator: Generator
    image_features: ImageFeatures
    latent_features: LatentFeatures
    joint_hidden: tuple[int, ...]
    image_shape: tuple[int, int, int]
    latent_dim: int
    negative_slope: float = 0.2
    num_classes: int | None = None


def build_ali_models(
    arch: str,
    latent_dim: int | None = None,
    channels: int | None = None,
    deterministic: bool = False,
    num_classes: int | None = None,
    output_bias: str = "channel",
) -> ALIModels:
    """The encoder, generator, ``D(x)`` and ``D(z)`` of architecture ``arch``.

    Args:
        arch: one of :func:`available_archs` (``"celeba"``, ``"digits"``, ``"svhn"``).
        latent_dim: the size of ``z``; the architecture's (256, 32, 256) when omitted.
        channels: image channels, e.g. 1 for grayscale; the architecture's when omitted.
        deterministic: a deterministic (BiGAN) encoder returning ``z`` instead of
            ``(mu, log_sigma)``.
        num_classes: a class-conditional generator over this many classes (and, through
            ``build_gali``, a head with projection terms); None: unconditional.
        output_bias: G's output bias, ``"channel"`` or ``"pixel"`` (:class:`Generator`).

    Raises:
        ConfigError: an unknown ``arch`` (the message lists the available ones), or a
            ``latent_dim`` or ``channels`` that is not a positive int.
    """
    spec = architecture(arch)
    latent = spec.latent_dim if latent_dim is None else _positive_int("latent_dim", latent_dim)
    image_shape = arch_image_shape(arch, channels)
    slope, std = spec.negative_slope, spec.init_std
    if num_classes is not None:
        num_classes = _positive_int("num_classes", num_classes)
    return ALIModels(
        encoder=GaussianEncoder(image_shape, spec.encoder, latent, slope, deterministic, std),
        generator=Generator(
            image_shape, spec.generator, latent, slope, std, num_classes, output_bias
        ),
        image_features=ImageFeatures(image_shape, spec.image_features, slope, std),
        latent_features=LatentFeatures(latent, spec.latent_features, slope, std),
        joint_hidden=spec.joint_hidden,
        image_shape=image_shape,
        latent_dim=latent,
        negative_slope=slope,
        num_classes=num_classes,
    )
