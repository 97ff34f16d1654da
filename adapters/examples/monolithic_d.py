"""A BiGAN project with a monolithic discriminator ``D(x, z)`` switched to GALI-4 (and to any
spec of two slots, ALI's own included).

The project (everything down to :func:`train_bigan`) is the user's own: a deterministic encoder,
a generator, and one discriminator module that reads an image and a latent together and ends in
one score, trained with BiGAN's binary cross-entropy. Its layers cannot be split into an image
network, a latent network and a joint one without rewriting it, so :func:`gali_objective` hands
the whole ``D(x, z)`` to :func:`~gali_ext.adapters.monolithic_head`: the head calls it once on
all ``K * B`` pairs; at K = 2 its score ``s`` gives the logits ``(s, 0)``; for K = 4 the head adds
a 4-way layer on the layer named as the features and on ``s``. A spec of more than two slots
(GALI-8) is refused with an error saying how to split D.

Run it: ``python -m gali_ext.adapters.examples.monolithic_d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as sn

from gali_ext import GALI, get_preset
from gali_ext.adapters import check, monolithic_head

from .digits import digits_batches

LATENT_DIM = 16


class Encoder(nn.Module):
    """BiGAN's deterministic encoder, ``[B, 1, 16, 16] -> [B, 16]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, LATENT_DIM),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Generator(nn.Module):
    """``[B, 16] -> [B, 1, 16, 16]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(LATENT_DIM, 64 * 4 * 4),
            nn.ReLU(),
            nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class BiGANDiscriminator(nn.Module):
    """``D(x, z)``: image convolutions, the latent appended, an MLP to one score ``[B, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(
            sn(nn.Conv2d(1, 32, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(32, 64, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.joint = nn.Sequential(
            sn(nn.Linear(64 * 4 * 4 + LATENT_DIM, 256)), nn.LeakyReLU(0.2), sn(nn.Linear(256, 1))
        )

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.joint(torch.cat([self.image(x), z], 1))


def bigan_losses(discriminator, encoder, generator, x: Tensor) -> tuple[Tensor, Tensor]:
    """BiGAN's D loss and its non-saturating generator-encoder loss on one batch."""
    z = torch.randn(len(x), LATENT_DIM)
    real, fake = discriminator(x, encoder(x)), discriminator(generator(z), z)
    bce = F.binary_cross_entropy_with_logits
    d_loss = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    g_loss = bce(real, torch.zeros_like(real)) + bce(fake, torch.ones_like(fake))
    return d_loss, g_loss


def train_bigan(steps: int = 2, seed: int = 0) -> list[float]:
    """The project's own loop."""
    torch.manual_seed(seed)
    encoder, generator, discriminator = Encoder(), Generator(), BiGANDiscriminator()
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_eg = torch.optim.Adam(eg, 2e-4, betas=(0.5, 0.999))
    losses = []
    for x, _ in digits_batches(steps, seed=seed):
        d_loss, g_loss = bigan_losses(discriminator, encoder, generator, x)
        opt_d.zero_grad()
        opt_eg.zero_grad()
        d_loss.backward(inputs=list(discriminator.parameters()), retain_graph=True)
        g_loss.backward(inputs=eg)
        opt_d.step()
        opt_eg.step()
        losses.append(d_loss.item())
    return losses


def gali_objective(preset: str, encoder, generator, discriminator) -> GALI:
    """The switch: the project's networks as a GALI objective of a two-slot ``preset``."""
    spec = get_preset(preset).spec  # every line here is the glue
    head = monolithic_head(spec, discriminator, features="joint.1")
    return GALI(encoder, generator, head, get_preset(preset).providers())


def train_gali(
    preset: str = "gali4", steps: int = 2, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """The project's loop on GALI: the D step, then the E/G step on the same chains."""
    torch.manual_seed(seed)
    encoder, generator, discriminator = Encoder(), Generator(), BiGANDiscriminator()
    gali = gali_objective(preset, encoder, generator, discriminator)
    opt_d = torch.optim.Adam(gali.head.parameters(), 2e-4, betas=(0.5, 0.999))
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_eg = torch.optim.Adam(eg, 2e-4, betas=(0.5, 0.999))
    losses = []
    for x, _ in digits_batches(steps, batch_size, seed):
        d = gali.discriminator_objective(x, differentiable_chains=True)  # glue
        opt_d.zero_grad()
        d.loss.backward()  # glue
        opt_d.step()
        g = gali.generator_objective(chains=d.chains)  # glue
        opt_eg.zero_grad()
        g.loss.backward()  # glue
        opt_eg.step()
        losses.append(d.loss.item())
    return losses


def check_switch(preset: str = "gali4", batch_size: int = 16):
    """:func:`gali_ext.adapters.check` on the switched project: ``(gali, batch)``."""
    torch.manual_seed(0)
    gali = gali_objective(preset, Encoder(), Generator(), BiGANDiscriminator())
    return gali, digits_batches(1, batch_size)[0][0]


if __name__ == "__main__":
    print("BiGAN D losses:", train_bigan())
    for name in ("ali", "gali4"):
        check(*check_switch(name))
        print(f"{name} D losses:", train_gali(name))
