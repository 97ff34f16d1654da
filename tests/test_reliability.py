"""What a research user relies on when a long run dies: resume, safe loading, clear errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gali_ext import recipes
from gali_ext.errors import CheckpointError, DataError, DivergenceError
from gali_ext.recipes.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--set",
    "batch_size=16",
    "--set",
    "checkpoint_every=5",
    "--set",
    "log_every=1",
    "--set",
    "sample_every=1000",
    "--set",
    "num_workers=2",
    "--no-progress",
]


def checkpoint_steps(run):
    """``{checkpoint folder name: step}`` of the complete checkpoints of a run (those whose
    manifest, written last, is there)."""
    return {
        p.name: json.loads((p / "train_state.json").read_text())["step"]
        for p in (run / "checkpoints").glob("checkpoint_*")
        if (p / "manifest.json").is_file()
    }


def gali_ext(*args):
    return [sys.executable, "-m", "gali_ext.cli", *args]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = "40"
    whole = subprocess.run(
        gali_ext(
            "recipe", "digits-gali4", "--steps", steps, "--out", str(tmp_path / "whole"), *TINY
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    process = subprocess.Popen(
        gali_ext("recipe", "digits-gali4", "--steps", steps, "--out", str(run), *TINY),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while 10 not in checkpoint_steps(run).values():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 40 not in checkpoint_steps(run).values()
    # a kill while saving leaves a checkpoint without a manifest, which resume must set aside
    numbers = [int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir()]
    half = run / "checkpoints" / f"checkpoint_{max(numbers) + 1}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    resumed = subprocess.run(
        gali_ext("recipe", "digits-gali4", "--steps", steps, "--out", str(run), "--resume", *TINY),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    output = resumed.stdout + resumed.stderr
    assert re.search(r"resumed from .*checkpoint_\d+ at step [1-3]\d\b", output)
    assert f"warning: --resume: skipped {half.name} (no manifest.json" in output
    assert not half.exists() and (run / "damaged-checkpoints" / half.name).is_dir()
    for name in ("encoder", "generator", "discriminator"):
        a = load_file(str(tmp_path / "whole" / f"{name}.safetensors"))
        b = load_file(str(run / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps_logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").open()]
    assert steps_logged == list(range(1, 41))  # no step logged twice after the resume
    kept = checkpoint_steps(run)
    assert len(list((run / "checkpoints").iterdir())) == len(kept)
    assert sorted(kept.values()) == [30, 35, 40]  # keep_checkpoints=3
    assert recipes.get("digits-gali4").keep_checkpoints == 3


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    from gali_ext.gali import GALI

    real, calls = GALI.generator_objective, {"n": 0}

    def poisoned(self, *args, **kwargs):
        objective = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            objective.loss = objective.loss * float("nan")
        return objective

    monkeypatch.setattr(GALI, "generator_objective", poisoned)
    config = recipes.get("digits-ali").with_overrides(
        {"steps": "10", "batch_size": "16", "checkpoint_every": "1"}
    )
    stop = "generator-encoder loss became nan at step 2; the last good checkpoint is checkpoint_1"
    with pytest.raises(DivergenceError, match=rf"{stop} \(step 2\): continue from it"):
        train(config, tmp_path / "run", progress=False)
    # nothing is saved at the divergence itself (issue 26, item 4): the newest is step 2's
    assert max(checkpoint_steps(tmp_path / "run").values()) == 2
    weights = load_file(str(tmp_path / "run" / "generator.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_corrupted_or_mismatched_weights_name_file_and_key(tmp_path):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    config = recipes.get("digits-ali").with_overrides({"steps": "1", "batch_size": "16"})
    run = train(config, tmp_path / "run", progress=False)
    data = (run / "generator.safetensors").read_bytes()
    (run / "generator.safetensors").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(app, ["sample", str(run), "--raw-weights"])
    assert isinstance(result.exception, CheckpointError)
    assert "generator.safetensors" in str(result.exception)
    data = (run / "generator_ema.safetensors").read_bytes()  # the digits recipes keep an EMA
    (run / "generator_ema.safetensors").write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(app, ["sample", str(run)])
    assert isinstance(result.exception, CheckpointError)
    assert "generator_ema.safetensors" in str(result.exception)
    from safetensors.torch import save_file

    state = load_file(str(run / "encoder.safetensors"))
    key = next(iter(state))
    state[key] = torch.zeros(1)
    save_file(state, str(run / "generator.safetensors"))
    (run / "encoder.safetensors").replace(run / "encoder.bak")
    save_file(state, str(run / "encoder.safetensors"))
    result = CliRunner().invoke(app, ["sample", str(run), "--raw-weights"])
    assert isinstance(result.exception, CheckpointError)
    assert "encoder.safetensors" in str(result.exception) and key in str(result.exception)


def test_images_that_do_not_fit_the_architecture(tmp_path):
    config = recipes.get("digits-gali4").with_overrides({"arch": "svhn"})
    with pytest.raises(DataError, match=r"expects images of shape \[3, 32, 32\].*\[1, 16, 16\]"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_failed_start_keeps_the_previous_run(tmp_path):
    config = recipes.get("digits-ali").with_overrides({"steps": "1", "batch_size": "16"})
    train(config, tmp_path / "run", progress=False)
    missing = str(tmp_path / "none.safetensors")
    broken = config.with_overrides(
        {"spec": "gali_pt", "features_model": "test_resnet", "features_weights": missing}
    )
    with pytest.raises(CheckpointError, match="none.safetensors"):
        train(broken, tmp_path / "run", progress=False, overwrite=True)
    assert (tmp_path / "run" / "generator.safetensors").is_file()
    # --resume of a run that does not exist yet starts it (issue 17)
    train(config, tmp_path / "new", progress=False, resume=True)
    assert [json.loads(x)["step"] for x in (tmp_path / "new" / "metrics.jsonl").open()] == [1]
