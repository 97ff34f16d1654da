"""Nothing of the user's project is lost in the switch (issue 23): checkpoints, conditioning in
``forward``, batch-norm discriminators, errors that name the fix, and the checker."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from gali_ext import (
    GALI,
    ConfigError,
    MultiClassJointDiscriminatorHead,
    ShapeError,
    SpecError,
    build_spec,
    get_preset,
    resolve_prior,
    tuple_class_accuracy,
)
from gali_ext.adapters import (
    FeatureNetwork,
    JointNetwork,
    LatentEncoder,
    check,
    monolithic_head,
    widen_input,
)
from gali_ext.adapters.examples import ali_style as ali
from gali_ext.adapters.examples import bigbigan_style as bb
from gali_ext.adapters.examples import monolithic_d as mono
from gali_ext.adapters.examples.digits import digits_batches


def one_step(gali, discriminator, encoder, generator, opt_d, opt_eg, batch):
    """The BigBiGAN example's loop, one step (the switched line included)."""
    d_loss, eg_loss = (o.loss for o in gali.shared_objectives(batch))
    eg = [*encoder.parameters(), *generator.parameters()]
    bb.apply_losses(d_loss, eg_loss, discriminator, eg, opt_d, opt_eg)


# -- 1: the user's own checkpoints -----------------------------------------------------------


def test_users_own_state_dict_holds_the_heads_layers_and_resumes_bit_identically(tmp_path):
    encoder, generator, d, gali, opt_d, opt_eg = bb.build("gali8")
    batches = digits_batches(2, 16)
    for batch in batches:
        one_step(gali, d, encoder, generator, opt_d, opt_eg, batch)
    added = gali.head.added_layers().state_dict()
    assert added and all(f"gali_head.{k}" in d.state_dict() for k in added)
    path = tmp_path / "project.pt"
    bb.save_checkpoint(path, encoder, generator, d, opt_d, opt_eg)  # the project's own code
    *rebuilt, gali2, opt_d2, opt_eg2 = bb.build("gali8", seed=1)  # other initial weights
    bb.load_checkpoint(path, *rebuilt, opt_d2, opt_eg2)  # strict load: nothing missing
    x, y = batches[0]
    for g in (gali, gali2):
        g.eval()
    with torch.no_grad():
        z = torch.randn(16, bb.LATENT_DIM, generator=torch.Generator().manual_seed(0))
        gali.condition_sampler = gali2.condition_sampler = lambda y, rng: y.flip(0)
        a = gali.discriminator_objective((x, y), z=z).output
        b = gali2.discriminator_objective((x, y), z=z).output
    assert torch.equal(a.joint, b.joint) and torch.equal(a.unary, b.unary)


def test_head_layers_missing_from_the_d_optimizer_are_an_error_at_the_second_step():
    torch.manual_seed(0)
    encoder, generator, d = bb.Encoder(), bb.Generator(), bb.BigBiGANDiscriminator()
    opt_d = torch.optim.Adam(d.parameters(), 2e-4)  # built before the head: misses its layers
    gali = bb.gali_objective("gali8", encoder, generator, d)
    opt_eg = torch.optim.Adam([*encoder.parameters(), *generator.parameters()], 1e-4)
    batches = digits_batches(2, 8)
    one_step(gali, d, encoder, generator, opt_d, opt_eg, batches[0])
    with pytest.raises(ConfigError, match=r"no optimizer that stepped.*gali_head\."):
        one_step(gali, d, encoder, generator, opt_d, opt_eg, batches[1])


# -- 2: conditioning computed in forward ------------------------------------------------------


def test_projection_computed_in_forward_trains_as_the_unary_score():
    torch.manual_seed(0)
    encoder, generator, d, gali, *_ = bb.build("gali8")
    out = gali.discriminator_objective(digits_batches(1, 8)[0], differentiable_chains=True)
    out.loss.backward()
    embed = d.x_net.embed.parametrizations.weight.original
    assert embed.grad is not None and embed.grad.abs().sum() > 0
    assert out.output.unary.shape[:2] == (4, 8)  # s_x and s_z on each of the 4 slots


def test_a_layer_the_head_never_calls_is_warned_about_at_the_first_step():
    torch.manual_seed(0)
    d = bb.BigBiGANDiscriminator()
    widen_input(d.joint, 2)
    head = MultiClassJointDiscriminatorHead(  # the natural wiring that drops the projection
        build_spec("gali8"),
        image_features=FeatureNetwork(d.x_net, output=1, condition="y"),
        latent_features=FeatureNetwork(d.z_net, output=1),
        joint=JointNetwork(d.joint, condition="y", features="body"),
        unary={"image": d.x_net.linear},
        discriminator=d,
    )
    gali = GALI(bb.Encoder(), bb.Generator(), head, get_preset("gali8").providers())
    with pytest.warns(UserWarning, match=r"x_net\.embed\.parametrizations\.weight\.original"):
        gali.discriminator_objective(digits_batches(1, 8)[0])
    with pytest.raises(ConfigError, match=r"x_net\.embed"):
        check(gali, digits_batches(1, 8)[0], file=None)


# -- 3: a batch-norm D(x) on GALI-8 -----------------------------------------------------------


@pytest.mark.slow
def test_gali8_with_a_batch_norm_dx_learns():
    torch.manual_seed(0)
    encoder, generator, d, gali, opt_d, opt_eg = ali.build("gali8")
    assert gali.head.feature_pass == "per_chain"
    accuracy = []
    for i, (x, _) in enumerate(digits_batches(200, 16, seed=0)):
        o = gali.discriminator_objective(x, differentiable_chains=True)
        opt_d.zero_grad()
        o.loss.backward()
        opt_d.step()
        g = gali.generator_objective(chains=o.chains)
        opt_eg.zero_grad()
        g.loss.backward()
        opt_eg.step()
        if i >= 160:
            accuracy.append(tuple_class_accuracy(o.logits))
    per_class = torch.stack(accuracy).mean(0)
    assert per_class.mean() > 0.3  # chance: 1/8
    assert per_class.min() > 0.15


# -- 5: errors that name the fix --------------------------------------------------------------


def test_a_joint_for_one_pair_on_gali8_names_widen_input():
    d = ali.ALIDiscriminator()
    with pytest.raises(ShapeError, match=r"widen_input\(joint_module, 2\)"):
        MultiClassJointDiscriminatorHead(
            build_spec("gali8"),
            image_features=FeatureNetwork(d.dx),
            latent_features=FeatureNetwork(d.dz, input_shape=(ali.LATENT_DIM, 1, 1)),
            joint=JointNetwork(d.dxz, features="5"),
        )
    head = MultiClassJointDiscriminatorHead(  # width unknown at build: the first batch says it
        build_spec("gali8"),
        image_features=d.dx,
        latent_features=FeatureNetwork(d.dz, input_shape=(ali.LATENT_DIM, 1, 1)),
        joint=JointNetwork(d.dxz, features="5"),
    )
    variables = {
        n: torch.randn(4, 1, 16, 16) if n.startswith("x") else torch.randn(4, 16)
        for n in build_spec("gali8").nodes
    }
    with pytest.raises(ShapeError, match=r"widen_input\(joint_module, 2\)"):
        head(variables)
    widen_input(d.dxz, 2)
    assert d.dxz[1].in_channels == 256 and head(variables).joint.shape == (8, 4, 8)


def test_widen_input_keeps_spectral_norm_and_the_layers_config():
    net = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(6, 4)), nn.ReLU())
    old = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 5, 1, bias=False)))
    widen_input(net, 2)
    widen_input(old, 3)
    assert net[0].in_features == 12 and net[0].out_features == 4
    assert nn.utils.parametrize.is_parametrized(net[0], "weight")
    assert old[0].in_channels == 9 and old[0].bias is None and hasattr(old[0], "weight_orig")
    assert net(torch.randn(2, 12)).shape == (2, 4)
    with pytest.raises(ConfigError, match="no linear or convolution"):
        widen_input(nn.Sequential(nn.ReLU()), 2)


class ScoredImages(nn.Module):
    """A D(x) returning (score, features): its last linear layer is the score layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LeakyReLU(0.2))
        self.linear = nn.Linear(32, 1)

    def forward(self, x):
        h = self.body(x)
        return self.linear(h), h


def test_feature_width_is_read_from_the_selected_output_not_the_score_layer():
    assert FeatureNetwork(ScoredImages(), output=1).out_features == 32
    assert FeatureNetwork(ScoredImages(), output=1, score=0).out_features == 32
    assert FeatureNetwork(ScoredImages(), features="body.2").out_features == 32
    spec = build_spec("gali4")
    head = MultiClassJointDiscriminatorHead(
        spec, FeatureNetwork(ScoredImages(), output=1), nn.Linear(6, 8), joint_hidden=(8,)
    )
    variables = {
        n: torch.randn(3, 1, 8, 8) if n.startswith("x") else torch.randn(3, 6) for n in spec.nodes
    }
    assert head(variables).joint.shape == (4, 3, 4)


def test_a_projects_own_prior_is_adapted_or_refused_when_gali_is_built():
    def sample_n(n, bound=1.0):
        return torch.empty(n, 5).uniform_(-bound, bound)

    def sample_shape(shape):
        return torch.zeros(shape)

    assert resolve_prior(sample_n)((7, 5)).shape == (7, 5)
    assert resolve_prior(sample_shape)((7, 5)).abs().sum() == 0

    def two(n, device):
        return torch.zeros(n, 5)

    head = mono.gali_objective("gali4", mono.Encoder(), mono.Generator(), mono.BiGANDiscriminator())
    with pytest.raises(ConfigError, match=r"prior two\(n, device\) cannot be called as"):
        GALI(mono.Encoder(), mono.Generator(), head.head, head.providers, prior=two)
    with pytest.raises(ShapeError, match=r"should draw latents \[7, 5\]"):
        resolve_prior(lambda n: torch.zeros(n, 3))((7, 5))


def test_an_output_callable_that_fails_names_what_the_encoder_returned():
    encoder = LatentEncoder(
        lambda x: tuple(torch.zeros(len(x), 2) for _ in range(4)),
        output=lambda out: out.flatten(1).chunk(2, 1),
    )
    with pytest.raises(ConfigError, match=r"a tuple of 4 \(\[3, 2\], \[3, 2\].*AttributeError"):
        encoder(torch.zeros(3, 1, 8, 8))


class ProbabilityD(nn.Module):
    def __init__(self, structural):
        super().__init__()
        self.joint = nn.Sequential(nn.Flatten(), nn.Linear(64 + 16, 1))
        self.structural = structural
        if structural:
            self.joint.append(nn.Sigmoid())

    def forward(self, x, z):
        out = self.joint(torch.cat([x.flatten(1), z], 1))
        return out if self.structural else torch.sigmoid(out + 2.0)


def test_a_d_that_returns_probabilities_is_warned_about():
    spec = build_spec("ali")
    with pytest.warns(UserWarning, match="ends in a sigmoid"):
        monolithic_head(spec, ProbabilityD(structural=True))
    head = monolithic_head(spec, ProbabilityD(structural=False))
    variables = {
        "x0": torch.randn(8, 1, 8, 8),
        "z0": torch.randn(8, 16),
        "xp0": torch.randn(8, 1, 8, 8),
        "zp0": torch.randn(8, 16),
    }
    with pytest.warns(UserWarning, match=r"only values in \[0, 1\].*logits"):
        head(variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head(variables)  # once


def test_misplaced_discriminators_point_to_monolithic_head_and_name_the_network():
    d = mono.BiGANDiscriminator()
    with pytest.raises(SpecError, match=r"monolithic_head\(spec, D\)"):
        GALI(mono.Encoder(), mono.Generator(), d)
    head = MultiClassJointDiscriminatorHead(
        build_spec("gali4"), d, nn.Linear(16, 8), feature_dims={"image": 8}, joint_hidden=(8,)
    )
    variables = {
        n: torch.randn(3, 1, 16, 16) if n.startswith("x") else torch.randn(3, 16)
        for n in build_spec("gali4").nodes
    }
    with pytest.raises(ConfigError, match=r"a whole D\(x, z\) is not a feature network"):
        head(variables)
    with pytest.raises(ConfigError, match=r"the joint network \w+ has no layer 'jiont\.1'"):
        JointNetwork(d, features="jiont.1")


# -- 6: the checker ---------------------------------------------------------------------------


def test_check_reports_every_module_and_changes_nothing():
    gali, x = ali.check_switch("gali8")
    d = gali.head.discriminator
    before = {k: v.clone() for k, v in d.state_dict().items()}
    rng = torch.random.get_rng_state()
    report = check(gali, x, file=None)
    assert not report.problems
    text = str(report)
    for row in ("dx", "dz", "dxz", "gali_head (the layers the head adds)", "encoder ALIEncoder"):
        assert row in text
    assert "trained in the D step" in text and "trained in the E/G step" in text
    assert "feature pass 'per_chain'" in text and "BatchNorm2d" in text
    assert "holds the" in text and "gali_head." in text
    assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    assert all(p.grad is None for p in gali.parameters())
    assert gali.audit.reached is None and not gali.head._checked_range  # the first step's checks


def test_check_fails_on_layers_the_users_checkpoints_would_miss():
    torch.manual_seed(0)
    d = mono.BiGANDiscriminator()
    head = MultiClassJointDiscriminatorHead(
        build_spec("gali4"), d.image, nn.Identity(), feature_dims={"image": 1024, "latent": 16}
    )  # the default joint MLP and K-way layers, registered nowhere
    gali = GALI(mono.Encoder(), mono.Generator(), head, get_preset("gali4").providers())
    with pytest.raises(ConfigError, match=r"state_dict\(\) misses the \d+ entries"):
        check(gali, digits_batches(1, 8)[0][0], discriminator=d, file=None)


@pytest.mark.slow
def test_check_command_runs_a_users_factory():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gali_ext.cli",
            "check",
            "gali_ext.adapters.examples.bigbigan_style:check_switch",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "x_net" in run.stdout and "none: nothing is silently lost" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gali_ext.cli", "check", "nothing_here"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "MODULE:FUNCTION" in bad.stderr


def test_a_network_on_the_meta_device_is_refused_when_gali_is_built():
    with torch.device("meta"):
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    gali, _ = mono.check_switch("gali4")
    with pytest.raises(ConfigError, match=r"encoder's tensor '1.weight' is on the meta device"):
        GALI(encoder, gali.generator, gali.head, get_preset("gali4").providers())
