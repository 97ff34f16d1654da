"""A project written the way the common public BigBiGAN PyTorch port is, switched to GALI-8.

The project (everything but :func:`gali_objective` and the two lines marked in :func:`train`)
is the user's own, laid out as that port lays out BigBiGAN (Donahue & Simonyan 2019), at the
scale of 16x16 digits:

- one ``nn.Module``, :class:`BigBiGAN`, holds the generator, the encoder and the three parts of
  the discriminator as attributes (``model.img_discriminator``, ``model.latent_discriminator``,
  ``model.comb_discriminator``); ``model.get_disc_params()`` is what the D optimizer trains,
  ``model.get_gen_enc_params()`` what the E/G optimizer trains, ``model.req_grad_disc(flag)``
  freezes D for the E/G step, and ``torch.save(model.state_dict())`` is the checkpoint;
- the image network returns ``(F(x), s_x)`` with the projection of the class inside its
  ``forward``; the latent network ``(H(z), s_z)``; the joint ``CombDisc.forward(img, latent)``
  concatenates its two arguments and runs a stack of residual MLP blocks, each reading its
  input twice (``linear1`` on the main path, ``skip_linear`` on the skip path), to ``s_xz``;
- a RevNet-style encoder whose bottleneck blocks hold a skip convolution they use only when the
  shapes change, which they never do here: those parameters are never trained, before or after
  the switch;
- the hinge losses ``(h(s) + h(-s'))/3`` and ``(s - s')/3`` summed over the three scores, a
  truncated-normal sampler, and a loop of one D step on detached samples, then one E/G step
  with D frozen.

:func:`gali_objective` is the switch, eight lines: the image and latent networks as feature
networks whose own scores (projection included) become unary heads, the joint widened in place
for GALI-8's two (image, latent) pairs and called with the images' features in its first
argument and the latents' in its second (``inputs="by_kind"``), the head registered in the D's
modules through the parameters the project's D optimizer takes, the hinge family and the
project's sampler. In :func:`train`, two lines change (the D loss and the E/G loss).

Run it: ``python -m gali_ext.adapters.examples.bigbigan_port``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali_ext import (
    GALI,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    MultiClassJointDiscriminatorHead,
    build_spec,
)
from gali_ext.adapters import FeatureNetwork, JointNetwork, baseline_of, check, widen_input
from gali_ext.providers import ReconstructionChain

from .digits import digits_batches

LATENT_DIM = 16
NUM_CLASSES = 10
IMG_FEATURES = 32  # width of F(x)
LATENT_FEATURES = 64  # width of H(z)
COMB_FEATURES = 64  # width of the joint's MLP


# -- layers ---------------------------------------------------------------------------------


class SpectralLinear(nn.Module):
    """A linear layer, spectrally normalised when ``sn`` (the port wraps every layer so)."""

    def __init__(self, in_features: int, out_features: int, sn: bool = True) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)
        if sn:
            self.layer = nn.utils.spectral_norm(self.layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class SpectralConv(nn.Module):
    """A 2-d convolution, spectrally normalised when ``sn``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int = 0, sn=True) -> None:
        super().__init__()
        self.layer = nn.Conv2d(in_ch, out_ch, kernel, padding=padding)
        if sn:
            self.layer = nn.utils.spectral_norm(self.layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class LinearResnetBlock(nn.Module):
    """``y = a(linear2(a(linear1(x)))) + a(skip_linear(x))``: the input is read twice."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0, sn: bool = True) -> None:
        super().__init__()
        self.linear1 = SpectralLinear(in_dim, out_dim, sn)
        self.dropout1 = nn.Dropout(dropout)
        self.leaky_relu1 = nn.LeakyReLU(0.3)
        self.linear2 = SpectralLinear(out_dim, out_dim, sn)
        self.dropout2 = nn.Dropout(dropout)
        self.leaky_relu2 = nn.LeakyReLU(0.3)
        self.skip_linear = SpectralLinear(in_dim, out_dim, sn)
        self.skip_leaky_relu = nn.LeakyReLU(0.3)

    def forward(self, x: Tensor) -> Tensor:
        x_skip = self.skip_leaky_relu(self.skip_linear(x))
        y = self.leaky_relu1(self.dropout1(self.linear1(x)))
        y = self.leaky_relu2(self.dropout2(self.linear2(y)))
        return y + x_skip


class DownResnetBlock(nn.Module):
    """Halves the spatial size: two convolutions and a 1x1 skip convolution, average-pooled."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.skip_conv = SpectralConv(in_ch, out_ch, 1)
        self.conv1 = SpectralConv(in_ch, out_ch, 3, padding=1)
        self.conv2 = SpectralConv(out_ch, out_ch, 3, padding=1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        x_skip = self.pool(self.skip_conv(x))
        y = self.conv2(F.relu(self.conv1(F.relu(x))))
        return self.pool(y) + x_skip


class BottleneckResnetBlock(nn.Module):
    """A residual block whose skip convolution runs only when the shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.skip_conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        if x.shape[1] != y.shape[1] or self.stride > 1:
            x = self.skip_conv(x)
        return y + x


class RevNetBlock(nn.Module):
    """A reversible block: ``(x1, x2) -> (x1 + f(x2), x2)`` over the two halves of the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res_block = BottleneckResnetBlock(channels // 2, channels // 2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return torch.cat([x1 + self.res_block(x2), x2], dim=1)


class RevPaddingLayer(nn.Module):
    """Halves the spatial size and doubles the channels with zeros on both sides."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 3, stride=2, padding=1)
        zeros_left, zeros_right = torch.zeros_like(x).chunk(2, dim=1)
        return torch.cat([zeros_left, x, zeros_right], dim=1)


# -- networks -------------------------------------------------------------------------------


class RevNetEncoder(nn.Module):
    """``x [B, 1, 16, 16] -> z [B, 16]``: a stem, six reversible blocks, two residual MLP
    blocks and ``z = mu + softplus(s) * eps``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        for i, channels in enumerate([16, 16, 16, 32, 32, 32]):
            if i == 3:
                blocks.append(RevPaddingLayer())
            blocks.append(RevNetBlock(channels))
        self.rev_blocks = nn.Sequential(*blocks)
        self.res_lin1 = LinearResnetBlock(32, 64, sn=False)
        self.res_lin2 = LinearResnetBlock(64, 64, sn=False)
        self.linear_dist_params = nn.Linear(64, 2 * LATENT_DIM)

    def forward(self, x: Tensor) -> Tensor:
        y = self.rev_blocks(self.conv(x)).mean(dim=[-2, -1])
        y = self.linear_dist_params(self.res_lin2(self.res_lin1(y)))
        mu, unnormed_std = y.split(LATENT_DIM, dim=1)
        return mu + F.softplus(unnormed_std) * torch.randn_like(mu)


class Generator(nn.Module):
    """``G(z, cls)``: ``[B, 16]`` and class ids -> ``[B, 1, 16, 16]`` in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_CLASSES, 16)
        self.linear = nn.Linear(LATENT_DIM + 16, 64 * 4 * 4)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(32, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor, cls: Tensor) -> Tensor:
        h = self.linear(torch.cat([z, self.embedding(cls)], dim=1))
        return self.blocks(h.view(-1, 64, 4, 4))


class DiscBigGAN(nn.Module):
    """``F`` and ``s_x``: ``x, cls -> (F(x) [B, 32], s_x [B, 1])``, the projection of the class
    computed in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.Sequential(DownResnetBlock(1, 16), DownResnetBlock(16, 32))
        self.linear = SpectralLinear(IMG_FEATURES, 1)
        self.cls_embedding = nn.Embedding(NUM_CLASSES, IMG_FEATURES)

    def forward(self, x: Tensor, cls: Tensor) -> tuple[Tensor, Tensor]:
        features = F.relu(self.down_blocks(x)).sum(dim=[-2, -1])
        score = self.linear(features)
        score = score + (self.cls_embedding(cls) * features).sum(dim=-1, keepdim=True)
        return features, score


class DiscMLP(nn.Module):
    """A stack of residual MLP blocks (``mpls``) and a score layer (``linear``)."""

    def __init__(self, in_dim: int, mlp_dim: int, n_blocks: int = 2, dropout: float = 0.2):
        super().__init__()
        widths = [in_dim] + [mlp_dim] * n_blocks
        self.mpls = nn.Sequential(
            *[LinearResnetBlock(a, b, dropout) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.linear = SpectralLinear(mlp_dim, 1)


class LatentDisc(DiscMLP):
    """``H`` and ``s_z``: ``z -> (H(z) [B, 64], s_z [B, 1])``."""

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        features = self.mpls(z)
        return features, self.linear(features)


class CombDisc(DiscMLP):
    """``J`` and ``s_xz``: ``(F(x), H(z)) -> s_xz [B, 1]``, concatenated inside."""

    def forward(self, img: Tensor, latent: Tensor) -> Tensor:
        return self.linear(self.mpls(torch.cat([img, latent], dim=-1)))


class BigBiGAN(nn.Module):
    """The whole model: G, E and the three parts of D; ``forward`` gives the six scores."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = Generator()
        self.encoder = RevNetEncoder()
        self.img_discriminator = DiscBigGAN()
        self.latent_discriminator = LatentDisc(LATENT_DIM, LATENT_FEATURES)
        self.comb_discriminator = CombDisc(IMG_FEATURES + LATENT_FEATURES, COMB_FEATURES)

    def forward(self, img_real, img_gen, z_noise, z_img, cls) -> dict[str, Tensor]:
        img_real_out, img_real_score = self.img_discriminator(img_real, cls)
        img_gen_out, img_gen_score = self.img_discriminator(img_gen, cls)
        z_noise_out, z_noise_score = self.latent_discriminator(z_noise)
        z_img_out, z_img_score = self.latent_discriminator(z_img)
        return {
            "img_real_score": img_real_score,
            "img_gen_score": img_gen_score,
            "z_noise_score": z_noise_score,
            "z_img_score": z_img_score,
            "comb_real_score": self.comb_discriminator(img_real_out, z_img_out),
            "comb_gen_score": self.comb_discriminator(img_gen_out, z_noise_out),
        }

    def generate_imgs(self, cls: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if noise is None:
            noise = truncated_normal((len(cls), LATENT_DIM))
        return self.generator(noise, cls), noise

    def generate_latent(self, img: Tensor) -> Tensor:
        return self.encoder(img)

    def req_grad_disc(self, req_grad: bool) -> None:
        for p in self.get_disc_params():
            p.requires_grad = req_grad

    def get_disc_params(self) -> list[nn.Parameter]:
        return (
            list(self.comb_discriminator.parameters())
            + list(self.latent_discriminator.parameters())
            + list(self.img_discriminator.parameters())
        )

    def get_gen_enc_params(self) -> list[nn.Parameter]:
        return list(self.generator.parameters()) + list(self.encoder.parameters())


def truncated_normal(shape, threshold: float = 2.0) -> Tensor:
    """The project's prior: N(0, I) truncated to [-threshold, threshold]."""
    return nn.init.trunc_normal_(torch.empty(shape), a=-threshold, b=threshold)


def disc_loss(output: dict[str, Tensor]) -> Tensor:
    """The project's D loss: the hinge on the three scores, ``(h(s) + h(-s')) / 3``."""
    real = sum(F.relu(1 - output[f"{k}_real_score"]) for k in ("img", "comb"))
    real = real + F.relu(1 - output["z_img_score"])
    fake = sum(F.relu(1 + output[f"{k}_gen_score"]) for k in ("img", "comb"))
    fake = fake + F.relu(1 + output["z_noise_score"])
    return (real.mean() + fake.mean()) / 3


def gen_enc_loss(output: dict[str, Tensor]) -> Tensor:
    """The project's E/G loss, ``(s - s') / 3`` on the three scores."""
    real = output["img_real_score"] + output["z_img_score"] + output["comb_real_score"]
    fake = output["img_gen_score"] + output["z_noise_score"] + output["comb_gen_score"]
    return (real.mean() - fake.mean()) / 3


# -- the switch -----------------------------------------------------------------------------


def gali_objective(model: BigBiGAN) -> GALI:
    """The switch: the project's model as a GALI-8 objective."""
    # every line below is the glue
    image = FeatureNetwork(model.img_discriminator, output=0, score=1, condition="cls")
    latent = FeatureNetwork(model.latent_discriminator, output=0, score=1)
    joint = JointNetwork(
        widen_input(model.comb_discriminator, 2), inputs="by_kind", features="mpls"
    )
    head = MultiClassJointDiscriminatorHead(
        build_spec("gali8"), image, latent, joint=joint, discriminator=model.get_disc_params()
    )
    return GALI(
        model.encoder,
        model.generator,
        head,
        [ReconstructionChain()],
        prior=truncated_normal,
        discriminator_criterion=HingeDiscriminatorLoss(),
        generator_criterion=HingeGeneratorLoss(),
    )


# -- the project's loop and checkpoints -----------------------------------------------------


def build(switch: bool = False, seed: int = 0):
    """The project's model and optimizers, switched to GALI-8 when ``switch``:
    ``(model, gali or None, opt_d, opt_ge)``."""
    torch.manual_seed(seed)
    model = BigBiGAN()
    gali = gali_objective(model) if switch else None
    opt_d = torch.optim.Adam(model.get_disc_params(), 2e-4, betas=(0.5, 0.999))
    opt_ge = torch.optim.Adam(model.get_gen_enc_params(), 2e-4, betas=(0.5, 0.999))
    return model, gali, opt_d, opt_ge


def train_step(model, gali, opt_d, opt_ge, x: Tensor, y: Tensor) -> tuple[float, float]:
    """The project's step: D on detached samples, then E and G with D frozen."""
    model.req_grad_disc(True)
    if gali is None:
        img_gen, noise = model.generate_imgs(cls=y)
        z_img = model.generate_latent(img=x)
        outputs = model(x, img_gen.detach(), noise, z_img.detach(), y)
        d_loss = disc_loss(outputs)
    else:  # the switch in the loop
        d_loss = gali.discriminator_loss((x, y))
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    model.req_grad_disc(False)
    if gali is None:
        ge_loss = gen_enc_loss(model(x, img_gen, noise, z_img, y))
    else:  # the switch in the loop
        ge_loss = gali.generator_loss((x, y))
    opt_ge.zero_grad()
    ge_loss.backward()
    opt_ge.step()
    return d_loss.item(), ge_loss.item()


def save_checkpoint(model: BigBiGAN, path) -> None:
    """The project's checkpoint: the whole model's ``state_dict()``."""
    torch.save(model.state_dict(), path)


def load_checkpoint(model: BigBiGAN, path) -> None:
    """The project's resume, strict."""
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)


def train(
    switch: bool = False, steps: int = 2, seed: int = 0, batch_size: int = 32, checkpoint=None
) -> list[tuple[float, float]]:
    """The project's loop on digits, on its own losses or, with ``switch``, GALI-8's; the
    model saved to ``checkpoint`` when given. Returns the (D, E/G) losses of each step."""
    model, gali, opt_d, opt_ge = build(switch, seed)
    losses = [
        train_step(model, gali, opt_d, opt_ge, x, y)
        for x, y in digits_batches(steps, batch_size, seed)
    ]
    if checkpoint is not None:
        save_checkpoint(model, checkpoint)
    return losses


def project_losses(model: BigBiGAN):
    """The project's own losses, ``batch -> (D loss, E/G loss)``, as its step computes them
    (for :func:`gali_ext.adapters.baseline_of`, before the switch)."""

    def losses(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        img_gen, noise = model.generate_imgs(cls=y)
        z_img = model.generate_latent(img=x)
        d_outputs = model(x, img_gen.detach(), noise, z_img.detach(), y)
        return disc_loss(d_outputs), gen_enc_loss(model(x, img_gen, noise, z_img, y))

    return losses


def check_switch(batch_size: int = 16):
    """:func:`gali_ext.adapters.check` on the switched project (``gali-ext check
    gali_ext.adapters.examples.bigbigan_port:check_switch``): ``(gali, batch, the module the
    project saves, what its own losses train)``, the last taken before the switch (the widened
    joint no longer fits the project's own forward)."""
    model, _, _, _ = build()
    batch = digits_batches(1, batch_size)[0]
    baseline = baseline_of(project_losses(model), batch, model)
    return gali_objective(model), batch, model, baseline


if __name__ == "__main__":
    print("BigBiGAN (D, E/G) losses:", train())
    gali, batch, model, baseline = check_switch()
    check(gali, batch, discriminator=model, baseline=baseline)
    print("GALI-8 (D, E/G) losses:", train(switch=True))
