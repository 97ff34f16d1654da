"""The paper's metrics while a run trains (issue 32, item 3; docs/design.md, section 6.11):
``eval_every``, ``best_metric`` and ``best/``, ``metrics.png``."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gali_ext import recipes
from gali_ext.errors import CheckpointError, ConfigError
from gali_ext.recipes.build import first_images, load_data
from gali_ext.recipes.files import read_metrics
from gali_ext.recipes.metrics import reconstruction_mse
from gali_ext.recipes.rundir import clear_run_directory
from gali_ext.recipes.runs import load_run_models, read_best, recover_best, save_best
from gali_ext.recipes.train import train
from gali_ext.recipes.watch import BestWeights, metric_series
from tests._helpers import error_lines, run_cli

# digits-gali4, batch 16, every step logged, a checkpoint every 2 steps (2 kept), no grids
TINY = {
    "batch_size": "16",
    "log_every": "1",
    "sample_every": "1000",
    "checkpoint_every": "2",
    "keep_checkpoints": "2",
}


def tiny(**changes):
    return recipes.get("digits-gali4").with_overrides(
        {**TINY, **{k: str(v) for k, v in changes.items()}}
    )


def write_evaluator(folder: Path) -> Path:
    """An (untrained) evaluator classifier in ``folder``, as ``gali-ext train-evaluator`` saves
    one: what matters here is that the run finds one beside it."""
    from gali_ext.recipes.evaluator import EvaluatorClassifier

    torch.manual_seed(123)
    model = EvaluatorClassifier(1, 10)
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "evaluator.safetensors"),
    )
    (folder / "evaluator.json").write_text(json.dumps({"dataset": "digits", "model": model.config}))
    return folder


def evaluations(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "eval/pixel_mse" in r]


# ------------------------------------------------------------------------------- settings


def test_bad_eval_settings_are_one_line_config_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"eval_every=-1 is invalid: expected an int >= 0"):
        tiny(eval_every=-1).validate()
    with pytest.raises(ConfigError, match=r"best_metric='fid' is invalid: expected pixel_mse, "):
        tiny(best_metric="fid").validate()
    for setting in ("eval_every=-1", "best_metric=fid", "eval_every=ten"):
        code, _, err = run_cli(
            capsys, "recipe", "digits-ali", "--set", setting, "--out", str(tmp_path / "r")
        )
        assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    # a metric this run cannot evaluate: no evaluator beside it, no FID weights; nothing written
    out = tmp_path / "runs" / "x"
    with pytest.raises(
        ConfigError,
        match=r"best_metric='feature_mse' is not evaluated in this run: no evaluator classifier "
        r"beside the run .*train-evaluator digits",
    ):
        train(tiny(best_metric="feature_mse", eval_every=2), out, progress=False)
    with pytest.raises(
        ConfigError, match=r"best_metric='fid_inception' is not evaluated.*--fid-weights"
    ):
        train(tiny(best_metric="fid_inception", eval_every=2), out, progress=False)
    with pytest.raises(ConfigError, match=r"fid_weights='nowhere.pth': no such file"):
        train(tiny(fid_weights="nowhere.pth", eval_every=2), out, progress=False)
    assert not out.exists()
    # a split the data set does not have
    with pytest.raises(
        Exception, match=r"digits has splits \['train', 'val', 'test'\], not 'extra'"
    ):
        train(tiny(eval_split="extra", eval_every=2), out, progress=False)
    assert not out.exists()


def test_every_recipe_evaluates_by_default_with_a_metric_it_has():
    for name in recipes.available():
        config = recipes.get(name)
        assert config.eval_every > 0 and config.best_metric == "pixel_mse", name
    # digits: 3000 steps, 12 evaluations; SVHN and CelebA: every 20000 steps
    assert recipes.get("digits-gali4").eval_every == 250
    assert recipes.get("svhn-gali8").eval_every == 20_000


# ----------------------------------------------------------------------------- best/ alone


def _modules(value: float) -> dict[str, nn.Module]:
    encoder, generator = nn.Linear(2, 3), nn.Linear(3, 2)
    for module in (encoder, generator):
        nn.init.constant_(module.weight, value)
    return {"encoder": encoder, "generator": generator}


@pytest.mark.parametrize(
    ("metric", "values", "best_step"),
    [
        ("pixel_mse", [0.3, 0.1, 0.2, 0.1], 2),  # lower is better: the argmin, the first of ties
        ("svm_error", [12.0, 15.0, 9.0, 11.0], 3),
        ("class_agreement", [0.2, 0.5, 0.4, 0.5], 2),  # higher is better: the argmax
    ],
)
def test_best_weights_are_the_argmin_or_argmax(tmp_path, metric, values, best_step):
    best = BestWeights(tmp_path, metric)
    kept = [best.update(step, {metric: v}, _modules(step)) for step, v in enumerate(values, 1)]
    assert kept[0] and best.step == best_step and best.value == values[best_step - 1]
    record = read_best(tmp_path)
    assert (record["metric"], record["step"], record["value"]) == (
        metric,
        best_step,
        values[best_step - 1],
    )
    assert record["lower_is_better"] == (metric != "class_agreement")
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(tmp_path / "best" / "encoder.safetensors"))["weight"],
        torch.full((3, 2), float(best_step)),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no staging folder left
    assert not best.better(math.nan)
    # a resumed run reads the best back: a worse value does not replace it
    again = BestWeights(tmp_path, metric)
    assert (again.step, again.value) == (best_step, values[best_step - 1])
    assert not again.update(9, {metric: values[0]}, _modules(9))


def test_a_kill_while_best_is_replaced_leaves_a_best(tmp_path):
    # killed after best/ became best.old/ and before the complete best.next/ became best/
    (tmp_path / "new").mkdir()
    save_best(tmp_path / "new", _modules(2), {"metric": "pixel_mse", "value": 0.4, "step": 2})
    save_best(tmp_path, _modules(1), {"metric": "pixel_mse", "value": 0.5, "step": 1})
    (tmp_path / "best").rename(tmp_path / "best.old")
    (tmp_path / "new" / "best").rename(tmp_path / "best.next")
    (tmp_path / "new").rmdir()
    assert recover_best(tmp_path) == tmp_path / "best"
    assert read_best(tmp_path)["step"] == 2  # the complete new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    # killed while best.next/ was written (no best.json yet): the old one stays
    (tmp_path / "best").rename(tmp_path / "best.old")
    (tmp_path / "best.next").mkdir()
    (tmp_path / "best.next" / "encoder.safetensors").write_bytes(b"half")
    recover_best(tmp_path)
    assert read_best(tmp_path)["step"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == [
        "best"
    ]
    (tmp_path / "best" / "best.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="is not a record of the best weights"):
        read_best(tmp_path)


def test_best_belongs_to_the_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"name": "x", "spec": "ali", "dataset": "digits", "arch": "digits"})
    )
    for name in ("best.json", "encoder.safetensors", "generator.safetensors"):
        (run / "best" / name).write_text("x")
    (run / "best" / "notes.txt").write_text("mine")
    (run / "best.old").mkdir()
    (run / "metrics.png").write_bytes(b"png")
    kept = clear_run_directory(run)
    assert kept == ["best/notes.txt", "config.json"] or kept == ["best/notes.txt"]
    assert not (run / "best.old").exists() and not (run / "metrics.png").exists()
    assert sorted(p.name for p in (run / "best").iterdir()) == ["notes.txt"]


def test_metric_series_and_plot(tmp_path):
    from PIL import Image

    from gali_ext.recipes.visual import save_metric_plot

    records = [
        {"step": 2, "eval/pixel_mse": 0.3, "eval/svm_error": 20.0},
        {"step": 4, "eval/pixel_mse": 0.1},
        {"step": 6, "eval/pixel_mse": 0.2, "eval/svm_error": 10.0},
    ]
    best = BestWeights(tmp_path, "pixel_mse")
    best.value, best.step = 0.1, 4
    series, marks = metric_series(records, best)
    titles = list(series)
    assert titles[0].startswith("pixel MSE (lower is better); best 0.1 at step 4")
    assert titles[1] == "SVM misclassification % (lower is better)"
    assert series[titles[0]] == [(2, 0.3), (4, 0.1), (6, 0.2)] and marks == {titles[0]: (4, 0.1)}
    image = Image.open(save_metric_plot(series, tmp_path / "metrics.png", marks))
    assert image.size == (760, 2 * 220)
    pixels = torch.tensor(list(image.convert("RGB").tobytes())).view(-1, 3)
    assert (pixels == torch.tensor([214, 39, 40])).all(1).any()  # the best point is ringed


# ------------------------------------------------------------------------- through a run


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """digits-gali4 for 6 steps, evaluated every 2 steps with an evaluator beside it and a
    TensorBoard tracker, progress shown (what it printed is returned too)."""
    import contextlib
    import io
    import os

    root = tmp_path_factory.mktemp("watched")
    write_evaluator(root / "evaluator-digits")
    printed = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"  # rich: the progress line in full
    try:
        with contextlib.redirect_stdout(printed):
            train(tiny(steps=6, eval_every=2, log_with="tensorboard"), root / "run", progress=True)
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return root / "run", printed.getvalue()


@pytest.mark.slow
def test_eval_every_writes_the_metrics_at_its_steps(watched):
    run, printed = watched
    records = evaluations(run)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {
            "eval/pixel_mse",
            "eval/svm_error",
            "eval/feature_mse",
            "eval/class_agreement",
        } <= r.keys()
        assert "eval/fid_inception" not in r  # no --fid-weights
        assert r["eval/weights"] == "ema" and r["eval/seconds"] > 0
        assert "200 images of the digits val split" in r["eval/protocol"]
        assert 0 < r["eval/pixel_mse"] < 1 and 0 <= r["eval/svm_error"] <= 100
        assert 0 <= r["eval/class_agreement"] <= 1
    # the training records are still one per step
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "d_loss" in r] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    # the tracker holds the same values at the same steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "digits-gali4"))
    events.Reload()
    for name in ("pixel_mse", "svm_error", "feature_mse", "class_agreement"):
        scalars = events.Scalars(f"eval/{name}")
        assert [e.step for e in scalars] == [2, 4, 6]
        assert [e.value for e in scalars] == pytest.approx(
            [r[f"eval/{name}"] for r in records], rel=1e-6
        )
    # the progress line shows the last evaluation
    last = records[-1]
    assert f"eval@6 MSE {last['eval/pixel_mse']:.4f} SVM {last['eval/svm_error']:.1f}%" in printed
    assert f"agree {last['eval/class_agreement']:.3f}" in printed
    from PIL import Image

    assert Image.open(run / "metrics.png").size == (760, 4 * 220)  # four metrics


@pytest.mark.slow
def test_best_is_the_argmin_and_survives_rotation(watched):
    run, _ = watched
    records = evaluations(run)
    values = [r["eval/pixel_mse"] for r in records]
    best = read_best(run)
    assert best["metric"] == "pixel_mse" and best["value"] == min(values)
    assert best["step"] == records[values.index(min(values))]["step"]
    assert (best["weights"], best["split"]) == ("ema", "val")
    # rotation kept 2 of the 3 checkpoints; best/ is where it was
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_1",
        "checkpoint_2",
    ]
    assert sorted(p.name for p in (run / "best").iterdir()) == [
        "best.json",
        "encoder.safetensors",
        "generator.safetensors",
    ]
    # best/ holds the weights that scored that value
    models = load_run_models(run, best=True)
    images = first_images(load_data(models.config, "val"), 2000)
    assert reconstruction_mse(models.encoder, models.generator, images) == pytest.approx(
        best["value"], rel=1e-5
    )
    assert models.weights == "ema" and models.best["step"] == best["step"]


@pytest.mark.slow
def test_evaluation_leaves_the_training_trajectory_as_it_was(tmp_path):
    # every step evaluated (with the evaluator built beside the run, and the SVM, whose
    # scikit-learn draws a seed from NumPy's global generator) against none
    write_evaluator(tmp_path / "on" / "evaluator-digits")
    (tmp_path / "off").mkdir()
    settings = {"steps": 4, "ema_decay": 0.5}
    train(tiny(eval_every=1, **settings), tmp_path / "on" / "run", progress=False)
    train(tiny(eval_every=0, **settings), tmp_path / "off" / "run", progress=False)
    assert len(evaluations(tmp_path / "on" / "run")) == 4 and not evaluations(
        tmp_path / "off" / "run"
    )
    files = [
        "encoder.safetensors",
        "generator.safetensors",
        "discriminator.safetensors",
        "encoder_ema.safetensors",
        "generator_ema.safetensors",
        "checkpoints/checkpoint_1/model.safetensors",
        "checkpoints/checkpoint_1/optimizer.bin",
        "checkpoints/checkpoint_1/random_states_0.pkl",  # torch, NumPy and Python generators
    ]
    for name in files:
        on, off = ((tmp_path / w / "run" / name).read_bytes() for w in ("on", "off"))
        assert on == off, name
    assert not (tmp_path / "off" / "run" / "best").exists()
    assert not (tmp_path / "off" / "run" / "metrics.png").exists()


@pytest.mark.slow
def test_resume_keeps_the_history_and_the_best(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(steps=4, eval_every=2), run, progress=False)
    first = read_best(run)
    # a best no later evaluation can beat: a resume that reset it would replace it
    record = {**first, "value": 0.0}
    (run / "best" / "best.json").write_text(json.dumps(record))
    code, out, err = run_cli(
        capsys,
        "recipe",
        "digits-gali4",
        "--resume",
        "--out",
        str(run),
        "--steps",
        "8",
        "--no-progress",
    )
    assert code == 0, err
    assert [r["step"] for r in evaluations(run)] == [2, 4, 6, 8]  # the history goes on
    assert read_best(run) == record
    # best_metric says what best/ holds: a resume cannot change it
    code, _, err = run_cli(
        capsys,
        "recipe",
        "digits-gali4",
        "--resume",
        "--out",
        str(run),
        "--steps",
        "10",
        "--set",
        "best_metric=svm_error",
    )
    assert code == 2 and "--resume cannot change best_metric ('pixel_mse' -> 'svm_error')" in err


@pytest.mark.slow
def test_sample_eval_and_export_take_the_best_weights(watched, tmp_path, capsys):
    run, _ = watched
    best = read_best(run)
    code, out, err = run_cli(capsys, "sample", str(run), "--best", "--out", str(tmp_path))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "reconstructions-best-ema.png",
        "samples-best-ema.png",
    ]
    assert f"(pixel_mse {best['value']:.4g}, step {best['step']})" in out
    code, out, err = run_cli(
        capsys, "eval", str(run), "--best", "--svm-draws", "1", "--out", str(tmp_path / "e")
    )
    assert code == 0, err
    result = json.loads((tmp_path / "e" / "eval.json").read_text())["results"][0]
    assert result["weights"] == "best-ema" and result["best"]["step"] == best["step"]
    code, out, err = run_cli(capsys, "export", str(run), str(tmp_path / "x"), "--best")
    assert code == 0, err
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["best"]["step"] == best["step"] and config["weights"] == "ema"
    card = (tmp_path / "x" / "README.md").read_text()
    assert f"by `pixel_mse` on the val split ({json.dumps(best['value'])} at step" in card
    # a run without best/ (eval_every=0): one line that says so
    (tmp_path / "plain").mkdir()
    for name in ("config.json", "encoder.safetensors", "generator.safetensors"):
        (tmp_path / "plain" / name).write_bytes((run / name).read_bytes())
    code, _, err = run_cli(capsys, "sample", str(tmp_path / "plain"), "--best")
    assert code == 2 and error_lines(err) and "has no best weights (best/best.json)" in err
