"""An ALI-style project (Dumoulin et al. 2017) switched to GALI-4 and GALI-8.

The project (everything down to :func:`train_ali`) is the user's own, shaped like public ALI
code: a stochastic encoder whose last 1x1 convolution outputs ``mu`` and ``log sigma`` stacked on
the channel axis (``[B, 2d, 1, 1]``), a generator of ``[B, d, 1, 1]`` latents, and a
discriminator of three parts as in ALI's appendix: ``D(x)`` (convolutions with batch norm and
dropout), ``D(z)`` (1x1 convolutions with dropout on ``[B, d, 1, 1]``) and ``D(x, z)`` (1x1
convolutions on their channel concatenation, ending in one score), trained with ALI's binary
cross-entropy.

:func:`gali_objective` is the switch: the encoder's stacked output read as ``(mu, log_sigma)``,
the generator's and ``D(z)``'s ``[B, d, 1, 1]`` inputs, ``D(x, z)``'s penultimate layer named
as the features the head's K-way layer reads (its own score is kept), and the head registered in
the project's discriminator (so its checkpoints and optimizer hold the layers the head adds).
``D(x)``'s batch norm makes the head run each chain's nodes together and the real and the prior
chain apart (``feature_pass="auto"``, docs/design.md, section 9.7). GALI-8's four-slot tuples
give ``D(x, z)`` twice the input channels: its layers that read its input are widened in place
(:func:`gali_ext.adapters.widen_input`). In the loop, one line changes.

Run it: ``python -m gali_ext.adapters.examples.ali_style``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali_ext import GALI, MultiClassJointDiscriminatorHead, get_preset
from gali_ext.adapters import (
    FeatureNetwork,
    JointNetwork,
    LatentEncoder,
    LatentGenerator,
    check,
    widen_input,
)

from .digits import digits_batches

LATENT_DIM = 16
CHANNELS = 64  # D(x) and D(z) output [B, 64, 1, 1]


def block(a: int, b: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    """A convolution, batch norm and a leaky ReLU (ALI's building block)."""
    return [
        nn.Conv2d(a, b, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(b),
        nn.LeakyReLU(0.2),
    ]


class ALIEncoder(nn.Module):
    """``G_z(x)``: ``[B, 1, 16, 16] -> [B, 2d, 1, 1]``, mu and log sigma on the channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *block(1, 32, 4, 2, 1),
            *block(32, 64, 4, 2, 1),
            *block(64, 128, 4),
            nn.Conv2d(128, 2 * LATENT_DIM, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ALIGenerator(nn.Module):
    """``G_x(z)``: ``[B, d, 1, 1] -> [B, 1, 16, 16]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(LATENT_DIM, 64, 4, bias=False),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(32, 1, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class ALIDiscriminator(nn.Module):
    """``D(x)``, ``D(z)`` and ``D(x, z)`` as in ALI's appendix."""

    def __init__(self) -> None:
        super().__init__()
        self.dx = nn.Sequential(
            nn.Dropout(0.2),
            nn.Conv2d(1, 32, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.2),
            *block(32, 64, 4, 2, 1),
            nn.Dropout(0.2),
            nn.Conv2d(64, CHANNELS, 4),
            nn.LeakyReLU(0.2),
        )
        self.dz = nn.Sequential(
            nn.Dropout(0.2),
            nn.Conv2d(LATENT_DIM, CHANNELS, 1),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.2),
            nn.Conv2d(CHANNELS, CHANNELS, 1),
            nn.LeakyReLU(0.2),
        )
        self.dxz = nn.Sequential(
            nn.Dropout(0.2),
            nn.Conv2d(2 * CHANNELS, 128, 1),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.2),
            nn.Conv2d(128, 128, 1),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.2),
            nn.Conv2d(128, 1, 1),
        )

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """One logit per pair, ``[B, 1, 1, 1]``."""
        return self.dxz(torch.cat([self.dx(x), self.dz(z)], 1))


def ali_losses(discriminator, encoder, generator, x: Tensor) -> tuple[Tensor, Tensor]:
    """ALI's D loss and its non-saturating generator-encoder loss on one batch."""
    mu, log_sigma = encoder(x).chunk(2, 1)
    z_hat = mu + log_sigma.exp() * torch.randn_like(mu)
    z = torch.randn(len(x), LATENT_DIM, 1, 1)
    real, fake = discriminator(x, z_hat), discriminator(generator(z), z)
    bce = F.binary_cross_entropy_with_logits
    d_loss = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    g_loss = bce(real, torch.zeros_like(real)) + bce(fake, torch.ones_like(fake))
    return d_loss, g_loss


def gali_objective(preset: str, encoder, generator, discriminator) -> GALI:
    """The switch: the project's networks as a GALI objective of ``preset``."""
    d, spec = discriminator, get_preset(preset).spec  # every line below is the glue
    widen_input(d.dxz, spec.arity // 2)  # GALI-8's joint reads two (image, latent) pairs
    head = MultiClassJointDiscriminatorHead(
        spec,
        discriminator=d,
        image_features=d.dx,
        latent_features=FeatureNetwork(d.dz, input_shape=(LATENT_DIM, 1, 1)),
        joint=JointNetwork(d.dxz, features="5"),
    )
    pair = (
        LatentEncoder(encoder, output=lambda out: out.flatten(1).chunk(2, 1)),
        LatentGenerator(generator, input_shape=(LATENT_DIM, 1, 1)),
    )
    return GALI(*pair, head, get_preset(preset).providers())


def build(preset: str | None = None, seed: int = 0):
    """The project's networks and optimizers, switched to GALI's ``preset`` when given:
    ``(encoder, generator, discriminator, gali or None, opt_d, opt_eg)``."""
    torch.manual_seed(seed)
    encoder, generator, discriminator = ALIEncoder(), ALIGenerator(), ALIDiscriminator()
    gali = gali_objective(preset, encoder, generator, discriminator) if preset else None
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-4, betas=(0.5, 1e-3))
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_eg = torch.optim.Adam(eg, 1e-4, betas=(0.5, 1e-3))
    return encoder, generator, discriminator, gali, opt_d, opt_eg


def apply_losses(d_loss, g_loss, discriminator, eg, opt_d, opt_eg) -> None:
    """The project's update: each loss back-propagated into its own parameters (D's, and E's
    and G's ``eg``), then both optimizers step."""
    opt_d.zero_grad()
    opt_eg.zero_grad()
    d_loss.backward(inputs=list(discriminator.parameters()), retain_graph=True)
    g_loss.backward(inputs=eg)
    opt_d.step()
    opt_eg.step()


def train(
    preset: str | None = None, steps: int = 2, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """The project's own loop, on ALI's losses or, with ``preset``, GALI's."""
    encoder, generator, discriminator, gali, opt_d, opt_eg = build(preset, seed)
    eg = [*encoder.parameters(), *generator.parameters()]
    losses = []
    for x, _ in digits_batches(steps, batch_size, seed):
        if gali is None:
            d_loss, g_loss = ali_losses(discriminator, encoder, generator, x)
        else:  # the switch in the loop: GALI's two losses from one forward, as above
            d_loss, g_loss = (o.loss for o in gali.shared_objectives(x))
        apply_losses(d_loss, g_loss, discriminator, eg, opt_d, opt_eg)
        losses.append(d_loss.item())
    return losses


def train_ali(steps: int = 2, seed: int = 0) -> list[float]:
    """The project before the switch."""
    return train(None, steps, seed)


def train_gali(
    preset: str = "gali8", steps: int = 2, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """The project switched to GALI's ``preset``."""
    return train(preset, steps, seed, batch_size)


def check_switch(preset: str = "gali8", batch_size: int = 16):
    """:func:`gali_ext.adapters.check` on the switched project (``gali-ext check
    gali_ext.adapters.examples.ali_style:check_switch``): ``(gali, batch)``."""
    *_, gali, _, _ = build(preset)
    return gali, digits_batches(1, batch_size)[0][0]


if __name__ == "__main__":
    print("ALI D losses:", train_ali())
    for name in ("gali4", "gali8"):
        check(*check_switch(name))
        print(f"{name} D losses:", train_gali(name))
