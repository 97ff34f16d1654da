import pytest
import torch
from torch import nn

from gali_ext import Chains, ProviderError, ShapeError, build_spec, sample_latent


class Affine(nn.Module):
    """A toy E or G: a fixed linear map, counting its calls."""

    def __init__(self, a: int, b: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(b, a, generator=g) * 0.3
        self.calls = 0

    def forward(self, v):
        self.calls += 1
        return v.flatten(1) @ self.weight.t()


def toy(latent=3, pixels=4):
    enc, gen = Affine(pixels, latent, 1), Affine(latent, pixels, 2)
    return enc, lambda z: gen(z).view(-1, 1, 2, 2), gen


def test_real_and_prior_chains_follow_the_definitions():
    enc, generate, _ = toy()
    x = torch.randn(4, 1, 2, 2)
    z = torch.randn(4, 3)
    chains = Chains(x, enc, generate, z=z)
    E = lambda v: v.flatten(1) @ enc.weight.t()  # noqa: E731
    G = lambda v: generate(v)  # noqa: E731
    torch.testing.assert_close(chains["z0"], E(x))
    torch.testing.assert_close(chains["x1"], G(E(x)))
    torch.testing.assert_close(chains["z1"], E(G(E(x))))
    torch.testing.assert_close(chains["x2"], G(E(G(E(x)))))
    torch.testing.assert_close(chains["xp0"], G(z))
    torch.testing.assert_close(chains["zp1"], E(G(z)))
    torch.testing.assert_close(chains["xp1"], G(E(G(z))))
    assert chains["zp0"] is z and chains["x0"] is x


@pytest.mark.parametrize(
    "name, e_calls, g_calls", [("gali4", 3, 3), ("gali8", 3, 3), ("ali", 1, 1)]
)
def test_each_node_computed_once_and_only_as_deep_as_needed(name, e_calls, g_calls):
    enc, generate, gen = toy()
    spec = build_spec(name)
    chains = Chains(torch.randn(4, 1, 2, 2), enc, generate, latent_shape=(3,))
    values = chains.compute(spec.nodes)
    values_again = chains.compute(spec.nodes)
    assert set(values) == set(spec.nodes)
    assert all(values[k] is values_again[k] for k in values)
    # gali4 and gali8: E on x0, x1, xp0 and G on z0, zp0, zp1; ALI one of each
    assert (enc.calls, gen.calls) == (e_calls, g_calls)
    assert (chains.calls["E"], chains.calls["G"]) == (e_calls, g_calls)


def test_stochastic_encoder_reparameterised_and_sampled_once():
    class Gaussian(nn.Module):
        def forward(self, x):
            mu = x.flatten(1)[:, :3]
            return mu, torch.full_like(mu, -1.0)

    x = torch.randn(500, 1, 2, 2, requires_grad=True)
    chains = Chains(
        x,
        Gaussian(),
        lambda z: z.new_zeros(z.shape[0], 1, 2, 2),
        rng=torch.Generator().manual_seed(0),
    )
    z0 = chains["z0"]
    assert chains["E(x0)"] is z0  # one sample, reused wherever z0 appears
    noise = (z0 - x.flatten(1)[:, :3]).detach()
    assert noise.std().item() == pytest.approx(torch.exp(torch.tensor(-1.0)).item(), rel=0.1)
    (grad,) = torch.autograd.grad(z0.sum(), x)
    assert grad.abs().sum() > 0  # gradients flow through the reparameterisation


def test_sample_latent_accepts_distribution_and_rejects_junk():
    normal = torch.distributions.Normal(torch.zeros(2, 3), torch.ones(2, 3))
    assert sample_latent(normal).shape == (2, 3)
    with pytest.raises(ShapeError, match="rsample"):
        sample_latent(torch.distributions.Categorical(logits=torch.zeros(2, 3)))
    with pytest.raises(ShapeError, match="mu of shape"):
        sample_latent((torch.zeros(2, 3), torch.zeros(2, 4)))
    with pytest.raises(ShapeError, match="got str"):
        sample_latent("z")


def test_prior_sample_shape_from_encoder_and_generator():
    enc, generate, _ = toy()
    a = Chains(torch.randn(4, 1, 2, 2), enc, generate, rng=torch.Generator().manual_seed(5))
    b = Chains(
        torch.randn(4, 1, 2, 2),
        enc,
        generate,
        rng=torch.Generator().manual_seed(5),
        latent_shape=(3,),
    )
    assert a["zp0"].shape == (4, 3)
    torch.testing.assert_close(
        b["zp0"], torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    )


def test_node_function_from_a_provider_and_missing_provider():
    enc, generate, _ = toy()
    chains = Chains(
        torch.randn(4, 1, 2, 2),
        enc,
        generate,
        functions={"Flip": lambda node, ch: ch[node.arg.name].flip(-1)},
    )
    torch.testing.assert_close(chains["Flip(x1)"], chains["x1"].flip(-1))
    assert chains.calls["Flip"] == 1
    chains["Flip(G(E(x0)))"]  # same node, spelled differently: not recomputed
    assert chains.calls["Flip"] == 1
    with pytest.raises(ProviderError, match="'Mask1'.*available: Flip"):
        chains["Mask1(x0)"]


def test_bad_inputs():
    enc, generate, _ = toy()
    with pytest.raises(ShapeError, match="floating"):
        Chains(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), enc, generate)
    with pytest.raises(ShapeError, match="batch size 3"):
        Chains(torch.randn(4, 1, 2, 2), enc, generate, z=torch.randn(3, 3))
    chains = Chains(torch.randn(4, 1, 2, 2), enc, lambda z: z[:2])
    with pytest.raises(ShapeError, match="'x1' should be a tensor with batch size 4"):
        chains["x1"]
