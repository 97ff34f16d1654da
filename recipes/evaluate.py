"""Evaluate trained runs with the paper's metrics (``gali-ext eval``; the study,
:mod:`gali_ext.recipes.study`, evaluates its runs here).

A run is scored on its data set's test split: pixel MSE, feature MSE with the evaluator
classifier ``M_eval``, linear-SVM misclassification on encoder features, Frechet distance of
generated samples (on the evaluator's features, labelled as such, and on the TF Inception
network behind published FIDs when the user has its weights in a local file: nothing is
downloaded; :mod:`gali_ext.recipes.fid`), and inpainting errors. Runs
that share a recipe are summarised as mean ± std. A class-conditional run (``G(z, y)``) is
scored with the labels (docs/design.md, section 6.10): samples of each class in turn,
reconstructions with x's own label and with a shuffled one.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gali_ext.errors import ConfigError
from gali_ext.recipes.build import first_images, load_data
from gali_ext.recipes.data import ImageData
from gali_ext.recipes.evaluator import default_evaluator_dir, ensure_evaluator, load_evaluator
from gali_ext.recipes.fid import StandardInceptionFID
from gali_ext.recipes.metrics import (
    eval_mode,
    feature_mse,
    fid,
    inpainting_errors,
    model_device,
    sample_class_statistics,
    summary_metrics,
    svm_misclassification,
)
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.runs import has_ema_weights, load_run_models
from gali_ext.recipes.settings import RecipeConfig

__all__ = [
    "METRICS",
    "check_same_weights",
    "table_notes",
    "SVM_DEFAULTS",
    "check_svm_options",
    "encoder_features",
    "evaluate_run",
    "format_table",
    "prior_samples",
    "summarise",
    "svm_references",
    "test_data_reference",
]

# (key, column title, digits after the point)
METRICS = [
    ("class_agreement", "recon. class agreement", 3),
    # class-conditional runs only (docs/design.md, section 6.10, eqs. 6.13-6.16)
    ("cond_sample_accuracy", "cond. sample accuracy", 3),
    ("cond_recon_agreement_own_label", "cond. recon. agreement (own label)", 3),
    ("cond_recon_agreement_shuffled_label", "cond. recon. agreement (shuffled label)", 3),
    ("cond_recon_label_gap", "cond. label gap (own - shuffled)", 3),
    ("sample_confidence", "confident samples", 3),
    ("sample_entropy_bits", "sample class entropy (bits)", 2),
    ("sample_classes_covered", "classes >= 5 % of samples", 1),
    ("pixel_mse", "pixel MSE", 4),
    ("feature_mse", "feature MSE", 4),
    ("svm_error", "SVM misclassification %", 2),
    ("svm_latent_error", "SVM % (latent only)", 2),
    ("fid_inception", "FID (TF Inception 2015-12-05)", 2),
    ("fid_evaluator", "FID (evaluator features)", 2),
    ("inpaint_pixel_mse", "inpainting pixel MSE", 4),
    ("inpaint_feature_mse", "inpainting feature MSE", 4),
]
SVM_DEFAULTS = {"digits": (500, 10), "svhn": (1000, 100), "celeba": (1000, 100)}


def encoder_features(
    encoder, images: torch.Tensor, latent_only: bool = False, batch_size: int = 500
) -> np.ndarray:
    """The encoder's SVM representation: its ``hidden_features`` concatenated (the paper's last
    three hidden layers and the output), or the output alone when ``latent_only``."""
    device = model_device(encoder)
    with torch.no_grad(), eval_mode(encoder):
        parts = []
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            features = encoder.hidden_features(batch if device is None else batch.to(device))
            parts.append((features[-1] if latent_only else torch.cat(features, dim=1)).cpu())
    return torch.cat(parts).float().numpy()


@torch.no_grad()
def prior_samples(
    generator: torch.nn.Module,
    prior: Any,
    count: int,
    latent_dim: int,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> torch.Tensor:
    """``count`` samples ``G(z)`` on the CPU, ``z`` drawn from ``prior`` (the run's, resolved)
    with a CPU generator seeded with ``seed``: the same latents for every model and every call.
    ``labels``: one class per sample for a class-conditional generator, ``G(z_i, y_i)``."""
    z = prior((count, latent_dim), rng=torch.Generator().manual_seed(seed))
    device = model_device(generator)
    parts = z.split(batch_size)
    conditions = [()] * len(parts) if labels is None else [(c,) for c in labels.split(batch_size)]
    with eval_mode(generator):
        return torch.cat(
            [
                generator(*(t if device is None else t.to(device) for t in (part, *c))).cpu()
                for part, c in zip(parts, conditions)
            ]
        )


def _svm_scores(
    encoder, splits: list, test_images: torch.Tensor, samples: int, draws: int
) -> dict[str, Any]:
    """SVM misclassification on the paper's representation and on the latent alone.

    ``splits`` are the train, validation and test data sets; ``test_images`` the test images
    scored (their first rows' labels are used). ``encoder=None`` scores the raw pixels.
    """

    labels = [d.labels_tensor().numpy() for d in splits]
    labels[2] = labels[2][: len(test_images)]
    images = [d.images_tensor() for d in splits[:2]] + [test_images]
    if encoder is None:
        representations = {"svm_error": lambda x: x.flatten(1).float().numpy()}
    else:
        representations = {
            "svm_error": lambda x: encoder_features(encoder, x),
            "svm_latent_error": lambda x: encoder_features(encoder, x, latent_only=True),
        }
    result: dict[str, Any] = {"svm_protocol": f"N={samples} labelled images, R={draws} draws"}
    for key, represent in representations.items():
        f = [represent(x) for x in images]
        svm = svm_misclassification(
            f[0], labels[0], f[1], labels[1], f[2], labels[2], samples=samples, draws=draws
        )
        result[key], result[f"{key}_std"] = svm["mean"], svm["std"]
    return result


def evaluate_run(
    run_dir: str | Path,
    evaluator_dir: str | Path | None = None,
    svm_samples: int | None = None,
    svm_draws: int | None = None,
    max_test_images: int = 2000,
    inception: StandardInceptionFID | None = None,
    echo: Callable[[str], Any] | None = print,
    ema: bool = True,
    best: bool = False,
) -> dict[str, Any]:
    """Every metric of docs/design.md, section 6, for one run directory: those of
    :func:`summary_metrics` (pixel MSE, reconstruction class agreement, confident samples and
    class coverage, eqs. 6.6-6.9), feature MSE, the linear SVM on the paper's representation
    and on the encoder's output alone (``svm_latent_error``), FID and inpainting errors.

    FID is computed on the evaluator classifier's features (``fid_evaluator``) and, when
    ``inception`` is given, on the TF Inception network's (``fid_inception``); ``KEY_network``
    names each one's network.
    Without ``evaluator_dir`` the evaluator is looked up (for digits: trained) in
    ``evaluator-DATASET`` beside the run directory. E and G are the run's moving averages
    (``*_ema.safetensors``) when it has them and ``ema`` is true, else its trained weights;
    with ``best``, the best weights the run kept by its ``best_metric`` (``best/``;
    ``result["best"]`` their step and value); ``result["weights"]`` says which.

    A class-conditional run (``config.conditions > 0``) gets the conditional metrics of
    :func:`summary_metrics` (section 6.10) in place of ``class_agreement``; its generator is
    given the test images' own labels wherever it reconstructs (pixel, feature and inpainting
    errors) and, for the FID, draws one sample ``G(z_i, y_i)`` per test label ``y_i``.
    """
    run = Path(run_dir)
    models = load_run_models(run, ema=ema, best=best)
    config = models.config
    test, train, val = (load_data(config, s) for s in ("test", "train", "val"))
    encoder, generator = models.encoder, models.generator
    folder = (
        Path(evaluator_dir)
        if evaluator_dir
        else default_evaluator_dir(config.dataset, run.resolve().parent)
    )
    evaluator = load_evaluator(
        ensure_evaluator(config.dataset, folder, config.data_dir or None, echo)
    )

    x = first_images(test, max_test_images)
    result: dict[str, Any] = {
        "run": str(run),
        "recipe": config.name,
        "seed": config.seed,
        "steps": config.steps,
        "test_images": len(x),
        "weights": models.tag,
    }
    if models.best is not None:
        result["best"] = {k: models.best[k] for k in ("metric", "value", "step")}
    summary = run / "summary.json"
    if summary.is_file():
        seconds = json.loads(summary.read_text()).get("seconds_this_session")
        if seconds is not None:
            result["train_seconds"] = seconds
    # the run's prior and, for a class-conditional run, its classes (section 6.10)
    settings = {"prior": models.prior, "conditions": config.conditions}
    result.update(summary_metrics(encoder, generator, test, evaluator, max_test_images, **settings))
    # a class-conditional G is given the test images' own labels (section 6.10)
    y = test.labels_tensor()[: len(x)] if config.conditions else None
    result["feature_mse"] = feature_mse(encoder, generator, evaluator.features, x, labels=y)

    samples, draws = SVM_DEFAULTS[config.dataset]
    samples, draws = svm_samples or samples, svm_draws or draws
    if train.labels_tensor().ndim == 1:  # class labels (digits, SVHN); not CelebA's attributes
        result.update(_svm_scores(encoder, [train, val, test], x, samples, draws))

    generated = prior_samples(generator, models.prior, len(x), models.latent_dim, y)
    result["fid_evaluator"] = fid(evaluator.features, x, generated)
    result["fid_evaluator_network"] = f"the {config.dataset} evaluator classifier's features"
    if inception is not None:
        result["fid_inception"], result["fid_inception_network"] = inception(x, generated)
    inpaint = inpainting_errors(encoder, generator, x, evaluator.features, labels=y)
    result["inpaint_pixel_mse"] = inpaint["pixel_mse"]
    result["inpaint_feature_mse"] = inpaint["feature_mse"]
    return result


def check_same_weights(run_dirs: list[Path], ema: bool = True) -> None:
    """Refuse run directories that are not runs, and runs of one recipe that would mix EMA
    weights with trained weights in one row of the table (``ema``: score the moving averages
    where a run has them)."""
    weights: dict[str, dict[str, list[str]]] = {}
    for run in run_dirs:
        if not (run / "config.json").is_file():
            raise ConfigError(f"{str(run)!r} is not a run directory (no config.json)")
        kind = "EMA" if ema and has_ema_weights(run) else "trained"
        name = RecipeConfig.from_json(run / "config.json").name
        weights.setdefault(name, {}).setdefault(kind, []).append(str(run))
    for name, kinds in weights.items():
        if len(kinds) > 1:
            raise ConfigError(
                f"eval: the runs of {name} would mix EMA weights ({', '.join(kinds['EMA'])}) "
                f"with trained weights ({', '.join(kinds['trained'])}) in one row: pass "
                "--raw-weights to score the trained weights of all, or evaluate them apart"
            )


def table_notes(results: list[dict[str, Any]], networks: dict[str, str]) -> list[str]:
    """The lines printed under the table of ``gali-ext eval``: the SVM protocol, the network of
    each FID and, for class-conditional runs, the chance level of the shuffled label."""
    lines = []
    protocols = sorted({r["svm_protocol"] for r in results if "svm_protocol" in r})
    if protocols:
        lines.append(f"SVM: {'; '.join(protocols)}.")
    lines.append(f"FID networks: {'; '.join(f'{k}: {v}' for k, v in networks.items())}.")
    conditional = [r for r in results if "cond_shuffled_label_chance" in r]
    chances = sorted({f"{r['cond_shuffled_label_chance']:.3f}" for r in conditional})
    if chances:
        lines.append(
            "Class-conditional runs (docs/design.md, section 6.10): the class of G(E(x), y) "
            "against x's class, y x's own label or a shuffled one; a generator that copies the "
            f"label and ignores E(x) scores {' or '.join(chances)} with the shuffled label."
        )
    return lines


def test_data_reference(
    evaluator: torch.nn.Module, test_data: ImageData, max_test_images: int = 2000
) -> dict[str, Any]:
    """The sample metrics (eqs. 6.12-6.14) of the real test images themselves, the row
    ``(test digits)``: what a generator whose samples look like the data would score (the
    evaluator is not certain of every real digit either)."""
    x = first_images(test_data, max_test_images)
    with torch.no_grad():
        logits = torch.cat([evaluator(x[i : i + 500]) for i in range(0, len(x), 500)])
    stats = sample_class_statistics(logits)
    return {
        "recipe": f"(test {test_data.name})",
        "sample_confidence": stats["confidence"],
        "sample_entropy_bits": stats["class_entropy_bits"],
        "sample_classes_covered": stats["classes_covered"],
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe: each metric's mean over the runs (seeds) of that recipe and, with two runs or
    more, its standard deviation (``KEY_std``, population form as the paper's ± columns)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["recipe"]].append(r)
    summary = {}
    for recipe, runs in groups.items():
        row: dict[str, Any] = {"runs": len(runs)}
        for key, _, _ in METRICS:
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = statistics.fmean(values)
                if len(values) > 1:
                    row[f"{key}_std"] = statistics.pstdev(values)
        summary[recipe] = row
    return summary


def format_table(summary: dict[str, dict[str, Any]], markdown: bool = True) -> str:
    """The paper-style table: rows are recipes, columns metrics, mean ± std over seeds (the mean
    alone for a recipe with one run)."""
    keys = [(k, t, d) for k, t, d in METRICS if any(k in row for row in summary.values())]
    header = ["recipe", "runs", *(t for _, t, _ in keys)]
    rows = []
    for recipe, row in summary.items():
        cells = [recipe, str(row["runs"])]
        for key, _, digits in keys:
            if key not in row:
                cells.append("")
            elif f"{key}_std" in row:
                cells.append(f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}")
            else:
                cells.append(f"{row[key]:.{digits}f}")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def check_svm_options(svm_samples: int | None, svm_draws: int | None) -> None:
    """``--svm-samples`` (labelled images per draw, at least one per digit class) and
    ``--svm-draws`` (at least one), when given."""
    if svm_samples is not None and svm_samples < 10:
        raise ConfigError(
            f"--svm-samples must be >= 10 (labelled images per SVM draw, one per class at "
            f"least), got {svm_samples}"
        )
    if svm_draws is not None and svm_draws < 1:
        raise ConfigError(f"--svm-draws must be >= 1, got {svm_draws}")


def svm_references(
    config: RecipeConfig,
    seeds: int = 3,
    svm_samples: int | None = None,
    svm_draws: int | None = None,
) -> list[dict[str, Any]]:
    """SVM misclassification of the raw pixels and of the recipe's untrained encoder (freshly
    initialised with each seed): what a trained encoder's representation is compared against."""
    test, train, val = (load_data(config, s) for s in ("test", "train", "val"))
    samples, draws = SVM_DEFAULTS[config.dataset]
    samples, draws = svm_samples or samples, svm_draws or draws
    x = first_images(test, 2000)
    rows = [{"recipe": "(raw pixels)", **_svm_scores(None, [train, val, test], x, samples, draws)}]
    for seed in range(seeds):
        torch.manual_seed(seed)
        encoder = build_ali_models(config.arch, config.latent_dim, test.channels).encoder
        scores = _svm_scores(encoder, [train, val, test], x, samples, draws)
        rows.append({"recipe": "(untrained encoder)", "seed": seed, **scores})
    return rows
