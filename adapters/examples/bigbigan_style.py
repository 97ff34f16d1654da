"""A BigBiGAN-style project (Donahue & Simonyan 2019) switched to GALI-4 and GALI-8.

The project (everything down to :func:`train_bigbigan`) is the user's own, shaped like public
BigBiGAN code: a deterministic encoder, a class-conditional generator ``G(z, y)``, and a
discriminator of three parts, an image network ``F``, a latent network ``H`` and a joint network
``J`` on their concatenation, with three score layers and their hinge losses

    s_x = theta_x . F(x) + <e_x(y), F(x)>        (a projection term, Miyato & Koyama 2018)
    s_z = theta_z . H(z)
    s_xz = theta_xz . J(F(x), H(z)) + <e_xz(y), J(F(x), H(z))>
    l_D = h(y s_x) + h(y s_z) + h(y s_xz),  l_EG = y (s_x + s_z + s_xz),  h(t) = max(0, 1 - t)

(y = +1 on encoder pairs, -1 on generator pairs), spectral norm throughout and a
truncated-normal prior. :func:`gali_objective` is the switch: the same networks in a GALI head,
the unary scores as unary heads, the hinge family, the projection terms fed the condition, the
prior by name. GALI-8's tuples have four slots, so its joint ``J`` takes twice the input width
(``BigBiGANDiscriminator(pairs=2)``), as in the paper. At K = 2 (``preset="ali"``) the GALI
losses are the project's own, exactly (tests/test_dropin.py).

Run it: ``python -m gali_ext.adapters.examples.bigbigan_style``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as sn

from gali_ext import (
    GALI,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    MultiClassJointDiscriminatorHead,
    get_preset,
)
from gali_ext.adapters import FeatureNetwork, JointNetwork

from .digits import digits_batches

LATENT_DIM = 16
NUM_CLASSES = 10
FEATURES = 64  # width of F(x) and H(z)
JOINT = 128  # width of J(F(x), H(z))


class Encoder(nn.Module):
    """Deterministic encoder ``x [B, 1, 16, 16] -> z [B, 16]`` (BigBiGAN's is a RevNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 4, 2, 1),
            nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(64 * 4 * 4, LATENT_DIM),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Generator(nn.Module):
    """Class-conditional generator ``G(z, y)``: z and a class embedding, BigGAN-style."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(NUM_CLASSES, 16)
        self.fc = nn.Linear(LATENT_DIM + 16, 64 * 4 * 4)
        self.net = nn.Sequential(
            nn.BatchNorm2d(64), nn.ReLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.BatchNorm2d(32), nn.ReLU(), nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1))
        return self.net(h.view(-1, 64, 4, 4))


class ImageFeatures(nn.Module):
    """``F(x)``: spectrally normalised convolutions, ``[B, 1, 16, 16] -> [B, 64]``."""

    out_features = FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            sn(nn.Conv2d(1, 32, 4, 2, 1)), nn.LeakyReLU(0.2), sn(nn.Conv2d(32, 64, 4, 2, 1)),
            nn.LeakyReLU(0.2), nn.Flatten(), sn(nn.Linear(64 * 4 * 4, FEATURES)), nn.LeakyReLU(0.2),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(widths: list[int]) -> nn.Sequential:
    """Spectrally normalised linear layers, each followed by a leaky ReLU."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [sn(nn.Linear(a, b)), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class ProjectedScore(nn.Module):
    """One score ``theta . h + <e(y), h>`` (BigGAN's discriminator output); no projection when
    ``num_classes`` is None."""

    def __init__(self, width: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.linear = sn(nn.Linear(width, 1))
        self.embed = sn(nn.Embedding(num_classes, width)) if num_classes else None

    def forward(self, h: Tensor, y: Tensor | None = None) -> Tensor:
        score = self.linear(h)
        if self.embed is not None:
            score = score + (self.embed(y) * h).sum(1, keepdim=True)
        return score


class BigBiGANDiscriminator(nn.Module):
    """``F``, ``H``, ``J`` and the three score layers; ``pairs`` image-latent pairs per joint
    input (1 for BigBiGAN; 2 for GALI-8's four-slot tuples)."""

    def __init__(self, pairs: int = 1) -> None:
        super().__init__()
        self.F = ImageFeatures()
        self.H = mlp([LATENT_DIM, FEATURES, FEATURES])
        self.J = mlp([pairs * 2 * FEATURES, JOINT, JOINT])
        self.theta_x = ProjectedScore(FEATURES, NUM_CLASSES)
        self.theta_z = ProjectedScore(FEATURES)
        self.theta_xz = ProjectedScore(JOINT, NUM_CLASSES)

    def forward(self, x: Tensor, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(s_x, s_z, s_xz)``, each ``[B, 1]``."""
        fx, fz = self.F(x), self.H(z)
        return (
            self.theta_x(fx, y),
            self.theta_z(fz),
            self.theta_xz(self.J(torch.cat([fx, fz], 1)), y),
        )


def truncated_normal(batch: int, bound: float = 2.0) -> Tensor:
    """The project's prior: N(0, I) truncated to [-bound, bound]."""
    return nn.init.trunc_normal_(torch.empty(batch, LATENT_DIM), a=-bound, b=bound)


def bigbigan_losses(
    discriminator, encoder, generator, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """The project's own ``(L_D, L_EG)`` on one batch: hinge for D, ``y (s_x + s_z + s_xz)``
    for E and G, summed over the encoder pairs' and generator pairs' batch means."""
    z = truncated_normal(len(x))
    y_fake = y[torch.randperm(len(y))]
    encoder_pairs = discriminator(x, encoder(x), y)
    generator_pairs = discriminator(generator(z, y_fake), z, y_fake)
    hinge = torch.nn.functional.relu
    d_loss = sum(hinge(1 - s).mean() for s in encoder_pairs)
    d_loss = d_loss + sum(hinge(1 + s).mean() for s in generator_pairs)
    eg_loss = sum(s.mean() for s in encoder_pairs) - sum(s.mean() for s in generator_pairs)
    return d_loss, eg_loss


def train_bigbigan(steps: int = 2, seed: int = 0) -> list[float]:
    """The project's own loop: one forward, D and E/G each back-propagate their loss."""
    torch.manual_seed(seed)
    encoder, generator, discriminator = Encoder(), Generator(), BigBiGANDiscriminator()
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.0, 0.999))
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_eg = torch.optim.Adam(eg, 1e-4, betas=(0.0, 0.999))
    losses = []
    for x, y in digits_batches(steps, seed=seed):
        d_loss, eg_loss = bigbigan_losses(discriminator, encoder, generator, x, y)
        opt_d.zero_grad()
        opt_eg.zero_grad()
        d_loss.backward(inputs=list(discriminator.parameters()), retain_graph=True)
        eg_loss.backward(inputs=eg)
        opt_d.step()
        opt_eg.step()
        losses.append(d_loss.item())
    return losses


def gali_objective(preset: str, encoder, generator, discriminator) -> GALI:
    """The switch: the project's networks as a GALI objective of ``preset`` (``"gali4"``,
    ``"gali8"``; ``"ali"`` is BigBiGAN itself)."""
    d = discriminator  # every line below is the glue
    head = MultiClassJointDiscriminatorHead(
        get_preset(preset).spec, image_features=d.F, latent_features=d.H,
        joint=JointNetwork(d.J, score=FeatureNetwork(d.theta_xz, condition="y")),
        unary={"image": FeatureNetwork(d.theta_x, condition="y"), "latent": d.theta_z},
    )  # fmt: skip
    return GALI(encoder, generator, head, get_preset(preset).providers(),
                discriminator_criterion=HingeDiscriminatorLoss(),
                generator_criterion=HingeGeneratorLoss(), prior="truncated_normal:2.0")  # fmt: skip


def train_gali(
    preset: str = "gali8", steps: int = 2, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """The project's loop on GALI: the D step, then the E/G step on the same chains."""
    torch.manual_seed(seed)
    pairs = 2 if get_preset(preset).spec.arity == 4 else 1
    encoder, generator = Encoder(), Generator()
    gali = gali_objective(preset, encoder, generator, BigBiGANDiscriminator(pairs))
    opt_d = torch.optim.Adam(gali.head.parameters(), 2e-4, betas=(0.0, 0.999))
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_eg = torch.optim.Adam(eg, 1e-4, betas=(0.0, 0.999))
    losses = []
    for x, y in digits_batches(steps, batch_size, seed):
        d = gali.discriminator_objective((x, y), differentiable_chains=True)
        opt_d.zero_grad()
        d.loss.backward()
        opt_d.step()
        g = gali.generator_objective(chains=d.chains)
        opt_eg.zero_grad()
        g.loss.backward()
        opt_eg.step()
        losses.append(d.loss.item())
    return losses


if __name__ == "__main__":
    print("BigBiGAN D losses:", train_bigbigan())
    for name in ("gali4", "gali8"):
        print(f"{name} D losses:", train_gali(name))
