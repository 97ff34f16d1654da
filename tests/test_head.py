import pytest
import torch

from gali_ext import (
    MultiClassJointDiscriminatorHead,
    ProviderError,
    ShapeError,
    SpecError,
    TupleSpec,
    add_instance_noise,
    build_spec,
)
from tests._helpers import make_head, random_variables

K3M3 = TupleSpec([("x0", "z0", "x2"), ("xp0", "zp0", "xp2"), ("x1", "z2", "x0")], name="k3m3")
SPECS = [build_spec(n) for n in ("ali", "gali4", "gali8", "gali_pt", "gali_mix")] + [K3M3]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_fused_head_equals_per_class_head(spec, seeded):
    head = make_head(spec).eval()
    variables = random_variables(spec)
    fused = head(variables).joint
    naive = head.forward_per_class(variables).joint
    k = spec.num_classes
    assert fused.shape == (k, 5, k)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_feature_networks_run_once_per_forward(spec, seeded):
    head = make_head(spec, counting=True)
    batch = 5
    head(random_variables(spec, batch=batch))
    for kind, net in head.feature_nets.items():
        assert net.calls == 1, kind
        assert net.rows == batch * len(spec.nodes_of_kind(kind)), kind
    # The authors' way calls each feature net once per slot occurrence.
    head.forward_per_class(random_variables(spec, batch=batch))
    for kind, net in head.feature_nets.items():
        occurrences = sum(c.kinds.count(kind) for c in spec.classes)
        assert net.calls == 1 + occurrences


def test_gradients_match_between_fused_and_per_class(seeded):
    spec = build_spec("gali8")
    head = make_head(spec).eval()
    variables = {k: v.requires_grad_(True) for k, v in random_variables(spec).items()}
    g1 = torch.autograd.grad(head(variables).joint.square().sum(), list(variables.values()))
    g2 = torch.autograd.grad(
        head.forward_per_class(variables).joint.square().sum(), list(variables.values())
    )
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_instance_noise_drawn_once_per_distinct_image():
    spec = build_spec("gali8")
    variables = random_variables(spec)
    noisy = add_instance_noise(variables, spec, 0.1, torch.Generator().manual_seed(0))
    for name in spec.nodes:
        changed = not torch.equal(noisy[name], variables[name])
        assert changed == (name in spec.nodes_of_kind("image"))
    diff = noisy["x0"] - variables["x0"]
    assert 0.07 < diff.std().item() < 0.13
    # The same generator state gives the same noise in both forward paths.
    head = make_head(spec).eval()
    a = head(variables, 0.1, torch.Generator().manual_seed(3)).joint
    b = head.forward_per_class(variables, 0.1, torch.Generator().manual_seed(3)).joint
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_missing_variable_names_the_class(seeded):
    spec = build_spec("gali4")
    head = make_head(spec)
    variables = random_variables(spec)
    del variables["z1"]
    with pytest.raises(ProviderError, match=r"'z1'.*class 2"):
        head(variables)


def test_wrong_latent_size_is_a_shape_error(seeded):
    spec = build_spec("ali")
    head = make_head(spec)
    variables = random_variables(spec, latent_dim=9)
    with pytest.raises(ShapeError, match="'latent' feature network failed"):
        head(variables)


def test_mismatched_batch_and_dtype(seeded):
    spec = build_spec("ali")
    head = make_head(spec)
    variables = random_variables(spec)
    variables["zp0"] = variables["zp0"][:3]
    with pytest.raises(ShapeError, match="batch size 3"):
        head(variables)
    variables = random_variables(spec)
    variables["x0"] = variables["x0"].to(torch.int64)
    with pytest.raises(ShapeError, match="floating"):
        head(variables)


def test_missing_feature_network_for_extra_kind():
    from gali_ext import SpectralMLP
    from tests._helpers import TinyImageFeatures

    with pytest.raises(SpecError, match=r"extra_features\['M'\]"):
        MultiClassJointDiscriminatorHead(
            build_spec("gali_pt"), TinyImageFeatures(), SpectralMLP(6, (), 4)
        )


def test_feature_width_must_be_known():
    from torch import nn

    with pytest.raises(SpecError, match="out_features"):
        MultiClassJointDiscriminatorHead(build_spec("ali"), nn.Flatten(), nn.Flatten())
    head = MultiClassJointDiscriminatorHead(
        build_spec("ali"),
        nn.Flatten(),
        nn.Flatten(),
        feature_dims={"image": 64, "latent": 6},
        joint_hidden=(8,),
    )
    assert head(random_variables(build_spec("ali"))).joint.shape == (2, 5, 2)


def test_no_batch_norm_or_dropout_and_spectral_norm_in_joint():
    head = make_head(build_spec("gali4"))
    kinds = {type(m).__name__ for m in head.modules()}
    assert not any("BatchNorm" in k or "Dropout" in k for k in kinds)
    linears = [m for m in head.joint.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(hasattr(m, "parametrizations") for m in linears)
