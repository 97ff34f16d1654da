import math

import pytest
import torch
from torch import nn

from adapters import EncoderGenerator, LatentEncoder, LatentGenerator, StochasticEncoder
from gali_ext import ConfigError, ShapeError, sample_latent
from gali_ext.chains import latent_mean


class Pair(nn.Module):
    def __init__(self, second):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.second = second

    def forward(self, x):
        mu = self.linear(x)
        return mu, torch.full_like(mu, self.second)


def test_output_conventions():
    x = torch.randn(5, 4)
    mu, log_sigma = LatentEncoder(Pair(-2.0), "mu_logvar")(x)
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, -1.0))  # log_sigma = logvar / 2
    _, log_sigma = LatentEncoder(Pair(-2.0), "mu_log_sigma")(x)
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, -2.0))
    _, log_sigma = LatentEncoder(Pair(0.5), "mu_sigma")(x)
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, math.log(0.5)))
    _, log_sigma = StochasticEncoder(Pair(-50.0), "log_sigma", min_log_sigma=-10.0)(x)
    assert torch.allclose(log_sigma, torch.full_like(log_sigma, -10.0))
    normal = torch.distributions.Normal(torch.zeros(5, 3), 1.0)
    assert LatentEncoder(lambda x: normal)(x) is normal  # noqa: ARG005
    z = LatentEncoder(lambda x: {"z": x[:, :2]}, output=lambda out: out["z"])(x)
    assert torch.equal(z, x[:, :2])


def test_a_pair_is_never_guessed():
    with pytest.raises(ConfigError, match="mu_logvar"):
        LatentEncoder(Pair(0.0))(torch.randn(2, 4))
    with pytest.raises(ConfigError, match="output must be"):
        LatentEncoder(Pair(0.0), "logvar")
    with pytest.raises(ShapeError, match="expects the encoder to return a pair"):
        LatentEncoder(nn.Linear(4, 3), "mu_logvar")(torch.randn(2, 4))


def test_bigbigan_latent_shape():
    encoder = LatentEncoder(lambda x: torch.randn(x.shape[0], 120, 1, 1), latent_shape=(120,))
    assert encoder(torch.zeros(3, 4)).shape == (3, 120)
    bad = LatentEncoder(lambda x: torch.randn(x.shape[0], 100, 1, 1), latent_shape=(120,))
    with pytest.raises(ShapeError, match=r"\[3, 100, 1, 1\].*\[B, 120\]"):
        bad(torch.zeros(3, 4))


def test_generator_arguments_and_output_checks():
    seen = {}

    def user_generator(z, scale, y=None):
        seen["shape"], seen["y"] = z.shape, y
        return torch.tanh(z.sum((1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 3, 4, 4) * scale)

    generator = LatentGenerator(
        user_generator, input_shape=(6, 1, 1), extra_args=(0.5,),
        extra_kwargs={"y": lambda batch, device: torch.arange(batch, device=device)},
    )  # fmt: skip
    out = generator(torch.randn(2, 6))
    assert out.shape == (2, 3, 4, 4) and seen["shape"] == (2, 6, 1, 1)
    assert seen["y"].tolist() == [0, 1]
    with pytest.raises(ShapeError, match=r"float images \[2, C, H, W\]"):
        LatentGenerator(lambda z: z)(torch.randn(2, 6))
    with pytest.raises(ShapeError, match="input shape"):
        LatentGenerator(lambda z: z, input_shape=(5,))(torch.randn(2, 6))


def test_hidden_features_from_named_layers():
    encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    pair = EncoderGenerator(encoder, nn.Identity(), feature_layers=["0", "1"])
    x = torch.randn(5, 4)
    features = pair.hidden_features(x)
    first = encoder[0](x)
    torch.testing.assert_close(features[0], first)
    torch.testing.assert_close(features[1], torch.relu(first))
    torch.testing.assert_close(features[2], encoder(x))
    with pytest.raises(ConfigError, match="no layer 'fc'"):
        EncoderGenerator(encoder, nn.Identity(), feature_layers=["fc"])


def test_gradients_reach_the_user_encoder():
    user = Pair(-1.0)
    z = sample_latent(LatentEncoder(user, "mu_logvar")(torch.randn(5, 4)))
    z.sum().backward()
    assert user.linear.weight.grad.abs().sum() > 0
    mean = latent_mean(LatentEncoder(user, "mu_logvar")(torch.zeros(1, 4)))
    torch.testing.assert_close(mean, user.linear.bias.detach().view(1, -1))


def test_worked_example_runs():
    from adapters.examples.bigan_loop import main

    losses = main(steps=3)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
