"""Evaluate trained runs with the paper's metrics, and the digits study (``gali-ext eval``,
``gali-ext study digits``).

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

import contextlib
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gali_ext.errors import ConfigError
from gali_ext.priors import resolve_prior
from gali_ext.providers.pretrained import load_safetensors_into
from gali_ext.recipes.evaluator import load_evaluator, train_evaluator
from gali_ext.recipes.metrics import (
    conditional_reconstruction_agreement,
    eval_mode,
    feature_mse,
    fid,
    inpainting_errors,
    model_device,
    reconstruct,
    reconstruction_class_agreement,
    reconstruction_mse,
    sample_class_statistics,
    sample_quality,
)
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.visual import save_image_grid

from . import RecipeConfig
from .data import ImageData
from .fid import StandardInceptionFID
from .rundir import write_text_atomic
from .runs import EMA_FILES
from .train import build_model, first_images, load_data

__all__ = [
    "METRICS",
    "check_reusable",
    "check_svm_options",
    "die_with_parent",
    "evaluate_run",
    "format_table",
    "study",
    "summarise",
    "summary_metrics",
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


SAMPLE_COUNT = 1000  # samples G(z) scored by the evaluator for confidence and coverage


def summary_metrics(
    encoder: torch.nn.Module,
    generator: torch.nn.Module,
    test_data: ImageData,
    evaluator: torch.nn.Module | None = None,
    max_test_images: int = 2000,
    samples: int = SAMPLE_COUNT,
    latent_dim: int | None = None,
    prior: Any = "normal",
    conditions: int | None = None,
) -> dict[str, float]:
    """The metrics a run's ``summary.json`` and tracker report at the end of training.

    ``pixel_mse`` on the first ``max_test_images`` test images always; with the evaluator
    classifier (class-labelled data only): ``class_agreement`` (eq. 6.6), and, over
    ``samples`` samples ``G(z)``, ``z`` drawn from ``prior`` (the run's) with seed 0,
    ``sample_confidence`` (eq. 6.7),
    ``sample_entropy_bits`` (eq. 6.8) and ``sample_classes_covered`` (eq. 6.9).
    ``latent_dim`` defaults to ``generator.latent_dim`` (the recipes' generators have it).

    ``conditions``: the classes of a class-conditional generator ``G(z, y)`` (the recipe's
    ``conditions``; default ``generator.num_classes``, 0 or ``None`` for an unconditional
    one). Such a run is scored as docs/design.md, section 6.10 says: ``pixel_mse`` of
    ``G(E(x), y)`` with x's own label; instead of ``class_agreement``,
    ``cond_recon_agreement_own_label`` (eq. 6.14), ``cond_recon_agreement_shuffled_label``
    (6.15), ``cond_recon_label_gap`` (6.16) and ``cond_shuffled_label_chance`` (6.17); the
    sample metrics of ``G(z_j, j mod conditions)`` and ``cond_sample_accuracy`` (6.13).

    The training loop calls it once at the end, with the weights it saves (the EMA weights
    when it keeps them) and the evaluator when one is at hand, e.g.
    ``summary_metrics(E, G, load_data(config, "test"), load_evaluator(folder))``.
    """
    if conditions is None:
        conditions = getattr(generator, "num_classes", None) or 0
    x = first_images(test_data, max_test_images)
    labels = test_data.labels_tensor()[: len(x)]
    if conditions and labels.ndim != 1:
        raise ConfigError(
            f"a class-conditional generator ({conditions} classes) needs class ids [N] as "
            f"labels, got {test_data.name}'s labels of shape {list(labels.shape)}"
        )
    conditioned = labels if conditions else None
    result = {"pixel_mse": reconstruction_mse(encoder, generator, x, labels=conditioned)}
    if evaluator is None or labels.ndim != 1:
        return result
    if conditions:
        agreement = conditional_reconstruction_agreement(encoder, generator, evaluator, x, labels)
        for key in ("own_label", "shuffled_label"):
            result[f"cond_recon_agreement_{key}"] = agreement[key]
        result["cond_recon_label_gap"] = agreement["label_gap"]
        result["cond_shuffled_label_chance"] = agreement["shuffled_label_chance"]
    else:
        result["class_agreement"] = reconstruction_class_agreement(
            encoder, generator, evaluator, x, labels
        )
    latent_dim = latent_dim or getattr(generator, "latent_dim", None)
    if latent_dim is None:
        raise ConfigError("summary_metrics needs latent_dim: the generator has no .latent_dim")
    quality = sample_quality(
        generator, evaluator, latent_dim, samples, prior=prior, classes=conditions or None
    )
    if conditions:
        result["cond_sample_accuracy"] = quality["conditional_accuracy"]
    result["sample_confidence"] = quality["confidence"]
    result["sample_entropy_bits"] = quality["class_entropy_bits"]
    result["sample_classes_covered"] = quality["classes_covered"]
    return result


def default_evaluator_dir(dataset: str, beside: Path | None = None) -> Path:
    """Where the evaluator of ``dataset`` lives by default: ``evaluator-DATASET`` in the folder
    ``beside`` (the runs' folder, or ``--out``), else under ``runs/``."""
    return (beside if beside is not None else Path("runs")) / f"evaluator-{dataset}"


def ensure_evaluator(
    dataset: str,
    folder: Path | None,
    data_dir: str | None = None,
    echo: Callable[[str], Any] | None = print,
) -> Path:
    """The evaluator folder; for digits one is trained when none exists yet, and ``echo`` says
    so first (about a minute on two CPU cores)."""
    folder = folder or default_evaluator_dir(dataset)
    if not (folder / "evaluator.json").is_file():
        if dataset != "digits":
            raise ConfigError(
                f"no evaluator for {dataset} in {str(folder)!r}: train one with "
                f"`gali-ext train-evaluator {dataset} --data-dir D --out {folder}`"
            )
        if echo is not None:
            echo(
                f"no evaluator classifier in {folder}: training one on the digits labels first "
                "(about 1 min on 2 CPU cores; reused afterwards)"
            )
        info = train_evaluator(dataset, folder, data_dir)
        if echo is not None:
            echo(f"evaluator: test accuracy {info['test_accuracy']:.4f}, saved in {folder}")
    return folder


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
    ``result["weights"]`` says which.

    A class-conditional run (``config.conditions > 0``) gets the conditional metrics of
    :func:`summary_metrics` (section 6.10) in place of ``class_agreement``; its generator is
    given the test images' own labels wherever it reconstructs (pixel, feature and inpainting
    errors) and, for the FID, draws one sample ``G(z_i, y_i)`` per test label ``y_i``.
    """
    run = Path(run_dir)
    config = RecipeConfig.from_json(run / "config.json")
    test, train, val = (load_data(config, s) for s in ("test", "train", "val"))
    built = build_model(config, test.channels)
    encoder, generator = built.models.encoder, built.models.generator
    use_ema = ema and all((run / f"{f}.safetensors").is_file() for f in EMA_FILES.values())
    for name, module in (("encoder", encoder), ("generator", generator)):
        load_safetensors_into(module, run / f"{EMA_FILES[name] if use_ema else name}.safetensors")
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
        "weights": "ema" if use_ema else "raw",
    }
    summary = run / "summary.json"
    if summary.is_file():
        seconds = json.loads(summary.read_text()).get("seconds_this_session")
        if seconds is not None:
            result["train_seconds"] = seconds
    # the run's prior and, for a class-conditional run, its classes (section 6.10)
    settings = {"prior": config.prior, "conditions": config.conditions}
    result.update(summary_metrics(encoder, generator, test, evaluator, max_test_images, **settings))
    # a class-conditional G is given the test images' own labels (section 6.10)
    y = test.labels_tensor()[: len(x)] if config.conditions else None
    result["feature_mse"] = feature_mse(encoder, generator, evaluator.features, x, labels=y)

    samples, draws = SVM_DEFAULTS[config.dataset]
    samples, draws = svm_samples or samples, svm_draws or draws
    if train.labels_tensor().ndim == 1:  # class labels (digits, SVHN); not CelebA's attributes
        result.update(_svm_scores(encoder, [train, val, test], x, samples, draws))

    with torch.no_grad(), eval_mode(generator):
        rng = torch.Generator().manual_seed(0)
        z = resolve_prior(config.prior)((len(x), built.models.latent_dim), rng=rng)
        parts = z.split(500)
        conditions = [()] * len(parts) if y is None else [(c,) for c in y.split(500)]
        generated = torch.cat([generator(part, *c) for part, c in zip(parts, conditions)])
    result["fid_evaluator"] = fid(evaluator.features, x, generated)
    result["fid_evaluator_network"] = f"the {config.dataset} evaluator classifier's features"
    if inception is not None:
        result["fid_inception"], result["fid_inception_network"] = inception(x, generated)
    inpaint = inpainting_errors(encoder, generator, x, evaluator.features, labels=y)
    result["inpaint_pixel_mse"] = inpaint["pixel_mse"]
    result["inpaint_feature_mse"] = inpaint["feature_mse"]
    return result


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


STUDY_RECIPES = [
    "digits-ali",
    "digits-alice",
    "digits-gali4",
    "digits-gali8",
    "digits-gali-pt",
    "digits-gali-mix",
]
STUDY_STEPS = 2000  # per run: where ALI has learned (docs/design.md, section 6)
STUDY_SEEDS = 5


# Settings that change neither the weights nor the scores of a finished run.
_BOOKKEEPING = frozenset({"description", "num_workers", "log_with", "data_dir"})


def check_reusable(run: Path, config: RecipeConfig) -> None:
    """Refuse to reuse the finished run in ``run`` (``summary.json``) for ``config`` when it was
    trained with other settings: the study would score the old run under the new settings."""
    if not (run / "summary.json").is_file() or not (run / "config.json").is_file():
        return
    saved = dataclasses.asdict(RecipeConfig.from_json(run / "config.json"))
    wanted = dataclasses.asdict(config)
    differ = [
        f"{key}={saved.get(key)!r} (this study: {wanted[key]!r})"
        for key in sorted(wanted)
        if key not in _BOOKKEEPING and _plain(saved.get(key)) != _plain(wanted[key])
    ]
    if differ:
        raise ConfigError(
            f"study: {str(run)!r} was trained with {', '.join(differ)}; a finished run is reused "
            "only with the same settings: pass another --out, or remove that run to train it "
            "again"
        )


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def die_with_parent(parent: int, interval: float = 0.5) -> None:
    """Make this worker process of the study end when its parent ``parent`` does: a study
    killed with ``kill -9`` would otherwise leave its workers training (and holding memory)
    for ever. On Linux the kernel sends SIGKILL at the parent's death (``prctl`` with
    ``PR_SET_PDEATHSIG``); everywhere a daemon thread checks every ``interval`` seconds that the
    parent is still the parent (``os.getppid``) and ends the process otherwise."""
    import os
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the call above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


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


def _train_and_evaluate(
    name: str,
    seed: int,
    settings: dict[str, str],
    run: Path,
    evaluator: Path,
    svm_samples: int | None,
    svm_draws: int | None,
    progress: bool,
    threads: int | None,
) -> dict[str, Any]:
    """One study run: train (unless ``run`` already holds a finished run) and evaluate. Runs in
    the study's process or in a worker process; ``threads`` sets torch's intra-op threads."""
    from gali_ext import recipes as registry
    from gali_ext.recipes.train import train

    if threads is not None:
        torch.set_num_threads(threads)
    if not (run / "summary.json").is_file():
        config = registry.get(name).with_overrides({**settings, "seed": str(seed)})
        train(config, run, progress=progress, overwrite=True)
    return evaluate_run(run, evaluator, svm_samples, svm_draws, echo=None)


def study(
    out_dir: str | Path,
    steps: int = STUDY_STEPS,
    seeds: int = STUDY_SEEDS,
    recipes: list[str] | None = None,
    progress: bool = True,
    echo=print,
    svm_samples: int | None = None,
    svm_draws: int | None = None,
    overrides: dict[str, str] | None = None,
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train each digits recipe for ``steps`` steps on seeds ``0 .. seeds-1``, evaluate all, and
    write ``study.json``, ``study.md`` (the table), ``paired.md`` and ``paired.json`` (the paired
    claims, :mod:`gali_ext.recipes.stats`) and ``study.png`` (test digits, then each recipe's
    reconstructions, row by row, as the paper's Figure 3). Finished runs are reused.

    ``jobs`` runs that many trainings at once, each in its own process (spawned), with
    ``threads`` torch threads per run (default ``cores // jobs``). Every run is seeded by its
    config alone: at the same ``threads`` the weights and scores are bit for bit those of a
    sequential study (``jobs=1``); another thread count changes float rounding only (about
    1e-7 in the weights after a few steps). ``overrides`` (``{"lr": "4e-5"}``) apply to every
    recipe. The table ends with reference rows: the raw pixels and the untrained encoder (one
    per seed) for the SVM columns, the test digits for the sample columns.
    """
    import os
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    from gali_ext import recipes as registry

    from .stats import format_paired_table, paired_table

    if jobs < 1 or seeds < 1 or steps < 1:
        raise ConfigError(f"jobs, seeds and steps must be >= 1, got {jobs}, {seeds}, {steps}")
    check_svm_options(svm_samples, svm_draws)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1 (torch threads per run), got {threads}")
    started = time.perf_counter()
    out = Path(out_dir)
    names = recipes or STUDY_RECIPES
    for name in names:  # a bad recipe name or --set key fails here, before any training
        registry.get(name).with_overrides({**(overrides or {}), "steps": str(steps)})
    out.mkdir(parents=True, exist_ok=True)
    evaluator = ensure_evaluator("digits", default_evaluator_dir("digits", out), echo=echo)
    tasks = []
    for name in names:
        for seed in range(seeds):
            settings = {**(overrides or {}), "steps": str(steps)}
            if registry.get(name).uses_features:
                settings["features_weights"] = str(evaluator)
            tasks.append(
                (
                    name,
                    seed,
                    settings,
                    out / f"{name}-seed{seed}",
                    evaluator,
                    svm_samples,
                    svm_draws,
                )
            )
    for name, seed, settings, run, *_ in tasks:  # before any training
        check_reusable(run, registry.get(name).with_overrides({**settings, "seed": str(seed)}))
    echo(
        f"study: {len(tasks)} runs ({len(names)} recipes x {seeds} seeds, {steps} steps each), "
        f"{jobs} at a time"
    )

    def report(result: dict[str, Any]) -> None:
        if "cond_recon_agreement_own_label" in result:  # a class-conditional run (section 6.10)
            own = result["cond_recon_agreement_own_label"]
            shuffled = result["cond_recon_agreement_shuffled_label"]
            echo(
                f"{result['recipe']} seed {result['seed']}: cond. recon. agreement {own:.3f} "
                f"(own label), {shuffled:.3f} (shuffled label), cond. sample accuracy "
                f"{result['cond_sample_accuracy']:.3f}, pixel MSE {result['pixel_mse']:.4f}"
            )
            return
        echo(
            f"{result['recipe']} seed {result['seed']}: recon. class agreement "
            f"{result.get('class_agreement', float('nan')):.3f}, confident samples "
            f"{result.get('sample_confidence', float('nan')):.3f}, pixel MSE "
            f"{result['pixel_mse']:.4f}"
        )

    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    results = []
    if jobs == 1:
        previous = torch.get_num_threads()
        try:
            for task in tasks:
                echo(f"training {task[0]} seed {task[1]} for {steps} steps")
                results.append(_train_and_evaluate(*task, progress, threads))
                report(results[-1])
        finally:
            torch.set_num_threads(previous)
    else:
        with ProcessPoolExecutor(
            jobs,
            mp_context=get_context("spawn"),
            initializer=die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {
                pool.submit(_train_and_evaluate, *task, False, threads): task for task in tasks
            }
            for future in as_completed(futures):
                results.append(future.result())
                report(results[-1])
        order = {(t[0], t[1]): i for i, t in enumerate(tasks)}
        results.sort(key=lambda r: order[(r["recipe"], r["seed"])])
    references = svm_references(registry.get(names[0]), seeds, svm_samples, svm_draws)
    references.append(
        test_data_reference(load_evaluator(evaluator), load_data(registry.get(names[0]), "test"))
    )
    summary = summarise(results + references)
    table = format_table(summary)
    paired = paired_table(results)
    paired_md = format_paired_table(paired)
    seconds = time.perf_counter() - started
    write_text_atomic(
        out / "study.json",
        json.dumps(
            {
                "results": results + references,
                "summary": summary,
                "paired": paired,
                "settings": {
                    "steps": steps,
                    "seeds": seeds,
                    "recipes": names,
                    "jobs": jobs,
                    "threads_per_run": threads,
                    "overrides": overrides or {},
                },
                "seconds": seconds,
            },
            indent=2,
        ),
    )
    write_text_atomic(out / "study.md", table + "\n")
    write_text_atomic(out / "paired.md", paired_md + "\n")
    write_text_atomic(out / "paired.json", json.dumps(paired, indent=2))
    _figure(out, names)
    echo(table)
    echo("")
    echo(paired_md)
    echo(f"study written to {out} in {seconds:.0f} s")
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
        y = test.labels_tensor()[:count] if config.conditions else None  # own labels (6.10)
        built = build_model(config, test.channels)
        load_safetensors_into(built.models.encoder, run / "encoder.safetensors")
        load_safetensors_into(built.models.generator, run / "generator.safetensors")
        recon = reconstruct(built.models.encoder, built.models.generator, x, labels=y)
        rows = [x] if rows is None else rows
        rows.append(recon)
    labels = ["test digits", *(name.removeprefix("digits-") for name in names)]
    return save_image_grid(
        torch.cat(rows), out / "study.png", columns=count, scale=3, row_labels=labels
    )
