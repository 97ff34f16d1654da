import math

import pytest
import torch
from torch import nn

from gali_ext.errors import ConfigError
from gali_ext.recipes.models import arch_image_shape, available_archs, build_ali_models


@pytest.mark.parametrize("arch", ["digits", "svhn", "celeba"])
def test_shapes(arch):
    torch.manual_seed(0)
    m = build_ali_models(arch)
    assert m.image_shape == arch_image_shape(arch)
    x = torch.rand(2, *m.image_shape) * 2 - 1
    mu, log_sigma = m.encoder(x)
    assert mu.shape == log_sigma.shape == (2, m.latent_dim)
    out = m.generator(mu)
    assert out.shape == x.shape and out.abs().max() <= 1
    assert m.image_features(x).shape == (2, m.image_features.out_features)
    assert m.latent_features(mu).shape == (2, m.latent_features.out_features)
    hidden = m.encoder.hidden_features(x)
    assert len(hidden) == 4 and all(h.shape[0] == 2 and h.dim() == 2 for h in hidden)
    torch.testing.assert_close(hidden[-1], mu)


def test_deterministic_encoder():
    m = build_ali_models("digits", deterministic=True)
    z = m.encoder(torch.zeros(3, 1, 16, 16))
    assert isinstance(z, torch.Tensor) and z.shape == (3, 32)


def test_output_bias_gives_the_data_mean():
    m = build_ali_models("digits")
    nn.init.zeros_(m.generator.output.weight)
    m.generator.init_output_bias(0.3)
    out = m.generator(torch.randn(4, 32))
    assert torch.allclose(out, torch.full_like(out, 2 * 0.3 - 1), atol=1e-6)
    assert m.generator.output.bias[0].item() == pytest.approx(0.5 * math.log(0.3 / 0.7))


@pytest.mark.parametrize("arch", available_archs())
def test_discriminator_parts_have_spectral_norm_and_no_batch_dependence(arch):
    m = build_ali_models(arch)
    for net in (m.image_features, m.latent_features):
        layers = [x for x in net.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
        assert layers and all(hasattr(x, "parametrizations") for x in layers)
        assert not any(isinstance(x, (nn.BatchNorm2d, nn.Dropout)) for x in net.modules())
    m.image_features.eval()
    a, b = torch.rand(2, *m.image_shape), torch.rand(3, *m.image_shape)
    together = m.image_features(torch.cat([a, b]))
    torch.testing.assert_close(together, torch.cat([m.image_features(a), m.image_features(b)]))


def test_unknown_arch():
    with pytest.raises(ConfigError, match="unknown architecture 'mnist'"):
        build_ali_models("mnist")
