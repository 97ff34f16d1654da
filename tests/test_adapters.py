"""The adapters: output conventions, shapes, generator arguments, hidden features, the example."""

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gali_ext import ConfigError, ShapeError
from gali_ext.adapters import EncoderGenerator, LatentEncoder, LatentGenerator, StochasticEncoder
from gali_ext.chains import Chains, latent_mean, sample_latent

README = (Path(__file__).resolve().parents[1] / "adapters" / "README.md").read_text()


class PairEncoder(nn.Module):
    """``x: [B, 4] -> (mu, s)``, two linear heads over a shared body."""

    def __init__(self, latent=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.mu = nn.Linear(6, latent)
        self.s = nn.Linear(6, latent)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.s(h)


class Constant(nn.Module):
    """Returns a fixed value whatever the input (to feed the adapter a given output)."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


class ImageGenerator(nn.Module):
    """``z: [B, d] -> [B, 1, 2, 2]``, recording what it was called with."""

    def __init__(self, d=6):
        super().__init__()
        self.linear = nn.Linear(d, 4)
        self.calls = []

    def forward(self, z, *args, **kwargs):
        self.calls.append((tuple(z.shape), args, kwargs))
        return self.linear(z.flatten(1)).view(-1, 1, 2, 2)


# --- encoder output conventions -------------------------------------------------------------


def test_tensor_latent_is_returned_as_is():
    z = torch.randn(5, 3)
    assert LatentEncoder(Constant(z))(torch.zeros(5, 4)) is z
    assert LatentEncoder(Constant(z), "tensor")(torch.zeros(5, 4)) is z


def test_mu_logvar_becomes_mu_and_half_logvar():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    out_mu, log_sigma = LatentEncoder(Constant((mu, logvar)), "mu_logvar")(torch.zeros(5, 4))
    torch.testing.assert_close(out_mu, mu)
    torch.testing.assert_close(log_sigma, 0.5 * logvar)
    # the standard deviation is sqrt(var): exp(log_sigma)**2 == exp(logvar)
    torch.testing.assert_close(log_sigma.exp() ** 2, logvar.exp())


def test_mu_log_sigma_and_mu_sigma():
    mu, log_sigma = torch.randn(5, 3), torch.randn(5, 3)
    out = LatentEncoder(Constant((mu, log_sigma)), "mu_log_sigma")(torch.zeros(5, 4))
    assert out[0] is mu and out[1] is log_sigma
    sigma = torch.tensor([[0.5, 1.0, 2.0]])
    _, log_sigma = LatentEncoder(Constant((sigma, sigma)), "mu_sigma")(torch.zeros(1, 4))
    torch.testing.assert_close(log_sigma, torch.tensor([[math.log(0.5), 0.0, math.log(2.0)]]))


def test_distribution_is_passed_through():
    normal = torch.distributions.Normal(torch.zeros(5, 3), torch.ones(5, 3))
    assert LatentEncoder(Constant(normal))(torch.zeros(5, 4)) is normal
    assert LatentEncoder(Constant(normal), "distribution")(torch.zeros(5, 4)) is normal
    independent = torch.distributions.Independent(normal, 1)  # batch [5], event [3]
    out = LatentEncoder(Constant(independent), latent_shape=(3,))(torch.zeros(5, 4))
    assert out is independent and sample_latent(out).shape == (5, 3)
    with pytest.raises(ShapeError, match=r"\[5, 3\], expected \[B, 2\]"):
        LatentEncoder(Constant(normal), latent_shape=(2,))(torch.zeros(5, 4))
    with pytest.raises(ShapeError, match="expects the encoder to return a torch.distributions"):
        LatentEncoder(Constant(torch.zeros(5, 3)), "distribution")(torch.zeros(5, 4))


def test_callable_reads_dicts_and_objects():
    z = torch.randn(5, 3)
    encoder = LatentEncoder(Constant({"z": z, "aux": 1}), output=lambda out: out["z"])
    assert encoder(torch.zeros(5, 4)) is z
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    obj = SimpleNamespace(mean=mu, logvar=logvar)
    # the callable returns sample_latent's own pair (mu, log_sigma)
    encoder = LatentEncoder(Constant(obj), output=lambda out: (out.mean, 0.5 * out.logvar))
    out_mu, log_sigma = encoder(torch.zeros(5, 4))
    assert out_mu is mu
    torch.testing.assert_close(log_sigma, 0.5 * logvar)
    with pytest.raises(ShapeError, match="output=callable to return a latent tensor"):
        LatentEncoder(Constant(obj), output=lambda out: out.__dict__)(torch.zeros(5, 4))


def test_auto_never_guesses_a_pair():
    encoder = LatentEncoder(Constant((torch.zeros(2, 3), torch.zeros(2, 3))))
    with pytest.raises(ConfigError, match="output='mu_logvar'.*output='mu_log_sigma'"):
        encoder(torch.zeros(2, 4))
    with pytest.raises(ShapeError, match="pass output=callable"):
        LatentEncoder(Constant({"z": torch.zeros(2, 3)}))(torch.zeros(2, 4))


def test_bad_outputs_and_arguments():
    with pytest.raises(ConfigError, match="output must be one of"):
        LatentEncoder(nn.Identity(), "logvar")
    with pytest.raises(ConfigError, match="latent_shape must be"):
        LatentEncoder(nn.Identity(), latent_shape=(120, 0))
    with pytest.raises(ConfigError, match="either latent_shape"):
        LatentEncoder(nn.Identity(), latent_shape=(120,), flatten=True)
    with pytest.raises(ShapeError, match=r"pair \(mu, logvar\), got a tensor \[2, 3\]"):
        LatentEncoder(Constant(torch.zeros(2, 3)), "mu_logvar")(torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"mu of shape \[2, 3\] but .* \[2, 4\]"):
        LatentEncoder(Constant((torch.zeros(2, 3), torch.zeros(2, 4))), "mu_logvar")(
            torch.zeros(2, 4)
        )
    with pytest.raises(ShapeError, match="logvar of the encoder's pair .* is a str"):
        LatentEncoder(Constant((torch.zeros(2, 3), "x")), "mu_logvar")(torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"batch size 2, got \[3, 3\]"):
        LatentEncoder(Constant(torch.zeros(3, 3)))(torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"floating-point .* got torch.int64 \[2, 3\]"):
        LatentEncoder(Constant(torch.zeros(2, 3, dtype=torch.long)))(torch.zeros(2, 4))


def test_stochastic_encoder_clamps_log_sigma_from_below():
    mu = torch.zeros(1, 3)
    s = torch.tensor([[-50.0, -4.0, 2.0]])
    _, log_sigma = StochasticEncoder(Constant((mu, s)))(torch.zeros(1, 4))  # log_sigma, -10
    torch.testing.assert_close(log_sigma, torch.tensor([[-10.0, -4.0, 2.0]]))
    _, log_sigma = StochasticEncoder(Constant((mu, s)), "logvar", min_log_sigma=-3.0)(
        torch.zeros(1, 4)
    )
    torch.testing.assert_close(log_sigma, torch.tensor([[-3.0, -2.0, 1.0]]))
    sigma = torch.tensor([[0.0, 1.0, math.e]])
    encoder = StochasticEncoder(Constant((mu, sigma)), "sigma")
    _, log_sigma = encoder(torch.zeros(1, 4))
    torch.testing.assert_close(log_sigma, torch.tensor([[-10.0, 0.0, 1.0]]))
    assert isinstance(encoder, LatentEncoder) and encoder.output == "mu_sigma"
    with pytest.raises(ConfigError, match="parameterisation must be one of"):
        StochasticEncoder(nn.Identity(), "variance")


# --- latent shapes ---------------------------------------------------------------------------


def test_bigbigan_latent_is_viewed_as_declared():
    z = torch.randn(3, 120, 1, 1)
    out = LatentEncoder(Constant(z), latent_shape=(120,))(torch.zeros(3, 4))
    assert out.shape == (3, 120)
    torch.testing.assert_close(out, z.view(3, 120))
    mu, log_sigma = LatentEncoder(Constant((z, z)), "mu_log_sigma", latent_shape=120)(
        torch.zeros(3, 4)
    )
    assert mu.shape == log_sigma.shape == (3, 120)
    assert LatentEncoder(Constant(z), flatten=True)(torch.zeros(3, 4)).shape == (3, 120)
    bad = LatentEncoder(Constant(torch.randn(3, 100, 1, 1)), latent_shape=(120,))
    with pytest.raises(ShapeError, match=r"\[3, 100, 1, 1\] \(100 values .*\[B, 120\] \(120"):
        bad(torch.zeros(3, 4))


def test_bigbigan_pair_runs_through_the_chains():
    """E: [B, 120, 1, 1]; G takes [B, 120] and a class vector; the chains see [B, 120]."""

    class BigBiGANEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 120, 4)

        def forward(self, x):
            return self.conv(x)  # [B, 120, 1, 1]

    class BigGANGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(120, 3 * 16)
            self.embed = nn.Embedding(10, 120)

        def forward(self, z, y):
            assert z.shape[1:] == (120,)
            return torch.tanh(self.linear(z + self.embed(y))).view(-1, 3, 4, 4)

    pair = EncoderGenerator(
        BigBiGANEncoder(),
        BigGANGenerator(),
        encoder_output="tensor",
        latent_shape=(120,),
        generator_kwargs={"y": lambda batch: torch.arange(batch) % 10},
    )
    assert pair.latent_shape == (120,)
    chains = Chains(torch.randn(5, 3, 4, 4), pair.encoder, pair.generator)
    assert chains["z0"].shape == (5, 120) and chains["xp0"].shape == (5, 3, 4, 4)
    assert chains["x1"].shape == (5, 3, 4, 4)
    with pytest.raises(ShapeError, match=r"latents z of shape \[B, 120\] .* got \[5, 7\]"):
        pair.generator(torch.randn(5, 7))


# --- generator -------------------------------------------------------------------------------


def test_generator_extra_args_kwargs_and_input_shape():
    user = ImageGenerator()
    generator = LatentGenerator(
        user,
        latent_shape=(6,),
        extra_args=("truncation",),
        extra_kwargs={"y": lambda batch: torch.arange(batch), "scale": 0.5},
        input_shape=(6, 1, 1),
    )
    x = generator(torch.randn(3, 6))
    assert x.shape == (3, 1, 2, 2)
    shape, args, kwargs = user.calls[-1]
    assert shape == (3, 6, 1, 1) and args == ("truncation",) and kwargs["scale"] == 0.5
    assert kwargs["y"].tolist() == [0, 1, 2]
    generator(torch.randn(2, 6))  # the callable is called per batch
    assert user.calls[-1][2]["y"].tolist() == [0, 1]
    embedding = nn.Embedding(3, 6)  # a module is an argument, not a per-batch callable
    LatentGenerator(user, extra_kwargs={"table": embedding})(torch.randn(2, 6))
    assert user.calls[-1][2]["table"] is embedding
    with pytest.raises(ShapeError, match=r"\[2, 5\] \(5 values .* input_shape \[B, 6, 1, 1\]"):
        LatentGenerator(user, input_shape=(6, 1, 1))(torch.randn(2, 5))
    with pytest.raises(ConfigError, match="different numbers of values"):
        LatentGenerator(user, latent_shape=(6,), input_shape=(5, 1, 1))


@pytest.mark.parametrize(
    ("output", "got"),
    [
        (torch.zeros(2, 4), r"torch.float32 \[2, 4\]"),
        (torch.zeros(3, 1, 2, 2), r"torch.float32 \[3, 1, 2, 2\]"),
        (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), r"torch.uint8 \[2, 1, 2, 2\]"),
        ((torch.zeros(2, 1, 2, 2),), "tuple"),
    ],
)
def test_generator_output_is_checked(output, got):
    with pytest.raises(ShapeError, match=r"float images \[2, C, H, W\] .* got " + got):
        LatentGenerator(Constant(output))(torch.randn(2, 6))


# --- hidden features -------------------------------------------------------------------------


def test_hidden_features_from_feature_layers_match_the_layers_by_hand():
    encoder = PairEncoder()
    pair = EncoderGenerator(
        encoder, ImageGenerator(3), encoder_output="mu_logvar", feature_layers=["body.1", "body.0"]
    )
    x = torch.randn(5, 4)
    features = pair.hidden_features(x)
    first = encoder.body[0](x)
    assert len(features) == 3
    torch.testing.assert_close(features[0], torch.tanh(first))  # in the order named
    torch.testing.assert_close(features[1], first)
    torch.testing.assert_close(features[2], encoder.mu(torch.tanh(first)))  # the latent mean
    assert all(not m._forward_hooks for m in encoder.modules())  # hooks removed


def test_hidden_features_flatten_conv_layers():
    encoder = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)
    )
    pair = EncoderGenerator(encoder, ImageGenerator(3), feature_layers=["1"])
    x = torch.randn(4, 1, 4, 4)
    hidden, mean = pair.hidden_features(x)
    torch.testing.assert_close(hidden, torch.relu(encoder[0](x)).flatten(1))
    assert hidden.shape == (4, 32)
    torch.testing.assert_close(mean, encoder(x))


def test_hidden_features_without_layers():
    encoder = PairEncoder()
    pair = EncoderGenerator(encoder, ImageGenerator(3), encoder_output="mu_logvar")
    x = torch.randn(5, 4)
    (mean,) = pair.hidden_features(x)
    torch.testing.assert_close(mean, encoder(x)[0])

    class WithOwn(PairEncoder):
        def hidden_features(self, x):
            return [self.body(x).unsqueeze(-1), self(x)[0]]

    encoder = WithOwn()
    features = EncoderGenerator(encoder, ImageGenerator(3), encoder_output="mu_logvar")
    own = features.hidden_features(x)
    assert [f.shape for f in own] == [(5, 6), (5, 3)]
    torch.testing.assert_close(own[0], encoder.body(x))


def test_feature_layer_errors():
    encoder = PairEncoder()
    with pytest.raises(ConfigError, match=r"no layer 'bdy.1'; valid names include 'body.1'"):
        EncoderGenerator(encoder, ImageGenerator(3), feature_layers=["bdy.1"])
    with pytest.raises(ConfigError, match="no layer 'fc'; valid names include 'body'"):
        EncoderGenerator(encoder, ImageGenerator(3), feature_layers=["fc"])
    with pytest.raises(ConfigError, match="must be a list of sub-module names"):
        EncoderGenerator(encoder, ImageGenerator(3), feature_layers="body.0")

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 3), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    shared = Shared()
    pair = EncoderGenerator(shared, ImageGenerator(3), feature_layers=["act"])
    with pytest.raises(ConfigError, match="'act' ran 2 times"):
        pair.hidden_features(torch.randn(2, 4))
    assert not shared.act._forward_hooks


# --- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["mu_logvar", "mu_log_sigma", "mu_sigma"])
def test_gradients_reach_the_user_encoder(output):
    user = PairEncoder()
    if output == "mu_sigma":
        user.s = nn.Sequential(user.s, nn.Softplus())
    z = sample_latent(LatentEncoder(user, output)(torch.randn(5, 4)))
    z.square().sum().backward()
    for name, p in user.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_reach_a_deterministic_encoder_and_the_mean_is_mu():
    user = nn.Sequential(nn.Linear(4, 120), nn.Unflatten(1, (120, 1, 1)))
    encoder = LatentEncoder(user, latent_shape=(120,))
    sample_latent(encoder(torch.randn(5, 4))).sum().backward()
    assert user[0].weight.grad.abs().sum() > 0
    pair = PairEncoder()
    mean = latent_mean(LatentEncoder(pair, "mu_logvar")(torch.zeros(1, 4)))
    torch.testing.assert_close(mean, pair.mu(pair.body(torch.zeros(1, 4))))


# --- the README and the worked example -------------------------------------------------------


def _readme_block(marker: str) -> str:
    """The adapters/README.md Python block that contains ``marker``."""
    (block,) = [b for b in re.findall(r"```python\n(.+?)```", README, re.S) if marker in b]
    return block


def test_worked_example_runs():
    from gali_ext.adapters.examples.bigan_loop import main

    losses = main(steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # at the start the head is near chance: product of terms = 2 log K with K = 4 (GALI-4)
    assert abs(losses[0] - 2 * math.log(4)) < 0.2


def test_readme_loop_runs_and_trains_the_users_modules():
    from gali_ext.adapters.examples.bigan_loop import random_loader, user_bigan

    block = _readme_block("gali.generator_objective(chains=d.chains)")
    assert len(block.strip().splitlines()) < 22
    user = user_bigan()
    before = [p.detach().clone() for p in user["my_encoder"].parameters()]
    namespace = {"torch": torch, "loader": random_loader(2), **user}
    exec(compile(block, "adapters/README.md", "exec"), namespace)
    after = list(user["my_encoder"].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    assert namespace["pair"].encoder.module is user["my_encoder"]


def test_readme_bigbigan_and_features_blocks_run():
    from gali_ext.adapters.examples.bigan_loop import user_bigan

    bigbigan = _readme_block("generator_kwargs")
    features = _readme_block("feature_layers")
    namespace = {"torch": torch, "nn": nn, "EncoderGenerator": EncoderGenerator}
    exec(compile(bigbigan, "adapters/README.md", "exec"), namespace)
    pair = namespace["pair"]
    x = pair.generator(sample_latent(pair.encoder(torch.randn(3, 1, 8, 8))))
    assert x.shape == (3, 1, 8, 8)
    namespace = {
        "torch": torch,
        "EncoderGenerator": EncoderGenerator,
        "loader": [torch.randn(3, 1, 8, 8)],
    }
    namespace.update(user_bigan())
    exec(compile(features, "adapters/README.md", "exec"), namespace)
    encoder = namespace["my_encoder"]
    hidden, mean = namespace["pair"].hidden_features(namespace["x"])
    torch.testing.assert_close(torch.cat([hidden, mean], 1), namespace["features"])
    torch.testing.assert_close(hidden, encoder.body(namespace["x"]))
    assert namespace["features"].shape == (3, 32 + 8)
