"""A BigBiGAN-style project (Donahue & Simonyan 2019) switched to GALI-4 and GALI-8.

The project (everything but :func:`gali_objective` and the marked line of :func:`train`) is
the user's own, written as public BigBiGAN code is: a deterministic encoder, a class-conditional
generator ``G(z, y)``, and a discriminator of three networks, each computing its score in its
own ``forward``: ``x_net`` gives ``(s_x, F(x))``, ``z_net`` gives ``(s_z, H(z))`` and ``joint``
gives ``s_xz`` from ``[F(x), H(z)]``, with the projection terms of the class inside ``forward``

    s_x = theta_x . F(x) + <e_x(y), F(x)>        (a projection term, Miyato & Koyama 2018)
    s_z = theta_z . H(z)
    s_xz = theta_xz . J(F(x), H(z)) + <e_xz(y), J(F(x), H(z))>
    l_D = h(y s_x) + h(y s_z) + h(y s_xz),  l_EG = y (s_x + s_z + s_xz),  h(t) = max(0, 1 - t)

(y = +1 on encoder pairs, -1 on generator pairs); hinge losses, spectral norm throughout, the
project's own truncated-normal sampler ``truncated_normal(batch)``, one forward per step with
both losses back-propagated into their own parameters, and its own checkpoint code
(:func:`save_checkpoint`, :func:`load_checkpoint`: the modules' ``state_dict()``).

:func:`gali_objective` is the switch: ``x_net`` and ``z_net`` as feature networks whose own
scores (projection included) become the unary heads, ``joint`` with its score and the
features of its ``body`` for the K-way layer, the head registered in the project's
discriminator (so its checkpoints and optimizer hold the layers the head adds), the hinge
family and the project's sampler. GALI-8's tuples hold two image-latent pairs, so ``joint``'s
layers that read its input are widened in place (:func:`gali_ext.adapters.widen_input`). In the
loop, one line changes: the two losses come from :meth:`gali_ext.GALI.shared_objectives`. At K = 2
(``preset="ali"``) the GALI losses are the project's own, exactly (tests/test_dropin.py).

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
from gali_ext.adapters import FeatureNetwork, JointNetwork, check, widen_input

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
    """Class-conditional generator ``G(z, y)``: z and a class embedding, BigGAN-style."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(NUM_CLASSES, 16)
        self.fc = nn.Linear(LATENT_DIM + 16, 64 * 4 * 4)
        self.net = nn.Sequential(
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, 2, 1),
            nn.Tanh(),
        )

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1))
        return self.net(h.view(-1, 64, 4, 4))


def mlp(widths: list[int]) -> nn.Sequential:
    """Spectrally normalised linear layers, each followed by a leaky ReLU."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [sn(nn.Linear(a, b)), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class ImageDiscriminator(nn.Module):
    """``F`` and its score: ``x [B, 1, 16, 16], y -> (s_x [B, 1], F(x) [B, 64])``, with the
    projection term ``<embed(y), F(x)>`` computed in ``forward`` (BigGAN's discriminator)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            sn(nn.Conv2d(1, 32, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(32, 64, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            sn(nn.Linear(64 * 4 * 4, FEATURES)),
            nn.LeakyReLU(0.2),
        )
        self.linear = sn(nn.Linear(FEATURES, 1))
        self.embed = sn(nn.Embedding(NUM_CLASSES, FEATURES))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.linear(h) + (self.embed(y) * h).sum(1, keepdim=True), h


class LatentDiscriminator(nn.Module):
    """``H`` and its score: ``z [B, 16] -> (s_z [B, 1], H(z) [B, 64])``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp([LATENT_DIM, FEATURES, FEATURES])
        self.linear = sn(nn.Linear(FEATURES, 1))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(z)
        return self.linear(h), h


class JointDiscriminator(nn.Module):
    """``J`` and its score: ``[F(x), H(z)], y -> s_xz [B, 1]``, projection in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp([2 * FEATURES, JOINT, JOINT])
        self.linear = sn(nn.Linear(JOINT, 1))
        self.embed = sn(nn.Embedding(NUM_CLASSES, JOINT))

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        j = self.body(h)
        return self.linear(j) + (self.embed(y) * j).sum(1, keepdim=True)


class BigBiGANDiscriminator(nn.Module):
    """The three networks; ``forward`` gives ``(s_x, s_z, s_xz)``, each ``[B, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.x_net = ImageDiscriminator()
        self.z_net = LatentDiscriminator()
        self.joint = JointDiscriminator()

    def forward(self, x: Tensor, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s_x, fx = self.x_net(x, y)
        s_z, hz = self.z_net(z)
        return s_x, s_z, self.joint(torch.cat([fx, hz], 1), y)


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


def gali_objective(preset: str, encoder, generator, discriminator) -> GALI:
    """The switch: the project's networks as a GALI objective of ``preset`` (``"gali4"``,
    ``"gali8"``; ``"ali"`` is BigBiGAN itself)."""
    d, spec = discriminator, get_preset(preset).spec  # every line below is the glue
    widen_input(d.joint, spec.arity // 2)  # GALI-8's joint reads two (image, latent) pairs
    head = MultiClassJointDiscriminatorHead(
        spec,
        discriminator=d,
        image_features=FeatureNetwork(d.x_net, output=1, score=0, condition="y"),
        latent_features=FeatureNetwork(d.z_net, output=1, score=0),
        joint=JointNetwork(d.joint, condition="y", features="body"),
    )
    return GALI(
        encoder,
        generator,
        head,
        get_preset(preset).providers(),
        prior=truncated_normal,
        discriminator_criterion=HingeDiscriminatorLoss(),
        generator_criterion=HingeGeneratorLoss(),
    )


def build(preset: str | None = None, seed: int = 0):
    """The project's networks and optimizers, switched to GALI's ``preset`` when given:
    ``(encoder, generator, discriminator, gali or None, opt_d, opt_eg)``."""
    torch.manual_seed(seed)
    encoder, generator, discriminator = Encoder(), Generator(), BigBiGANDiscriminator()
    gali = gali_objective(preset, encoder, generator, discriminator) if preset else None
    opt_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.0, 0.999))
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_eg = torch.optim.Adam(eg, 1e-4, betas=(0.0, 0.999))
    return encoder, generator, discriminator, gali, opt_d, opt_eg


def save_checkpoint(path, encoder, generator, discriminator, opt_d, opt_eg) -> None:
    """The project's own checkpoint: its modules' and optimizers' state dicts."""
    torch.save(
        {
            "E": encoder.state_dict(),
            "G": generator.state_dict(),
            "D": discriminator.state_dict(),
            "opt_d": opt_d.state_dict(),
            "opt_eg": opt_eg.state_dict(),
        },
        path,
    )


def load_checkpoint(path, encoder, generator, discriminator, opt_d, opt_eg) -> None:
    """The project's own resume (strict: every tensor of the modules is in the file)."""
    state = torch.load(path, weights_only=True)
    encoder.load_state_dict(state["E"])
    generator.load_state_dict(state["G"])
    discriminator.load_state_dict(state["D"])
    opt_d.load_state_dict(state["opt_d"])
    opt_eg.load_state_dict(state["opt_eg"])


def apply_losses(d_loss, eg_loss, discriminator, eg, opt_d, opt_eg) -> None:
    """The project's update: each loss back-propagated into its own parameters (D's, and E's
    and G's ``eg``), then both optimizers step."""
    opt_d.zero_grad()
    opt_eg.zero_grad()
    d_loss.backward(inputs=list(discriminator.parameters()), retain_graph=True)
    eg_loss.backward(inputs=eg)
    opt_d.step()
    opt_eg.step()


def train(
    preset: str | None = None,
    steps: int = 2,
    seed: int = 0,
    batch_size: int = 32,
    checkpoint=None,
) -> list[float]:
    """The project's own loop (one forward, D and E/G each back-propagate their loss), on
    BigBiGAN's losses or, with ``preset``, GALI's; saved to ``checkpoint`` when given."""
    encoder, generator, discriminator, gali, opt_d, opt_eg = build(preset, seed)
    eg = [*encoder.parameters(), *generator.parameters()]
    losses = []
    for x, y in digits_batches(steps, batch_size, seed):
        if gali is None:
            d_loss, eg_loss = bigbigan_losses(discriminator, encoder, generator, x, y)
        else:  # the switch in the loop: GALI's two losses from one forward, as above
            d_loss, eg_loss = (o.loss for o in gali.shared_objectives((x, y)))
        apply_losses(d_loss, eg_loss, discriminator, eg, opt_d, opt_eg)
        losses.append(d_loss.item())
    if checkpoint is not None:
        save_checkpoint(checkpoint, encoder, generator, discriminator, opt_d, opt_eg)
    return losses


def train_bigbigan(steps: int = 2, seed: int = 0) -> list[float]:
    """The project before the switch."""
    return train(None, steps, seed)


def train_gali(
    preset: str = "gali8", steps: int = 2, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """The project switched to GALI's ``preset``."""
    return train(preset, steps, seed, batch_size)


def check_switch(preset: str = "gali8", batch_size: int = 16):
    """:func:`gali_ext.adapters.check` on the switched project (``gali-ext check
    gali_ext.adapters.examples.bigbigan_style:check_switch``): ``(gali, batch)``."""
    *_, gali, _, _ = build(preset)
    return gali, digits_batches(1, batch_size)[0]


if __name__ == "__main__":
    print("BigBiGAN D losses:", train_bigbigan())
    for name in ("gali4", "gali8"):
        check(*check_switch(name))
        print(f"{name} D losses:", train_gali(name))
