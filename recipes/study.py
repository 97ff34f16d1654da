"""The digits study (``gali-ext study digits``): each recipe trained on several seeds, every run
evaluated (:func:`.evaluate.evaluate_run`), the table, the paired claims (:mod:`.stats`) and
the figure of reconstructions written beside the runs (docs/design.md, section 6).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from gali_ext.errors import ConfigError
from gali_ext.recipes import registry
from gali_ext.recipes.build import first_images, load_data
from gali_ext.recipes.evaluate import (
    check_svm_options,
    evaluate_run,
    format_table,
    summarise,
    svm_references,
    test_data_reference,
)
from gali_ext.recipes.evaluator import default_evaluator_dir, ensure_evaluator, load_evaluator
from gali_ext.recipes.files import write_text_atomic
from gali_ext.recipes.metrics import (
    reconstruct,
)
from gali_ext.recipes.outputs import check_output_path
from gali_ext.recipes.plugins import import_modules, imported_modules
from gali_ext.recipes.runs import load_run_models
from gali_ext.recipes.settings import RecipeConfig
from gali_ext.recipes.stats import format_paired_table, paired_table
from gali_ext.recipes.train import train
from gali_ext.recipes.visual import save_image_grid

__all__ = [
    "STUDY_RECIPES",
    "STUDY_SEEDS",
    "STUDY_STEPS",
    "check_reusable",
    "die_with_parent",
    "study",
]


STUDY_RECIPES = [
    "digits-ali",
    "digits-alice",
    "digits-gali4",
    "digits-gali8",
    "digits-gali-pt",
    "digits-gali-mix",
    "digits-gali-nda",
]


STUDY_STEPS = 2000  # per run: where ALI has learned (docs/design.md, section 6)


STUDY_SEEDS = 5


# Settings that change neither the weights nor the scores of a finished run (the evaluation
# while training leaves the weights as they are: docs/design.md, section 6.11).
_BOOKKEEPING = frozenset(
    {
        "description",
        "num_workers",
        "log_with",
        "data_dir",
        "eval_every",
        "best_metric",
        "eval_split",
        "fid_weights",
    }
)


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


def _start_worker(parent: int, modules: list[str]) -> None:
    """A study worker: it dies with the study (:func:`die_with_parent`) and imports what the
    study imported with ``--import`` (a preset of the user's own), as a spawned process starts
    without them."""
    die_with_parent(parent)
    import_modules(modules)


@dataclass(frozen=True)
class StudyRun:
    """One run of the study: its settings, resolved once (recipe, ``--set`` overrides, steps,
    seed, the evaluator as M where the recipe uses one), and its folder."""

    config: RecipeConfig
    folder: Path


def plan_runs(
    out: Path,
    names: list[str],
    seeds: int,
    steps: int,
    overrides: dict[str, str] | None,
    echo: Callable[[str], Any] = print,
) -> tuple[Path, list[StudyRun]]:
    """The evaluator folder (trained first when there is none) and every run of the study,
    ``names x range(seeds)``. A bad recipe name or ``--set`` key fails before the evaluator is
    trained; a finished run trained with other settings (:func:`check_reusable`) before any
    training."""
    bases = {
        name: dataclasses.replace(registry.get(name).with_overrides(overrides or {}), steps=steps)
        for name in names
    }
    out.mkdir(parents=True, exist_ok=True)
    evaluator = ensure_evaluator("digits", default_evaluator_dir("digits", out), echo=echo)
    runs = []
    for name, base in bases.items():
        if base.uses_features:
            base = dataclasses.replace(base, features_weights=str(evaluator))
        for seed in range(seeds):
            runs.append(StudyRun(dataclasses.replace(base, seed=seed), out / f"{name}-seed{seed}"))
    for run in runs:
        check_reusable(run.folder, run.config)
    return evaluator, runs


def _train_and_evaluate(
    run: StudyRun,
    evaluator: Path,
    svm_samples: int | None,
    svm_draws: int | None,
    progress: bool,
    threads: int | None,
) -> dict[str, Any]:
    """One study run: train (unless its folder already holds a finished run) and evaluate. Runs
    in the study's process or in a worker process; ``threads`` sets torch's intra-op threads."""
    if threads is not None:
        torch.set_num_threads(threads)
    if not (run.folder / "summary.json").is_file():
        train(run.config, run.folder, progress=progress, overwrite=True)
    return evaluate_run(run.folder, evaluator, svm_samples, svm_draws, echo=None)


def _result_line(result: dict[str, Any]) -> str:
    """One line of a run's scores, as the study reports each run when it ends."""
    if "cond_recon_agreement_own_label" in result:  # a class-conditional run (section 6.10)
        own = result["cond_recon_agreement_own_label"]
        shuffled = result["cond_recon_agreement_shuffled_label"]
        return (
            f"{result['recipe']} seed {result['seed']}: cond. recon. agreement {own:.3f} "
            f"(own label), {shuffled:.3f} (shuffled label), cond. sample accuracy "
            f"{result['cond_sample_accuracy']:.3f}, pixel MSE {result['pixel_mse']:.4f}"
        )
    return (
        f"{result['recipe']} seed {result['seed']}: recon. class agreement "
        f"{result.get('class_agreement', float('nan')):.3f}, confident samples "
        f"{result.get('sample_confidence', float('nan')):.3f}, pixel MSE "
        f"{result['pixel_mse']:.4f}"
    )


def run_all(
    runs: list[StudyRun],
    evaluator: Path,
    svm_samples: int | None,
    svm_draws: int | None,
    *,
    jobs: int,
    threads: int,
    progress: bool,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Train and evaluate every run, ``jobs`` at a time (each job its own spawned process that
    dies with the study, :func:`die_with_parent`, and imports the study's ``--import`` modules),
    each run's line echoed as it ends; the results in the order of ``runs``."""
    results = []
    if jobs == 1:
        previous = torch.get_num_threads()
        try:
            for run in runs:
                config = run.config
                echo(f"training {config.name} seed {config.seed} for {config.steps} steps")
                results.append(
                    _train_and_evaluate(run, evaluator, svm_samples, svm_draws, progress, threads)
                )
                echo(_result_line(results[-1]))
        finally:
            torch.set_num_threads(previous)
        return results
    with ProcessPoolExecutor(
        jobs,
        mp_context=get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), imported_modules()),
    ) as pool:
        futures = [
            pool.submit(_train_and_evaluate, run, evaluator, svm_samples, svm_draws, False, threads)
            for run in runs
        ]
        for future in as_completed(futures):
            results.append(future.result())
            echo(_result_line(results[-1]))
    order = {(run.config.name, run.config.seed): i for i, run in enumerate(runs)}
    return sorted(results, key=lambda r: order[(r["recipe"], r["seed"])])


def study(
    out_dir: str | Path,
    steps: int = STUDY_STEPS,
    seeds: int = STUDY_SEEDS,
    recipes: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
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
    if jobs < 1 or seeds < 1 or steps < 1:
        raise ConfigError(f"jobs, seeds and steps must be >= 1, got {jobs}, {seeds}, {steps}")
    check_svm_options(svm_samples, svm_draws)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1 (torch threads per run), got {threads}")
    started = time.perf_counter()
    out = check_output_path(out_dir, "--out")
    names = recipes or STUDY_RECIPES
    evaluator, runs = plan_runs(out, names, seeds, steps, overrides, echo)
    echo(
        f"study: {len(runs)} runs ({len(names)} recipes x {seeds} seeds, {steps} steps each), "
        f"{jobs} at a time"
    )
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    results = run_all(
        runs,
        evaluator,
        svm_samples,
        svm_draws,
        jobs=jobs,
        threads=threads,
        progress=progress,
        echo=echo,
    )
    first = registry.get(names[0])
    references = svm_references(first, seeds, svm_samples, svm_draws)
    references.append(test_data_reference(load_evaluator(evaluator), load_data(first, "test")))
    summary = summarise(results + references)
    table = format_table(summary)
    paired = paired_table(results)
    paired_md = format_paired_table(paired)
    seconds = time.perf_counter() - started
    settings = {
        "steps": steps,
        "seeds": seeds,
        "recipes": names,
        "jobs": jobs,
        "threads_per_run": threads,
        "overrides": overrides or {},
    }
    record = {
        "results": results + references,
        "summary": summary,
        "paired": paired,
        "settings": settings,
        "seconds": seconds,
    }
    write_text_atomic(out / "study.json", json.dumps(record, indent=2))
    write_text_atomic(out / "study.md", table + "\n")
    write_text_atomic(out / "paired.md", paired_md + "\n")
    write_text_atomic(out / "paired.json", json.dumps(paired, indent=2))
    _figure(out, names)
    for line in (table, "", paired_md, f"study written to {out} in {seconds:.0f} s"):
        echo(line)
    return summary


def _figure(out: Path, names: list[str], count: int = 10) -> Path:
    """Originals in the first row, then each recipe's reconstructions (seed 0), one row each."""
    rows = None
    for name in names:
        run = out / f"{name}-seed0"
        models = load_run_models(run, ema=False)  # the trained weights, as the paper shows
        config = models.config
        test = load_data(config, "test")
        x = first_images(test, count)
        y = test.labels_tensor()[:count] if config.conditions else None  # own labels (6.10)
        recon = reconstruct(models.encoder, models.generator, x, labels=y)
        rows = [x] if rows is None else rows
        rows.append(recon)
    labels = ["test digits", *(name.removeprefix("digits-") for name in names)]
    return save_image_grid(
        torch.cat(rows), out / "study.png", columns=count, scale=3, row_labels=labels
    )
