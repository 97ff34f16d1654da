"""An existing BiGAN training loop with gali-ext plugged in (the example of adapters/README.md).

The user's encoder (returning ``(mu, logvar)``), generator, discriminator feature networks
``D(x)`` and ``D(z)``, encoder-generator optimiser and loop are the user's own (:func:`user_bigan`);
what :func:`main` adds is the README's block: the adapted pair, GALI's multi-class joint head in
place of the BiGAN's joint discriminator (the D optimiser takes its parameters), the losses, a
feedback provider, and the two losses the loop back-propagates.

Run it: ``python -m adapters.examples.bigan_loop``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gali_ext import GALI, MultiClassJointDiscriminatorHead, build_spec
from gali_ext.adapters import EncoderGenerator
from gali_ext.losses import DiscriminatorLoss, ProductOfTermsLoss
from gali_ext.providers import ReconstructionChain

LATENT_DIM = 8
IMAGE_SHAPE = (1, 8, 8)


class UserEncoder(nn.Module):
    """The user's stochastic encoder: ``x: [B, 1, 8, 8] -> (mu, logvar)``, each ``[B, 8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(0.2))
        self.mu = nn.Linear(32, LATENT_DIM)
        self.logvar = nn.Linear(32, LATENT_DIM)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class UserGenerator(nn.Module):
    """The user's generator: ``z: [B, 8] -> x: [B, 1, 8, 8]`` in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT_DIM, 32), nn.ReLU(), nn.Linear(32, 64), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(-1, *IMAGE_SHAPE)


class FeatureNet(nn.Sequential):
    """One of the user's discriminator feature networks, ``[B, ...] -> [B, out_features]``."""

    def __init__(self, in_features: int, out_features: int = 16) -> None:
        super().__init__(nn.Flatten(), nn.Linear(in_features, out_features), nn.LeakyReLU(0.2))
        self.out_features = out_features


def user_bigan(seed: int = 0) -> dict[str, Any]:
    """The user's BiGAN parts: ``my_encoder``, ``my_generator``, ``my_dx`` (D(x)), ``my_dz``
    (D(z)) and ``opt_eg``, the user's Adam optimiser of the encoder and the generator."""
    torch.manual_seed(seed)
    my_encoder, my_generator = UserEncoder(), UserGenerator()
    opt_eg = torch.optim.Adam(
        [*my_encoder.parameters(), *my_generator.parameters()], lr=2e-4, betas=(0.5, 0.999)
    )
    return {
        "my_encoder": my_encoder,
        "my_generator": my_generator,
        "my_dx": FeatureNet(64),
        "my_dz": FeatureNet(LATENT_DIM),
        "opt_eg": opt_eg,
    }


def random_loader(steps: int, batch_size: int = 16, seed: int = 0) -> list[Tensor]:
    """``steps`` batches of random images ``[batch_size, 1, 8, 8]`` in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch_size, *IMAGE_SHAPE, generator=g) * 2 - 1 for _ in range(steps)]


def main(steps: int = 3, seed: int = 0) -> list[float]:
    """Train the toy BiGAN with GALI-4 for ``steps`` steps; returns the generator-encoder losses."""
    user = user_bigan(seed)
    my_encoder, my_generator = user["my_encoder"], user["my_generator"]
    my_dx, my_dz, opt_eg = user["my_dx"], user["my_dz"], user["opt_eg"]
    loader = random_loader(steps, seed=seed)

    pair = EncoderGenerator(my_encoder, my_generator, encoder_output="mu_logvar")  # gali-ext
    spec = build_spec("gali4")  # gali-ext
    head = MultiClassJointDiscriminatorHead(  # gali-ext; a toy joint MLP, ALI's is (1024, 1024)
        spec, image_features=my_dx, latent_features=my_dz, joint_hidden=(64,)
    )
    losses = dict(
        generator_criterion=ProductOfTermsLoss(), discriminator_criterion=DiscriminatorLoss()
    )
    gali = GALI(pair.encoder, pair.generator, head, providers=[ReconstructionChain()], **losses)

    opt_d = torch.optim.Adam(head.parameters(), lr=2e-4, betas=(0.5, 0.999))  # was: D's params
    g_losses = []
    for x in loader:
        d = gali.discriminator_objective(x, differentiable_chains=True)  # gali-ext
        opt_d.zero_grad()
        d.loss.backward()  # gali-ext: was the BiGAN D loss
        opt_d.step()
        g = gali.generator_objective(chains=d.chains)  # gali-ext: the D step's chains
        opt_eg.zero_grad()
        g.loss.backward()  # gali-ext: was the BiGAN E-G loss
        opt_eg.step()
        g_losses.append(g.loss.item())
    return g_losses


if __name__ == "__main__":
    for step, loss in enumerate(main()):
        print(f"step {step}: generator-encoder loss {loss:.4f}")
