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
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from gali_ext import recipes as registry
from gali_ext.errors import ConfigError
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

    if threads is not None:
        torch.set_num_threads(threads)
    if not (run / "summary.json").is_file():
        config = dataclasses.replace(registry.get(name).with_overrides(settings), seed=seed)
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
        check_reusable(
            run, dataclasses.replace(registry.get(name).with_overrides(settings), seed=seed)
        )
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


def _figure(out: Path, names: list[str], count: int = 10) -> Path:
    """Originals in the first row, then each recipe's reconstructions (seed 0), one row each."""
    rows = None
    for name in names:
        run = out / f"{name}-seed0"
        config = RecipeConfig.from_json(run / "config.json")
        test = load_data(config, "test")
        x = first_images(test, count)
        y = test.labels_tensor()[:count] if config.conditions else None  # own labels (6.10)
        models = load_run_models(run, ema=False)  # the trained weights, as the paper shows
        recon = reconstruct(models.encoder, models.generator, x, labels=y)
        rows = [x] if rows is None else rows
        rows.append(recon)
    labels = ["test digits", *(name.removeprefix("digits-") for name in names)]
    return save_image_grid(
        torch.cat(rows), out / "study.png", columns=count, scale=3, row_labels=labels
    )
