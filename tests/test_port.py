"""Public BigBiGAN code as it is written (issue 34): joints that read their input on several
paths, joints taking the image and the latent as two arguments, a D spread over one model that
also holds E and G, a checker that tells what the switch loses from what the project never
trained, and the worked example written as the common PyTorch port is."""

import ast
import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gali_ext import (
    GALI,
    ConfigError,
    HingeDiscriminatorLoss,
    HingeGeneratorLoss,
    MultiClassJointDiscriminatorHead,
    ShapeError,
    SpectralMLP,
    build_spec,
)
from gali_ext.adapters import (
    FeatureNetwork,
    JointNetwork,
    baseline_of,
    check,
    widen_input,
)
from gali_ext.adapters.examples import bigbigan_port as port
from gali_ext.adapters.examples.digits import digits_batches
from gali_ext.providers import ReconstructionChain

# -- 1: widen_input follows the input -------------------------------------------------------


class ResidualBlock(nn.Module):
    """The port's block: the input read by ``linear1`` and by ``skip_linear``."""

    def __init__(self, a, b):
        super().__init__()
        self.linear1 = nn.utils.spectral_norm(nn.Linear(a, b))
        self.linear2 = nn.Linear(b, b)
        self.skip_linear = nn.utils.parametrizations.spectral_norm(nn.Linear(a, b))

    def forward(self, x):
        return self.linear2(F.leaky_relu(self.linear1(x))) + self.skip_linear(x)


class Branches(nn.Module):
    """Parallel branches: one on the input, one on its activation, one on it twice over."""

    def __init__(self, width=6):
        super().__init__()
        self.a = nn.Linear(width, 4)
        self.b = nn.Sequential(nn.Dropout(0.5), nn.Linear(width, 4))
        self.c = nn.Linear(2 * width, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.a(x) + self.b(F.relu(x)) + self.c(torch.cat([x, x], 1)))


def widths(module):
    return {n: m.in_features for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def test_widen_input_widens_every_layer_that_reads_the_input_and_only_those():
    block = nn.Sequential(ResidualBlock(6, 8), ResidualBlock(8, 8))
    kept = [id(p) for p in block.parameters()]
    widen_input(block, 2)
    assert widths(block) == {
        "0.linear1": 12,
        "0.linear2": 8,
        "0.skip_linear": 12,
        "1.linear1": 8,
        "1.linear2": 8,
        "1.skip_linear": 8,
    }
    assert [id(p) for p in block.parameters()] == kept  # the same parameters, new values
    assert block[0].linear1.weight_v.shape == (12,)  # spectral norm's vector of the new width
    assert block(torch.randn(3, 12)).shape == (3, 8)
    branches = Branches()
    widen_input(branches, 3)
    assert widths(branches) == {"a": 18, "b.1": 18, "c": 36, "out": 4}
    assert branches(torch.randn(2, 18)).shape == (2, 1)


def test_widen_input_leaves_the_network_as_it_was_but_the_widths():
    torch.manual_seed(0)
    net = nn.Sequential(ResidualBlock(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).train()
    net[1].running_mean.normal_()
    stats = net[1].running_mean.clone()
    widen_input(net, 2)  # the probe runs in eval mode: no statistics, no power iteration
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, stats)


class Sliced(nn.Module):
    """A layer that reads a fixed part of the input: no widening makes it take more."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(3, 4)

    def forward(self, x):
        return self.a(x) + self.b(x[:, :3])


def test_widen_input_refuses_and_names_what_it_cannot_widen():
    normed = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"also read by '0' \(LayerNorm\)"):
        widen_input(normed, 2)
    sliced = Sliced()
    before = {n: p.shape for n, p in sliced.named_parameters()}
    with pytest.raises(ConfigError, match=r"still fails in its layer 'b'.*nothing was changed"):
        widen_input(sliced, 2)
    assert {n: p.shape for n, p in sliced.named_parameters()} == before


class CombDisc(nn.Module):
    """The port's joint: ``forward(img, latent)``, concatenated inside, residual blocks."""

    def __init__(self, img=16, latent=10):
        super().__init__()
        self.mpls = nn.Sequential(ResidualBlock(img + latent, 8), ResidualBlock(8, 8))
        self.linear = nn.Linear(8, 1)

    def forward(self, img, latent):
        return self.linear(self.mpls(torch.cat([img, latent], dim=-1)))


def gali8_head(joint, **kwargs):
    dz = SpectralMLP(6, (12,), 10, activate_output=True)
    dx = SpectralMLP(64, (), 16, activate_output=True)
    return MultiClassJointDiscriminatorHead(build_spec("gali8"), dx, dz, joint=joint, **kwargs)


def gali8_variables(batch=3):
    g = torch.Generator().manual_seed(0)
    return {
        n: torch.randn(batch, 1, 8, 8, generator=g)
        if n.startswith("x")
        else torch.randn(batch, 6, generator=g)
        for n in build_spec("gali8").nodes
    }


def test_a_partial_widening_names_the_layer_left_behind_and_the_fix():
    joint = CombDisc()
    joint.mpls[0].linear1 = nn.Linear(52, 8)  # widened by hand: the skip path left at 26
    head = gali8_head(JointNetwork(joint, inputs="by_kind"))
    with pytest.raises(ShapeError) as error:
        head(gali8_variables())
    message = str(error.value)
    assert "its layer 'mpls.0.skip_linear' takes 26 features and receives 52" in message
    assert "as 'mpls.0.linear1' does after widening" in message
    assert "widen_input(joint_module, 2)" in message and "input_shape" not in message


# -- 2: a joint of one argument per kind ----------------------------------------------------


class Recording(nn.Module):
    """``forward(img, latent)`` that keeps its arguments and returns one score."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2 * 16 + 2 * 10, 1)
        self.seen = []

    def forward(self, img, latent):
        self.seen.append((img, latent))
        return self.linear(torch.cat([img, latent], 1))


def test_by_kind_gives_the_images_then_the_latents_in_slot_order():
    joint = Recording()
    head = gali8_head(JointNetwork(joint, inputs="by_kind")).eval()
    variables = gali8_variables()
    head(variables)
    ((img, latent),) = joint.seen  # one call over the K * B tuples (fused)
    fx, hz = head.feature_nets["image"], head.feature_nets["latent"]
    with torch.no_grad():
        for i, tuple_class in enumerate(head.spec.classes):  # e.g. (x1, z0, x0, z1)
            rows = slice(3 * i, 3 * i + 3)
            images = [
                fx(variables[n])
                for n, k in zip(tuple_class.nodes, tuple_class.kinds)
                if k == "image"
            ]
            latents = [
                hz(variables[n])
                for n, k in zip(tuple_class.nodes, tuple_class.kinds)
                if k == "latent"
            ]
            torch.testing.assert_close(img[rows], torch.cat(images, 1))
            torch.testing.assert_close(latent[rows], torch.cat(latents, 1))


def test_a_widened_two_argument_joint_works_for_any_arity():
    for preset, factor in (("ali", 1), ("gali4", 1), ("gali8", 2)):
        joint = widen_input(CombDisc(), factor)
        spec = build_spec(preset)
        dx, dz = SpectralMLP(64, (), 16), SpectralMLP(6, (), 10)
        head = MultiClassJointDiscriminatorHead(
            spec, dx, dz, joint=JointNetwork(joint, inputs="by_kind", features="mpls")
        )
        variables = {k: v for k, v in gali8_variables().items() if k in spec.nodes}
        assert head(variables).joint.shape == (spec.num_classes, 3, spec.num_classes)
    with pytest.raises(ShapeError, match=r"widen_input\(joint_module, 2\)"):
        gali8_head(JointNetwork(CombDisc(), inputs="by_kind"))  # a joint for one pair: at build


def failure(head):
    with pytest.raises((ConfigError, ShapeError)) as error:
        head(gali8_variables())
    return str(error.value)


def test_hints_name_the_setting_that_fits_and_never_the_one_in_use():
    joint = widen_input(CombDisc(), 2)
    concat = failure(gali8_head(JointNetwork(joint)))  # the first message
    assert "missing 1 required positional argument: 'latent'" in concat
    assert "JointNetwork(net, inputs='by_kind')" in concat and "'separate'" not in concat
    separate = failure(gali8_head(JointNetwork(joint, inputs="separate")))
    assert "takes 3 positional arguments but 5 were given" in separate
    assert "inputs='by_kind'" in separate and "inputs='separate'" not in separate
    one = nn.Sequential(nn.Linear(52, 8), nn.ReLU(), nn.Linear(8, 1))
    by_kind = failure(gali8_head(JointNetwork(one, inputs="by_kind")))
    assert "inputs='concat'" in by_kind and "inputs='by_kind'" not in by_kind
    image = port.DiscBigGAN()  # forward(x, cls)
    spec = build_spec("gali4")
    dz = SpectralMLP(16, (), 8)
    bare = MultiClassJointDiscriminatorHead(spec, FeatureNetwork(image, output=0), dz)
    variables = {
        n: torch.randn(2, 1, 16, 16) if n.startswith("x") else torch.randn(2, 16)
        for n in spec.nodes
    }
    with pytest.raises(ConfigError, match=r"FeatureNetwork\(net, condition='cls'\)"):
        bare(variables)


# -- 3: a D spread over one model -----------------------------------------------------------


def port_head(model, discriminator):
    image = FeatureNetwork(model.img_discriminator, output=0, score=1, condition="cls")
    latent = FeatureNetwork(model.latent_discriminator, output=0, score=1)
    joint = JointNetwork(
        widen_input(model.comb_discriminator, 2), inputs="by_kind", features="mpls"
    )
    return MultiClassJointDiscriminatorHead(
        build_spec("gali8"), image, latent, joint=joint, discriminator=discriminator(model)
    )


def port_gali(discriminator):
    torch.manual_seed(0)
    model = port.BigBiGAN()
    head = port_head(model, discriminator)
    return model, GALI(model.encoder, model.generator, head, [ReconstructionChain()])


def d_rows(report):
    return [line for line in report.lines if line.startswith("discriminator")]


def test_a_d_of_several_modules_registers_where_its_optimizer_and_checkpoint_see_it():
    batch = digits_batches(1, 8)[0]
    parts = ("img_discriminator", "latent_discriminator", "comb_discriminator")
    for discriminator in (
        lambda m: m.get_disc_params(),
        lambda m: [getattr(m, name) for name in parts],
    ):
        model, gali = port_gali(discriminator)
        assert gali.head.discriminator is model.comb_discriminator  # holds the joint
        assert [type(m).__name__ for m in gali.head.discriminator_modules] == [
            "DiscBigGAN",
            "LatentDisc",
            "CombDisc",
        ]
        assert any(k.startswith("comb_discriminator.gali_head.") for k in model.state_dict())
        assert {id(p) for p in gali.head.parameters()} == {id(p) for p in model.get_disc_params()}
        report = check(gali, batch, discriminator=model, file=None)
        assert d_rows(report) == [
            "discriminator DiscBigGAN (the 'image' feature network):",
            "discriminator LatentDisc (the 'latent' feature network):",
            "discriminator CombDisc (the joint network):",
        ]
        assert "under 'comb_discriminator.gali_head.'" in str(report)
    model, gali = port_gali(
        lambda m: m.get_disc_params()[: -len(list(m.img_discriminator.parameters()))]
    )
    with pytest.raises(ConfigError, match=r"'image' feature network \(DiscBigGAN\).*in none of"):
        check(gali, batch, file=None)


def test_the_whole_model_as_d_is_one_problem_naming_the_fix_not_four_false_ones():
    model, gali = port_gali(lambda m: m)
    with pytest.raises(ConfigError) as error:
        check(gali, digits_batches(1, 8)[0], file=None)
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 1
    assert "holds the generator and the encoder too" in problems[0]
    assert "model.get_disc_params()" in problems[0]


# -- 4: what the switch loses, apart from what the project never trained ---------------------


class DetachedFeatures(nn.Module):
    """A D(x) whose ``aux`` layer is read, but only as a detached term: no loss trains it,
    the project's own included."""

    out_features = 16

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LeakyReLU(0.2))
        self.aux = nn.Linear(64, 16)

    def forward(self, x):
        return self.body(x) + self.aux(x.flatten(1)).detach()


def small_project(image_features):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    generator = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    dz = SpectralMLP(6, (), 10, activate_output=True)
    d = nn.ModuleDict({"dx": image_features, "dz": dz})
    head = MultiClassJointDiscriminatorHead(
        build_spec("gali4"), image_features, dz, joint_hidden=(8,), discriminator=d
    )
    gali = GALI(encoder, generator, head, [ReconstructionChain()])

    def own_losses(x):  # the project's BiGAN-style losses on (x, E(x)) and (G(z), z)
        z = torch.randn(len(x), 6)
        real = d["dx"](x).sum(1) + d["dz"](encoder(x)).sum(1)
        fake = d["dx"](generator(z)).sum(1) + d["dz"](z).sum(1)
        return F.softplus(-real).mean() + F.softplus(fake).mean(), -fake.mean()

    return gali, own_losses


def test_check_reports_what_no_loss_trains_and_raises_on_what_the_switch_drops():
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    gali, own_losses = small_project(DetachedFeatures())
    with pytest.raises(ConfigError, match=r"dx: 2 parameters take no gradient in the D step"):
        check(gali, x, file=None)  # read by the forward, reached by no loss: not known why
    report = check(gali, x, baseline=own_losses, file=None)  # the project's own: not trained
    assert not report.problems
    assert report.untrained == [
        "discriminator ModuleDict dx: 2 parameters take no gradient from your project's own D "
        "loss either (dx.aux.weight, dx.aux.bias)"
    ]
    assert "untrained before the switch too" in str(report)


def test_check_raises_when_gali_drops_what_the_projects_loss_trains():
    # the projection in the image network's forward is trained by the project's loss; wired
    # without the network's own score, GALI's losses never reach it
    torch.manual_seed(0)
    model = port.BigBiGAN()
    batch = digits_batches(1, 8)[0]
    baseline = baseline_of(port.project_losses(model), batch, model)
    image = FeatureNetwork(model.img_discriminator, output=0, condition="cls")
    latent = FeatureNetwork(model.latent_discriminator, output=0, score=1)
    joint = JointNetwork(
        widen_input(model.comb_discriminator, 2), inputs="by_kind", features="mpls"
    )
    head = MultiClassJointDiscriminatorHead(
        build_spec("gali8"), image, latent, joint=joint, discriminator=model.get_disc_params()
    )
    gali = GALI(model.encoder, model.generator, head, [ReconstructionChain()])
    with pytest.raises(
        ConfigError, match=r"though your project's D loss trains them \(linear\.layer\.bias"
    ):
        check(gali, batch, baseline=baseline, file=None)


# -- 6: the worked example ------------------------------------------------------------------

WIDTH = 100


def _wrapped_lines(statement: str) -> int:
    """The lines a statement takes written on one line and wrapped at 100 columns between the
    arguments of its outermost call (continuation lines aligned after the bracket): how the
    worked examples' switches were counted, independent of the formatter's layout."""
    node = ast.parse(statement).body[0]
    value = node.value if isinstance(node, (ast.Assign, ast.Return, ast.Expr)) else None
    one = " ".join(statement.split())
    if not isinstance(value, ast.Call) or len(one) <= WIDTH:
        return -(-len(one) // WIDTH)
    func = " ".join(ast.get_source_segment(statement, value.func).split())
    start = one.index(func) + len(func) + 1
    pieces = [*value.args, *value.keywords]
    pieces = [" ".join(ast.get_source_segment(statement, a).split()) for a in pieces]
    lines, column = 1, start
    for i, piece in enumerate(pieces):
        piece += ", " if i < len(pieces) - 1 else ")"
        if column + len(piece.rstrip()) > WIDTH and column > start:
            lines, column = lines + 1, start
        column += len(piece)
    return lines


def glue_lines(module) -> tuple[int, int]:
    """(switch, loop): the statements of ``gali_objective`` from its "is the glue" marker on,
    and the loop's statements marked ``# glue`` or under ``else:  # the switch in the loop``."""
    source = textwrap.dedent(inspect.getsource(module.gali_objective))
    marker = next(i for i, line in enumerate(source.splitlines(), 1) if "is the glue" in line)
    body = ast.parse(source).body[0].body
    switch = sum(
        _wrapped_lines(ast.get_source_segment(source, s)) for s in body if s.lineno >= marker
    )
    text = inspect.getsource(module)
    lines = text.splitlines()
    loop = 0
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.If) and node.orelse:
            header = lines[node.orelse[0].lineno - 2]
            if "# the switch in the loop" in header:
                loop += sum(_wrapped_lines(ast.get_source_segment(text, s)) for s in node.orelse)
        elif isinstance(node, ast.stmt) and lines[node.end_lineno - 1].endswith("# glue"):
            loop += _wrapped_lines(ast.get_source_segment(text, node))
    return switch, loop


def test_the_worked_examples_glue_lines():
    from gali_ext.adapters.examples import ali_style, bigbigan_style, monolithic_d

    assert glue_lines(bigbigan_style) == (9, 1)  # as documented: 9 + 1
    assert glue_lines(ali_style) == (8, 1)
    assert glue_lines(monolithic_d) == (3, 4)
    switch, loop = glue_lines(port)
    assert (switch, loop) == (8, 2) and switch + loop <= 10


def test_the_port_at_k2_is_its_own_hinge_three_times():
    # ali, no widening: the head's unary and joint hinge terms are the project's three terms,
    # which it divides by 3 (closed form of docs/design.md, 9.1-9.3)
    torch.manual_seed(0)
    model = port.BigBiGAN().eval()
    image = FeatureNetwork(model.img_discriminator, output=0, score=1, condition="cls")
    latent = FeatureNetwork(model.latent_discriminator, output=0, score=1)
    joint = JointNetwork(model.comb_discriminator, inputs="by_kind")
    head = MultiClassJointDiscriminatorHead(
        build_spec("ali"), image, latent, joint=joint, discriminator=model.get_disc_params()
    )
    gali = GALI(
        model.encoder,
        model.generator,
        head,
        discriminator_criterion=HingeDiscriminatorLoss(),
        generator_criterion=HingeGeneratorLoss(),
    ).eval()
    gali.condition_sampler = lambda y, rng: y  # the project's fakes take the batch's classes
    x, y = digits_batches(1, 8)[0]
    z = port.truncated_normal((8, port.LATENT_DIM))
    with torch.no_grad():
        torch.manual_seed(1)  # the encoder's own noise
        z_img = model.generate_latent(x)
        outputs = model(x, model.generator(z, y), z, z_img, y)
        torch.manual_seed(1)
        d = gali.discriminator_objective((x, y), z=z).loss
        torch.manual_seed(1)
        g = gali.generator_objective((x, y), z=z).loss
    torch.testing.assert_close(d, 3 * port.disc_loss(outputs))
    torch.testing.assert_close(g, 3 * port.gen_enc_loss(outputs))


@pytest.mark.slow
def test_the_port_switches_trains_checks_and_round_trips_its_checkpoint(tmp_path):
    model, gali, opt_d, opt_ge = port.build(switch=True)
    for x, y in digits_batches(2, 16):  # the project's step; the audit checks its optimizers
        losses = port.train_step(model, gali, opt_d, opt_ge, x, y)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    port.save_checkpoint(model, tmp_path / "model.pt")  # torch.save(model.state_dict())
    fresh, resumed, *_ = port.build(switch=True, seed=3)  # other initial weights
    port.load_checkpoint(fresh, tmp_path / "model.pt")  # strict: the head's layers are in it
    variables = {
        n: torch.rand(4, 1, 16, 16) if n.startswith("x") else torch.randn(4, port.LATENT_DIM)
        for n in gali.head.spec.nodes
    }
    conditions = {"x0": torch.arange(4), "zp0": torch.arange(4).flip(0)}
    with torch.no_grad():
        a = gali.eval().head(variables, conditions=conditions)
        b = resumed.eval().head(variables, conditions=conditions)
    assert torch.equal(a.joint, b.joint) and torch.equal(a.unary, b.unary)
    gali, batch, model, baseline = port.check_switch()
    for report in (
        check(gali, batch, discriminator=model, baseline=baseline, file=None),
        check(gali, batch, file=None),
    ):
        assert not report.problems
        assert len(report.untrained) == 1
        assert "12 parameters" in report.untrained[0] and "skip_conv" in report.untrained[0]


def test_gali_ext_check_runs_the_ports_factory_with_its_baseline():
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    factory = "gali_ext.adapters.examples.bigbigan_port:check_switch"
    result = CliRunner().invoke(app, ["check", factory])
    assert result.exit_code == 0, result.output
    assert "against your project's own losses" in result.output
    assert "none: nothing is silently lost" in result.output
