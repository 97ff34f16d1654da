"""An existing BiGAN training loop with gali-ext plugged in (the adapters README's example).

The user's encoder, generator, discriminator parts, optimisers and loop stay as they were; the
lines marked ``# gali-ext`` are all that changes.
"""

from __future__ import annotations

import torch
from torch import nn

from adapters import EncoderGenerator
from gali_ext import GALI, MultiClassJointDiscriminatorHead, SpectralMLP, build_spec
from gali_ext.providers import ReconstructionChain


class UserEncoder(nn.Module):
    """A user's stochastic encoder that returns ``(mu, logvar)``."""

    def __init__(self, latent: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(0.2))
        self.mu, self.logvar = nn.Linear(32, latent), nn.Linear(32, latent)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


def main(steps: int = 3, seed: int = 0) -> list[float]:
    """Train the toy BiGAN for ``steps`` steps on random 1x8x8 images; returns the G losses."""
    torch.manual_seed(seed)
    encoder = UserEncoder()
    generator = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    dx = SpectralMLP(64, (32,), 16, activate_output=True)  # the user's D(x) part
    dz = SpectralMLP(8, (32,), 16, activate_output=True)  # the user's D(z) part
    data = [torch.rand(16, 1, 8, 8) * 2 - 1 for _ in range(steps)]

    pair = EncoderGenerator(encoder, generator, encoder_output="mu_logvar")  # gali-ext
    head = MultiClassJointDiscriminatorHead(
        build_spec("gali4"), dx, dz, joint_hidden=(32,)
    )  # gali-ext
    gali = GALI(pair.encoder, pair.generator, head, [ReconstructionChain()])  # gali-ext

    opt_d = torch.optim.Adam(head.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(
        [*encoder.parameters(), *generator.parameters()], 2e-4, betas=(0.5, 0.999)
    )
    losses = []
    for x in data:
        opt_d.zero_grad()
        gali.discriminator_loss(x).backward()  # gali-ext: was the BiGAN D loss
        opt_d.step()
        opt_g.zero_grad()
        g_loss = gali.generator_loss(x)  # gali-ext: was the BiGAN G/E loss
        g_loss.backward()
        opt_g.step()
        losses.append(g_loss.item())
    return losses


if __name__ == "__main__":
    print(main())
