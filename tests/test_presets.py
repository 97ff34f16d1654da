"""One preset registry: a preset registered from Python trains through build_gali, a recipe
(`--set spec=NAME`, also from the command line) and the benchmark."""

import inspect
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gali_ext import (
    ProviderError,
    SpecError,
    available_presets,
    build_gali,
    build_spec,
    get_preset,
    presets,
    register_preset,
    train_step,
)
from gali_ext.presets import _REGISTRY
from gali_ext.providers import (
    AliceReconstruction,
    FeedbackProvider,
    MaskMix,
    PretrainedFeatures,
    ReconstructionChain,
)

TRI = [("x0", "z0"), ("xp0", "zp0"), ("x0", "z1")]  # ALI's two classes and (x, E(G(E(x))))


@pytest.fixture
def tri():
    name = "tri_test"
    preset = register_preset(name, TRI, [ReconstructionChain], title="three classes")
    try:
        yield preset
    finally:
        _REGISTRY.pop(name, None)


def test_the_builtin_presets_declare_their_classes_and_providers_together():
    expected = {
        "ali": (2, 2, []),
        "gali4": (4, 2, ["ReconstructionChain"]),
        "gali8": (8, 4, ["ReconstructionChain"]),
        "gali_mix": (8, 2, ["MaskMix"]),
        "alice": (2, 2, ["AliceReconstruction"]),
    }
    for name, (k, m, providers) in expected.items():
        preset = get_preset(name)
        assert (preset.spec.num_classes, preset.spec.arity) == (k, m)
        assert [type(p).__name__ for p in preset.providers()] == providers
    assert get_preset("gali_pt").needs_features and get_preset("alice_pt").needs_features
    with pytest.raises(ProviderError, match="needs a pretrained feature model M"):
        get_preset("gali_pt").providers()
    # each call makes fresh provider modules: two objectives never share one
    assert get_preset("gali4").providers()[0] is not get_preset("gali4").providers()[0]


def test_a_user_preset_trains_through_build_gali(tri):
    from gali_ext.recipes.models import build_ali_models

    assert "tri_test" in available_presets() and build_spec("tri_test").num_classes == 3
    torch.manual_seed(0)
    models = build_ali_models("digits", latent_dim=8)
    gali = build_gali("tri_test", models)
    assert gali.spec.num_classes == 3
    d_opt = torch.optim.Adam(gali.head.parameters(), 1e-4)
    g_opt = torch.optim.Adam([*models.encoder.parameters(), *models.generator.parameters()], 1e-4)
    metrics = train_step(gali, [torch.rand(4, 1, 16, 16) * 2 - 1], d_opt, g_opt)
    assert len(metrics.class_accuracy) == 3 and math.isfinite(metrics.g_loss)
    # at initialisation D is near chance, p = 1/K: D's loss, K terms -log(1/K) weighted by
    # 2/K, is 2 log K
    assert metrics.d_loss == pytest.approx(2 * math.log(3), abs=0.3)


def test_registration_checks_the_classes_against_the_providers():
    with pytest.raises(ProviderError, match="ReconstructionChain"):
        register_preset("needs_chain", TRI)  # z1 needs the reconstruction chain
    with pytest.raises(ProviderError, match="Mask1"):
        register_preset("needs_masks", [("x0", "E(Mask1(x0))"), ("xp0", "zp0")])
    with pytest.raises(SpecError, match="already registered"):
        register_preset("gali4", TRI, [ReconstructionChain])
    with pytest.raises(SpecError, match="not a provider class"):
        register_preset("instances", TRI, [3])
    with pytest.raises(SpecError, match="did you mean 'gali8'"):
        get_preset("gali9")
    assert "needs_chain" not in available_presets()
    assert "needs_masks" not in available_presets()
    mix = register_preset("mix_test", [("x0", "E(Mask1(x0))"), ("xp0", "zp0")], [MaskMix])
    _REGISTRY.pop("mix_test")
    assert mix.spec.num_classes == 2


def constructor_default(provider, option):
    """The default of ``option`` in ``provider``'s constructor signature."""
    return inspect.signature(provider).parameters[option].default


def digits_models():
    from gali_ext.recipes.models import build_ali_models

    torch.manual_seed(0)
    return build_ali_models("digits", latent_dim=8)


def flat_features():
    """M for 1 x 16 x 16 images: a frozen linear map to 5 features."""
    return PretrainedFeatures(nn.Sequential(nn.Flatten(), nn.Linear(256, 5)))


def test_a_provider_option_reaches_the_providers_constructor():
    (alice,) = get_preset("alice").providers(weight=0.25)
    assert isinstance(alice, AliceReconstruction) and alice.loss.weight == 0.25
    (mix,) = get_preset("gali_mix").providers(fill=0.0)
    assert isinstance(mix, MaskMix) and mix.fill == 0.0
    models = digits_models()
    gali = build_gali("alice", models, provider_options={"weight": 0.25})
    assert [p.loss.weight for p in gali.providers] == [0.25]
    features = flat_features()
    gali = build_gali("alice_pt", models, features, provider_options={"weight": 0.5})
    m, penalty = gali.providers
    assert m is features and (penalty.loss.weight, penalty.features) == (0.5, "M")
    # the option changes the loss: the penalty term is the weight times ALICE's mean square
    objective = gali.generator_objective(torch.rand(4, 1, 16, 16) * 2 - 1)
    chains = objective.chains
    expected = 0.5 * (chains["M(x0)"] - chains["M(x1)"]).pow(2).mean()
    torch.testing.assert_close(objective.parts["alicereconstruction1"], expected.detach())


def test_an_option_left_out_keeps_the_providers_own_default():
    weight = constructor_default(AliceReconstruction, "weight")
    fill = constructor_default(MaskMix, "fill")
    assert get_preset("alice").options == {"weight": weight}
    assert get_preset("alice_pt").options == {"weight": weight}
    assert get_preset("gali_mix").options["fill"] == fill
    assert get_preset("alice").providers()[0].loss.weight == weight
    assert get_preset("gali_mix").providers()[0].fill == fill
    gali = build_gali("alice", digits_models())
    assert gali.providers[0].loss.weight == weight
    for name in ("ali", "gali4", "gali8", "gali_pt"):
        assert get_preset(name).options == {}


def test_an_option_the_preset_does_not_take_is_refused_naming_those_it_takes():
    with pytest.raises(ProviderError, match=r"'alice' has no provider option 'wieght' \(did you"):
        get_preset("alice").providers(wieght=0.25)
    with pytest.raises(ProviderError, match=r"its options: fill \(default -1.0\), rng"):
        get_preset("gali_mix").providers(weight=0.25)
    with pytest.raises(ProviderError, match="'gali4' takes no provider options, got 'weight'"):
        build_gali("gali4", digits_models(), provider_options={"weight": 0.25})
    models = digits_models()
    with pytest.raises(ProviderError, match="features argument"):
        build_gali("alice_pt", models, provider_options={"features": flat_features()})
    with pytest.raises(ProviderError, match="mapping"):
        build_gali("alice", models, provider_options=[("weight", 0.25)])
    assert not hasattr(presets, "PresetOptions") and "PresetOptions" not in presets.__all__


class Penalty(FeedbackProvider):
    """A user's provider with an option of its own: ``scale * mean(z1^2)`` on E and G."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def extra_loss(self, chains):
        return self.scale * chains["z1"].pow(2).mean()


def penalised(*, scale: float = 0.5) -> list[FeedbackProvider]:
    return [ReconstructionChain(), Penalty(scale)]


@pytest.fixture
def penalised_preset():
    name = "penalised_test"
    preset = register_preset(name, TRI, penalised)
    try:
        yield preset
    finally:
        _REGISTRY.pop(name, None)


def test_a_user_preset_exposes_its_own_providers_option(penalised_preset):
    assert penalised_preset.options == {"scale": constructor_default(penalised, "scale")}
    assert penalised_preset.providers()[1].scale == 0.5
    models = digits_models()
    gali = build_gali("penalised_test", models, provider_options={"scale": 2.0})
    assert gali.providers[1].scale == 2.0
    objective = gali.generator_objective(torch.rand(4, 1, 16, 16) * 2 - 1)
    expected = 2.0 * objective.chains["z1"].pow(2).mean()
    torch.testing.assert_close(objective.parts["penalty1"], expected.detach())
    with pytest.raises(ProviderError, match=r"its options: scale \(default 0.5\)"):
        build_gali("penalised_test", models, provider_options={"weight": 2.0})


def test_a_factory_takes_its_options_by_keyword_with_defaults():
    with pytest.raises(SpecError, match="'options' has no default.*PresetOptions"):
        register_preset("old_style", TRI, lambda options: [ReconstructionChain()])
    with pytest.raises(SpecError, match=r"takes \*\*options; name each provider option"):
        register_preset("any_options", TRI, lambda **options: [ReconstructionChain()])
    with pytest.raises(SpecError, match="no 'features' argument"):
        register_preset(
            "no_m", [("x0", "z0", "M(x0)"), ("xp0", "zp0", "M(xp0)")], [], needs_features=True
        )
    assert not {"old_style", "any_options", "no_m"} & set(available_presets())


@pytest.mark.slow
def test_a_user_preset_trains_through_a_recipe_and_the_benchmark(tri, tmp_path):
    from gali_ext import recipes
    from gali_ext.recipes.bench import run_benchmark
    from gali_ext.recipes.train import train

    config = recipes.get("digits-gali4").with_overrides(
        {"spec": "tri_test", "steps": "2", "batch_size": "8", "log_every": "1"}
    )
    out = train(config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["d_accuracy"]) for r in records] == [3, 3]
    result = run_benchmark(
        "digits",
        "cpu",
        repeats=1,
        warmup=0,
        batch=4,
        out=None,
        print_fn=lambda line: None,
        specs=("tri_test",),
    )
    assert set(result["step_seconds"]) == {"ali", "tri_test"}
    assert result["head"]  # the fused-head table still runs


def readme_module(name: str) -> str:
    """The README's Python block that starts with the comment ``# NAME``."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.+?)```", readme, re.S)
    return next(b for b in blocks if b.startswith(f"# {name}\n"))


@pytest.mark.slow
def test_a_user_preset_module_trains_from_the_command_line_and_the_run_remembers_it(tmp_path):
    # the README's provider of one's own, its preset and its digits run (README, "Write a
    # feedback provider")
    (tmp_path / "my_rotation.py").write_text(readme_module("my_rotation.py"))

    def gali_ext(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gali_ext.cli", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    settings = ["--set", "batch_size=8", "--set", "checkpoint_every=1", "--no-progress"]
    train = ["recipe", "digits-ali", "--set", "spec=gali_rot", *settings, "--out", "run"]
    run = gali_ext("--import", "my_rotation", *train, "--steps", "2")
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["spec"] == "gali_rot"
    assert config["launch"]["imports"] == ["my_rotation"]
    assert config["launch"]["preset_source"] == "my_rotation"
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(json.loads(records[-1])["d_accuracy"]) == 4  # the preset's four classes
    listed = gali_ext("--import", "my_rotation", "presets")
    assert "gali_rot" in listed.stdout and "K=4 m=2" in listed.stdout
    # without the import: a fresh run is refused, a resume names the module to import
    unknown = gali_ext("recipe", "digits-ali", "--set", "spec=gali_rot")
    assert unknown.returncode == 2 and "error: spec='gali_rot' is invalid" in unknown.stderr
    resume = ["recipe", "digits-ali", "--resume", "--out", "run", *settings[-1:]]
    forgotten = gali_ext(*resume, "--steps", "3")
    assert forgotten.returncode == 2 and forgotten.stderr == (
        "error: 'run' was trained with the preset 'gali_rot', registered by the module "
        "my_rotation: import it, `gali-ext --import my_rotation recipe digits-ali --resume "
        "--out run`\n"
    )
    resumed = gali_ext("--import", "my_rotation", *resume, "--steps", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    # sample reads E and G only: no import needed
    sampled = gali_ext("sample", "run", "--out", "grids")
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "grids" / "samples-ema.png").is_file()
