"""Evaluation metrics against hand-computed values (docs/design.md, section 6)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from gali_ext.recipes.metrics import (
    feature_mse,
    fid,
    frechet_distance,
    gaussian_fit,
    inpainting_errors,
    reconstruction_mse,
    svm_misclassification,
)


def identity_pair():
    return nn.Identity(), nn.Identity()


def constant_generator(value):
    return lambda z: torch.full_like(z, value)


def test_pixel_mse_by_hand():
    x = torch.tensor([[[[-1.0, 1.0], [0.0, 0.5]]]])  # [1, 1, 2, 2]
    assert reconstruction_mse(nn.Identity(), nn.Identity(), x) == 0.0
    # G(E(x)) = 0: per-pixel ((x - 0) / 2)^2 = 0.25, 0.25, 0, 0.0625 -> mean 0.140625
    value = reconstruction_mse(nn.Identity(), constant_generator(0.0), x)
    assert value == pytest.approx(0.140625)


def test_stochastic_encoder_is_evaluated_at_its_mean():
    encoder = lambda x: (x, torch.full_like(x, 5.0))  # noqa: E731  huge sigma, ignored
    assert reconstruction_mse(encoder, nn.Identity(), torch.rand(3, 1, 2, 2)) == 0.0


def test_feature_mse_by_hand():
    x = torch.zeros(2, 1, 1, 2)
    features = nn.Flatten()
    # G(E(x)) = 1 everywhere: features differ by 1 in every coordinate
    assert feature_mse(nn.Identity(), constant_generator(1.0), features, x) == pytest.approx(1.0)


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for N(m, s^2)
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                            np.array([[1.0]])) == pytest.approx(4.0 + 1.0)  # fmt: skip
    # diagonal: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # rotation-invariant for equal Gaussians
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4))
    sigma = m @ m.T + np.eye(4)
    assert frechet_distance(np.zeros(4), sigma, np.zeros(4), sigma) == pytest.approx(0, abs=1e-6)


def test_fid_of_samples_from_known_gaussians():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(20000, 2, generator=g)
    fake = torch.randn(20000, 2, generator=g) * 2 + torch.tensor([3.0, 0.0])
    # N(0, I) vs N((3, 0), 4 I): 9 + 2 * (2 - 1)^2 = 11
    assert fid(nn.Identity(), real, fake) == pytest.approx(11.0, rel=0.03)


def test_svm_on_separable_and_on_random_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    separable = np.eye(3)[labels] * 5 + rng.normal(size=(600, 3)) * 0.1
    split = lambda a: (a[:400], a[400:500], a[500:])  # noqa: E731
    f, y = split(separable), split(labels)
    perfect = svm_misclassification(f[0], y[0], f[1], y[1], f[2], y[2], samples=100, draws=3)
    assert perfect["mean"] == 0.0 and perfect["draws"] == 3 and len(perfect["C"]) == 3
    noise = rng.normal(size=(600, 5))
    f = split(noise)
    chance = svm_misclassification(f[0], y[0], f[1], y[1], f[2], y[2], samples=100, draws=3)
    assert 45 < chance["mean"] < 85  # chance is 66.7 % for 3 classes


def test_inpainting_errors_by_hand():
    x = torch.rand(64, 1, 6, 6) * 2 - 1
    # an encoder-generator pair that reconstructs perfectly from the masked image cannot know
    # the hidden pixels; a "cheating" pair that returns x restores them exactly
    cheat = inpainting_errors(lambda m: torch.zeros(m.shape[0], 1), lambda z: x[: z.shape[0]], x,
                              features=nn.Flatten())  # fmt: skip
    assert cheat == {"pixel_mse": 0.0, "feature_mse": 0.0}
    # filling the box with 1 everywhere: error ((x - 1) / 2)^2 over the box pixels only
    ones = inpainting_errors(nn.Identity(), constant_generator(1.0), x, seed=3)
    from gali_ext.providers.maskmix import sample_box_masks

    boxes = sample_box_masks(64, 6, 6, torch.Generator().manual_seed(3))
    expected = ((x - 1) / 2).pow(2)[boxes].mean().item()
    assert ones["pixel_mse"] == pytest.approx(expected)


def test_evaluator_trains_and_reports_accuracy(tmp_path):
    from gali_ext.recipes.evaluator import load_evaluator, train_evaluator

    info = train_evaluator("digits", tmp_path / "ev", epochs=5)
    assert info["test_accuracy"] > 0.7  # chance is 0.1
    saved = json.loads((tmp_path / "ev" / "evaluator.json").read_text())
    assert saved["test_accuracy"] == info["test_accuracy"]
    model = load_evaluator(tmp_path / "ev")
    assert not model.training and model.features(torch.zeros(2, 1, 16, 16)).shape == (2, 128)


def test_eval_and_study_commands(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app
    from gali_ext.recipes.evaluator import train_evaluator

    monkeypatch.chdir(tmp_path)
    train_evaluator("digits", tmp_path / "study" / "evaluator", epochs=1)  # reused by the study
    runner = CliRunner()
    result = runner.invoke(app, ["study", "digits", "--steps", "2", "--seeds", "2", "--out",
                                 "study", "--no-progress", "--svm-samples", "100",
                                 "--svm-draws", "1", "--recipes", "digits-gali-pt"])  # fmt: skip
    assert result.exit_code == 0, result.output
    table = (tmp_path / "study" / "study.md").read_text()
    assert "| digits-gali-pt | 2 |" in table
    # the SVM reference rows: raw pixels, and the untrained encoder once per seed
    assert "| (raw pixels) | 1 |" in table and "| (untrained encoder) | 2 |" in table
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    run = saved["results"][0]
    assert 0 <= run["svm_latent_error"] <= 100 and 0 <= run["svm_error"] <= 100
    assert (tmp_path / "study" / "study.png").is_file()
    runs = [str(tmp_path / "study" / f"digits-gali-pt-seed{s}") for s in (0, 1)]
    options = ["--markdown", "--svm-samples", "100", "--svm-draws", "1"]
    result = runner.invoke(app, ["eval", *runs, "--evaluator", "study/evaluator", *options])
    assert result.exit_code == 0, result.output
    assert "| digits-gali-pt | 2 |" in result.output and "N=100" in result.output
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["results"]) == 2 and 0 < saved["summary"]["digits-gali-pt"]["pixel_mse"] < 1


def test_study_refuses_a_bad_setting_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["study", "--out", "s", "--set", "n_diss=2"])
    assert result.exit_code != 0 and "n_dis" in str(result.exception)
    assert not (tmp_path / "s").exists()


def test_latent_only_svm_features_are_the_encoder_output():
    from gali_ext.recipes.evaluate import _encoder_features
    from gali_ext.recipes.models import build_ali_models

    encoder = build_ali_models("digits", latent_dim=8, channels=1).encoder
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    latent = _encoder_features(encoder, x, latent_only=True)
    encoder.eval()
    with torch.no_grad():
        mu = encoder(x)[0]
    np.testing.assert_allclose(latent, mu.numpy(), rtol=1e-5, atol=1e-6)
    assert _encoder_features(encoder, x).shape == (5, sum(encoder.hidden_dims))


def test_fid_with_fewer_samples_than_dimensions_closed_forms():
    # 40 samples of 300 features: the covariances are rank-deficient. Shifting every sample
    # by c leaves the covariance alone, so the distance is ||c||^2 exactly; scaling by 2
    # gives ||mu||^2 (1 - 2)^2 + tr(S) (1 - 2)^2.
    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 300, generator=g, dtype=torch.float64) + 1
    shift = torch.linspace(-1, 1, 300, dtype=torch.float64)
    assert fid(nn.Identity(), real, real) == pytest.approx(0.0, abs=1e-9)
    assert fid(nn.Identity(), real, real + shift) == pytest.approx(shift.pow(2).sum().item())
    expected = real.mean(0).pow(2).sum().item() + real.var(0).sum().item()
    assert fid(nn.Identity(), real, 2 * real) == pytest.approx(expected)
    # the same as the covariance route once there are more samples than dimensions
    wide = real[:, :20]
    assert fid(nn.Identity(), wide, wide * 1.5 + 0.3) == pytest.approx(
        frechet_distance(*gaussian_fit(wide), *gaussian_fit(wide * 1.5 + 0.3))
    )


def test_fid_on_inception_features_from_a_local_file(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from gali_ext import recipes
    from gali_ext.errors import CheckpointError
    from gali_ext.recipes.evaluate import evaluate_run, format_table, inception_features, summarise
    from gali_ext.recipes.train import train

    # Random Inception weights with calibrated batch-norm statistics, saved whole (classifier
    # too) as a real file would be; 75 x 75 inputs (Inception's smallest) keep the test fast.
    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(16, 3, 75, 75))
    weights = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    inception = inception_features(weights, input_size=(75, 75))
    x = torch.rand(12, 1, 16, 16) * 2 - 1
    assert inception.features(x).shape == (12, 2048)  # pooled features of RGB images

    monkeypatch.chdir(tmp_path)
    run = train(recipes.get("digits-ali").with_overrides({"steps": "1"}), tmp_path / "run",
                progress=False)  # fmt: skip
    result = evaluate_run(run, svm_samples=100, svm_draws=1, max_test_images=24,
                          inception=inception)  # fmt: skip
    assert result["fid_inception"] > 0 and result["fid_inception"] != result["fid_evaluator"]
    assert "FID (Inception features)" in format_table(summarise([result]))
    with pytest.raises(CheckpointError, match="does not exist"):
        inception_features(tmp_path / "missing.safetensors")


class _Reached(Exception):
    pass


class _DeviceProbe(nn.Module):
    """A network whose weights sit on ``meta`` (standing in for a GPU): records where its
    input lives, then stops the evaluation."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, device="meta"))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.device)
        raise _Reached

    hidden_features = forward


def test_metrics_feed_each_network_on_its_own_device():
    from gali_ext.recipes.evaluate import _encoder_features
    from gali_ext.recipes.metrics import model_device, reconstruct

    images = torch.rand(3, 1, 2, 2)  # on the CPU, as data sets load them
    probe = _DeviceProbe()
    for run in (
        lambda: reconstruct(probe, nn.Identity(), images),
        lambda: reconstruct(nn.Identity(), probe, images),
        lambda: fid(probe, images, images),
        lambda: _encoder_features(probe, images),
    ):
        with pytest.raises(_Reached):
            run()
    assert probe.seen == [torch.device("meta")] * 4
    assert model_device(probe) == torch.device("meta")
    assert model_device(nn.Identity()) is None and model_device(lambda x: x) is None
    buffered = nn.BatchNorm1d(2, affine=False)
    assert model_device(buffered) == torch.device("cpu")
