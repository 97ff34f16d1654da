"""Recipes, the training loop, run directories, resume and the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gali_ext import recipes
from gali_ext.errors import ConfigError, DataError
from gali_ext.recipes.build import load_data
from gali_ext.recipes.cli import app
from gali_ext.recipes.train import train
from tests._helpers import write_svhn

REQUIRED = [
    "digits-ali",
    "digits-alice",
    "digits-gali4",
    "digits-gali8",
    "svhn-ali",
    "svhn-alice",
    "svhn-gali4",
    "svhn-gali8",
    "svhn-gali-pt",
    "celeba-ali",
    "celeba-gali4",
    "celeba-gali-pt",
    "celeba-gali-mix",
]


def tiny(name="digits-gali4", **changes):
    settings = {
        "steps": "4",
        "batch_size": "16",
        "log_every": "1",
        "sample_every": "2",
        "checkpoint_every": "2",
    }
    settings.update({k: str(v) for k, v in changes.items()})
    return recipes.get(name).with_overrides(settings)


def test_registry_has_the_paper_rows():
    assert set(REQUIRED) <= set(recipes.available())
    config = recipes.get("svhn-gali8")
    assert (config.spec, config.batch_size, config.latent_dim, config.betas) == (
        "gali8",
        100,
        256,
        (0.5, 0.999),
    )
    assert config.lr in (2e-5, 4e-5, 1e-4, 2e-4)


def test_unknown_recipe_and_bad_settings():
    with pytest.raises(ConfigError, match="did you mean 'digits-gali4'"):
        recipes.get("digits-gal4")
    with pytest.raises(ConfigError, match="unknown setting 'lrr'; did you mean 'lr'"):
        recipes.get("digits-gali4").with_overrides({"lrr": "1"})
    with pytest.raises(ConfigError, match="steps='ten'.*int"):
        recipes.get("digits-gali4").with_overrides({"steps": "ten"})
    config = recipes.get("digits-gali4").with_overrides({"lr": "2e-5", "betas": "0.5,0.9"})
    assert config.lr == 2e-5 and config.betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match="n_dis=0"):
        recipes.get("digits-gali4").with_overrides({"n_dis": "0"}).validate()
    with pytest.raises(ConfigError, match="features_weights"):
        recipes.get("svhn-gali-pt").validate()
    # Accelerate deletes the oldest checkpoint before writing the next: one would leave none
    with pytest.raises(ConfigError, match="keep_checkpoints=1 is invalid: expected an int >= 2"):
        recipes.get("digits-gali4").with_overrides({"keep_checkpoints": "1"}).validate()
    for decay in ("1", "-0.1"):
        with pytest.raises(ConfigError, match=r"ema_decay=.* is invalid: expected a float in \[0"):
            recipes.get("digits-gali4").with_overrides({"ema_decay": decay}).validate()
    with pytest.raises(ConfigError, match="num_workers=-1 is invalid"):
        recipes.get("digits-gali4").with_overrides({"num_workers": "-1"}).validate()


def test_train_writes_the_run_directory(tmp_path):
    out = train(tiny(), tmp_path / "run", progress=False)
    for name in (
        "config.json",
        "metrics.jsonl",
        "encoder.safetensors",
        "generator.safetensors",
        "discriminator.safetensors",
        "samples.png",
        "reconstructions.png",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(len(r["d_accuracy"]) == 4 and np.isfinite(r["g_loss"]) for r in records)
    assert records[0]["noise_std"] == pytest.approx(0.1) and records[-1]["noise_std"] < 0.1
    # Accelerate names the checkpoints; train_state.json holds the step, and manifest.json,
    # written last, the sizes and hashes of every other file
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["checkpoint_0", "checkpoint_1"]
    states = [json.loads((p / "train_state.json").read_text()) for p in checkpoints]
    assert states == [{"step": 2, "world_size": 1}, {"step": 4, "world_size": 1}]
    manifests = [json.loads((p / "manifest.json").read_text()) for p in checkpoints]
    assert [m["step"] for m in manifests] == [2, 4]
    assert set(manifests[0]["files"]) == {p.name for p in checkpoints[0].iterdir()} - {
        "manifest.json"
    }
    launch = json.loads((out / "config.json").read_text())["launch"]
    assert (launch["num_processes"], launch["world_size"]) == (1, 1)
    assert recipes.RecipeConfig.from_json(out / "config.json") == tiny()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["test_pixel_mse"] < 1
    weights = load_file(str(out / "encoder.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    from PIL import Image

    assert Image.open(out / "reconstructions.png").size[0] > 16 * 8


def test_existing_run_directory_is_refused(tmp_path):
    train(tiny(steps=1), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        train(tiny(steps=1), tmp_path / "run", progress=False)
    train(tiny(steps=1), tmp_path / "run", progress=False, overwrite=True)
    with pytest.raises(ConfigError, match="holds a run of 'digits-gali4', not 'digits-ali'"):
        train(tiny("digits-ali", steps=1), tmp_path / "run", progress=False, resume=True)


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    # batches of 256: 5 per epoch, so the run resumes mid-epoch (step 3) and crosses into the
    # next epoch; two DataLoader workers; the EMA is resumed too
    config = tiny(
        "digits-gali8", steps=6, checkpoint_every=3, batch_size=256, num_workers=2, ema_decay=0.9
    )
    train(config, tmp_path / "whole", progress=False)

    import gali_ext.recipes.build as loop  # the module whose step the loop calls

    real_step, calls = loop.train_step, {"n": 0}

    def crash_after_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(loop, "train_step", real_step)
    train(config, tmp_path / "resumed", progress=False, resume=True)
    for name in ("encoder", "generator", "discriminator", "encoder_ema", "generator_ema"):
        a = load_file(str(tmp_path / "whole" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "resumed" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed/metrics.jsonl").open()]
    assert steps[-1] == 6


def test_channels_last_trains_in_nhwc_resumes_and_matches_contiguous(tmp_path, monkeypatch):
    import gali_ext.recipes.build as loop  # the module whose step the loop calls

    config = tiny("digits-gali4", steps=4, channels_last=True)
    real_step, seen = loop.train_step, []

    def recording(gali, batches, *args, **kwargs):
        x = next(batches)
        # digits are grayscale, so x is both; the second convolution has 16 input channels
        conv = gali.encoder.blocks[1][0].weight
        seen.append(
            all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, conv))
            and not conv.is_contiguous()
        )
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(
            gali, iter([x, *[next(batches) for _ in range(kwargs["n_dis"] - 1)]]), *args, **kwargs
        )

    monkeypatch.setattr(loop, "train_step", recording)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=False)
    assert seen == [True] * 3
    monkeypatch.setattr(loop, "train_step", real_step)
    train(config, tmp_path / "resumed", progress=False, resume=True)
    train(config, tmp_path / "whole", progress=False)
    train(tiny("digits-gali4", steps=4), tmp_path / "contiguous", progress=False)
    for name in ("encoder", "generator", "discriminator"):
        whole = load_file(str(tmp_path / "whole" / f"{name}.safetensors"))
        resumed = load_file(str(tmp_path / "resumed" / f"{name}.safetensors"))
        contiguous = load_file(str(tmp_path / "contiguous" / f"{name}.safetensors"))
        for key in whole:
            assert torch.equal(whole[key], resumed[key]), (name, key)
            # the same arithmetic in another memory order: equal up to float rounding
            torch.testing.assert_close(whole[key], contiguous[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shared_forward", [False, True])
def test_bf16_on_cpu(tmp_path, shared_forward):
    config = tiny("digits-ali", steps=2, mixed_precision="bf16", shared_forward=shared_forward)
    out = train(config, tmp_path / "r", progress=False)
    records = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert all(np.isfinite(r["d_loss"]) and np.isfinite(r["g_loss"]) for r in records)


def test_cli_svhn_gali8_on_tiny_mat_files(tmp_path):
    from typer.testing import CliRunner

    write_svhn(tmp_path / "svhn", {"train": 40, "test": 40, "extra": 40})  # svhn trains on extra
    result = CliRunner().invoke(
        app,
        [
            "recipe",
            "svhn-gali8",
            "--data-dir",
            str(tmp_path / "svhn"),
            "--steps",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "batch_size=8",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "generator.safetensors").is_file()
    result = CliRunner().invoke(
        app, ["sample", str(tmp_path / "run"), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "samples-raw.png").is_file()
    assert str(tmp_path / "s" / "reconstructions-raw.png") in result.output


def test_sample_keeps_the_training_grids_and_uses_the_ema(tmp_path):
    from typer.testing import CliRunner

    run = train(tiny("digits-ali", steps=2, ema_decay=0.5), tmp_path / "run", progress=False)
    before = (run / "samples.png").read_bytes()
    result = CliRunner().invoke(app, ["sample", str(run)])
    assert result.exit_code == 0, result.output
    assert "moving average (EMA)" in result.output and str(run / "samples-ema.png") in result.output
    assert (run / "samples.png").read_bytes() == before  # training's grid is left alone
    result = CliRunner().invoke(app, ["sample", str(run), "--raw-weights"])
    assert result.exit_code == 0, result.output
    assert "moving average" not in result.output and (run / "samples-raw.png").is_file()


def test_ema_is_the_moving_average_of_the_weights(tmp_path, monkeypatch):
    import gali_ext.recipes.build as loop  # the module whose step the loop calls
    from gali_ext.recipes.runs import load_run_models

    real_step, seen = loop.train_step, []

    def recording(gali, *args, **kwargs):
        result = real_step(gali, *args, **kwargs)
        seen.append(
            {
                f"{name}.{k}": v.detach().clone()
                for name in ("encoder", "generator")
                for k, v in getattr(gali, name).state_dict().items()
            }
        )
        return result

    monkeypatch.setattr(loop, "train_step", recording)
    d = 0.75
    out = train(tiny("digits-ali", steps=3, ema_decay=d), tmp_path / "run", progress=False)
    # w1 after the first step is copied, then ema = d * ema + (1 - d) * w
    w1, w2, w3 = seen
    checked = 0
    for name in ("encoder", "generator"):
        ema = load_file(str(out / f"{name}_ema.safetensors"))
        raw = load_file(str(out / f"{name}.safetensors"))
        for key, value in ema.items():
            full = f"{name}.{key}"
            assert torch.equal(raw[key], w3[full])
            if value.is_floating_point() and "running_" not in key:
                expected = d * d * w1[full] + d * (1 - d) * w2[full] + (1 - d) * w3[full]
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
                checked += 1
        assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert checked > 10
    # E's first batch norm: the statistics of the averaged first convolution on the first 1024
    # training images, batch by batch (16 each), not an average of the trained statistics
    ema = load_file(str(out / "encoder_ema.safetensors"))
    x = load_data(tiny("digits-ali"), "train").images_tensor(1024)
    h = torch.nn.functional.conv2d(x, ema["blocks.0.0.weight"], stride=2, padding=1)
    per_batch = h.view(64, 16, *h.shape[1:]).transpose(1, 2).flatten(2)  # [batch, C, 16 * H * W]
    torch.testing.assert_close(ema["blocks.0.1.running_mean"], per_batch.mean(2).mean(0))
    torch.testing.assert_close(ema["blocks.0.1.running_var"], per_batch.var(2).mean(0))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == "ema" and 0 < summary["test_pixel_mse_raw"] < 1
    assert summary["test_pixel_mse"] != summary["test_pixel_mse_raw"]
    assert load_run_models(out).weights == "ema"
    raw_models = load_run_models(out, ema=False)
    assert raw_models.weights == "raw"
    saved = load_file(str(out / "encoder.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in raw_models.encoder.state_dict().items())


def test_refresh_ema_statistics_recomputes_batch_norm_from_the_averaged_weights():
    from torch import nn
    from torch.optim.swa_utils import AveragedModel

    from gali_ext.recipes.build import refresh_ema_statistics

    class ConditionalG(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = nn.Linear(3, 2), nn.BatchNorm1d(2)

        def forward(self, z, y):
            return self.norm(self.linear(z) + 10 * y[:, None].float())

    encoder = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2))
    ema = {"encoder": AveragedModel(encoder), "generator": AveragedModel(ConditionalG())}
    images, latents = torch.randn(12, 4), torch.randn(12, 3)
    labels = torch.tensor([0, 1, 2] * 4)
    refresh_ema_statistics(ema, images, latents, labels, batch_size=6)
    # each statistic is the mean of the two batches': batch means average to the mean over all
    # 12 inputs; variances are each batch's unbiased one
    linear = ema["encoder"].module[0]
    h = images @ linear.weight.T + linear.bias
    norm = ema["encoder"].module[1]
    torch.testing.assert_close(norm.running_mean, h.mean(0))
    torch.testing.assert_close(norm.running_var, (h[:6].var(0) + h[6:].var(0)) / 2)
    g = ema["generator"].module
    hg = latents @ g.linear.weight.T + g.linear.bias + 10 * labels[:, None].float()
    torch.testing.assert_close(g.norm.running_mean, hg.mean(0))
    torch.testing.assert_close(g.norm.running_var, (hg[:6].var(0) + hg[6:].var(0)) / 2)


def test_tensorboard_gets_scalars_class_accuracy_and_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(tiny(log_with="tensorboard"), tmp_path / "run", progress=False)
    events = EventAccumulator(str(out / "logs" / "digits-gali4"), size_guidance={"images": 0})
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    d_loss = events.Scalars("d_loss")
    assert [e.step for e in d_loss] == [1, 2, 3, 4]
    assert [e.value for e in d_loss] == pytest.approx([r["d_loss"] for r in records], rel=1e-6)
    for k in range(4):  # GALI-4: D's accuracy on each of its 4 tuple classes
        accuracy = [e.value for e in events.Scalars(f"d_accuracy/class_{k}")]
        assert accuracy == pytest.approx([r["d_accuracy"][k] for r in records], rel=1e-6)
    samples = events.Images("samples")
    assert [e.step for e in samples] == [2, 4, 4]  # sample_every=2, and at the end
    from PIL import Image

    png = Image.open(out / "samples.png")
    assert (samples[-1].width, samples[-1].height) == png.size


def test_unknown_or_missing_tracker_is_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="log_with='tensorbored' is not a tracker"):
        train(tiny(log_with="tensorbored"), tmp_path / "run", progress=False)
    import gali_ext.recipes.build

    monkeypatch.setattr(gali_ext.recipes.build, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match=r"pip install \"gali-ext\[tensorboard\]\""):
        train(tiny(log_with="tensorboard"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_lists_recipes_and_reports_errors_in_one_line(tmp_path):
    from typer.testing import CliRunner

    listing = CliRunner().invoke(app, ["recipes"])
    assert listing.exit_code == 0
    assert all(name in listing.output for name in REQUIRED)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gali_ext.cli",
            "recipe",
            "svhn-gali8",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error:") and "--data-dir" in run.stderr
    assert not (tmp_path / "x").exists()  # nothing written before validation passed


def test_missing_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        train(tiny("svhn-ali", data_dir=tmp_path), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
