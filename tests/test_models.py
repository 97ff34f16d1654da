"""ALI's networks (gali_ext.recipes.models): shapes, the tanh output bias, spectral norm in D,
no batch dependence in D(x), initialisation and errors."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gali_ext.errors import ConfigError, ShapeError
from gali_ext.recipes.models import (
    ALIModels,
    ConvLayer,
    GaussianEncoder,
    Generator,
    arch_image_shape,
    available_archs,
    build_ali_models,
    init_weights,
)

ARCHS = ["celeba", "digits", "svhn"]

# Widths from ALI's tables (appendix A): D(x) ends in 512 channels at 1 x 1 for both SVHN and
# CelebA; D(z) is 512-512 (SVHN) and 1024-1024 (CelebA); D(x, z) 1024-1024 and 2048-2048.
EXPECTED = {
    "svhn": dict(shape=(3, 32, 32), latent=256, dx=512, dz=512, joint=(1024, 1024), slope=0.01),
    "celeba": dict(shape=(3, 64, 64), latent=256, dx=512, dz=1024, joint=(2048, 2048), slope=0.02),
    "digits": dict(shape=(1, 16, 16), latent=32, dx=128, dz=128, joint=(256, 256), slope=0.2),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are too small to gain from intra-op threads, and on a busy 2-core machine
    two spinning OpenMP threads make this file 10x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(one_thread):
    """One set of networks per architecture, built once (CelebA's take a moment)."""
    torch.manual_seed(0)
    return {arch: build_ali_models(arch) for arch in ARCHS}


def _feature_layers(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def test_available_archs():
    assert available_archs() == ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_sizes_follow_the_tables(arch, built):
    m, want = built[arch], EXPECTED[arch]
    assert isinstance(m, ALIModels)
    assert m.image_shape == want["shape"] == arch_image_shape(arch)
    assert m.latent_dim == want["latent"]
    assert m.image_features.out_features == want["dx"]
    assert m.latent_features.out_features == want["dz"]
    assert m.joint_hidden == want["joint"]
    assert m.negative_slope == want["slope"]
    slopes = {
        x.negative_slope
        for net in (m.encoder, m.generator, m.image_features, m.latent_features)
        for x in net.modules()
        if isinstance(x, nn.LeakyReLU)
    }
    assert slopes == {want["slope"]}


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch, built):
    m = built[arch]
    torch.manual_seed(1)
    x = torch.rand(3, *m.image_shape) * 2 - 1
    mu, log_sigma = m.encoder(x)
    assert mu.shape == log_sigma.shape == (3, m.latent_dim)
    out = m.generator(torch.randn(3, m.latent_dim) * 3)
    assert out.shape == (3, *m.image_shape)
    assert out.min() >= -1 and out.max() <= 1
    # a [B, latent, 1, 1] latent is read the same way
    torch.testing.assert_close(m.generator.eval()(mu), m.generator(mu[:, :, None, None]))
    m.generator.train()
    assert m.image_features(x).shape == (3, m.image_features.out_features)
    assert m.latent_features(mu).shape == (3, m.latent_features.out_features)


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_encoder(arch):
    torch.manual_seed(0)
    m = build_ali_models(arch, deterministic=True)
    z = m.encoder(torch.rand(2, *m.image_shape))
    assert isinstance(z, torch.Tensor) and z.shape == (2, m.latent_dim)
    assert m.encoder.output.out_channels == m.latent_dim
    m.encoder.eval()
    x = torch.rand(2, *m.image_shape)
    torch.testing.assert_close(m.encoder.hidden_features(x)[-1], m.encoder(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_features_are_the_last_three_hidden_layers_and_mu(arch, built):
    enc = built[arch].encoder.eval()
    x = torch.rand(5, *built[arch].image_shape)
    hidden = enc.hidden_features(x)
    assert len(hidden) == 4
    assert all(h.dim() == 2 and h.shape[0] == 5 for h in hidden)
    assert tuple(h.shape[1] for h in hidden) == enc.hidden_dims
    torch.testing.assert_close(hidden[-1], enc(x)[0])
    # the third-to-last block's output, recomputed by hand, is the first feature
    h = x
    for block in enc.blocks[:-2]:
        h = block(h)
    torch.testing.assert_close(hidden[0], h.flatten(1))
    enc.train()


def test_hidden_feature_widths_svhn(built):
    # SVHN: 4x4/2 conv to 256 x 4 x 4, 4x4 conv to 512 x 1 x 1, 1x1 conv to 512, then mu (256)
    assert built["svhn"].encoder.hidden_dims == (4096, 512, 512, 256)


def test_tanh_of_half_logit_is_two_m_minus_one():
    # docs/design.md, section 4, eq. (4.3), in float64: tanh(logit(m) / 2) = 2 m - 1
    m = torch.linspace(1e-3, 1 - 1e-3, 999, dtype=torch.float64)
    torch.testing.assert_close(torch.tanh(0.5 * torch.logit(m)), 2 * m - 1, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "data_mean, expected_mean",
    [(0.3, 0.3), (0.5, 0.5), (0.93, 0.93), (0.0, 1e-3), (1.0, 1 - 1e-3)],
)
def test_output_bias_gives_the_data_mean(data_mean, expected_mean):
    torch.manual_seed(0)
    gen = build_ali_models("digits").generator
    nn.init.zeros_(gen.output.weight)  # pre-activation = the bias alone
    gen.init_output_bias(data_mean)
    bias = 0.5 * math.log(expected_mean / (1 - expected_mean))
    assert gen.output.bias.tolist() == pytest.approx([bias] * gen.output.out_channels, abs=1e-7)
    out = gen(torch.randn(4, 32))
    torch.testing.assert_close(out, torch.full_like(out, 2 * expected_mean - 1), rtol=0, atol=1e-6)
    # so the mean pixel on the [0, 1] scale is the data's mean
    assert ((out + 1) / 2).mean().item() == pytest.approx(expected_mean, abs=1e-6)


@pytest.mark.parametrize("bad", [-0.2, 1.5, float("nan")])
def test_output_bias_rejects_a_mean_outside_0_1(bad):
    gen = build_ali_models("digits").generator
    with pytest.raises(ShapeError, match="data_mean"):
        gen.init_output_bias(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_discriminator_parts_have_spectral_norm_and_no_batch_dependent_layers(arch, built):
    m = built[arch]
    for net in (m.image_features, m.latent_features):
        layers = _feature_layers(net)
        assert layers
        for layer in layers:
            assert parametrize.is_parametrized(layer, "weight")
            kinds = [type(p).__name__ for p in layer.parametrizations.weight]
            assert kinds == ["_SpectralNorm"]
        banned = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
        assert not any(isinstance(x, banned) for x in net.modules())
    # ALI's encoder and generator keep their batch norm
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.encoder.modules())
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.generator.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_image_features_of_a_concatenated_batch_are_those_of_the_parts(arch, built):
    m = built[arch]
    dx, dz = m.image_features.eval(), m.latent_features.eval()
    torch.manual_seed(2)
    a, b, c = (torch.rand(n, *m.image_shape) * 2 - 1 for n in (1, 2, 3))
    together = dx(torch.cat([a, b, c]))
    torch.testing.assert_close(together, torch.cat([dx(a), dx(b), dx(c)]))
    za, zb = torch.randn(2, m.latent_dim), torch.randn(4, m.latent_dim)
    torch.testing.assert_close(dz(torch.cat([za, zb])), torch.cat([dz(za), dz(zb)]))
    dx.train()
    dz.train()


def test_spectral_norm_makes_the_largest_singular_value_one():
    torch.manual_seed(0)
    m = build_ali_models("digits")
    for _ in range(30):  # each training-mode call runs one power iteration
        m.image_features(torch.rand(1, *m.image_shape))
        m.latent_features(torch.randn(1, m.latent_dim))
    m.image_features.eval()
    m.latent_features.eval()
    for net in (m.image_features, m.latent_features):
        for layer in _feature_layers(net):
            sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()
            assert sigma == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("arch, std", [("svhn", 0.01), ("digits", 0.02)])
def test_weights_start_from_a_small_gaussian(arch, std, built):
    m = built[arch]
    for net in (m.encoder, m.generator, m.image_features, m.latent_features):
        for layer in _feature_layers(net):
            w = (
                layer.parametrizations.weight.original
                if parametrize.is_parametrized(layer, "weight")
                else layer.weight
            )
            if w.numel() >= 4096:
                assert w.mean().item() == pytest.approx(0.0, abs=5 * std / math.sqrt(w.numel()))
                assert w.std().item() == pytest.approx(std, rel=0.1)
            if layer.bias is not None:
                assert torch.count_nonzero(layer.bias) == 0


def test_init_weights_reaches_the_weight_under_spectral_norm():
    torch.manual_seed(0)
    dx = build_ali_models("digits").image_features
    init_weights(dx, 0.5)
    for layer in _feature_layers(dx):
        original = layer.parametrizations.weight.original
        if original.numel() >= 4096:
            assert original.std().item() == pytest.approx(0.5, rel=0.1)


def test_latent_and_channel_overrides():
    torch.manual_seed(0)
    m = build_ali_models("svhn", latent_dim=16, channels=1)
    assert m.image_shape == (1, 32, 32) == arch_image_shape("svhn", channels=1)
    mu, _ = m.encoder(torch.rand(2, 1, 32, 32))
    assert mu.shape == (2, 16)
    assert m.generator(mu).shape == (2, 1, 32, 32)
    assert m.latent_features(mu).shape == (2, 512)


def test_unknown_arch_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'mnist'") as info:
        build_ali_models("mnist")
    assert all(name in str(info.value) for name in ARCHS)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        arch_image_shape("cifar10")


@pytest.mark.parametrize("kwargs", [{"latent_dim": 0}, {"latent_dim": 2.5}, {"channels": -1}])
def test_bad_sizes_raise_config_error(kwargs):
    with pytest.raises(ConfigError, match="positive int"):
        build_ali_models("digits", **kwargs)


def test_wrong_input_shapes_say_what_was_expected(built):
    m = built["digits"]
    with pytest.raises(
        ShapeError, match=r"expected images of shape \[N, 1, 16, 16\], got \[2, 1, 28, 28\]"
    ):
        m.encoder(torch.rand(2, 1, 28, 28))
    with pytest.raises(ShapeError, match=r"\[N, 32\], got \[2, 31\]"):
        m.generator(torch.randn(2, 31))
    with pytest.raises(ShapeError, match="ImageFeatures"):
        m.image_features(torch.rand(2, 3, 16, 16))
    with pytest.raises(ShapeError, match="LatentFeatures"):
        m.latent_features(torch.randn(2, 33))


def test_layer_tables_that_do_not_fit_the_image_raise_config_error():
    with pytest.raises(ConfigError, match="expected 1 x 1"):
        GaussianEncoder((1, 16, 16), [ConvLayer(3, 8), ConvLayer(3, 8), ConvLayer(3, 8)], 4)
    with pytest.raises(ConfigError, match="expected 16 x 16"):
        Generator((1, 16, 16), [ConvLayer(4, 8, transposed=True)], 4)
