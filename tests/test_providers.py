import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gali_ext import GALI, Chains, ConfigError, ProviderError, ShapeError, TupleSpec, build_spec
from gali_ext.errors import CheckpointError
from gali_ext.providers import (
    AliceReconstruction,
    MaskMix,
    PretrainedFeatures,
    ReconstructionChain,
    sample_box_masks,
)
from tests._helpers import make_head


def exact_coverage(height: int, width: int) -> torch.Tensor:
    """P(pixel (r, c) inside the box) under P(M), by enumerating every box."""

    def axis(n: int) -> torch.Tensor:
        p = torch.zeros(n, dtype=torch.float64)
        for size in range(1, n + 1):
            for start in range(n - size + 1):
                p[start : start + size] += 1 / n / (n - size + 1)
        return p

    return axis(height)[:, None] * axis(width)[None, :]


def test_mask_coverage_matches_closed_form():
    h, w, n = 5, 4, 40000
    masks = sample_box_masks(n, h, w, torch.Generator().manual_seed(0))
    assert masks.shape == (n, 1, h, w) and masks.dtype == torch.bool
    empirical = masks.double().mean((0, 1))
    exact = exact_coverage(h, w)
    tolerance = 4 * torch.sqrt(exact * (1 - exact) / n)  # four standard errors
    assert ((empirical - exact).abs() <= tolerance).all()
    # the centre pixel of a 5-row axis is covered with probability (by hand) 0.6333...
    assert exact_coverage(5, 1)[2, 0].item() == pytest.approx(
        (1 / 5 + 1 / 4 * 2 + 1 / 3 * 3 + 1 / 2 * 2 + 1) / 5
    )


def test_mask_box_sizes_are_uniform():
    masks = sample_box_masks(30000, 4, 3, torch.Generator().manual_seed(1))
    heights = masks.any(-1).sum(-1).flatten()
    counts = torch.bincount(heights, minlength=5)[1:].double() / len(heights)
    assert torch.allclose(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.015)
    # every mask is one solid rectangle: area == height * width
    widths = masks.any(-2).sum(-1).flatten()
    assert torch.equal(masks.sum((1, 2, 3)), heights * widths)


def toy_pair(latent=6):
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, latent))
    generator = nn.Sequential(nn.Linear(latent, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    return encoder, generator


def test_mask_and_mix_semantics():
    encoder, generator = toy_pair()
    provider = MaskMix(fill=-1.0)
    x = torch.rand(8, 1, 8, 8)
    chains = Chains(
        x,
        encoder,
        generator,
        functions={n: provider.function_for(n) for n in ("Mask1", "Mix1", "Mask2")},
        rng=torch.Generator().manual_seed(0),
    )
    masked, mixed = chains["Mask1(x0)"], chains["Mix1(x0)"]
    box = chains.scratch["MaskMix.box1"]
    assert torch.equal(masked[box.expand_as(x)], torch.full_like(x, -1.0)[box.expand_as(x)])
    assert torch.equal(masked[~box.expand_as(x)], x[~box.expand_as(x)])
    inpainted = chains["G(E(Mask1(x0)))"]
    outside = ~box.expand_as(x)
    assert torch.equal(mixed[outside], x[outside])  # bit-identical outside the box
    assert torch.equal(mixed[~outside], inpainted[~outside])
    assert chains.calls["Mask1"] == 1  # Mix1 reused Mask1's node, not a second mask
    chains["Mask2(x0)"]
    assert not torch.equal(chains.scratch["MaskMix.box2"], box)  # independent draws


def small_feature_model(tmp_path):
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_pretrained_features_from_local_timm_weights(tmp_path):
    source, path = small_feature_model(tmp_path)
    provider = PretrainedFeatures("test_resnet", path, input_size=(32, 32))
    # the loaded weights are the saved ones (classifier dropped)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    for k, v in provider.model.state_dict().items():
        assert torch.equal(v, body[k]), k
    assert all(not p.requires_grad for p in provider.model.parameters())
    provider.train()
    assert not provider.model.training
    x = torch.rand(3, 1, 8, 8, requires_grad=True) * 2 - 1
    feats = provider.features(x)
    assert feats.shape == (3, provider.feature_dim((1, 8, 8)))
    # normalisation and resize by hand: [-1,1] -> [0,1] -> 32x32 bilinear -> (x - mean) / std
    manual = (x.detach() + 1) / 2
    manual = nn.functional.interpolate(
        manual.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", align_corners=False
    )
    mean = torch.tensor(source.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(source.pretrained_cfg["std"]).view(1, 3, 1, 1)
    source.reset_classifier(0)
    source.eval()
    torch.testing.assert_close(feats.detach(), source((manual - mean) / std))
    (grad,) = torch.autograd.grad(feats.sum(), x)
    assert grad.abs().sum() > 0  # differentiable in its input


def test_pretrained_features_named_layer_and_errors(tmp_path):
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 2))
    provider = PretrainedFeatures(module, layer="1")
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(provider.features(x * 2 - 1), module[1](x.flatten(1)))
    with pytest.raises(ConfigError, match="no layer 'head'"):
        PretrainedFeatures(module, layer="head")
    nan_model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():
        nan_model[1].bias.fill_(float("nan"))
    with pytest.raises(ShapeError, match="NaN"):
        PretrainedFeatures(nan_model).features(x)
    with pytest.raises(ConfigError, match="cannot name"):
        PretrainedFeatures(module, name="Mask1")


def test_bad_weight_files_name_file_and_key(tmp_path):
    _, path = small_feature_model(tmp_path)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.0.weight": torch.zeros(1, 1, 1, 1)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"wrong.safetensors.*'conv1.0.weight'.*shape"):
        PretrainedFeatures("test_resnet", wrong)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        PretrainedFeatures("test_resnet", truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        PretrainedFeatures("test_resnet", tmp_path / "missing.safetensors")


def test_reconstruction_chain_depth_checks():
    encoder, generator = toy_pair()
    with pytest.raises(ProviderError, match="ReconstructionChain"):
        GALI(encoder, generator, make_head(build_spec("gali4")))
    deep = TupleSpec([("x0", "z2"), ("xp2", "zp0")])
    with pytest.raises(ProviderError, match="depth 2"):
        GALI(encoder, generator, make_head(deep), [ReconstructionChain(depth=1)])
    GALI(encoder, generator, make_head(deep), [ReconstructionChain()])
    with pytest.raises(ProviderError, match="depth must be"):
        ReconstructionChain(depth=0)


def test_missing_provider_is_named():
    encoder, generator = toy_pair()
    with pytest.raises(ProviderError, match="'Mask1'.*no feedback provider"):
        GALI(encoder, generator, make_head(build_spec("gali_mix")), [ReconstructionChain()])
    with pytest.raises(ProviderError, match="'M'"):
        GALI(encoder, generator, make_head(build_spec("ali")), [AliceReconstruction(1, "M")])


def test_alice_terms_by_hand():
    encoder, generator = toy_pair()
    gali = GALI(encoder, generator, make_head(build_spec("alice")), [AliceReconstruction(0.5)])
    x = torch.rand(4, 1, 8, 8)
    objective = gali.generator_objective(x)
    chains = objective.chains
    expected = 0.5 * (chains["x0"] - chains["x1"]).pow(2).mean()
    torch.testing.assert_close(objective.parts["alicereconstruction0"], expected.detach())
    torch.testing.assert_close(
        objective.loss, objective.parts["adversarial"] + expected, rtol=1e-6, atol=1e-6
    )
    assert math.isfinite(objective.loss.item())
