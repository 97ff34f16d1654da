"""Drop-in for BigBiGAN-style projects (docs/design.md, section 9): unary heads, the hinge
family, conditioning, priors, discriminator shapes, the documented loop, worked examples."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gali_ext import (
    GALI,
    Chains,
    ConfigError,
    DiscriminatorLoss,
    DiscriminatorOutput,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    MultiClassJointDiscriminatorHead,
    ProductOfTermsLoss,
    ShapeError,
    SpecError,
    SpectralMLP,
    TupleSpec,
    build_spec,
    resolve_prior,
    train_step,
)
from gali_ext.adapters import (
    FeatureNetwork,
    JointNetwork,
    LatentGenerator,
    check,
    monolithic_head,
)
from gali_ext.head import Projection
from gali_ext.losses import hinge_discriminator_loss, hinge_generator_loss
from gali_ext.providers import ReconstructionChain
from tests._helpers import TinyImageFeatures, make_head, random_variables


def hinge(t):
    return torch.relu(1 - t)


# -- 9.2 the hinge family ------------------------------------------------------------------


def test_hinge_family_reduces_to_bigbigan_at_k2():
    logits = torch.randn(2, 7, 2, generator=torch.Generator().manual_seed(0))
    s_enc = logits[0, :, 0] - logits[0, :, 1]  # class 0: encoder pairs, y = +1
    s_gen = logits[1, :, 0] - logits[1, :, 1]  # class 1: generator pairs, y = -1
    d_expected = hinge(s_enc).mean() + hinge(-s_gen).mean()
    eg_expected = s_enc.mean() - s_gen.mean()
    torch.testing.assert_close(HingeDiscriminatorLoss()(logits), d_expected)
    torch.testing.assert_close(HingeGeneratorLoss()(logits), eg_expected)


def test_hinge_family_at_k4_by_hand():
    rows = [[2.0, 0.0, 1.0, -1.0], [0.0, 0.5, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0, 0, -2]]
    logits = torch.tensor(rows).unsqueeze(1)  # [K=4, B=1, K=4]; logits[i, 0] is class i's row
    # D: sum_{j != i} max(0, 1 - (l_i - l_j)) per class: 0, 0.5 + 1.5 + 0.5, 1 + 1 + 1, 6 + 3 + 3
    assert hinge_discriminator_loss(logits, weighted=False).item() == pytest.approx(17.5)
    assert hinge_discriminator_loss(logits).item() == pytest.approx(17.5 * 2 / 12)
    # E/G: sum_{j != i} (l_i - l_j) per class: 2 + 1 + 3, 0.5 - 0.5 + 0.5, 0, -5 - 2 - 2
    assert hinge_generator_loss(logits, weighted=False).item() == pytest.approx(-2.5)
    assert hinge_generator_loss(logits).item() == pytest.approx(-2.5 * 2 / 12)


def test_losses_sum_the_weighted_unary_terms():
    g = torch.Generator().manual_seed(1)
    joint, unary = torch.randn(4, 3, 4, generator=g), torch.randn(2, 4, 3, 4, generator=g)
    output = DiscriminatorOutput(joint, unary, (0, 1), (0.5, 2.0))
    for loss in (DiscriminatorLoss(), ProductOfTermsLoss(), HingeDiscriminatorLoss()):
        expected = loss(joint) + 0.5 * loss(unary[0]) + 2.0 * loss(unary[1])
        torch.testing.assert_close(loss(output), expected)


def test_criteria_registries_and_recipe_settings():
    from gali_ext import DISCRIMINATOR_CRITERIA, GENERATOR_CRITERIA, build_discriminator_criterion
    from gali_ext.recipes import get

    assert set(DISCRIMINATOR_CRITERIA) == {"cross_entropy", "hinge"}
    assert GENERATOR_CRITERIA["hinge"] is HingeGeneratorLoss
    assert isinstance(build_discriminator_criterion("hinge"), HingeDiscriminatorLoss)
    with pytest.raises(ConfigError, match="cross_entropy, hinge"):
        build_discriminator_criterion("wasserstein")
    config = get("digits-gali4").with_overrides(
        {
            "discriminator_criterion": "hinge",
            "generator_criterion": "hinge",
            "prior": "truncated_normal:1.5",
            "unary_weight": "0.5",
        }
    )
    config.validate()
    with pytest.raises(ConfigError, match="discriminator_criterion"):
        get("digits-gali4").with_overrides({"discriminator_criterion": "nope"}).validate()
    with pytest.raises(ConfigError, match="unknown prior"):
        get("digits-gali4").with_overrides({"prior": "cauchy"}).validate()


# -- 9.1 unary heads, closed form against BigBiGAN ------------------------------------------


def _bigbigan_parts(seed=0):
    from gali_ext.adapters.examples import bigbigan_style as bb

    torch.manual_seed(seed)
    parts = bb.Encoder(), bb.Generator(), bb.BigBiGANDiscriminator()
    for module in parts:
        module.eval()  # spectral norm without power iterations, batch norm on running stats
    return bb, parts


def test_unary_hinge_objective_equals_bigbigan_losses_at_k2():
    bb, (encoder, generator, d) = _bigbigan_parts()
    gali = bb.gali_objective("ali", encoder, generator, d)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (6,), generator=g)
    z, y_fake = torch.randn(6, bb.LATENT_DIM, generator=g), torch.tensor([3, 1, 4, 1, 5, 9])
    gali.condition_sampler = lambda y, rng: y_fake
    # BigBiGAN by hand: s_x, s_z, s_xz on encoder pairs (y = +1) and generator pairs (y = -1)
    with torch.no_grad():
        enc = d(x, encoder(x), y)
        gen = d(generator(z, y_fake), z, y_fake)
    d_hand = sum(hinge(s).mean() for s in enc) + sum(hinge(-s).mean() for s in gen)
    eg_hand = sum(s.mean() for s in enc) - sum(s.mean() for s in gen)
    with torch.no_grad():
        d_gali = gali.discriminator_objective((x, y), z=z)
        g_gali = gali.generator_objective((x, y), z=z)
    assert d_gali.output.unary.shape == (2, 2, 6, 2)  # two unary heads, s_x and s_z
    torch.testing.assert_close(d_gali.loss, d_hand)
    torch.testing.assert_close(g_gali.loss, eg_hand)


def test_default_unary_heads_are_bigbigans_scores_with_theta_the_difference_of_rows():
    spec = build_spec("ali")
    dx = TinyImageFeatures()
    dz = SpectralMLP(6, (12,), 10, activate_output=True)
    head = MultiClassJointDiscriminatorHead(
        spec, dx, dz, joint_hidden=(8,), unary=True, unary_weights={"latent": 0.5}
    ).eval()
    variables = random_variables(spec)
    out = head(variables)
    assert out.unary_slots == (0, 1) and out.unary_weights == (1.0, 0.5)
    layer = head.unary_heads["0"].linear
    w, b = layer.weight, layer.bias
    theta, bias = w[0] - w[1], b[0] - b[1]
    with torch.no_grad():
        s_x = torch.stack([dx(variables["x0"]), dx(variables["xp0"])]) @ theta + bias
        unary_x = out.unary[0]
    torch.testing.assert_close(unary_x[..., 0] - unary_x[..., 1], s_x)
    d = HingeDiscriminatorLoss()(out)
    joint_term = HingeDiscriminatorLoss()(out.joint)
    x_term = hinge(s_x[0]).mean() + hinge(-s_x[1]).mean()
    z_term = HingeDiscriminatorLoss()(out.unary[1])
    torch.testing.assert_close(d, joint_term + x_term + 0.5 * z_term)


def test_unary_keys_and_weights_are_checked():
    spec = build_spec("gali8")
    with pytest.raises(ConfigError, match="expected a kind"):
        make_head_with(spec, unary={"pixels": True})
    with pytest.raises(ConfigError, match="slot 1 has no unary head"):
        make_head_with(spec, unary={0: True}, unary_weights={1: 2.0})
    head = make_head_with(spec, unary={"image": True})
    assert head(random_variables(spec)).unary.shape == (2, 8, 5, 8)  # GALI-8's slots 0 and 2


def make_head_with(spec, **kwargs):
    dz = SpectralMLP(6, (12,), 10, activate_output=True)
    return MultiClassJointDiscriminatorHead(
        spec, TinyImageFeatures(), dz, joint_hidden=(8,), **kwargs
    )


# -- 9.3 conditioning ------------------------------------------------------------------------


class RecordingGenerator(nn.Module):
    def __init__(self, latent_dim=6):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim + 1, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8))
        )
        self.seen = []

    def forward(self, z, y):
        self.seen.append(y)
        return self.net(torch.cat([z, y.float().unsqueeze(1)], 1))


def test_the_condition_travels_with_the_chains():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    generator = RecordingGenerator()
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    chains = Chains(
        x, encoder, generator, y=y, latent_shape=(6,), rng=torch.Generator().manual_seed(0)
    )
    chains.compute(build_spec("gali4").nodes)  # x1 = G(z0), xp0 = G(zp0), xp1 = G(zp1)
    y_prior = chains.conditions["zp0"]
    assert sorted(y_prior.tolist()) == y.tolist() and not torch.equal(y_prior, y)
    assert [s is y for s in generator.seen].count(True) == 1  # x1 = G(z0, y)
    assert [s is y_prior for s in generator.seen].count(True) == 2  # xp0, xp1 = G(., y_p)
    assert chains.condition_of("E(Mask1(x0))") is y and chains.condition_of("zp1") is y_prior
    again = Chains(
        x, encoder, generator, y=y, latent_shape=(6,), rng=torch.Generator().manual_seed(0)
    )
    again.compute(build_spec("gali4").nodes)
    assert torch.equal(again.conditions["zp0"], y_prior)  # the rng draws the shuffle


def test_projection_of_class_ids_equals_one_hot_and_reduces_to_the_projection_term():
    torch.manual_seed(0)
    projection = Projection(in_features=3, num_classes=2, conditions=4).eval()
    h, y = torch.randn(5, 3), torch.tensor([0, 3, 1, 1, 2])
    by_id = projection(h, y)
    torch.testing.assert_close(by_id, projection(h, F.one_hot(y, 4).float()))
    v = projection.embedding.weight.view(4, 2, 3)  # V(y)_k, one row per class k
    expected = ((v[y, 0] - v[y, 1]) * h).sum(1)  # <V_0(y) - V_1(y), h>
    torch.testing.assert_close(by_id[:, 0] - by_id[:, 1], expected)
    with pytest.raises(ShapeError, match=r"\[N, 4\].*got \[5, 3\]"):
        projection(h, torch.rand(5, 3))


def test_conditional_objective_needs_pairs_and_a_generator_that_takes_the_condition():
    spec = build_spec("gali4")
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    plain = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,))
    unconditional = GALI(encoder, plain, make_head(spec), [ReconstructionChain()])
    with pytest.raises(ConfigError, match="head is unconditional"):
        unconditional.discriminator_loss((x, y))
    conditional = GALI(encoder, plain, make_head_with(spec, conditions=3), [ReconstructionChain()])
    with pytest.raises(ConfigError, match=r"pass batches \(x, y\)"):
        conditional.discriminator_loss(x)
    with pytest.raises(ConfigError, match=r"LatentGenerator\(G, condition="):
        conditional.discriminator_loss((x, y))
    with pytest.raises(ConfigError, match="was not told how the generator takes"):
        GALI(
            encoder, LatentGenerator(plain), conditional.head, [ReconstructionChain()]
        ).discriminator_loss((x, y))
    dropped = GALI(
        encoder, LatentGenerator(plain, condition=False), conditional.head, [ReconstructionChain()]
    )
    assert torch.isfinite(dropped.discriminator_loss((x, y)))
    named = GALI(
        encoder,
        LatentGenerator(RecordingGenerator(), condition="y"),
        conditional.head,
        [ReconstructionChain()],
    )
    assert torch.isfinite(named.generator_loss((x, y)))


def test_a_conditional_head_refuses_classes_mixing_the_two_chains():
    mixed = TupleSpec([("x0", "z0"), ("xp0", "zp0"), ("x0", "zp0")])
    with pytest.raises(SpecError, match="mixes nodes of the real chain"):
        make_head_with(mixed, conditions=3)


def test_conditional_recipe_runs(tmp_path):
    import json

    from gali_ext.recipes import get
    from gali_ext.recipes.train import train

    config = get("digits-gali8-cond").with_overrides(
        {"steps": "2", "batch_size": "8", "checkpoint_every": "2", "sample_every": "1"}
    )
    assert config.conditions == 10 and config.spec == "gali8"
    out = train(config, tmp_path / "run", progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["test_pixel_mse"])
    assert (out / "samples.png").is_file()


# -- 9.4 priors ------------------------------------------------------------------------------


def test_named_priors_draw_what_they_say():
    g = torch.Generator().manual_seed(0)
    z = resolve_prior("truncated_normal:1.5")((20000, 2), "cpu", torch.float32, g)
    assert z.abs().max() <= 1.5
    # the standard deviation of N(0, 1) truncated to [-b, b]: sqrt(1 - 2 b phi(b) / (2 Phi(b) - 1))
    b = 1.5
    phi, big_phi = math.exp(-b * b / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(b / 2**0.5))
    assert z.std().item() == pytest.approx(math.sqrt(1 - 2 * b * phi / (2 * big_phi - 1)), rel=0.02)
    u = resolve_prior("uniform:3")((20000,), "cpu", torch.float64, g)
    assert u.dtype == torch.float64 and -3 <= u.min() and u.max() <= 3
    assert u.var().item() == pytest.approx(9 / 3, rel=0.03)  # (2b)^2 / 12
    assert resolve_prior(None).name == "normal" and resolve_prior("truncated_normal").name == (
        "truncated_normal:2"
    )
    with pytest.raises(ConfigError, match="takes no parameter"):
        resolve_prior("normal:2")
    with pytest.raises(ConfigError, match="positive"):
        resolve_prior("uniform:-1")


def test_distribution_and_callable_priors_reach_the_prior_chain():
    spec = build_spec("ali")
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    x = torch.rand(4, 1, 8, 8)
    for prior, holds in [
        (torch.distributions.Uniform(2.0, 3.0), lambda z: (z >= 2).all() and (z <= 3).all()),
        (
            torch.distributions.Normal(torch.full((6,), 7.0), 0.01),
            lambda z: (z - 7).abs().max() < 1,
        ),
        (lambda shape, device, dtype, rng: torch.full(shape, -5.0), lambda z: (z == -5).all()),
        ("truncated_normal:0.1", lambda z: z.abs().max() <= 0.1),
    ]:
        gali = GALI(encoder, generator, make_head(spec), prior=prior)
        z = gali.chains(x)["zp0"]
        assert z.shape == (4, 6) and holds(z), prior
    with pytest.raises(ShapeError, match="draws latents of shape"):
        GALI(
            encoder,
            generator,
            make_head(spec),
            prior=torch.distributions.Normal(torch.zeros(3), 1.0),
        ).chains(x)["zp0"]


# -- 9.5 discriminator shapes, user failures, batch norm --------------------------------------


class SeparateJoint(nn.Module):
    """A joint network taking (F, H) separately."""

    def __init__(self):
        super().__init__()
        self.net = SpectralMLP(16 + 10, (8,), 4)

    def forward(self, fx, fz):
        return self.net(torch.cat([fx, fz], 1))


class TupleFeatures(nn.Module):
    """A feature network returning (features, logits), as many classifiers do."""

    out_features = 16

    def __init__(self):
        super().__init__()
        self.body = TinyImageFeatures()

    def forward(self, x):
        h = self.body(x)
        return h, h.sum(1)


def test_user_network_failures_name_the_fix():
    spec = build_spec("gali4")
    dz = SpectralMLP(6, (12,), 10, activate_output=True)
    variables = random_variables(spec)
    head = MultiClassJointDiscriminatorHead(spec, TinyImageFeatures(), dz, joint=SeparateJoint())
    with pytest.raises(ConfigError, match=r"TypeError.*JointNetwork\(net, inputs='by_kind'\)"):
        head(variables)
    head = MultiClassJointDiscriminatorHead(
        spec, TinyImageFeatures(), dz, joint=JointNetwork(SeparateJoint(), inputs="separate")
    )
    assert head(variables).joint.shape == (4, 5, 4)
    head = MultiClassJointDiscriminatorHead(spec, TupleFeatures(), dz, joint_hidden=(8,))
    with pytest.raises(ShapeError, match=r"returned a tuple of 2.*FeatureNetwork\(net, output=0\)"):
        head(variables)
    head = MultiClassJointDiscriminatorHead(
        spec, FeatureNetwork(TupleFeatures(), output=0), dz, joint_hidden=(8,)
    )
    assert head(variables).joint.shape == (4, 5, 4)
    with pytest.raises(ConfigError, match=r"output=5 cannot be read.*2 elements"):
        MultiClassJointDiscriminatorHead(
            spec, FeatureNetwork(TupleFeatures(), output=5), dz, joint_hidden=(8,)
        )(variables)


def test_monolithic_d_refuses_more_than_two_slots_and_gives_bigans_logits_at_k2():
    from gali_ext.adapters.examples import monolithic_d as mono

    torch.manual_seed(0)
    d = mono.BiGANDiscriminator().eval()
    with pytest.raises(SpecError, match=r"4 slots.*split your D into"):
        monolithic_head(build_spec("gali8"), d)
    head = monolithic_head(build_spec("ali"), d).eval()
    x, z = torch.rand(3, 1, 16, 16), torch.randn(3, mono.LATENT_DIM)
    xp, zp = torch.rand(3, 1, 16, 16), torch.randn(3, mono.LATENT_DIM)
    out = head({"x0": x, "z0": z, "xp0": xp, "zp0": zp}).joint
    with torch.no_grad():
        s_real, s_fake = d(x, z).squeeze(1), d(xp, zp).squeeze(1)
    torch.testing.assert_close(out[:, :, 1], torch.zeros(2, 3))
    torch.testing.assert_close(out[:, :, 0], torch.stack([s_real, s_fake]))
    # cross-entropy on (s, 0) is BiGAN's binary cross-entropy on s
    bce = F.binary_cross_entropy_with_logits
    expected = bce(s_real, torch.ones(3)) + bce(s_fake, torch.zeros(3))
    torch.testing.assert_close(DiscriminatorLoss()(out), expected)
    with pytest.raises(SpecError, match="ends in one score, and K=4"):
        monolithic_head(build_spec("gali4"), d)


class BatchNormFeatures(nn.Module):
    out_features = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 4, 2, 1),
            nn.BatchNorm2d(4),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64, 16),
        )
        self.outputs = []

    def forward(self, x):
        out = self.net(x)
        self.outputs.append(out)
        return out


def test_batch_norm_warned_when_fused_is_chosen_and_auto_runs_each_chain_alone():
    spec = build_spec("gali4")
    dz = SpectralMLP(6, (12,), 10, activate_output=True)
    with pytest.warns(UserWarning, match=r"net\.1: BatchNorm2d.*'per_chain'"):
        fused = MultiClassJointDiscriminatorHead(
            spec, BatchNormFeatures(), dz, joint_hidden=(8,), feature_pass="fused"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = MultiClassJointDiscriminatorHead(
            spec, copy.deepcopy(fused.feature_nets["image"]), dz, joint_hidden=(8,)
        )
        per_node = MultiClassJointDiscriminatorHead(
            spec,
            copy.deepcopy(fused.feature_nets["image"]),
            dz,
            joint_hidden=(8,),
            feature_pass="per_node",
        )
    assert auto.feature_pass == "per_chain"
    assert MultiClassJointDiscriminatorHead(spec, TinyImageFeatures(), dz).feature_pass == "fused"
    variables = random_variables(spec)
    x0 = variables["x0"]
    alone = copy.deepcopy(per_node.feature_nets["image"]).net(x0)  # D(x)(x0) run alone
    per_node(variables)
    image_net = per_node.feature_nets["image"]
    assert len(image_net.outputs) == len(spec.nodes_of_kind("image"))  # once per node
    torch.testing.assert_close(image_net.outputs[0], alone)
    auto(variables)  # GALI-4's image nodes: x0 (real chain); xp0, xp1 (prior chain)
    batches = [len(out) for out in auto.feature_nets["image"].outputs]
    assert batches == [len(x0), 2 * len(x0)]
    torch.testing.assert_close(auto.feature_nets["image"].outputs[0], alone)
    fused(variables)
    mixed = fused.feature_nets["image"].outputs[0][: len(x0)]  # x0's rows of the fused pass
    assert not torch.allclose(mixed, alone, atol=1e-3)  # batch statistics mixed


class NormalisedImages(nn.Module):
    """D(x) = batch norm without affine parameters, flattened: ``(x - mean) / std``."""

    out_features = 64

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(1, affine=False, eps=1e-12)

    def forward(self, x):
        return self.norm(x).flatten(1)


@pytest.mark.parametrize("feature_pass", ["per_node", "per_chain"])
def test_batch_norm_per_node_erases_what_tells_an_image_from_its_reconstruction(feature_pass):
    # x1 = x0 + c: per node, batch norm maps both to the same features (GALI-8's classes,
    # which swap x0 and x1, become one); per chain, x0 and x1 are normalised together, and
    # their features differ by c / std(x0 and x1 pooled), in closed form.
    spec = build_spec("gali8")
    dz = SpectralMLP(6, (12,), 10, activate_output=True)
    head = MultiClassJointDiscriminatorHead(
        spec, NormalisedImages(), dz, joint_hidden=(8,), feature_pass=feature_pass
    )
    seen = []
    head.feature_nets["image"].register_forward_hook(lambda m, i, out: seen.append(out))
    variables = random_variables(spec, batch=16)
    c = 0.5
    variables["x1"] = variables["x0"] + c
    head(variables)
    features = torch.cat(seen)
    x0, x1 = features[:16], features[16:32]  # the real chain's nodes come first
    if feature_pass == "per_node":
        torch.testing.assert_close(x0, x1)
    else:
        pooled = torch.cat([variables["x0"], variables["x1"]])
        std = pooled.var(unbiased=False).sqrt()
        torch.testing.assert_close(x1 - x0, torch.full_like(x0, c) / std)


# -- 6: the documented loop is train_step's ---------------------------------------------------


def test_documented_loop_equals_train_step():
    spec = build_spec("gali4")
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    gali = GALI(encoder, generator, make_head(spec), [ReconstructionChain()])
    twin = copy.deepcopy(gali)
    x = torch.rand(5, 1, 8, 8) * 2 - 1

    def optimizers(g):
        eg = [*g.encoder.parameters(), *g.generator.parameters()]
        return torch.optim.Adam(g.head.parameters(), 1e-3), torch.optim.Adam(eg, 1e-3)

    opt_d, opt_eg = optimizers(gali)
    torch.manual_seed(1)
    d = gali.discriminator_objective(x, differentiable_chains=True)  # the README's loop
    opt_d.zero_grad()
    d.loss.backward()
    opt_d.step()
    g = gali.generator_objective(chains=d.chains)
    opt_eg.zero_grad()
    g.loss.backward()
    opt_eg.step()
    torch.manual_seed(1)
    metrics = train_step(twin, [x], *optimizers(twin))
    assert metrics.g_loss == g.loss.item() and d.chains.calls["E"] == 3  # z0, z1, zp1: once each
    for a, b in zip(gali.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# -- 7: worked examples -----------------------------------------------------------------------


def _grads(params):
    """Which parameters the last backward pass reached (a hinge's bias may get an exact 0)."""
    return [p.grad is not None for p in params]


def check_gradients(gali, d_params, eg_params, batch):
    """One documented D step and G/E step: every D parameter gets a gradient in the D step and
    none in the G/E step; E and G get none in the D step and some in the G/E step."""
    everything = [*d_params, *eg_params]
    d = gali.discriminator_objective(batch, differentiable_chains=True)
    for p in everything:
        p.grad = None
    d.loss.backward()
    assert math.isfinite(d.loss.item())
    missing = [i for i, ok in enumerate(_grads(d_params)) if not ok]
    assert not missing, f"D parameters without a gradient in the D step: {missing}"
    assert all(p.grad is None for p in eg_params)
    g = gali.generator_objective(chains=d.chains)
    for p in everything:
        p.grad = None
    g.loss.backward()
    assert math.isfinite(g.loss.item())
    assert all(p.grad is None for p in d_params)
    assert any(_grads(eg_params))


def own_loss_trains(module, loss):
    """The parameters of ``module`` the project's own loss gives a gradient."""
    params = list(module.parameters())
    loss.backward(inputs=params)
    return [p for p, ok in zip(params, _grads(params)) if ok]


def test_example_a_bigbigan_style_switches_to_gali4_and_gali8():
    from gali_ext.adapters.examples import bigbigan_style as bb
    from gali_ext.adapters.examples.digits import digits_batches

    x, y = digits_batches(1, batch_size=16)[0]
    torch.manual_seed(0)
    encoder, generator, d = bb.Encoder(), bb.Generator(), bb.BigBiGANDiscriminator()
    d_loss, _ = bb.bigbigan_losses(d, encoder, generator, x, y)
    trained = own_loss_trains(d, d_loss)
    assert len(trained) == len(list(d.parameters()))  # the unary and projection layers too
    gali = bb.gali_objective("gali4", encoder, generator, d)
    head_params = {id(p) for p in gali.head.parameters()}
    assert all(id(p) in head_params for p in trained)
    eg = [*encoder.parameters(), *generator.parameters()]
    check_gradients(gali, list(gali.head.parameters()), eg, (x, y))
    gali8 = bb.gali_objective("gali8", encoder, generator, bb.BigBiGANDiscriminator())
    check_gradients(gali8, list(gali8.head.parameters()), eg, (x, y))
    for preset in ("gali4", "gali8"):
        assert not check(*bb.check_switch(preset), file=None).problems
    for preset in ("gali4", "gali8"):
        losses = bb.train_gali(preset, steps=2, batch_size=16)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_example_b_ali_style_switches_to_gali4_and_gali8():
    from gali_ext.adapters.examples import ali_style as ali
    from gali_ext.adapters.examples.digits import digits_batches

    x, _ = digits_batches(1, batch_size=16)[0]
    torch.manual_seed(0)
    encoder, generator, d = ali.ALIEncoder(), ali.ALIGenerator(), ali.ALIDiscriminator()
    d_loss, _ = ali.ali_losses(d, encoder, generator, x)
    trained = own_loss_trains(d, d_loss)
    assert len(trained) == len(list(d.parameters()))
    eg = [*encoder.parameters(), *generator.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # per_chain: no batch-norm warning
        gali = ali.gali_objective("gali4", encoder, generator, d)
    assert all(id(p) in {id(q) for q in gali.head.parameters()} for p in trained)
    check_gradients(gali, list(gali.head.parameters()), eg, x)
    gali8 = ali.gali_objective("gali8", encoder, generator, ali.ALIDiscriminator())
    check_gradients(gali8, list(gali8.head.parameters()), eg, x)
    for preset in ("gali4", "gali8"):
        assert not check(*ali.check_switch(preset), file=None).problems
    for preset in ("gali4", "gali8"):
        losses = ali.train_gali(preset, steps=2, batch_size=16)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_example_c_monolithic_d_switches_to_gali4_and_ali():
    from gali_ext.adapters.examples import monolithic_d as mono
    from gali_ext.adapters.examples.digits import digits_batches

    x, _ = digits_batches(1, batch_size=16)[0]
    torch.manual_seed(0)
    encoder, generator, d = mono.Encoder(), mono.Generator(), mono.BiGANDiscriminator()
    d_loss, _ = mono.bigan_losses(d, encoder, generator, x)
    trained = own_loss_trains(d, d_loss)
    assert len(trained) == len(list(d.parameters()))
    eg = [*encoder.parameters(), *generator.parameters()]
    for preset in ("ali", "gali4"):
        d = copy.deepcopy(d)  # one head per discriminator: the head's layers go into it
        trained = own_loss_trains(d, mono.bigan_losses(d, encoder, generator, x)[0])
        gali = mono.gali_objective(preset, encoder, generator, d)
        assert all(id(p) in {id(q) for q in gali.head.parameters()} for p in trained)
        check_gradients(gali, list(gali.head.parameters()), eg, x)
        losses = mono.train_gali(preset, steps=2, batch_size=16)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
        assert not check(*mono.check_switch(preset), file=None).problems


def test_adapters_readme_discriminator_blocks_run(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "adapters" / "README.md").read_text()
    monkeypatch.chdir(tmp_path)  # the files the blocks write stay out of the repository
    blocks = re.findall(r"```python\n(.+?)```", readme, re.S)
    cases = {
        "BigBiGANDiscriminator(": "gali8",
        "ALIDiscriminator(": "gali4",
        "monolithic_head(build_spec": "gali4",
    }
    namespace: dict = {}  # the blocks run in order, as a reader pastes them
    checked = set()
    for block in blocks:
        exec(compile(block, "adapters/README.md", "exec"), namespace)
        marker = next((m for m in cases if m in block), None)
        if marker is None or "head = " not in block:
            continue
        checked.add(marker)
        preset = cases[marker]
        head, d = namespace["head"], namespace["d"]
        assert head.spec.name == preset
        assert {id(p) for p in d.parameters()} <= {id(p) for p in head.parameters()}
    assert checked == set(cases)
