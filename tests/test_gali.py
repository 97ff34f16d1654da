"""Every preset trains one step end to end through the public API."""

import pytest
import torch
from torch import nn

from gali_ext import GALI, MinimaxLoss, build_spec
from gali_ext.providers import AliceReconstruction, MaskMix, PretrainedFeatures, ReconstructionChain
from tests._helpers import make_head


class StochasticEncoder(nn.Module):
    def __init__(self, latent=6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(0.2))
        self.mu, self.log_sigma = nn.Linear(32, latent), nn.Linear(32, latent)

    def forward(self, x):
        h = self.net(x)
        return self.mu(h), self.log_sigma(h)


def feature_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Tanh())


PROVIDERS = {
    "ali": lambda: [],
    "alice": lambda: [AliceReconstruction(1.0)],
    "alice_pt": lambda: [PretrainedFeatures(feature_model()), AliceReconstruction(1.0, "M")],
    "gali4": lambda: [ReconstructionChain()],
    "gali8": lambda: [ReconstructionChain(depth=1)],
    "gali_mix": lambda: [MaskMix()],
    "gali_pt": lambda: [ReconstructionChain(), PretrainedFeatures(feature_model())],
}


def grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_preset_trains_one_step(name, seeded):
    spec = build_spec(name)
    encoder = StochasticEncoder()
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    head = make_head(spec)
    gali = GALI(encoder, generator, head, PROVIDERS[name]())
    x = torch.rand(5, 1, 8, 8) * 2 - 1

    d_loss = gali.discriminator_loss(x, instance_noise_std=0.1)
    assert torch.isfinite(d_loss)
    d_loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in grads(head))
    assert any(g.abs().sum() > 0 for g in grads(head))
    assert all(g is None for g in grads(encoder) + grads(generator))  # no grad for E, G

    head.zero_grad(set_to_none=True)
    g_loss = gali.generator_loss(x, instance_noise_std=0.1)
    assert torch.isfinite(g_loss)
    g_loss.backward()
    assert all(g is None for g in grads(head))  # D's parameters take no gradient
    for module in (encoder, generator):
        assert any(g is not None and g.abs().sum() > 0 for g in grads(module))
    assert all(p.requires_grad for p in head.parameters())  # restored after the G step


def test_objective_exposes_logits_and_swappable_loss(seeded):
    spec = build_spec("gali4")
    encoder = StochasticEncoder()
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    gali = GALI(
        encoder,
        generator,
        make_head(spec),
        [ReconstructionChain()],
        generator_criterion=MinimaxLoss(),
    )
    objective = gali.generator_objective(torch.rand(5, 1, 8, 8))
    assert objective.logits.shape == (4, 5, 4)
    torch.testing.assert_close(objective.loss, MinimaxLoss()(objective.logits))
