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


@pytest.mark.parametrize("name", ["gali8", "alice"])
def test_alternating_step_equals_d_step_then_g_step_on_the_same_chains(name):
    torch.manual_seed(0)
    gali = build(name)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    reference = copy.deepcopy(gali)

    # By hand: a D step, then the G/E loss on the same prior sample and encoder noise (the
    # same seed before each), with the D that was just updated.
    d_opt, g_opt = sgd_pair(reference)
    torch.manual_seed(1)
    reference.discriminator_loss(x).backward()
    d_opt.step()
    torch.manual_seed(1)
    reference.generator_loss(x).backward()
    g_opt.step()

    torch.manual_seed(1)
    train_step(gali, [x], *sgd_pair(gali))
    for (key, new), old in zip(gali.named_parameters(), reference.parameters()):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6, msg=key)


class Counted(nn.Module):
    """Counts the calls of a network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("n_dis", [1, 3])
def test_alternating_step_runs_each_chain_node_once_for_the_d_and_g_steps(n_dis):
    gali = build("gali8")
    gali.encoder, gali.generator = Counted(gali.encoder), Counted(gali.generator)
    batches = [torch.rand(5, 1, 8, 8) * 2 - 1 for _ in range(n_dis)]
    train_step(gali, iter(batches), *sgd_pair(gali), n_dis=n_dis)
    # GALI-8's chains: E on x0, x1, xp0 and G on z0, zp0, zp1, once per D step; the G/E
    # step reuses the last D step's chains.
    assert gali.encoder.calls == gali.generator.calls == 3 * n_dis


def test_reusing_chains_made_without_gradients_is_refused():
    gali = build("gali8")
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    d = gali.discriminator_objective(x)  # differentiable_chains=False
    with pytest.raises(ConfigError, match="differentiable_chains=True"):
        gali.generator_objective(x, chains=d.chains)
    d = gali.discriminator_objective(x, differentiable_chains=True)
    d.loss.backward()  # D's loss reaches only D: the chains are detached from it
    assert all(p.grad is None for p in [*gali.encoder.parameters(), *gali.generator.parameters()])
    assert any(p.grad is not None for p in gali.head.parameters())


def test_shared_forward_with_n_dis_uses_one_batch_per_d_step():
    torch.manual_seed(0)
    gali = build("gali8")
    batches = [torch.rand(5, 1, 8, 8) * 2 - 1 for _ in range(3)]
    result = train_step(gali, iter(batches), *sgd_pair(gali), n_dis=3, shared_forward=True)
    assert result.d_loss > 0 and len(result.class_accuracy) == 8


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
    from gali_ext import recipes

    config = recipes.get("digits-gali8").with_overrides({"shared_forward": "true"})
    assert config.shared_forward is True
    config.validate()
    with pytest.raises(ConfigError, match="bf16"):
        config.with_overrides({"mixed_precision": "fp16"}).validate()


class Recorded(nn.Module):
    """Records the inputs a network is called on."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x)
        return self.net(x)


@pytest.mark.parametrize("n_dis", [1, 3])
def test_own_generator_batch_runs_the_g_step_on_a_batch_of_its_own(n_dis):
    gali = build("gali8")
    gali.encoder = Recorded(gali.encoder)
    batches = [torch.rand(5, 1, 8, 8) * 2 - 1 for _ in range(n_dis + 2)]
    stream = iter(batches)
    train_step(gali, stream, *sgd_pair(gali), n_dis=n_dis, own_generator_batch=True)
    assert next(stream) is batches[-1]  # it drew n_dis + 1 batches, no more
    # each of the n_dis + 1 forwards runs E on x0, x1 and xp0 of its own batch: the G/E step's
    # chains are new (a fresh prior sample and encoder noise), not the last D step's
    assert len(gali.encoder.inputs) == 3 * (n_dis + 1)
    firsts = gali.encoder.inputs[::3]
    assert all(x is b for x, b in zip(firsts, batches[: n_dis + 1]))


def test_own_generator_batch_equals_d_steps_then_a_g_step_on_the_next_batch():
    torch.manual_seed(0)
    gali = build("gali8")
    xs = [torch.rand(5, 1, 8, 8) * 2 - 1 for _ in range(3)]
    reference = copy.deepcopy(gali)
    d_opt, g_opt = sgd_pair(reference)
    for seed, x in enumerate(xs[:2]):  # D alone on two batches, then E and G alone on a third
        d_opt.zero_grad()
        torch.manual_seed(seed)
        reference.discriminator_loss(x, instance_noise_std=0.1).backward()
        d_opt.step()
    torch.manual_seed(2)
    g_opt.zero_grad()
    reference.generator_loss(xs[2], instance_noise_std=0.1).backward()
    g_opt.step()

    seeds = iter(range(3))  # the same seed before each forward: each batch's draws
    stream = (torch.manual_seed(next(seeds)) and x for x in xs)
    train_step(gali, stream, *sgd_pair(gali), n_dis=2, instance_noise=0.1, own_generator_batch=True)
    for (key, new), old in zip(gali.named_parameters(), reference.parameters()):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6, msg=key)


def test_own_generator_batch_excludes_shared_forward():
    gali = build("gali8")
    with pytest.raises(ConfigError, match="exclude each other"):
        train_step(
            gali,
            [torch.rand(5, 1, 8, 8)] * 2,
            *sgd_pair(gali),
            shared_forward=True,
            own_generator_batch=True,
        )
    with pytest.raises(ConfigError, match=r"n_dis=1 \+ 1 \(own_generator_batch\) batches"):
        train_step(gali, [torch.rand(5, 1, 8, 8)], *sgd_pair(gali), own_generator_batch=True)
