"""One preset registry: a preset registered from Python trains through build_gali, a recipe
(`--set spec=NAME`, also from the command line) and the benchmark."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from gali_ext import (
    ProviderError,
    SpecError,
    available_presets,
    build_gali,
    build_spec,
    get_preset,
    register_preset,
    train_step,
)
from gali_ext.presets import _REGISTRY
from gali_ext.providers import MaskMix, ReconstructionChain

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


@pytest.mark.slow
def test_a_user_preset_module_trains_from_the_command_line(tmp_path):
    (tmp_path / "my_presets.py").write_text(
        textwrap.dedent(
            """
            from gali_ext import register_preset
            from gali_ext.providers import ReconstructionChain

            register_preset("tri_cli", [("x0", "z0"), ("xp0", "zp0"), ("x0", "z1")],
                            [ReconstructionChain])
            """
        )
    )
    command = [
        sys.executable,
        "-m",
        "gali_ext.cli",
        "--import",
        "my_presets",
        "recipe",
        "digits-gali4",
        "--set",
        "spec=tri_cli",
        "--steps",
        "2",
        "--set",
        "batch_size=8",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["spec"] == "tri_cli"
    listed = subprocess.run(
        [sys.executable, "-m", "gali_ext.cli", "--import", "my_presets", "presets"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "tri_cli" in listed.stdout and "K=3 m=2" in listed.stdout
    unknown = subprocess.run(
        command[:3] + ["recipe", "digits-gali4", "--set", "spec=tri_cli"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "error: spec='tri_cli' is invalid" in unknown.stderr
