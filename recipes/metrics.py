"""The paper's evaluation of an encoder-generator pair (docs/design.md, section 6).

- :func:`reconstruction_mse`: pixel MSE between x and ``G(E(x))``, pixels in [0, 1];
- :func:`feature_mse`: the same between ``M_eval(x)`` and ``M_eval(G(E(x)))`` for a frozen
  evaluator classifier (:mod:`gali_ext.recipes.evaluator`);
- :func:`svm_misclassification`: a linear SVM on encoder features from N labelled images, C
  chosen on a validation split, test misclassification averaged over R random draws;
- :func:`frechet_distance` and :func:`fid`: Frechet distance between Gaussian fits of features;
- :func:`inpainting_errors`: pixel MSE on the masked region and feature MSE of ``Mix(x, M)``;
- :func:`reconstruction_class_agreement`: how often the evaluator classifier gives ``G(E(x))``
  the label of x (docs/design.md, section 6, eq. 6.6);
- :func:`sample_class_statistics` (on logits) and :func:`sample_quality` (on a generator):
  the share of samples ``G(z)`` the evaluator classifies with confidence (eq. 6.7), and how
  the samples cover the classes (eqs. 6.8 and 6.9); for a class-conditional generator,
  ``G(z, y)`` with ``y`` each class in turn and how often the evaluator agrees with ``y``
  (eq. 6.13);
- :func:`conditional_reconstruction_agreement`: for a class-conditional pair, the class
  agreement of ``G(E(x), y)`` with x's own label and of ``G(E(x), y_perm)`` with a shuffled
  label, which separates inference from label copying (docs/design.md, section 6.10,
  eqs. 6.14-6.17);
- :func:`summary_metrics`: those a run's ``summary.json`` reports at the end of training;
- :data:`WATCHED_METRICS`: those a run evaluates while it trains (:mod:`gali_ext.recipes.watch`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gali_ext.chains import latent_mean
from gali_ext.errors import ConfigError, ShapeError
from gali_ext.priors import resolve_prior
from gali_ext.providers.maskmix import sample_box_masks
from gali_ext.recipes.data import ImageData

__all__ = [
    "SAMPLE_COUNT",
    "WATCHED_METRICS",
    "class_cycle",
    "conditional_reconstruction_agreement",
    "eval_mode",
    "feature_mse",
    "fid",
    "frechet_distance",
    "gaussian_fit",
    "inpainting_errors",
    "model_device",
    "reconstruct",
    "reconstruction_class_agreement",
    "reconstruction_mse",
    "sample_class_statistics",
    "sample_quality",
    "shuffled_labels",
    "summary_metrics",
    "svm_misclassification",
]


class eval_mode:  # noqa: N801  (used like a function: `with eval_mode(encoder, generator):`)
    """Puts modules in eval mode inside the block and restores their modes after."""

    def __init__(self, *modules: Any) -> None:
        self.modules = [m for m in modules if isinstance(m, nn.Module)]

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


def model_device(model: Any) -> torch.device | None:
    """The device of a module's first parameter or buffer; ``None`` for a plain function or a
    module without tensors (its inputs then stay where they are)."""
    if isinstance(model, nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor.device
    return None


def _batches(images: Tensor, batch_size: int, device: torch.device | None = None):
    """Slices of ``images``, each moved to ``device`` (the model's: the images may stay on the
    CPU while the networks sit on a GPU)."""
    for i in range(0, images.shape[0], batch_size):
        batch = images[i : i + batch_size]
        yield batch if device is None else batch.to(device)


@torch.no_grad()
def reconstruct(
    encoder: Callable[[Tensor], Any],
    generator: Callable[..., Tensor],
    images: Tensor,
    batch_size: int = 500,
    labels: Tensor | None = None,
) -> Tensor:
    """``G(E(x))`` with E's mean for a stochastic encoder (a deterministic reconstruction), on
    the device of ``images`` whichever device E and G run on. ``labels``: the images'
    conditions, for a class-conditional generator ``G(E(x), y)``."""
    to_generator = model_device(generator)
    parts = []
    label_batches = _batches(labels, batch_size, to_generator) if labels is not None else None
    with eval_mode(encoder, generator):
        for x in _batches(images, batch_size, model_device(encoder)):
            z = latent_mean(encoder(x))
            z = z if to_generator is None else z.to(to_generator)
            condition = () if label_batches is None else (next(label_batches).to(z.device),)
            parts.append(generator(z, *condition).to(images.device))
    return torch.cat(parts)


@torch.no_grad()
def reconstruction_mse(
    encoder: Callable[[Tensor], Any],
    generator: Callable[..., Tensor],
    images: Tensor,
    batch_size: int = 500,
    labels: Tensor | None = None,
) -> float:
    """Pixel MSE ``mean(((x - G(E(x))) / 2)^2)``: images in [-1, 1] mapped to [0, 1].
    ``labels``: the images' conditions, for a class-conditional generator."""
    recon = reconstruct(encoder, generator, images, batch_size, labels)
    return ((images.float() - recon.float()) / 2).pow(2).mean().item()


@torch.no_grad()
def _features(model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    device = model_device(model)
    with eval_mode(model):
        return torch.cat(
            [
                model(x).flatten(1).float().to(images.device)
                for x in _batches(images, batch_size, device)
            ]
        )


@torch.no_grad()
def feature_mse(
    encoder: Callable[[Tensor], Any],
    generator: Callable[..., Tensor],
    features: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = 500,
    labels: Tensor | None = None,
) -> float:
    """``mean((M_eval(x) - M_eval(G(E(x))))^2)`` over images and feature dimensions (eq. 6.2).
    ``labels``: the images' conditions, for a class-conditional generator ``G(E(x), y)``."""
    recon = reconstruct(encoder, generator, images, batch_size, labels)
    a = _features(features, images, batch_size)
    b = _features(features, recon, batch_size)
    return (a - b).pow(2).mean().item()


def svm_misclassification(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    samples: int = 1000,
    draws: int = 100,
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0),
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-SVM test misclassification (%) on features, as in the paper's representation
    evaluation (a linear-kernel SVM, one-vs-one over the classes): for each of ``draws`` random
    sets of ``samples`` labelled training images, standardise, pick C on the validation split,
    and score on the test split.

    Returns ``{"mean": %, "std": %, "samples": N, "draws": R, "C": [chosen per draw]}``.
    """
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if samples > len(train_labels):
        raise ShapeError(f"asked for {samples} SVM training images, only {len(train_labels)} exist")
    rng = np.random.default_rng(seed)
    errors, chosen = [], []
    for _ in range(draws):
        index = rng.choice(len(train_labels), samples, replace=False)
        scaler = StandardScaler().fit(train_features[index])
        x_train = scaler.transform(train_features[index])
        best = None
        for c in c_grid:
            # libsvm's linear kernel (one-vs-one): on N <= a few thousand images of features in
            # the thousands it is far faster than liblinear, which stalls at large C.
            svm = SVC(kernel="linear", C=c).fit(x_train, train_labels[index])
            accuracy = svm.score(scaler.transform(val_features), val_labels)
            if best is None or accuracy > best[0]:
                best = (accuracy, c, svm)
        _, c, svm = best
        errors.append(100.0 * (1.0 - svm.score(scaler.transform(test_features), test_labels)))
        chosen.append(c)
    return {
        "mean": float(np.mean(errors)),
        "std": float(np.std(errors)),
        "samples": samples,
        "draws": draws,
        "C": chosen,
    }


def gaussian_fit(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of ``[N, d]`` features, in float64."""
    x = features.double().cpu().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``: the Frechet (2-Wasserstein) distance
    between ``N(mu1, S1)`` and ``N(mu2, S2)``, the quantity behind FID."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ShapeError(
            f"Gaussians of different dimension: {mu1.shape} vs {mu2.shape}, "
            f"{sigma1.shape} vs {sigma2.shape}"
        )
    # tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): a symmetric PSD matrix, whose
    # eigenvalues are real, so no complex square roots appear.
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def _frechet_distance_of_samples(a: Tensor, b: Tensor) -> float:
    """:func:`frechet_distance` of the Gaussian fits of samples ``a [N1, d]`` and ``b [N2, d]``.

    With fewer samples than dimensions (300 test digits, 2048 Inception features) it works on
    the centred samples ``A``, ``B`` (scaled by ``1/sqrt(N-1)``) instead of the d x d
    covariances ``S1 = A^T A``, ``S2 = B^T B``: ``tr((S1 S2)^(1/2))`` is the sum of the singular
    values of ``A B^T``, an N1 x N2 matrix (the nonzero eigenvalues of ``A^T A B^T B`` are those
    of ``(A B^T)(A B^T)^T``). Exact, and free of the rank-deficient d x d square root.
    """
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))
    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    centred = [(v - v.mean(0)) / np.sqrt(len(v) - 1) for v in (a, b)]
    trace_root = np.linalg.svd(centred[0] @ centred[1].T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    traces = sum((c * c).sum() for c in centred)
    return float(diff @ diff + traces - 2 * trace_root)


@torch.no_grad()
def fid(
    features: Callable[[Tensor], Tensor], real: Tensor, generated: Tensor, batch_size: int = 500
) -> float:
    """Frechet distance between feature Gaussians of real and generated images. With Inception
    features this is FID; with another extractor, say which (e.g. "FID (evaluator features)")."""
    if min(len(real), len(generated)) < 2:
        raise ShapeError("FID needs at least 2 real and 2 generated images")
    return _frechet_distance_of_samples(
        _features(features, real, batch_size), _features(features, generated, batch_size)
    )


@torch.no_grad()
def inpainting_errors(
    encoder: Callable[[Tensor], Any],
    generator: Callable[..., Tensor],
    images: Tensor,
    features: Callable[[Tensor], Tensor] | None = None,
    fill: float = -1.0,
    seed: int = 0,
    batch_size: int = 500,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """Inpainting: ``Mix(x, M)`` is x outside a box drawn from P(M) and ``G(E(M(x)))`` inside.

    ``pixel_mse``: mean squared error (pixels in [0, 1]) over the masked pixels only (eq. 6.4);
    ``feature_mse``: ``mean((M_eval(x) - M_eval(Mix(x, M)))^2)`` when ``features`` is given
    (eq. 6.5). ``labels``: the images' conditions, for a class-conditional generator
    ``G(E(M(x)), y)``.
    """

    b, _, h, w = images.shape
    boxes = sample_box_masks(b, h, w, torch.Generator().manual_seed(seed), images.device)
    masked = images.masked_fill(boxes, fill)
    inpainted = reconstruct(encoder, generator, masked, batch_size, labels)
    mixed = torch.where(boxes, inpainted, images)
    inside = boxes.expand_as(images)
    squared = ((images.float() - mixed.float()) / 2).pow(2)
    result = {"pixel_mse": (squared[inside].sum() / inside.sum()).item()}
    if features is not None:
        a = _features(features, images, batch_size)
        c = _features(features, mixed, batch_size)
        result["feature_mse"] = (a - c).pow(2).mean().item()
    return result


@torch.no_grad()
def _logits(classifier: Callable[[Tensor], Tensor], images: Tensor, batch_size: int) -> Tensor:
    device = model_device(classifier)
    with eval_mode(classifier):
        return torch.cat(
            [classifier(x).float().to(images.device) for x in _batches(images, batch_size, device)]
        )


def _check_class_ids(labels: Tensor, count: int, what: str = "labels") -> None:
    """``labels`` must be ``count`` class indices, ``[count]``."""
    if labels.ndim != 1 or len(labels) != count or labels.is_floating_point():
        raise ShapeError(
            f"expected one class index per image, {what} of shape [{count}] (integers), "
            f"got {labels.dtype} of shape {list(labels.shape)}"
        )


def _agreement(logits: Tensor, labels: Tensor) -> float:
    """``mean_i [argmax_k logits_ik = labels_i]`` for logits ``[N, K]`` and labels ``[N]``."""
    predicted = logits.argmax(1)
    return (predicted == labels.to(predicted.device)).float().mean().item()


@torch.no_grad()
def reconstruction_class_agreement(
    encoder: Callable[[Tensor], Any],
    generator: Callable[..., Tensor],
    classifier: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    batch_size: int = 500,
    conditions: Tensor | None = None,
) -> float:
    """Reconstruction class agreement (eq. 6.6): the fraction of images x whose reconstruction
    ``G(E(x))`` the classifier assigns to x's label, ``mean_i [argmax_k C(G(E(x_i)))_k = y_i]``.

    ``classifier`` returns class logits ``[B, K]`` (the evaluator classifier's ``forward``);
    ``labels`` are class indices ``[B]``. Chance is ``1/K`` for balanced classes.
    ``conditions``: for a class-conditional generator, the classes ``c_i`` it is given,
    ``G(E(x_i), c_i)`` (eqs. 6.14 and 6.15); the agreement is still with ``labels``.
    """
    _check_class_ids(labels, len(images))
    if conditions is not None:
        _check_class_ids(conditions, len(images), "conditions")
    recon = reconstruct(encoder, generator, images, batch_size, conditions)
    return _agreement(_logits(classifier, recon, batch_size), labels)


def shuffled_labels(labels: Tensor, seed: int = 0) -> Tensor:
    """``y_perm = y[pi]`` for a random permutation ``pi`` drawn by a CPU generator seeded with
    ``seed`` (eq. 6.15): the same classes in the same proportions, each moved to a random image
    (where it may meet its own class: eq. 6.17)."""
    rng = torch.Generator().manual_seed(seed)
    return labels[torch.randperm(len(labels), generator=rng).to(labels.device)]


@torch.no_grad()
def conditional_reconstruction_agreement(
    encoder: Callable[[Tensor], Any],
    generator: Callable[[Tensor, Tensor], Tensor],
    classifier: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    seed: int = 0,
    batch_size: int = 500,
) -> dict[str, float]:
    """Inference or label copying, for a class-conditional pair (docs/design.md, section 6.10).

    With ``y_perm = shuffled_labels(labels, seed)`` and ``c(v) = argmax_k C(v)_k``:

    - ``own_label`` (eq. 6.14): ``mean_i [c(G(E(x_i), y_i)) = y_i]``;
    - ``shuffled_label`` (eq. 6.15): ``mean_i [c(G(E(x_i), y_perm_i)) = y_i]``, the agreement
      with x's class when G is told another class: what E(x) carries of the class;
    - ``label_gap`` (eq. 6.16): ``own_label - shuffled_label``, what the label adds;
    - ``shuffled_label_chance`` (eq. 6.17): ``mean_i [y_perm_i = y_i]``, the ``shuffled_label``
      of a generator that copies the label and ignores ``E(x)`` (about ``sum_k h_k^2``, 1/K
      for balanced classes), given a perfect classifier.

    ``labels`` are class indices ``[B]``; ``classifier`` returns logits ``[B, K]``.
    """
    _check_class_ids(labels, len(images))
    permuted = shuffled_labels(labels, seed)
    scored = (encoder, generator, classifier, images, labels, batch_size)  # against x's class
    own = reconstruction_class_agreement(*scored, conditions=labels)
    shuffled = reconstruction_class_agreement(*scored, conditions=permuted)
    return {
        "own_label": own,
        "shuffled_label": shuffled,
        "label_gap": own - shuffled,
        "shuffled_label_chance": (permuted == labels).float().mean().item(),
    }


def sample_class_statistics(
    logits: Tensor, threshold: float = 0.9, min_share: float = 0.05
) -> dict[str, Any]:
    """What a classifier says about N samples, from its logits ``[N, K]``:

    - ``confidence`` (eq. 6.7): the fraction of samples whose top softmax probability is at
      least ``threshold``, ``mean_i [max_k p_ik >= threshold]``;
    - ``class_entropy_bits`` (eq. 6.8): the entropy ``-sum_k h_k log2 h_k`` of the histogram
      ``h_k`` of predicted classes ``argmax_k p_ik`` over all samples (``log2 K`` when every
      class holds as many samples, 0 when all samples fall in one class);
    - ``classes_covered`` (eq. 6.9): the number of classes with ``h_k >= min_share``;
    - ``class_histogram``: ``h`` itself, a list of K shares summing to 1.
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ShapeError(f"expected logits of shape [N, K] with N >= 1, got {list(logits.shape)}")
    if not 0 < threshold <= 1 or not 0 < min_share <= 1:
        raise ShapeError(
            f"expected threshold and min_share in (0, 1], got {threshold} and {min_share}"
        )
    p = logits.double().softmax(1)
    top, predicted = p.max(1)
    shares = torch.bincount(predicted, minlength=logits.shape[1]).double() / len(predicted)
    nonzero = shares[shares > 0]
    return {
        "confidence": (top >= threshold).double().mean().item(),
        "class_entropy_bits": float(-(nonzero * nonzero.log2()).sum().item()) + 0.0,
        "classes_covered": int((shares >= min_share).sum().item()),
        "class_histogram": shares.tolist(),
    }


def class_cycle(count: int, classes: int) -> Tensor:
    """``y_j = j mod classes`` for ``j = 0 .. count-1``: each class in turn (eq. 6.13)."""
    if classes < 1:
        raise ShapeError(f"expected classes >= 1, got {classes}")
    return torch.arange(count) % classes


@torch.no_grad()
def sample_quality(
    generator: Callable[..., Tensor],
    classifier: Callable[[Tensor], Tensor],
    latent_dim: int,
    count: int = 1000,
    seed: int = 0,
    threshold: float = 0.9,
    min_share: float = 0.05,
    batch_size: int = 500,
    prior: Any = "normal",
    classes: int | None = None,
) -> dict[str, Any]:
    """:func:`sample_class_statistics` of ``count`` samples ``G(z)``, ``z`` drawn from ``prior``
    (anything :func:`gali_ext.priors.resolve_prior` takes: the run's prior) with a CPU generator
    seeded with ``seed`` (the same latents for every model of a study).

    ``classes``: a class-conditional generator over that many classes. The samples are then
    ``G(z_j, y_j)`` with ``y_j = j mod classes`` (each class in turn, :func:`class_cycle`) and
    the result also holds ``conditional_accuracy`` (eq. 6.13), the class-conditional sample
    accuracy ``mean_j [argmax_k C(G(z_j, y_j))_k = y_j]``."""
    rng = torch.Generator().manual_seed(seed)
    z = resolve_prior(prior)((count, latent_dim), rng=rng)
    device = model_device(generator)
    y = class_cycle(count, classes) if classes is not None else None
    parts = []
    with eval_mode(generator):
        for start, b in zip(range(0, count, batch_size), _batches(z, batch_size, device)):
            condition = () if y is None else (y[start : start + len(b)].to(b.device),)
            parts.append(generator(b, *condition).float().cpu())
    logits = _logits(classifier, torch.cat(parts), batch_size)
    stats = sample_class_statistics(logits, threshold, min_share)
    if y is not None:
        stats["conditional_accuracy"] = _agreement(logits, y)
    return stats


SAMPLE_COUNT = 1000  # samples G(z) scored by the evaluator for confidence and coverage

WATCHED_METRICS = ("pixel_mse", "svm_error", "feature_mse", "class_agreement", "fid_inception")
"""The metrics a run evaluates every ``eval_every`` steps on a held-out split, and may keep its
best weights by (``best_metric``): eqs. 6.1, 6.2 and 6.6, the SVM of section 6.2 sized down, and
FID (docs/design.md, section 6.11; :mod:`gali_ext.recipes.watch`)."""


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
    x = test_data.images_tensor(max_test_images)
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
