"""Evaluation metrics against hand-computed values (docs/design.md, section 6)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gali_ext.errors import ShapeError
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
    assert frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])
    ) == pytest.approx(4.0 + 1.0)
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
    cheat = inpainting_errors(
        lambda m: torch.zeros(m.shape[0], 1), lambda z: x[: z.shape[0]], x, features=nn.Flatten()
    )
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


@pytest.fixture(scope="module")
def evaluator_copy(tmp_path_factory):
    """Copies a 1-epoch evaluator (a real one takes 10 epochs), trained once per module, into a
    folder: ``evaluator_copy(folder)``."""
    import shutil

    from gali_ext.recipes.evaluator import train_evaluator

    cache = tmp_path_factory.mktemp("evaluator")
    train_evaluator("digits", cache, epochs=1)

    def copy(folder):
        shutil.copytree(cache, folder, dirs_exist_ok=True)
        return folder

    return copy


def test_eval_and_study_commands(tmp_path, monkeypatch, evaluator_copy):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    monkeypatch.chdir(tmp_path)
    evaluator_copy(tmp_path / "study" / "evaluator-digits")  # reused by the study and by eval
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "study",
            "digits",
            "--steps",
            "2",
            "--seeds",
            "2",
            "--out",
            "study",
            "--no-progress",
            "--svm-samples",
            "100",
            "--svm-draws",
            "1",
            "--recipes",
            "digits-gali-pt",
            "--jobs",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "training one" not in result.output  # the evaluator in the study folder is reused
    table = (tmp_path / "study" / "study.md").read_text()
    assert "| digits-gali-pt | 2 |" in table
    # the SVM reference rows: raw pixels, and the untrained encoder once per seed; the sample
    # columns' reference: the real test digits
    assert "| (raw pixels) | 1 |" in table and "| (untrained encoder) | 2 |" in table
    assert "| (test digits) | 1 |" in table
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    run = saved["results"][0]
    assert 0 <= run["svm_latent_error"] <= 100 and 0 <= run["svm_error"] <= 100
    assert 0 <= run["class_agreement"] <= 1 and 0 <= run["sample_confidence"] <= 1
    assert 1 <= run["sample_classes_covered"] <= 10 and run["train_seconds"] > 0
    assert (tmp_path / "study" / "study.png").is_file()
    runs = [str(tmp_path / "study" / f"digits-gali-pt-seed{s}") for s in (0, 1)]
    options = ["--markdown", "--svm-samples", "100", "--svm-draws", "1"]
    result = runner.invoke(app, ["eval", *runs, *options])
    assert result.exit_code == 0, result.output
    assert "| digits-gali-pt | 2 |" in result.output and "N=100" in result.output
    assert "training one" not in result.output  # found beside the runs
    # eval.json goes beside the runs, not into the current folder
    assert not (tmp_path / "eval.json").exists()
    saved = json.loads((tmp_path / "study" / "eval.json").read_text())
    assert len(saved["results"]) == 2 and 0 < saved["summary"]["digits-gali-pt"]["pixel_mse"] < 1
    # one run: its values, no spread
    result = runner.invoke(app, ["eval", runs[0], *options, "--out", "one"])
    assert result.exit_code == 0, result.output
    assert "| digits-gali-pt | 1 |" in result.output and "±" not in result.output
    assert (tmp_path / "one" / "eval.json").is_file()


def test_eval_announces_the_evaluator_it_trains_beside_the_runs(
    tmp_path, monkeypatch, evaluator_copy
):
    from typer.testing import CliRunner

    from gali_ext import recipes
    from gali_ext.recipes import evaluator
    from gali_ext.recipes.cli import app
    from gali_ext.recipes.train import train

    monkeypatch.chdir(tmp_path)
    train(
        recipes.get("digits-ali").with_overrides({"steps": "1"}),
        tmp_path / "runs" / "a",
        progress=False,
    )
    trained = []

    def fake_train_evaluator(dataset, folder, data_dir=None):
        trained.append(Path(folder))
        evaluator_copy(folder)
        return json.loads((Path(folder) / "evaluator.json").read_text())

    monkeypatch.setattr(evaluator, "train_evaluator", fake_train_evaluator)
    args = ["eval", "runs/a", "--svm-samples", "100", "--svm-draws", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first_line = result.output.splitlines()[0]
    assert "training one" in first_line and "about 1 min" in first_line
    assert trained == [(tmp_path / "runs" / "evaluator-digits").resolve()]
    assert (tmp_path / "runs" / "eval.json").is_file() and not (tmp_path / "eval.json").exists()
    result = CliRunner().invoke(app, args)  # the second time it is found and reused
    assert result.exit_code == 0 and "training one" not in result.output and len(trained) == 1


def test_study_in_parallel_equals_sequential_and_writes_the_paired_table(
    tmp_path, monkeypatch, evaluator_copy
):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app
    from gali_ext.recipes.study import study

    monkeypatch.chdir(tmp_path)
    for name in ("parallel", "sequential"):
        evaluator_copy(tmp_path / name / "evaluator-digits")
    recipes = "digits-ali,digits-gali-mix"
    svm = ["--svm-samples", "100", "--svm-draws", "1"]
    result = CliRunner().invoke(
        app,
        [
            "study",
            "digits",
            "--steps",
            "3",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--threads",
            "1",
            "--recipes",
            recipes,
            "--out",
            "parallel",
            *svm,
        ],
    )
    assert result.exit_code == 0, result.output
    study(
        tmp_path / "sequential",
        steps=3,
        seeds=1,
        recipes=recipes.split(","),
        progress=False,
        echo=lambda *_: None,
        svm_samples=100,
        svm_draws=1,
        jobs=1,
        threads=1,
    )
    # seed 0 of each recipe: the same weights and scores whether trained two at a time or alone
    saved = {
        name: {
            (r["recipe"], r["seed"]): r
            for r in json.loads((tmp_path / name / "study.json").read_text())["results"]
            if "seed" in r
        }
        for name in ("parallel", "sequential")
    }
    for recipe in recipes.split(","):
        run = f"{recipe}-seed0"
        for weights in ("encoder", "generator", "discriminator"):
            a = (tmp_path / "parallel" / run / f"{weights}.safetensors").read_bytes()
            assert a == (tmp_path / "sequential" / run / f"{weights}.safetensors").read_bytes()
        a, b = saved["parallel"][(recipe, 0)], saved["sequential"][(recipe, 0)]
        ignore = {"run", "train_seconds"}
        assert {k: v for k, v in a.items() if k not in ignore} == {
            k: v for k, v in b.items() if k not in ignore
        }
    # GALI-mix's inpainting claim, paired over the two seeds
    paired = json.loads((tmp_path / "parallel" / "paired.json").read_text())
    rows = {r["metric"]: r for r in paired if r["claim"] == "GALI-mix beats ALI on inpainting"}
    assert set(rows) == {"inpaint_pixel_mse", "inpaint_feature_mse"}
    assert all(r["n"] == 2 and r["seeds"] == [0, 1] and r["lower_is_better"] for r in rows.values())
    markdown = (tmp_path / "parallel" / "paired.md").read_text()
    assert "| GALI-mix beats ALI on inpainting | inpaint_pixel_mse | lower |" in markdown
    assert "| digits-gali-mix | 2 |" in (tmp_path / "parallel" / "study.md").read_text()
    settings = json.loads((tmp_path / "parallel" / "study.json").read_text())["settings"]
    assert settings["jobs"] == 2 and settings["threads_per_run"] == 1


def test_study_refuses_a_bad_setting_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["study", "--out", "s", "--set", "n_diss=2"])
    assert result.exit_code != 0 and "n_dis" in str(result.exception)
    assert not (tmp_path / "s").exists()


def test_latent_only_svm_features_are_the_encoder_output():
    from gali_ext.recipes.evaluate import encoder_features
    from gali_ext.recipes.models import build_ali_models

    encoder = build_ali_models("digits", latent_dim=8, channels=1).encoder
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    latent = encoder_features(encoder, x, latent_only=True)
    encoder.eval()
    with torch.no_grad():
        mu = encoder(x)[0]
    np.testing.assert_allclose(latent, mu.numpy(), rtol=1e-5, atol=1e-6)
    assert encoder_features(encoder, x).shape == (5, sum(encoder.hidden_dims))


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
    from gali_ext.recipes.evaluate import encoder_features
    from gali_ext.recipes.metrics import model_device, reconstruct

    images = torch.rand(3, 1, 2, 2)  # on the CPU, as data sets load them
    probe = _DeviceProbe()
    for run in (
        lambda: reconstruct(probe, nn.Identity(), images),
        lambda: reconstruct(nn.Identity(), probe, images),
        lambda: fid(probe, images, images),
        lambda: encoder_features(probe, images),
    ):
        with pytest.raises(_Reached):
            run()
    assert probe.seen == [torch.device("meta")] * 4
    assert model_device(probe) == torch.device("meta")
    assert model_device(nn.Identity()) is None and model_device(lambda x: x) is None
    buffered = nn.BatchNorm1d(2, affine=False)
    assert model_device(buffered) == torch.device("cpu")


class _FirstPixelsClassifier(nn.Module):
    """A fake evaluator: the logits of an image are its first K pixel values."""

    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return x.flatten(1)[:, : self.classes]


def test_reconstruction_class_agreement_by_hand():
    from gali_ext.recipes.metrics import reconstruction_class_agreement

    # four 1 x 2 x 2 images; the classifier reads the first 3 pixels as logits of 3 classes
    x = torch.tensor([[5.0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 5, 0], [5, 0, 0, 0]]).view(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 2])  # the last image's label disagrees with its content
    classifier = _FirstPixelsClassifier(3)
    # a perfect reconstruction keeps the classes of x: 3 of 4 labels match
    assert (
        reconstruction_class_agreement(nn.Identity(), nn.Identity(), classifier, x, labels) == 0.75
    )
    # G(E(x)) = the same image for all: (1, 0, 0, 0) is class 0, which one label of four has
    to_class0 = lambda z: torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2).expand(len(z), 1, 2, 2)  # noqa: E731
    assert reconstruction_class_agreement(nn.Identity(), to_class0, classifier, x, labels) == 0.25
    # a stochastic encoder is read at its mean
    stochastic = lambda v: (v, torch.full_like(v, 9.0))  # noqa: E731
    assert reconstruction_class_agreement(stochastic, nn.Identity(), classifier, x, labels) == 0.75
    with pytest.raises(ShapeError, match=r"labels of shape \[4\]"):
        reconstruction_class_agreement(nn.Identity(), nn.Identity(), classifier, x, labels[:3])


def test_sample_class_statistics_by_hand():
    from gali_ext.recipes.metrics import sample_class_statistics

    # softmax of (a, 0, 0, 0) puts e^a / (e^a + 3) on the first class: a = ln 27 gives 0.9
    # exactly, a = ln 18 gives 18/21 = 0.857; four samples of K = 4 classes
    logits = torch.zeros(4, 4, dtype=torch.float64)
    logits[0, 0] = math.log(27)  # class 0, p = 0.9: confident (>= 0.9)
    logits[1, 0] = math.log(18)  # class 0, p = 0.857: not
    logits[2, 1] = 10.0  # class 1, p = e^10 / (e^10 + 3) > 0.9
    logits[3, 2] = math.log(18)  # class 2, not confident
    stats = sample_class_statistics(logits, threshold=0.9 - 1e-12)
    assert stats["confidence"] == pytest.approx(0.5)
    # histogram (1/2, 1/4, 1/4, 0): entropy 1/2 * 1 + 2 * 1/4 * 2 = 1.5 bits
    assert stats["class_histogram"] == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert stats["class_entropy_bits"] == pytest.approx(1.5)
    assert stats["classes_covered"] == 3
    assert sample_class_statistics(logits, min_share=0.3)["classes_covered"] == 1
    # every sample in one class: entropy 0 (not -0), one class covered
    one = sample_class_statistics(torch.tensor([[3.0, 0.0]] * 5))
    assert str(one["class_entropy_bits"]) == "0.0" and one["classes_covered"] == 1
    # uniform over K = 8 classes: log2(8) = 3 bits
    assert sample_class_statistics(torch.eye(8) * 5)["class_entropy_bits"] == pytest.approx(3.0)
    with pytest.raises(ShapeError, match=r"\[N, K\]"):
        sample_class_statistics(torch.zeros(4))


def test_sample_quality_scores_the_generator_samples():
    from gali_ext.recipes.metrics import sample_quality

    # G(z) = z as a 1 x 1 x 2 "image", the classifier's logits are (100 z_0, 100 z_1): each
    # sample falls in the class of its larger coordinate, almost always with p > 0.9
    generator = lambda z: z.view(-1, 1, 1, 2)  # noqa: E731
    classifier = lambda x: 100 * x.flatten(1)  # noqa: E731
    stats = sample_quality(generator, classifier, latent_dim=2, count=400, seed=3)
    z = torch.randn(400, 2, generator=torch.Generator().manual_seed(3))
    share0 = (z[:, 0] > z[:, 1]).double().mean().item()
    assert stats["class_histogram"] == pytest.approx([share0, 1 - share0])
    # p < 0.9 only where |100 (z_0 - z_1)| < ln 9
    assert stats["confidence"] == pytest.approx(
        ((100 * (z[:, 0] - z[:, 1])).abs() >= math.log(9)).double().mean().item()
    )
    assert stats["classes_covered"] == 2


def test_sample_quality_draws_from_the_runs_prior():
    from gali_ext.recipes.metrics import sample_quality

    # class 1 when a coordinate leaves [-1, 1]: never under U(-1, 1), which a run trained with
    # prior=uniform samples from; often (1 - P(|z| <= 1)^2 = 0.534) under N(0, I)
    generator = lambda z: z.view(-1, 1, 1, 2)  # noqa: E731

    def classifier(x):
        return 100 * torch.stack([torch.zeros(len(x)), x.flatten(1).abs().amax(1) - 1], 1)

    uniform = sample_quality(generator, classifier, latent_dim=2, count=2000, prior="uniform:1")
    assert uniform["class_histogram"] == [1.0, 0.0]
    normal = sample_quality(generator, classifier, latent_dim=2, count=2000)
    outside = 1 - math.erf(1 / math.sqrt(2)) ** 2
    assert normal["class_histogram"][1] == pytest.approx(outside, abs=0.04)


def test_summary_metrics_on_a_trained_pair_and_a_one_run_table():
    from gali_ext.recipes.data import load_dataset
    from gali_ext.recipes.evaluate import format_table, summarise
    from gali_ext.recipes.metrics import summary_metrics
    from gali_ext.recipes.models import build_ali_models

    test = load_dataset("digits", "test")
    models = build_ali_models("digits", latent_dim=32, channels=1)
    classifier = _FirstPixelsClassifier(10)
    result = summary_metrics(models.encoder, models.generator, test, classifier, samples=50)
    assert set(result) == {
        "pixel_mse",
        "class_agreement",
        "sample_confidence",
        "sample_entropy_bits",
        "sample_classes_covered",
    }
    assert set(summary_metrics(models.encoder, models.generator, test)) == {"pixel_mse"}
    table = format_table(summarise([{"recipe": "r", **result}]))
    assert "±" not in table and f"| {result['class_agreement']:.3f} |" in table
    two = format_table(
        summarise([{"recipe": "r", "pixel_mse": 0.1}, {"recipe": "r", "pixel_mse": 0.3}])
    )
    assert "| r | 2 | 0.2000 ± 0.1000 |" in two


# -- class-conditional runs (docs/design.md, section 6.10) ------------------------------------
#
# Stand-ins on K = 4 classes: an image of class k is 1 x 4 x 4 with pixel (0, k) at +1 and the
# rest at -1; the oracle evaluator reads the first K pixels as logits (_FirstPixelsClassifier),
# so it classifies every such image exactly. E(x) is the first K pixels, which carry x's class:
# perfect inference. A "label copier" G draws y's image and ignores z; a "latent drawer" G draws
# the class z carries and ignores y.

K = 4


def _class_images(classes: torch.Tensor) -> torch.Tensor:
    images = -torch.ones(len(classes), 1, K, K)
    images[torch.arange(len(classes)), 0, 0, classes] = 1.0
    return images


class _StandInGenerator(nn.Module):
    """``G(z, y)``: the image of class ``draw(z, y)``."""

    def __init__(self, draw):
        super().__init__()
        self.draw = draw
        self.num_classes = K
        self.latent_dim = K

    def forward(self, z, y):
        return _class_images(self.draw(z, y))


def _reads_class(x):
    return x.flatten(1)[:, :K]


def _label_copier():
    return _StandInGenerator(lambda z, y: y)


def _latent_drawer():
    return _StandInGenerator(lambda z, y: z.argmax(1))


def _half_copier():
    """Copies even labels, draws the latent's class for odd ones."""
    return _StandInGenerator(lambda z, y: torch.where(y % 2 == 0, y, z.argmax(1)))


def _balanced_labels(n=400):
    return torch.arange(n) % K


def test_label_copying_and_inference_are_told_apart_by_the_shuffled_label():
    from gali_ext.recipes.metrics import conditional_reconstruction_agreement

    y = _balanced_labels()
    x = _class_images(y)
    oracle = _FirstPixelsClassifier(K)
    # the permutation of eq. 6.15: torch.randperm with a CPU generator seeded with 0
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    same = (y[perm] == y).double().mean().item()
    assert 0.15 < same < 0.35  # about sum_k h_k^2 = 1/K = 0.25 for balanced labels
    # G copies the label: perfect with the own label, at chance with a shuffled one
    copier = conditional_reconstruction_agreement(_reads_class, _label_copier(), oracle, x, y)
    assert copier["own_label"] == 1.0
    assert copier["shuffled_label"] == pytest.approx(same)
    assert copier["shuffled_label_chance"] == pytest.approx(same)
    assert copier["label_gap"] == pytest.approx(1.0 - same)
    # G draws what E(x) carries: the label changes nothing
    drawer = conditional_reconstruction_agreement(_reads_class, _latent_drawer(), oracle, x, y)
    assert drawer["own_label"] == drawer["shuffled_label"] == 1.0
    assert drawer["label_gap"] == 0.0
    # G copies even labels and draws z for odd ones: x's class survives a shuffled label when
    # y_perm is odd or happens to equal y
    mixed = conditional_reconstruction_agreement(_reads_class, _half_copier(), oracle, x, y)
    expected = ((y[perm] % 2 == 1) | (y[perm] == y)).double().mean().item()
    assert mixed["own_label"] == 1.0 and mixed["shuffled_label"] == pytest.approx(expected)
    # another seed, another permutation
    other = conditional_reconstruction_agreement(_reads_class, _label_copier(), oracle, x, y, 1)
    perm1 = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    assert other["shuffled_label"] == pytest.approx((y[perm1] == y).double().mean().item())
    with pytest.raises(ShapeError, match=r"labels of shape \[400\]"):
        conditional_reconstruction_agreement(_reads_class, _label_copier(), oracle, x, y[:3])


def test_class_conditional_sample_accuracy_by_hand():
    from gali_ext.recipes.metrics import sample_quality

    oracle = _FirstPixelsClassifier(K)
    # y_j = j mod K over 1000 samples: 250 of each class; the copier draws each one right
    copier = sample_quality(_label_copier(), oracle, latent_dim=K, count=1000, classes=K)
    assert copier["conditional_accuracy"] == 1.0
    assert copier["class_histogram"] == [0.25] * K
    assert copier["class_entropy_bits"] == pytest.approx(2.0)
    # drawing class y + 1 instead: never right, the classes still covered evenly
    shifted = _StandInGenerator(lambda z, y: (y + 1) % K)
    assert sample_quality(shifted, oracle, K, count=1000, classes=K)["conditional_accuracy"] == 0
    # right for even y (classes 0 and 2, 500 of the 1000), the latent's class for odd y, which
    # is y itself where argmax z = y
    stats = sample_quality(_half_copier(), oracle, K, count=1000, seed=5, classes=K, batch_size=300)
    z = torch.randn(1000, K, generator=torch.Generator().manual_seed(5))
    y = torch.arange(1000) % K
    lucky = ((y % 2 == 1) & (z.argmax(1) == y)).double().sum().item()
    assert stats["conditional_accuracy"] == pytest.approx((500 + lucky) / 1000)
    # an unconditional generator gets no conditional accuracy
    plain = sample_quality(lambda z: _class_images(z.argmax(1)), oracle, K, count=100)
    assert "conditional_accuracy" not in plain


def test_summary_metrics_of_a_class_conditional_pair():
    from gali_ext.recipes.data import ImageData
    from gali_ext.recipes.evaluate import format_table, summarise
    from gali_ext.recipes.metrics import summary_metrics

    y = _balanced_labels(200)
    images = ((_class_images(y) + 1) * 127.5).round().to(torch.uint8)  # uint8 [N, 1, 4, 4]
    test = ImageData("stand-in", "test", images, y, K)
    oracle = _FirstPixelsClassifier(K)
    # conditions default to the generator's num_classes
    copier = summary_metrics(_reads_class, _label_copier(), test, oracle, samples=100)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    same = (y[perm] == y).double().mean().item()
    assert copier["pixel_mse"] == 0.0  # G(E(x), y) with x's own label redraws x exactly
    assert "class_agreement" not in copier
    assert copier["cond_recon_agreement_own_label"] == 1.0
    assert copier["cond_recon_agreement_shuffled_label"] == pytest.approx(same)
    assert copier["cond_recon_label_gap"] == pytest.approx(1 - same)
    assert copier["cond_shuffled_label_chance"] == pytest.approx(same)
    assert copier["cond_sample_accuracy"] == 1.0 and copier["sample_classes_covered"] == K
    drawer = summary_metrics(_reads_class, _latent_drawer(), test, oracle, conditions=K)
    assert drawer["cond_recon_label_gap"] == 0.0 and drawer["pixel_mse"] == 0.0
    # without the evaluator: the pixel MSE alone, still with the own labels
    assert summary_metrics(_reads_class, _label_copier(), test) == {"pixel_mse": 0.0}
    table = format_table(summarise([{"recipe": "copier", **copier}]))
    assert "cond. recon. agreement (shuffled label)" in table
    assert "recon. class agreement" not in table


def test_a_class_conditional_run_is_studied_sampled_and_evaluated(
    tmp_path, monkeypatch, evaluator_copy
):
    from PIL import Image
    from typer.testing import CliRunner

    from gali_ext.recipes.cli import app

    monkeypatch.chdir(tmp_path)
    evaluator_copy(tmp_path / "study" / "evaluator-digits")
    runner = CliRunner()
    svm = ["--svm-samples", "100", "--svm-draws", "1"]
    study = ["study", "digits", "--recipes", "digits-gali8-cond", "--steps", "2", "--seeds", "1"]
    options = ["--out", "study", "--no-progress", "--jobs", "1", "--set", "batch_size=8"]
    result = runner.invoke(app, [*study, *options, *svm])
    assert result.exit_code == 0, result.output
    assert "digits-gali8-cond seed 0: cond. recon. agreement" in result.output
    assert "| digits-gali8-cond | 1 |" in (tmp_path / "study" / "study.md").read_text()
    run = tmp_path / "study" / "digits-gali8-cond-seed0"
    # training's summary.json has the conditional metrics (the evaluator is beside the run)
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["cond_sample_accuracy"] <= 1 and "class_agreement" not in summary

    result = runner.invoke(app, ["sample", str(run), "--out", "s"])
    assert result.exit_code == 0, result.output
    assert "row k has y = k (k = 0 to 9 from the top), the same 8 latents" in result.output
    # ten rows of 16-pixel digits with 2 pixels of padding: 10 * 18 + 2 high, enlarged 4 times
    # (8 columns, 146 px wide, to at least 512 px)
    assert Image.open(tmp_path / "s" / "samples-raw.png").size[1] == 4 * 182
    for name in ("reconstructions", "reconstructions-shuffled"):
        assert (tmp_path / "s" / f"{name}-raw.png").is_file()
    # the printed labels are the test images' and their shuffle (seed 0)
    from gali_ext.recipes.build import load_data
    from gali_ext.recipes.metrics import shuffled_labels
    from gali_ext.recipes.settings import RecipeConfig

    labels = load_data(RecipeConfig.from_json(run / "config.json"), "test").labels_tensor()[:32]
    row = " ".join(str(int(v)) for v in shuffled_labels(labels)[:8])
    assert f"y_perm of the test images, row by row: {row} |" in result.output

    result = runner.invoke(app, ["eval", str(run), *svm, "--out", "e"])
    assert result.exit_code == 0, result.output
    assert "cond. recon. agreement (shuffled label)" in result.output
    assert "copies the label and ignores E(x) scores 0." in result.output
    assert "recon. class agreement " not in result.output.replace("cond. recon.", "cond.")
    scored = json.loads((tmp_path / "e" / "eval.json").read_text())["results"][0]
    own, shuffled = (scored[f"cond_recon_agreement_{k}_label"] for k in ("own", "shuffled"))
    assert 0 <= own <= 1 and 0 <= shuffled <= 1
    assert scored["cond_recon_label_gap"] == pytest.approx(own - shuffled)
    assert 0 <= scored["cond_sample_accuracy"] <= 1
    assert 0 < scored["pixel_mse"] < 1 and scored["fid_evaluator"] > 0
    assert 0 < scored["inpaint_feature_mse"] and 0 <= scored["svm_error"] <= 100
