"""The paper's metrics while a run trains (``eval_every``, ``best_metric``; docs/design.md,
section 6.11).

Every ``eval_every`` steps the loop (:func:`gali_ext.recipes.train.train`) scores the weights it
shows, the moving average (EMA) of E and G when the run keeps one, on a held-out split
(:func:`eval_split`), with :class:`Watch`:

- ``pixel_mse``, eq. 6.1, of the reconstructions ``G(mu_E(x))``;
- ``svm_error``, the linear SVM of section 6.2 sized down to run often (:data:`WATCH_SVM`): one
  fixed draw of N labelled training images, C chosen on V other training images, the error
  measured on the held-out images; data sets with class labels only (not CelebA);
- ``feature_mse`` (eq. 6.2) and ``class_agreement`` (eq. 6.6), when the evaluator classifier
  of the data set is beside the run (``evaluator-DATASET``, where ``gali-ext eval`` keeps it);
- ``fid_inception`` (section 6.3) with ``fid_weights`` (``gali-ext recipe --fid-weights``).

The metrics are the functions of :mod:`gali_ext.recipes.metrics`, as ``gali-ext eval`` computes
them. :class:`BestWeights` keeps the best weights by ``best_metric`` in the run's ``best/``
(:func:`gali_ext.recipes.runs.save_best`), and :func:`metric_series` turns the evaluations into
the plot ``metrics.png``. An evaluation draws nothing from the training's random streams
(:func:`preserved_random_state`), so a run trains the same weights with and without it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gali_ext.errors import ConfigError
from gali_ext.recipes.build import first_images, load_data
from gali_ext.recipes.data import SVHN_FILES, ImageData
from gali_ext.recipes.evaluate import METRICS, encoder_features, prior_samples
from gali_ext.recipes.evaluator import default_evaluator_dir, load_evaluator
from gali_ext.recipes.fid import STANDARD_WEIGHTS_FILE, STANDARD_WEIGHTS_URL, StandardInceptionFID
from gali_ext.recipes.metrics import (
    WATCHED_METRICS,
    feature_mse,
    model_device,
    reconstruction_class_agreement,
    reconstruction_mse,
    svm_misclassification,
)
from gali_ext.recipes.runs import read_best, recover_best, save_best
from gali_ext.recipes.settings import RecipeConfig
from gali_ext.recipes.stats import LOWER_IS_BETTER

__all__ = [
    "EVAL_PREFIX",
    "HELD_OUT_SPLITS",
    "WATCH_IMAGES",
    "WATCH_SVM",
    "BestWeights",
    "Watch",
    "eval_split",
    "metric_series",
    "preserved_random_state",
    "progress_text",
]

HELD_OUT_SPLITS = {"digits": "val", "svhn": "val", "celeba": "val"}
"""The split a run is evaluated on when ``eval_split`` is empty: one it does not train on.
SVHN's ``val`` is cut from ``train_32x32.mat`` (``recipes.data.load_svhn``): a run that trains
on that file (``train_split`` ``train`` or ``train+extra``) is evaluated on ``test`` instead
(:func:`eval_split`)."""

WATCH_IMAGES = 2000
"""Held-out images evaluated: the first ones of the split (digits' val split has 200)."""

WATCH_SVM = {"digits": (500, 300), "svhn": (1000, 1000)}
"""The SVM while training, per data set: ``(N, V)``, N labelled training images to fit on and
V other training images to choose C on, both one fixed draw (a permutation seeded with 0), the
error measured on the held-out images. ``gali-ext eval`` averages R = 10 (digits) or 100 (SVHN,
the paper's) random draws of N instead and measures on the test split."""

EVAL_PREFIX = "eval/"
"""The metrics' names in ``metrics.jsonl`` and the trackers: ``eval/pixel_mse``, ..."""

_SHORT = {
    "pixel_mse": ("MSE", "{:.4f}"),
    "svm_error": ("SVM", "{:.1f}%"),
    "feature_mse": ("fMSE", "{:.4f}"),
    "class_agreement": ("agree", "{:.3f}"),
    "fid_inception": ("FID", "{:.2f}"),
}
_TITLES = {key: title for key, title, _ in METRICS}


def eval_split(config: RecipeConfig) -> str:
    """The split a run is evaluated on: ``config.eval_split``, or the data set's held-out split
    (:data:`HELD_OUT_SPLITS`) when it is empty, unless the run trains on the file that split is
    cut from (SVHN's ``val``: then ``test``)."""
    if config.eval_split:
        return config.eval_split
    split = HELD_OUT_SPLITS[config.dataset]
    if config.dataset == "svhn" and set(SVHN_FILES[split]) & set(SVHN_FILES[config.train_split]):
        return "test"
    return split


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Run the block and put back the CPU generator of torch, NumPy's global generator and
    Python's ``random`` as they were before it. The metrics draw their own latents and SVM
    subsets from seeded generators, and draw nothing on CUDA; but scikit-learn's ``SVC`` takes a
    seed from NumPy's global generator, whose state Accelerate saves in every checkpoint."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class Watch:
    """The held-out evaluation of a run, set up once before it trains (docs/design.md,
    section 6.11): the first :data:`WATCH_IMAGES` images of :func:`eval_split` with their
    labels, the SVM's fixed training images (:data:`WATCH_SVM`), the evaluator classifier
    beside the run ``out`` when there is one, and the FID network with ``config.fid_weights``.

    ``watch(encoder, generator, prior)`` returns the metrics of E and G (``{name: value}``,
    names of :data:`~gali_ext.recipes.metrics.WATCHED_METRICS`), in eval mode, leaving the
    networks' modes and every random generator as it found them. Building it reads the data and
    checks the files and builds the FID network (a :class:`ConfigError`, ``CheckpointError`` or
    ``DataError`` before the run writes anything); :meth:`load` loads the evaluator and moves
    both networks to the device of the process that evaluates.
    """

    def __init__(self, config: RecipeConfig, train_data: ImageData, out: Path) -> None:
        self.config = config
        self.split = eval_split(config)
        data = load_data(config, self.split)
        self.images = first_images(data, WATCH_IMAGES)
        self.labels = data.labels_tensor()[: len(self.images)]
        classes = self.labels.ndim == 1
        # a class-conditional G reconstructs G(E(x), y) with x's own label (section 6.10)
        self.conditions = self.labels if config.conditions else None
        self.svm: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
        if classes and config.dataset in WATCH_SVM:
            fit, pick = WATCH_SVM[config.dataset]
            fit = min(fit, len(train_data) // 2)
            pick = min(pick, len(train_data) - fit)
            order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(0))
            self.svm = (train_data.batch(order[:fit]), train_data.batch(order[fit : fit + pick]))
        self.evaluator_dir = default_evaluator_dir(config.dataset, Path(out).resolve().parent)
        self.has_evaluator = (self.evaluator_dir / "evaluator.json").is_file()
        self._inception: StandardInceptionFID | None = None
        if config.fid_weights and not Path(config.fid_weights).is_file():
            raise ConfigError(
                f"fid_weights={config.fid_weights!r}: no such file; expected a local copy of "
                f"{STANDARD_WEIGHTS_FILE} (from {STANDARD_WEIGHTS_URL}), or no fid_weights"
            )
        if config.fid_weights:  # built here, so that a file of other weights is refused before
            with preserved_random_state():  # the run starts (building draws initial weights)
                self._inception = StandardInceptionFID(config.fid_weights, "cpu")
        self.check(config.best_metric)

    @property
    def protocol(self) -> str:
        """What was evaluated, for ``metrics.jsonl`` (``eval/protocol``)."""
        text = (
            f"the first {len(self.images)} images of the {self.config.dataset} {self.split} split"
        )
        if self.svm is not None:
            fit, pick = (len(labels) for _, labels in self.svm)
            text += f"; SVM: N={fit} labelled training images, C chosen on {pick} others, 1 draw"
        return text

    def unavailable(self) -> dict[str, str]:
        """The metrics of :data:`WATCHED_METRICS` this run does not evaluate, with the reason."""
        missing = {}
        if self.svm is None:
            missing["svm_error"] = (
                f"the {self.config.dataset} labels are not classes (the SVM needs them)"
            )
        if not self.has_evaluator:
            missing["feature_mse"] = missing["class_agreement"] = (
                f"no evaluator classifier beside the run ({str(self.evaluator_dir)!r}): train "
                f"it with `gali-ext train-evaluator {self.config.dataset} --out "
                f"{self.evaluator_dir}`"
            )
        if self.labels.ndim != 1:
            missing["class_agreement"] = f"the {self.config.dataset} labels are not classes"
        elif self.config.conditions:
            missing["class_agreement"] = (
                "a class-conditional run's reconstructions are given the label (docs/design.md, "
                "section 6.10)"
            )
        if not self.config.fid_weights:
            missing["fid_inception"] = "FID needs --fid-weights (--set fid_weights=FILE)"
        return missing

    @property
    def metrics(self) -> list[str]:
        """The names of the metrics this run evaluates."""
        missing = self.unavailable()
        return [name for name in WATCHED_METRICS if name not in missing]

    def check(self, best_metric: str) -> None:
        """Raise :class:`ConfigError` when ``best_metric`` is not among :attr:`metrics`."""
        reason = self.unavailable().get(best_metric)
        if reason is not None:
            raise ConfigError(
                f"best_metric={best_metric!r} is not evaluated in this run: {reason}; or choose "
                f"one it evaluates: {', '.join(self.metrics)}"
            )

    def load(self, device: Any = None) -> None:
        """Load the evaluator classifier and move it and the FID network onto ``device``
        (building a network draws its initial weights: from the preserved generators too)."""
        with preserved_random_state():
            if self.has_evaluator:
                self.evaluator.to(device)
            if self._inception is not None:
                self._inception.to(device or "cpu")

    @functools.cached_property
    def evaluator(self) -> torch.nn.Module:
        """The evaluator classifier beside the run (``evaluator-DATASET``)."""
        return load_evaluator(self.evaluator_dir)

    def __call__(self, encoder: Any, generator: Any, prior: Any) -> dict[str, float]:
        """The metrics of ``encoder`` and ``generator`` (the run's ``prior`` draws FID's
        latents, with a generator seeded with 0)."""
        x, y = self.images, self.conditions
        result: dict[str, float] = {}
        self.load(model_device(generator))
        with preserved_random_state(), torch.no_grad():
            result["pixel_mse"] = reconstruction_mse(encoder, generator, x, labels=y)
            if self.svm is not None:
                (fit_x, fit_y), (pick_x, pick_y) = self.svm
                fit, pick, test = (encoder_features(encoder, v) for v in (fit_x, pick_x, x))
                labels = (fit_y.numpy(), pick_y.numpy(), self.labels.numpy())
                svm = svm_misclassification(
                    fit, labels[0], pick, labels[1], test, labels[2], samples=len(fit), draws=1
                )
                result["svm_error"] = svm["mean"]
            if self.has_evaluator:
                evaluator = self.evaluator
                result["feature_mse"] = feature_mse(
                    encoder, generator, evaluator.features, x, labels=y
                )
                if "class_agreement" not in self.unavailable():
                    result["class_agreement"] = reconstruction_class_agreement(
                        encoder, generator, evaluator, x, self.labels
                    )
            if self._inception is not None:
                latent_dim = self.config.latent_dim
                generated = prior_samples(generator, prior, len(x), latent_dim, y)
                result["fid_inception"] = self._inception(x, generated).value
        return result


class BestWeights:
    """The best weights of a run by one metric, kept in its ``best/`` (docs/design.md,
    section 10.1): ``update`` replaces them (:func:`gali_ext.recipes.runs.save_best`) when a
    value is strictly better than the best so far, lower or higher as the metric says
    (:data:`gali_ext.recipes.stats.LOWER_IS_BETTER`). Built on a resumed run, it finishes a
    replacement a kill interrupted and reads the best value back from ``best/best.json``."""

    def __init__(self, out: Path, metric: str) -> None:
        self.out, self.metric = Path(out), metric
        self.lower_is_better = metric in LOWER_IS_BETTER
        recover_best(self.out)
        record = read_best(self.out)
        self.value: float | None = None
        self.step: int | None = None
        if record is not None and record["metric"] == metric:
            self.value, self.step = float(record["value"]), int(record["step"])

    def better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (a NaN never does)."""
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.lower_is_better else value > self.value

    def update(
        self,
        step: int,
        metrics: Mapping[str, float],
        modules: Mapping[str, torch.nn.Module],
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Keep ``modules`` (``encoder``, ``generator``) as the best weights when
        ``metrics[metric]`` is better; ``best.json`` records the metric, value, step, direction
        and ``details``. Returns whether they were kept."""
        value = metrics.get(self.metric)
        if value is None or not self.better(value):
            return False
        record = {
            "metric": self.metric,
            "value": value,
            "step": step,
            "lower_is_better": self.lower_is_better,
            **(details or {}),
        }
        save_best(self.out, dict(modules), record)
        self.value, self.step = value, step
        return True


def metric_series(
    records: Sequence[Mapping[str, Any]], best: BestWeights | None = None
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, tuple[int, float]]]:
    """The evaluations of ``records`` (``metrics.jsonl``'s ``eval/`` records) as
    :func:`gali_ext.recipes.visual.save_metric_plot` takes them: ``{title: [(step, value)]}``
    per metric in :data:`WATCHED_METRICS` order, titles saying which way is better, and the
    best point of ``best``'s metric to mark."""
    series: dict[str, list[tuple[int, float]]] = {}
    marks = {}
    for name in WATCHED_METRICS:
        points = [
            (int(r["step"]), float(r[EVAL_PREFIX + name]))
            for r in records
            if isinstance(r.get(EVAL_PREFIX + name), (int, float))
        ]
        if not points:
            continue
        which = "lower" if name in LOWER_IS_BETTER else "higher"
        title = f"{_TITLES[name]} ({which} is better)"
        if best is not None and best.metric == name and best.step is not None:
            title += f"; best {best.value:.4g} at step {best.step}, kept in best/"
            marks[title] = (best.step, best.value)
        series[title] = points
    return series, marks


def progress_text(step: int, metrics: Mapping[str, float], best: BestWeights | None) -> str:
    """The evaluation's part of the progress line: ``eval@500 MSE 0.0213 SVM 12.3% ...``."""
    parts = [f"eval@{step}"]
    for name in WATCHED_METRICS:
        if name in metrics:
            short, form = _SHORT[name]
            parts.append(f"{short} {form.format(metrics[name])}")
    if best is not None and best.step is not None:
        parts.append(f"best@{best.step}")
    return " ".join(parts)
