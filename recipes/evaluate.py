"""Evaluate trained runs with the paper's metrics, and the digits study (``gali-ext eval``,
``gali-ext study digits``).

A run is scored on its data set's test split: pixel MSE, feature MSE with the evaluator
classifier ``M_eval``, linear-SVM misclassification on encoder features, Frechet distance of
generated samples (on the evaluator's features, labelled as such, and on Inception-v3's when
the user has its weights in a local file: nothing is downloaded), and inpainting errors. Runs
that share a recipe are summarised as mean ± std.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gali_ext.errors import ConfigError
from gali_ext.providers import PretrainedFeatures
from gali_ext.providers.pretrained import load_safetensors_into
from gali_ext.recipes.evaluator import load_evaluator, train_evaluator
from gali_ext.recipes.metrics import (
    eval_mode,
    feature_mse,
    fid,
    inpainting_errors,
    model_device,
    reconstruct,
    reconstruction_mse,
)
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.visual import save_image_grid

from . import RecipeConfig
from .train import build_model, first_images, load_data

__all__ = [
    "METRICS",
    "evaluate_run",
    "format_table",
    "inception_features",
    "study",
    "summarise",
    "svm_references",
]

# (key, column title, digits after the point)
METRICS = [
    ("pixel_mse", "pixel MSE", 4),
    ("feature_mse", "feature MSE", 4),
    ("svm_error", "SVM misclassification %", 2),
    ("svm_latent_error", "SVM % (latent only)", 2),
    ("fid_inception", "FID (Inception features)", 2),
    ("fid_evaluator", "FID (evaluator features)", 2),
    ("inpaint_pixel_mse", "inpainting pixel MSE", 4),
    ("inpaint_feature_mse", "inpainting feature MSE", 4),
]
SVM_DEFAULTS = {"digits": (500, 10), "svhn": (1000, 100), "celeba": (1000, 100)}


def default_evaluator_dir(dataset: str) -> Path:
    """Where ``gali-ext train-evaluator DATASET`` puts the evaluator by default."""
    return Path("runs") / f"evaluator-{dataset}"


def ensure_evaluator(dataset: str, folder: Path | None, data_dir: str | None = None) -> Path:
    """The evaluator folder; for digits one is trained (seconds) when none exists yet."""
    folder = folder or default_evaluator_dir(dataset)
    if not (folder / "evaluator.json").is_file():
        if dataset != "digits":
            raise ConfigError(
                f"no evaluator for {dataset} in {str(folder)!r}: train one with "
                f"`gali-ext train-evaluator {dataset} --data-dir D --out {folder}`"
            )
        train_evaluator(dataset, folder, data_dir)
    return folder


def inception_features(
    weights: str | Path, input_size: tuple[int, int] = (299, 299)
) -> PretrainedFeatures:
    """timm's Inception-v3 (``inception_v3``, 2048 pooled features, images resized to
    ``input_size``) with weights from a local ``.safetensors`` file, e.g. those of timm's
    ``inception_v3.tv_in1k``.

    FID on these features ranks models as the paper's FID does; its values are not those of
    the TensorFlow Inception graph behind published FIDs.
    """
    return PretrainedFeatures("inception_v3", weights, input_size=input_size)


def _encoder_features(
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


def _svm_scores(
    encoder, splits: list, test_images: torch.Tensor, samples: int, draws: int
) -> dict[str, Any]:
    """SVM misclassification on the paper's representation and on the latent alone.

    ``splits`` are the train, validation and test data sets; ``test_images`` the test images
    scored (their first rows' labels are used). ``encoder=None`` scores the raw pixels.
    """
    from gali_ext.recipes.metrics import svm_misclassification

    labels = [d.labels_tensor().numpy() for d in splits]
    labels[2] = labels[2][: len(test_images)]
    images = [d.images_tensor() for d in splits[:2]] + [test_images]
    if encoder is None:
        representations = {"svm_error": lambda x: x.flatten(1).float().numpy()}
    else:
        representations = {
            "svm_error": lambda x: _encoder_features(encoder, x),
            "svm_latent_error": lambda x: _encoder_features(encoder, x, latent_only=True),
        }
    result: dict[str, Any] = {"svm_protocol": f"N={samples} labelled images, R={draws} draws"}
    for key, represent in representations.items():
        f = [represent(x) for x in images]
        svm = svm_misclassification(f[0], labels[0], f[1], labels[1], f[2], labels[2],
                                    samples=samples, draws=draws)  # fmt: skip
        result[key], result[f"{key}_std"] = svm["mean"], svm["std"]
    return result


def evaluate_run(
    run_dir: str | Path,
    evaluator_dir: str | Path | None = None,
    svm_samples: int | None = None,
    svm_draws: int | None = None,
    max_test_images: int = 2000,
    inception: PretrainedFeatures | None = None,
) -> dict[str, Any]:
    """Every metric of docs/design.md, section 6, for one run directory, plus the linear SVM on the
    encoder's output alone (``svm_latent_error``).

    FID is computed on the evaluator classifier's features (``fid_evaluator``) and, when
    ``inception`` is given (:func:`inception_features`), on Inception's (``fid_inception``).
    """
    run = Path(run_dir)
    config = RecipeConfig.from_json(run / "config.json")
    if config.conditions:
        raise ConfigError(
            f"run {str(run)!r} is class-conditional ({config.name}); its generator needs the "
            "labels, which the evaluation protocol does not pass yet"
        )
    test, train, val = (load_data(config, s) for s in ("test", "train", "val"))
    built = build_model(config, test.channels)
    encoder, generator = built.models.encoder, built.models.generator
    load_safetensors_into(encoder, run / "encoder.safetensors")
    load_safetensors_into(generator, run / "generator.safetensors")
    evaluator = load_evaluator(
        ensure_evaluator(
            config.dataset, evaluator_dir and Path(evaluator_dir), config.data_dir or None
        )
    )

    x = first_images(test, max_test_images)
    result: dict[str, Any] = {"run": str(run), "recipe": config.name, "seed": config.seed,
                              "steps": config.steps, "test_images": len(x)}  # fmt: skip
    result["pixel_mse"] = reconstruction_mse(encoder, generator, x)
    result["feature_mse"] = feature_mse(encoder, generator, evaluator.features, x)

    samples, draws = SVM_DEFAULTS[config.dataset]
    samples, draws = svm_samples or samples, svm_draws or draws
    if train.labels_tensor().ndim == 1:  # class labels (digits, SVHN); not CelebA's attributes
        result.update(_svm_scores(encoder, [train, val, test], x, samples, draws))

    with torch.no_grad(), eval_mode(generator):
        z = torch.randn(len(x), built.models.latent_dim, generator=torch.Generator().manual_seed(0))
        generated = torch.cat([generator(z[i : i + 500]) for i in range(0, len(z), 500)])
    result["fid_evaluator"] = fid(evaluator.features, x, generated)
    if inception is not None:
        result["fid_inception"] = fid(inception.features, x, generated, batch_size=50)
    inpaint = inpainting_errors(encoder, generator, x, evaluator.features)
    result["inpaint_pixel_mse"] = inpaint["pixel_mse"]
    result["inpaint_feature_mse"] = inpaint["feature_mse"]
    return result


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe: each metric's mean and std over the runs (seeds) of that recipe."""
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
                row[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        summary[recipe] = row
    return summary


def format_table(summary: dict[str, dict[str, Any]], markdown: bool = True) -> str:
    """The paper-style table: rows are recipes, columns metrics, mean ± std over seeds."""
    keys = [(k, t, d) for k, t, d in METRICS if any(k in row for row in summary.values())]
    header = ["recipe", "runs", *(t for _, t, _ in keys)]
    rows = []
    for recipe, row in summary.items():
        cells = [recipe, str(row["runs"])]
        for key, _, digits in keys:
            cells.append(
                f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}" if key in row else ""
            )
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


STUDY_RECIPES = ["digits-ali", "digits-alice", "digits-gali4", "digits-gali8", "digits-gali-pt"]


def study(
    out_dir: str | Path,
    steps: int = 600,
    seeds: int = 3,
    recipes: list[str] | None = None,
    progress: bool = True,
    echo=print,
    svm_samples: int | None = None,
    svm_draws: int | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train each digits recipe for ``steps`` steps over ``seeds`` seeds, evaluate all, and
    write ``study.json``, ``study.md`` and ``study.png`` (test digits, then each recipe's
    reconstructions, row by row, as the paper's Figure 3). Finished runs are reused.

    ``overrides`` (``{"lr": "4e-5"}``) apply to every recipe. The table ends with two reference
    rows for the SVM columns: the raw pixels and the untrained encoder (one per seed), the
    floor any learned representation should beat.
    """
    from gali_ext import recipes as registry
    from gali_ext.recipes.train import train

    out = Path(out_dir)
    names = recipes or STUDY_RECIPES
    for name in names:  # a bad recipe name or --set key fails here, before any training
        registry.get(name).with_overrides({**(overrides or {}), "steps": str(steps)})
    out.mkdir(parents=True, exist_ok=True)
    evaluator = ensure_evaluator("digits", out / "evaluator")
    results = []
    for name in names:
        for seed in range(seeds):
            run = out / f"{name}-seed{seed}"
            settings = {**(overrides or {}), "steps": str(steps), "seed": str(seed)}
            if registry.get(name).uses_features:
                settings["features_weights"] = str(evaluator)
            config = registry.get(name).with_overrides(settings)
            if not (run / "summary.json").is_file():
                echo(f"training {name} seed {seed} for {steps} steps")
                train(config, run, progress=progress, overwrite=True)
            results.append(evaluate_run(run, evaluator, svm_samples, svm_draws))
            echo(f"{name} seed {seed}: pixel MSE {results[-1]['pixel_mse']:.4f}, "
                 f"SVM error {results[-1].get('svm_error', float('nan')):.2f}%")  # fmt: skip
    results += svm_references(registry.get(names[0]), seeds, svm_samples, svm_draws)
    summary = summarise(results)
    table = format_table(summary)
    (out / "study.json").write_text(json.dumps({"results": results, "summary": summary}, indent=2))
    (out / "study.md").write_text(table + "\n")
    _figure(out, names)
    echo(table)
    return summary


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


def _figure(out: Path, names: list[str], count: int = 10) -> Path:
    """Originals in the first row, then each recipe's reconstructions (seed 0), one row each."""
    rows = None
    for name in names:
        run = out / f"{name}-seed0"
        config = RecipeConfig.from_json(run / "config.json")
        test = load_data(config, "test")
        x = first_images(test, count)
        built = build_model(config, test.channels)
        load_safetensors_into(built.models.encoder, run / "encoder.safetensors")
        load_safetensors_into(built.models.generator, run / "generator.safetensors")
        recon = reconstruct(built.models.encoder, built.models.generator, x)
        rows = [x] if rows is None else rows
        rows.append(recon)
    labels = ["test digits", *(name.removeprefix("digits-") for name in names)]
    return save_image_grid(torch.cat(rows), out / "study.png", columns=count, scale=3,
                           row_labels=labels)  # fmt: skip
