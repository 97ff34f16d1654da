"""FID on the TF Inception network behind published FIDs, offline (docs/design.md, section 6).

The standard weights cannot be downloaded here: the tests build torch-fidelity's
FeatureExtractorInceptionV3 (the standard architecture) with random weights, save its state
dict as the real file is saved, and load that file through ``--fid-weights``. The network
resizes to 75 x 75, its smallest input, instead of 299 x 299, to keep the tests short.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gali_ext.errors import CheckpointError, ConfigError, ShapeError
from gali_ext.recipes import fid as fid_module
from gali_ext.recipes.fid import (
    STANDARD_NETWORK,
    STANDARD_WEIGHTS_FILE,
    STANDARD_WEIGHTS_URL,
    StandardInceptionFID,
    inception_input,
)
from gali_ext.recipes.metrics import _frechet_distance_of_samples, frechet_distance, gaussian_fit
from tests._helpers import error_lines, run_cli, train_run


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A state dict of the standard architecture, random weights, saved with ``torch.save``.

    The constructor of FeatureExtractorInceptionV3 builds the layers, then loads the weights
    (downloading them without a path): both steps are skipped here. Kaiming-normal conv weights
    keep the features of order 1 through the network (its default init shrinks them to 1e-8).
    """
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    patch = pytest.MonkeyPatch()
    patch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: None)
    patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *args: None)
    try:
        torch.manual_seed(0)
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def small_inputs(monkeypatch):
    """The network resizes to 75 x 75 (the architecture's smallest input) instead of 299."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


def test_images_reach_the_network_as_the_bytes_the_data_stored():
    pixels = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    images = pixels.float() / 127.5 - 1  # the data's mapping
    converted = inception_input(images)
    assert converted.dtype == torch.uint8 and converted.shape == (4, 3, 5, 5)
    assert all(torch.equal(converted[:, c], pixels[:, 0]) for c in range(3))
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(inception_input(rgb.float() / 127.5 - 1), rgb)
    assert torch.equal(
        inception_input(torch.full((1, 1, 2, 2), 7.0)), torch.full((1, 3, 2, 2), 255)
    )
    with pytest.raises(ShapeError, match="1 or 3"):
        inception_input(torch.zeros(2, 2, 4, 4))


def test_a_missing_weights_file_says_where_to_get_the_standard_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as error:
        StandardInceptionFID(tmp_path / "missing.pth")
    assert STANDARD_WEIGHTS_FILE in str(error.value) and STANDARD_WEIGHTS_URL in str(error.value)


def test_a_file_that_is_not_the_standard_networks_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    timm_weights = tmp_path / "inception_v3.safetensors"  # the old option's file
    save_file({"conv_stem.weight": torch.zeros(2, 2)}, str(timm_weights))
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("weights-inception-2015-12-05-6726825d.pth\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    other_keys = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 2)}, other_keys)
    a_module = tmp_path / "module.pth"  # unpickling it would run code: refused unread
    torch.save(nn.Linear(2, 2), a_module)
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    cases = {
        timm_weights: "is not the weights of TF Inception 2015-12-05",
        not_torch: r"not a PyTorch state dict of tensors \(torch.load\(weights_only=True\) refuses",
        empty: r"not a PyTorch state dict of tensors \(torch.load: EOFError",
        other_keys: "is not the weights of TF Inception 2015-12-05",
        a_module: r"torch.load\(weights_only=True\) refuses it, and it is not unpickled further",
        a_list: "holds a list, not a state dict",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as error:
            StandardInceptionFID(path)
        assert STANDARD_WEIGHTS_FILE in str(error.value), path
    with pytest.raises(CheckpointError, match="Missing key"):
        StandardInceptionFID(other_keys)


@pytest.mark.slow  # torchmetrics' FID takes the eigenvalues of a 2048 x 2048 matrix (~10 s)
def test_fid_on_the_standard_architecture_agrees_with_the_projects_frechet_distance(
    weights, small_inputs, monkeypatch
):
    scorer = StandardInceptionFID(weights, device="cpu")
    assert scorer.network.startswith("TF Inception 2015-12-05 architecture, other weights")
    assert "not the standard 6726825d" in scorer.network
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, 12, 12, generator=generator) * 2 - 1  # digits-like: 1 channel
    generated = (torch.rand(8, 1, 12, 12, generator=generator) * 2 - 1).clamp(-1, 0.4)
    score = scorer(real, generated)
    assert score.network == scorer.network

    with torch.no_grad():
        features = [scorer.metric.inception(inception_input(x)) for x in (real, generated)]
    assert features[0].shape == (8, 2048) and features[0].std() > 1e-3  # not degenerate
    own = frechet_distance(*gaussian_fit(features[0]), *gaussian_fit(features[1]))
    assert own > 0.1
    assert score.value == pytest.approx(own, rel=1e-4)
    assert score.value == pytest.approx(_frechet_distance_of_samples(*features), rel=1e-4)

    # the standard file (its SHA-256 begins with the digits in its name) is named as such
    sha256 = fid_module._sha256(weights)
    monkeypatch.setattr(fid_module, "_STANDARD_SHA256_PREFIX", sha256[:8])
    assert StandardInceptionFID(weights, device="cpu").network == STANDARD_NETWORK
    with pytest.raises(ShapeError, match="at least 2"):
        scorer(real[:1], generated)


def test_the_tables_and_the_paired_statistics_take_the_fid_and_its_network():
    from gali_ext.recipes.evaluate import format_table, summarise
    from gali_ext.recipes.fid import fid_networks
    from gali_ext.recipes.stats import Claim, paired_table

    results = [
        {
            "recipe": recipe,
            "seed": seed,
            "fid_inception": value,
            "fid_inception_network": STANDARD_NETWORK,
            "fid_evaluator_network": f"the {dataset} evaluator classifier's features",
        }
        for recipe, dataset, values in (("a", "digits", (10.0, 12.0)), ("b", "svhn", (20.0, 21.0)))
        for seed, value in enumerate(values)
    ]
    summary = summarise(results)
    assert summary["a"]["fid_inception"] == 11.0 and "fid_inception_network" not in summary["a"]
    assert "| FID (TF Inception 2015-12-05) |" in format_table(summary)
    assert fid_networks(results) == {
        "fid_evaluator": "the digits evaluator classifier's features | "
        "the svhn evaluator classifier's features",
        "fid_inception": STANDARD_NETWORK,
    }
    (row,) = paired_table(results, [Claim("a beats b", "a", "b", ("fid_inception",))])
    assert row["lower_is_better"] and row["mean"] == -9.5 and row["agree"] == 2


def test_the_removed_inception_weights_option_points_to_fid_weights(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", str(tmp_path), "--inception-weights", "x.safetensors")
    assert code == 2
    (line,) = error_lines(err)
    assert "--inception-weights (timm's inception_v3) was removed" in line
    assert f"--fid-weights {STANDARD_WEIGHTS_FILE}" in line and STANDARD_WEIGHTS_URL in line


@pytest.mark.slow  # trains a run and an evaluator; Inception on 2 x 300 test digits
def test_eval_reports_the_fid_with_the_network_it_used(capsys, tmp_path, weights, small_inputs):
    from gali_ext.recipes.evaluator import train_evaluator

    run = tmp_path / "run"
    train_run(run, ["digits-ali", "--steps", "1", "--no-progress"])
    train_evaluator("digits", tmp_path / "evaluator-digits", epochs=1)
    options = ["--svm-samples", "100", "--svm-draws", "1", "--markdown"]
    code, out, err = run_cli(capsys, "eval", str(run), *options, "--fid-weights", str(weights))
    assert code == 0, err
    header = out.splitlines()[0]
    assert "| FID (TF Inception 2015-12-05) |" in header
    assert "| FID (evaluator features) |" in header
    assert (
        "FID networks: fid_evaluator: the digits evaluator classifier's features; fid_inception: "
        "TF Inception 2015-12-05 architecture, other weights (random-inception.pth, sha256 "
    ) in out
    saved = json.loads((tmp_path / "eval.json").read_text())
    result = saved["results"][0]
    assert result["fid_inception"] > 0 and result["fid_inception"] != result["fid_evaluator"]
    assert saved["fid_networks"]["fid_inception"] == result["fid_inception_network"]
    assert saved["summary"]["digits-ali"]["fid_inception"] == result["fid_inception"]

    code, _, err = run_cli(capsys, "eval", str(run), "--fid-weights", str(tmp_path / "no.pth"))
    assert code == 2 and STANDARD_WEIGHTS_URL in error_lines(err)[0]
