"""The SVHN recipes as the authors' runs (issue 32; docs/design.md, section 4.9): their settings,
the loss weights they resolve to, the length and FLOPs a run states, and svhn-gali8 end to end
on SVHN-format files of real digits (the split, G's per-pixel output bias, the paper's metrics
while it trains, the best checkpoint, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gali_ext import build_spec, recipes
from gali_ext.errors import ConfigError
from gali_ext.recipes.authors import loss_weight_matrices
from gali_ext.recipes.build import build_model, resolve_steps
from gali_ext.recipes.cost import measure_step_flops
from tests._helpers import run_cli, write_svhn_digits

# recipe: (epochs of extra, n_dis, shared_forward, own_generator_batch), the authors' scripts
AUTHORS = {
    "svhn-ali": (300, 5, False, True),
    "svhn-alice": (300, 5, False, True),
    "svhn-gali8": (300, 5, False, True),
    "svhn-gali4": (100, 1, True, False),
    "svhn-gali-pt": (100, 1, True, False),
}


def test_svhn_recipes_take_the_authors_settings():
    for name, (epochs, n_dis, shared, own) in AUTHORS.items():
        c = recipes.get(name)
        assert (c.lr, c.betas, c.batch_size, c.latent_dim) == (2e-4, (0.5, 0.999), 100, 256)
        assert (c.train_split, c.epochs, c.instance_noise) == ("extra", epochs, 0.1)
        assert (c.n_dis, c.shared_forward, c.own_generator_batch) == (n_dis, shared, own)
        assert (c.output_bias, c.loss_weights) == ("pixel", "authors")
    assert recipes.get("svhn-alice").alice_weight == 1.0
    for name in ("digits-gali8", "celeba-gali4"):  # the other recipes keep theirs
        c = recipes.get(name)
        assert (c.output_bias, c.loss_weights, c.train_split, c.epochs) == (
            "channel",
            "paper",
            "train",
            0.0,
        )
        assert not c.own_generator_batch


def test_the_run_length_in_steps_from_the_authors_epochs():
    per_epoch = 531_131 // 100  # full batches of 100 in extra
    gali8, gali4 = recipes.get("svhn-gali8"), recipes.get("svhn-gali4")
    # GALI-8: 300 epochs of 5311 batches, 6 batches a step (5 D, 1 E/G of its own)
    assert resolve_steps(gali8, per_epoch) == 300 * per_epoch // 6 == 265_550
    assert resolve_steps(gali4, per_epoch) == 100 * per_epoch == 531_100  # one batch a step
    assert resolve_steps(recipes.get("svhn-ali"), 7) == math.ceil(300 * 7 / 6)
    # a length in steps replaces the epochs, from --set and from --steps alike
    assert gali8.with_overrides({"steps": "7"}).epochs == 0
    assert resolve_steps(gali8.with_overrides({"steps": "7"}), per_epoch) == 7


def test_authors_loss_weights_in_our_class_order():
    spec = build_spec("gali4")
    at = {c.nodes: i for i, c in enumerate(spec.classes)}
    real, real2 = at[("x0", "z0")], at[("x0", "z1")]
    d, g = loss_weight_matrices("authors", "gali4")
    expected_d = torch.eye(4)
    expected_d[real, real] = 0.5  # 0.5 * CE(class 0) + CE(1) + CE(2) + CE(3)
    expected_g = 1 - torch.eye(4)
    expected_g[real, real2] = 1 / 6  # (1/6) * CE(class 0 -> its first wrong class) + 11 terms
    torch.testing.assert_close(d, expected_d)
    torch.testing.assert_close(g, expected_g)
    for spec_name, k in (("ali", 2), ("alice", 2), ("gali8", 8)):  # every CE term, unweighted
        d, g = loss_weight_matrices("authors", spec_name)
        torch.testing.assert_close(d, torch.eye(k))
        torch.testing.assert_close(g, 1 - torch.eye(k))
    d, g = loss_weight_matrices("authors", "gali_pt")  # 0.5 * (4 terms), (1/6) * (12 terms)
    torch.testing.assert_close(d, 0.5 * torch.eye(4))
    torch.testing.assert_close(g, (1 - torch.eye(4)) / 6)
    assert loss_weight_matrices("paper", "gali4") == (None, None)


def test_the_built_objective_weighs_its_terms_as_the_authors():
    torch.manual_seed(0)
    gali = build_model(recipes.get("svhn-gali4"), 3).gali
    logits = torch.randn(4, 6, 4)
    ce = [
        [float(torch.nn.functional.cross_entropy(logits[i], torch.full((6,), j))) for j in range(4)]
        for i in range(4)
    ]
    at = {c.nodes: i for i, c in enumerate(gali.spec.classes)}
    real, real2 = at[("x0", "z0")], at[("x0", "z1")]
    d = sum(ce[i][i] * (0.5 if i == real else 1) for i in range(4))
    g = sum(
        ce[i][j] * (1 / 6 if (i, j) == (real, real2) else 1)
        for i in range(4)
        for j in range(4)
        if i != j
    )
    assert float(gali.discriminator_criterion(logits)) == pytest.approx(d, rel=1e-6)
    assert float(gali.generator_criterion(logits)) == pytest.approx(g, rel=1e-6)
    # the paper's weights: 2/K for D, 2/(K(K-1)) for E and G
    paper = build_model(recipes.get("svhn-gali4").with_overrides({"loss_weights": "paper"}), 3)
    d_paper = sum(ce[i][i] for i in range(4)) * 2 / 4
    assert float(paper.gali.discriminator_criterion(logits)) == pytest.approx(d_paper, rel=1e-6)


def test_settings_the_authors_weights_and_schedule_refuse():
    base = recipes.get("digits-gali8")
    for changes, words in (
        ({"spec": "gali_mix", "loss_weights": "authors"}, "not spec 'gali_mix'"),
        ({"loss_weights": "authors", "generator_criterion": "minimax"}, "product_of_terms"),
        ({"loss_weights": "thesis"}, "paper or authors"),
        ({"shared_forward": "true", "own_generator_batch": "true"}, "exclude each other"),
        ({"train_split": "extra"}, "a split of digits"),
        ({"output_bias": "row"}, "channel, pixel"),
        ({"epochs": "-1"}, "epochs"),
    ):
        with pytest.raises(ConfigError, match=words):
            base.with_overrides(changes).validate()


def test_step_flops_are_linear_in_the_batch():
    config = recipes.get("digits-gali8").with_overrides({"own_generator_batch": "true"})
    at_2 = measure_step_flops(config.with_overrides({"batch_size": "2"}), batch=2)
    at_6 = measure_step_flops(config.with_overrides({"batch_size": "6"}), batch=6)
    scaled = measure_step_flops(config.with_overrides({"batch_size": "6"}), batch=2)
    assert at_6 == 3 * at_2 == scaled > 0


@pytest.mark.slow
def test_dry_run_states_the_cost_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "recipe", "svhn-gali8", "--dry-run")
    assert code == 0, err
    assert "svhn-gali8: 265,550 steps = 300 epochs of svhn extra (531,131 images)" in out
    assert "6 batches of 100 per step: 159,330,000 images" in out
    assert "5 D step(s), then E/G on a batch of its own" in out
    flops = int(out.split("FLOPs per step: ")[1].split(" ")[0].replace(",", ""))
    assert 1e11 < flops < 1e13  # the same count as a real run's first step: the test below
    assert list(tmp_path.iterdir()) == []  # no run directory, no data folder


def first_batch_bias(images_chw_uint8: np.ndarray) -> torch.Tensor:
    """The authors' initial output bias, by hand: 0.5 logit(p) of the batch's mean pixel
    p = mean(x / 255), clamped to [1e-7, 1 - 1e-7]."""
    p = torch.from_numpy(images_chw_uint8.astype(np.float64) / 255).mean(0)
    p = p.clamp(1e-7, 1 - 1e-7)
    return (0.5 * torch.log(p / (1 - p))).float()


def eval_records(run):
    """The evaluation records of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r for r in records if "eval/pixel_mse" in r]


@pytest.mark.slow
def test_svhn_gali8_end_to_end_on_svhn_format_digits(tmp_path, capsys):
    folder, run = tmp_path / "svhn", tmp_path / "run"
    written = write_svhn_digits(folder)
    extra = written["extra"][0].transpose(3, 2, 0, 1)  # (32, 32, 3, N) -> [N, 3, 32, 32]
    args = ["recipe", "svhn-gali8", "--data-dir", str(folder), "--set", "batch_size=4"]
    args += ["--set", "lr=1e-9", "--set", "checkpoint_every=2", "--set", "sample_every=100"]
    args += ["--set", "eval_every=1"]
    code, out, err = run_cli(capsys, *args, "--steps", "2", "--out", str(run), "--no-progress")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert (config["train_split"], config["output_bias"], config["steps"]) == ("extra", "pixel", 2)
    # the first lines: the length, then the FLOPs of the first step
    assert "svhn-gali8: 2 steps = 0.5 epochs of svhn extra (96 images)" in out
    assert "6 batches of 4 per step: 48 images" in out
    flops = int(out.split("FLOPs per step: ")[1].split(" ")[0].replace(",", ""))
    code, dry, _ = run_cli(capsys, *args, "--steps", "2", "--dry-run")
    assert code == 0 and f"FLOPs per step: {flops:,} " in dry  # the dry run's, measured apart

    # G's per-pixel bias was set from the first batch the run drew: batch 0 of epoch 0 of the
    # extra split, images randperm(96, seed 0 + epoch 0)[:4] (recipes.data.training_loader);
    # a learning rate of 1e-9 keeps it there through two steps
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0)).numpy()
    expected = first_batch_bias(extra[order[:4]])
    bias = load_file(run / "generator.safetensors")["output_bias"]
    assert bias.shape == (3, 32, 32)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-5)
    whole = first_batch_bias(extra)  # the whole split's mean would be another bias
    assert float((whole - expected).abs().max()) > 0.5

    # the paper's metrics at every step, on the held-out split the extra split leaves out (val,
    # cut from train_32x32.mat), and best/ holds the weights of the best pixel MSE so far
    evaluations = eval_records(run)
    assert [r["step"] for r in evaluations] == [1, 2]
    assert all(
        math.isfinite(r["eval/pixel_mse"]) and 0 <= r["eval/svm_error"] <= 100 for r in evaluations
    )
    best = json.loads((run / "best" / "best.json").read_text())
    assert (best["metric"], best["split"]) == ("pixel_mse", "val")
    first = min(evaluations, key=lambda r: r["eval/pixel_mse"])
    assert (best["step"], best["value"]) == (first["step"], first["eval/pixel_mse"])

    # resume: continues from the step-2 checkpoint, and keeps the bias (not re-initialised from
    # the batch it resumes with, batch 12 of the stream)
    code, out, err = run_cli(
        capsys, "recipe", "svhn-gali8", "--resume", "--out", str(run), "--steps", "3"
    )
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if "eval/pixel_mse" not in r]  # the training records
    assert steps[-1] == 3 and steps.count(2) == 1
    resumed = first_batch_bias(extra[order[48:52]])
    assert float((resumed - expected).abs().max()) > 0.5
    bias = load_file(run / "generator.safetensors")["output_bias"]
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-5)
    # the resumed run keeps its metric history and its best, and evaluates on
    evaluations = eval_records(run)
    assert [r["step"] for r in evaluations] == [1, 2, 3]
    best = json.loads((run / "best" / "best.json").read_text())
    first = min(evaluations, key=lambda r: r["eval/pixel_mse"])
    assert (best["step"], best["value"]) == (first["step"], first["eval/pixel_mse"])

    # an export rebuilds G with its per-pixel bias
    from gali_ext.recipes.export import HubGenerator

    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "hub"))
    assert code == 0, err
    generator = HubGenerator.from_pretrained(str(tmp_path / "hub"))
    assert generator.output_bias_mode == "pixel"
    torch.testing.assert_close(generator.output_bias.detach(), bias)
