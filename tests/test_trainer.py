"""The training step's two schedules: alternating, and one shared forward (authors' script)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gali_ext import GALI, build_spec
from gali_ext.errors import ConfigError
from gali_ext.providers import AliceReconstruction, ReconstructionChain
from gali_ext.trainer import train_step
from tests._helpers import make_head
from tests.test_gali import StochasticEncoder


def build(name: str) -> GALI:
    providers = {"gali8": [ReconstructionChain()], "alice": [AliceReconstruction(1.0)]}[name]
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    gali = GALI(StochasticEncoder(), generator, make_head(build_spec(name)), providers)
    # eval mode: spectral norm keeps its power-iteration vectors, so repeated forwards agree
    return gali.eval()


def sgd_pair(gali: GALI) -> tuple[torch.optim.SGD, torch.optim.SGD]:
    eg = list(gali.encoder.parameters()) + list(gali.generator.parameters())
    return torch.optim.SGD(gali.head.parameters(), lr=1.0), torch.optim.SGD(eg, lr=1.0)


@pytest.mark.parametrize("name", ["gali8", "alice"])
def test_shared_forward_takes_both_gradients_at_the_same_parameters(name):
    torch.manual_seed(0)
    gali = build(name)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    before = copy.deepcopy(gali)

    # Reference: the two separate objectives, both at the initial parameters, on the same
    # prior sample and reparameterisation noise (same seed before each).
    torch.manual_seed(1)
    before.discriminator_loss(x).backward()
    torch.manual_seed(1)
    before.generator_loss(x).backward()

    torch.manual_seed(1)
    d_opt, g_opt = sgd_pair(gali)
    train_step(gali, [x], d_opt, g_opt, shared_forward=True)

    # SGD with lr 1: new = old - grad, for D from eq. 3 alone, for E and G from eq. 4 alone
    for (key, new), old in zip(gali.named_parameters(), before.parameters()):
        expected = old.detach() - (old.grad if old.grad is not None else 0)
        torch.testing.assert_close(new.detach(), expected, rtol=1e-5, atol=1e-6, msg=key)
    head_moved = any(
        not torch.equal(a, b) for a, b in zip(gali.head.parameters(), before.head.parameters())
    )
    assert head_moved


def test_alternating_step_lets_the_generator_see_the_updated_discriminator():
    torch.manual_seed(0)
    gali = build("gali8")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    shared, alternating = copy.deepcopy(gali), copy.deepcopy(gali)
    for model, flag in ((shared, True), (alternating, False)):
        torch.manual_seed(1)
        train_step(model, [x], *sgd_pair(model), shared_forward=flag)
    # D's update is the same; E's differs, because only the alternating G/E step saw it
    for a, b in zip(shared.head.parameters(), alternating.head.parameters()):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(
        next(shared.encoder.parameters()), next(alternating.encoder.parameters())
    )


def test_shared_forward_with_n_dis_uses_one_batch_per_d_step():
    torch.manual_seed(0)
    gali = build("gali8")
    batches = [torch.rand(5, 1, 8, 8) * 2 - 1 for _ in range(3)]
    result = train_step(gali, iter(batches), *sgd_pair(gali), n_dis=3, shared_forward=True)
    assert result.discriminator_loss > 0 and len(result.class_accuracy) == 8


def test_shared_forward_refuses_ddp_and_fp16_scaling():
    gali = build("gali8")
    x = [torch.rand(5, 1, 8, 8)]
    for accelerator, words in (
        (SimpleNamespace(num_processes=2, scaler=None), "one process"),
        (SimpleNamespace(num_processes=1, scaler=object()), "fp16"),
    ):
        with pytest.raises(ConfigError, match=words):
            train_step(gali, x, *sgd_pair(gali), shared_forward=True, accelerator=accelerator)


def test_recipe_setting_shared_forward():
    import recipes

    config = recipes.get("digits-gali8").with_overrides({"shared_forward": "true"})
    assert config.shared_forward is True
    config.validate()
    with pytest.raises(ConfigError, match="bf16"):
        config.with_overrides({"mixed_precision": "fp16"}).validate()
