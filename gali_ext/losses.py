"""GALI's objectives on the discriminator's logits (docs/design.md, section 3, paper eqs. 2-4;
the hinge family, section 9.2).

Every loss takes ``logits: [K, B, K]``, where ``logits[i]`` are the discriminator's logits on the
B tuples of class i, computes its per-sample values in float32 (also under autocast), sums them
over the classes and averages over the batch. An objective with T terms is weighted by ``2 / T``
so that every preset trains on ALI's scale (the paper, "Architecture and Setup");
``weighted=False`` turns that off. :class:`DiscriminatorLoss` and :class:`ProductOfTermsLoss`
also take a ``[K, K]`` matrix of per-term weights instead (``weights``, docs/design.md,
section 3.7): ``W[i, j]`` multiplies the term of class i's tuples and class j's probability.
Logits holding NaN or inf raise :class:`~gali_ext.errors.DivergenceError` naming the loss,
instead of a NaN loss (the cross-entropy family; a host sync per loss). ``check_finite=False``
skips that check, as :func:`~gali_ext.trainer.train_step` asks when its device-side guard
watches the losses.

| loss                           | minimised by | per-sample value, class i             | T      |
|--------------------------------|--------------|---------------------------------------|--------|
| :class:`DiscriminatorLoss`     | D            | ``-log_p[i, b, i]``                   | K      |
| :class:`HingeDiscriminatorLoss`| D            | ``sum_{j != i} h(l_i - l_j)``         | K(K-1) |
| :class:`ProductOfTermsLoss`    | G and E      | ``-sum_{j != i} log_p[i, b, j]``      | K(K-1) |
| :class:`MinimaxLoss`           | G and E      | ``+log_p[i, b, i]``                   | K      |
| :class:`MisclassificationLoss` | G and E      | ``-log(1 - p[i, b, i])``              | K      |
| :class:`HingeGeneratorLoss`    | G and E      | ``sum_{j != i} (l_i - l_j)``          | K(K-1) |

with ``log_p = log_softmax(logits, -1)``, ``l = logits[i, b]`` and ``h(t) = max(0, 1 - t)``.
The loss modules also take a :class:`~gali_ext.head.DiscriminatorOutput`: the joint term plus
each unary term times its weight, each by the same per-logits loss (section 9.1, eq. 9.2).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DivergenceError, ShapeError
from .head import DiscriminatorOutput

__all__ = [
    "log_probabilities",
    "discriminator_loss",
    "product_of_terms_loss",
    "minimax_loss",
    "misclassification_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "tuple_class_accuracy",
    "LogitsLoss",
    "DiscriminatorLoss",
    "ProductOfTermsLoss",
    "MinimaxLoss",
    "MisclassificationLoss",
    "HingeDiscriminatorLoss",
    "HingeGeneratorLoss",
    "AliceReconstructionLoss",
    "DISCRIMINATOR_CRITERIA",
    "GENERATOR_CRITERIA",
    "build_discriminator_criterion",
    "build_generator_criterion",
    "check_term_weights",
]


def _check_logits(logits: Tensor, loss: str | None = None, check_finite: bool = True) -> int:
    """K of ``logits: [K, B, K]``; ``loss`` names the loss for which they must be finite, checked
    when ``check_finite`` (never while ``torch.compile`` traces or a CUDA graph is captured)."""
    if not isinstance(logits, Tensor):
        raise ShapeError(f"expected logits to be a tensor, got {type(logits).__name__}")
    if logits.dim() != 3 or logits.shape[0] != logits.shape[2]:
        raise ShapeError(f"expected logits of shape [K, B, K], got {list(logits.shape)}")
    k = logits.shape[0]
    if k < 2:
        raise ShapeError(f"expected K >= 2 tuple classes, got logits of shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ShapeError(f"expected floating-point logits, got dtype {logits.dtype}")
    # One reduction and host sync per loss (train_step syncs on the loss right after anyway);
    # skipped while torch.compile traces, where it would break the graph, and on the meta
    # device, whose tensors have shapes but no values to check.
    if (
        loss is not None
        and check_finite
        and not logits.is_meta
        and not torch.compiler.is_compiling()
        and not (logits.is_cuda and torch.cuda.is_current_stream_capturing())
    ):
        if not bool(torch.isfinite(logits).all()):
            nan, inf = int(torch.isnan(logits).sum()), int(torch.isinf(logits).sum())
            raise DivergenceError(
                f"the logits {list(logits.shape)} given to {loss} hold {nan} NaN and {inf} "
                f"infinite value(s): expected finite logits [K, B, K]"
            )
    return k


def _float32_region(tensor: Tensor) -> Any:
    """A region where autocast is off on ``tensor``'s device (the meta device has no autocast:
    shapes pass through unchanged there)."""
    if tensor.is_meta:
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _log_softmax32(logits: Tensor) -> Tensor:
    with _float32_region(logits):
        return torch.log_softmax(logits.float(), dim=-1)


def _own_class_mask(k: int, device: torch.device) -> Tensor:
    """``[K, 1, K]`` boolean, true at ``[i, :, i]``: the true class of each block of tuples."""
    return torch.eye(k, dtype=torch.bool, device=device).unsqueeze(1)


def check_term_weights(weights: Any, k: int, loss: str, own_class: bool) -> Tensor:
    """``weights`` as a float ``[K, K]`` tensor of per-term weights for ``loss``, checked: finite
    and non-negative, and zero where the loss has no term (off the diagonal for D's loss,
    ``own_class``; on it for the product of terms). Else :class:`ShapeError` or
    :class:`ConfigError` saying what was expected."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (k, k):
        raise ShapeError(
            f"expected {loss} weights of shape [K, K] = [{k}, {k}], got {list(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ConfigError(f"expected finite {loss} weights >= 0, got {weights.tolist()}")
    eye = torch.eye(k, dtype=torch.bool, device=weights.device)
    unused = ~eye if own_class else eye
    if bool((weights[unused] != 0).any()):
        where = "off the diagonal" if own_class else "on the diagonal"
        terms = "one term per class, log p[i, b, i]" if own_class else "no term log p[i, b, i]"
        raise ConfigError(
            f"{loss} has {terms}: expected zero weights {where}, got {weights.tolist()}"
        )
    return weights


def _weighted_terms(log_p: Tensor, weights: Tensor) -> Tensor:
    """``-(1/B) sum_b sum_{i, j} W[i, j] log p[i, b, j]`` (eqs. 3.13, 3.14) of checked weights
    (:func:`check_term_weights`; the shape is checked here, without a host sync)."""
    k = log_p.shape[0]
    if weights.shape != (k, k):
        raise ShapeError(
            f"expected logits [K, B, K] with K={weights.shape[0]} (the weights' K), "
            f"got {list(log_p.shape)}"
        )
    return -(log_p.mean(1) * weights.to(log_p.device, log_p.dtype)).sum()


def log_probabilities(logits: Tensor) -> Tensor:
    """``log_softmax(logits, -1)`` in float32, also inside an autocast region. ``[K, B, K]``."""
    _check_logits(logits)
    return _log_softmax32(logits)


def discriminator_loss(
    logits: Tensor,
    weighted: bool = True,
    *,
    check_finite: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Eq. 3 negated: ``-(1/B) sum_b sum_i log D_i(t_ib)``, times ``2/K`` when weighted.

    ``weights``: a diagonal ``[K, K]`` matrix; class i's term is then multiplied by
    ``weights[i, i]`` instead (eq. 3.13; ``weighted`` is ignored). ``check_finite``: first
    raise :class:`~gali_ext.errors.DivergenceError` if the logits hold NaN or inf (one host
    sync); ``False`` skips the check.
    """
    k = _check_logits(logits, "discriminator_loss", check_finite)
    log_p = _log_softmax32(logits)
    if weights is not None:
        return _weighted_terms(log_p, check_term_weights(weights, k, "discriminator_loss", True))
    loss = -log_p.diagonal(dim1=0, dim2=2).sum(-1).mean()
    return loss * (2.0 / k) if weighted else loss


def product_of_terms_loss(
    logits: Tensor,
    weighted: bool = True,
    *,
    check_finite: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Eq. 4, the non-saturating product of terms for G and E.

    ``-(1/B) sum_b sum_i sum_{j != i} log D_j(t_ib)``, times ``2/(K(K-1))`` when weighted. For
    K = 2 it is ALI/BiGAN's non-saturating generator loss
    ``-log(1 - D(x, E(x))) - log D(G(z), z)``.

    ``weights``: a ``[K, K]`` matrix with a zero diagonal; the term of class i and wrong class
    j is then multiplied by ``weights[i, j]`` instead (eq. 3.14; ``weighted`` is ignored).
    ``check_finite``: first raise :class:`~gali_ext.errors.DivergenceError` if the logits hold
    NaN or inf (one host sync); ``False`` skips the check.
    """
    k = _check_logits(logits, "product_of_terms_loss", check_finite)
    log_p = _log_softmax32(logits)
    if weights is not None:
        weights = check_term_weights(weights, k, "product_of_terms_loss", False)
        return _weighted_terms(log_p, weights)
    off_class = log_p.masked_fill(_own_class_mask(k, logits.device), 0.0)
    loss = -off_class.sum(dim=(0, 2)).mean()
    return loss * (2.0 / (k * (k - 1))) if weighted else loss


def minimax_loss(logits: Tensor, weighted: bool = True, *, check_finite: bool = True) -> Tensor:
    """Eq. 2 for G and E (they minimise D's log-likelihood): ``(1/B) sum_b sum_i log D_i(t_ib)``.

    Saturates: its gradient vanishes when D is confident (the paper's motivation for eq. 4).

    ``check_finite``: first raise :class:`~gali_ext.errors.DivergenceError` if the logits hold
    NaN or inf (one host sync); ``False`` skips the check.
    """
    k = _check_logits(logits, "minimax_loss", check_finite)
    log_p = _log_softmax32(logits)
    loss = log_p.diagonal(dim1=0, dim2=2).sum(-1).mean()
    return loss * (2.0 / k) if weighted else loss


def misclassification_loss(
    logits: Tensor, weighted: bool = True, *, check_finite: bool = True
) -> Tensor:
    """``-(1/B) sum_b sum_i log(1 - D_i(t_ib))``, times ``2/K`` when weighted.

    Computed stably as ``log(1 - p_i) = logsumexp_{j != i} l_j - logsumexp_j l_j``, which stays
    finite when ``p_i`` rounds to 1.

    ``check_finite``: first raise :class:`~gali_ext.errors.DivergenceError` if the logits hold
    NaN or inf (one host sync); ``False`` skips the check.
    """
    k = _check_logits(logits, "misclassification_loss", check_finite)
    with _float32_region(logits):
        logits32 = logits.float()
        others = logits32.masked_fill(_own_class_mask(k, logits.device), float("-inf"))
        log_not_own = torch.logsumexp(others, -1) - torch.logsumexp(logits32, -1)
    loss = -log_not_own.sum(0).mean()
    return loss * (2.0 / k) if weighted else loss


def _pairwise_margins(logits: Tensor) -> Tensor:
    """``[K, B, K]``: ``t[i, b, j] = l_i - l_j`` with ``l = logits[i, b]`` in float32, zero at
    ``j = i``."""
    k = _check_logits(logits)
    with _float32_region(logits):
        logits32 = logits.float()
        own = logits32.diagonal(dim1=0, dim2=2).t().unsqueeze(-1)  # [K, B, 1]: l_i
        margins = own - logits32
    return margins.masked_fill(_own_class_mask(k, logits.device), 0.0)


def hinge_discriminator_loss(
    logits: Tensor, weighted: bool = True, *, check_finite: bool = True
) -> Tensor:
    """D's multi-class hinge (Weston-Watkins), docs/design.md eq. 9.4:
    ``(1/B) sum_b sum_i sum_{j != i} max(0, 1 - (l_i - l_j))``, times ``2/(K(K-1))`` when
    weighted.

    At K = 2, with ``s = l_0 - l_1``, it is BigBiGAN's (and BigGAN's) hinge
    ``h(s) + h(-s)``: ``h(y s)`` with y = +1 on class 0 (encoder pairs) and -1 on class 1.

    The hinge losses do not check their logits for NaN or inf (a NaN logit gives a NaN loss):
    ``check_finite`` has no effect, it is taken for the signature all the losses share.
    """
    k = _check_logits(logits)
    hinge = torch.relu(1.0 - _pairwise_margins(logits))
    hinge = hinge.masked_fill(_own_class_mask(k, logits.device), 0.0)
    loss = hinge.sum(dim=(0, 2)).mean()
    return loss * (2.0 / (k * (k - 1))) if weighted else loss


def hinge_generator_loss(
    logits: Tensor, weighted: bool = True, *, check_finite: bool = True
) -> Tensor:
    """The generator-encoder loss of the hinge family, docs/design.md eq. 9.5:
    ``(1/B) sum_b sum_i sum_{j != i} (l_i - l_j)``, times ``2/(K(K-1))`` when weighted.

    E and G lower each tuple's own-class logit against every other class's, the margins D's
    hinge raises. At K = 2, with ``s = l_0 - l_1``, it is BigBiGAN's ``y s``: ``s`` on class 0
    and ``-s`` on class 1. Per sample it equals ``K l_i - sum_j l_j``.

    The hinge losses do not check their logits for NaN or inf (a NaN logit gives a NaN loss):
    ``check_finite`` has no effect, it is taken for the signature all the losses share.
    """
    k = _check_logits(logits)
    loss = _pairwise_margins(logits).sum(dim=(0, 2)).mean()
    return loss * (2.0 / (k * (k - 1))) if weighted else loss


def tuple_class_accuracy(logits: Tensor | DiscriminatorOutput) -> Tensor:
    """``[K]``: the fraction of each class's tuples that D assigns to their own class (the joint
    logits of a :class:`~gali_ext.head.DiscriminatorOutput`)."""
    if isinstance(logits, DiscriminatorOutput):
        logits = logits.joint
    k = _check_logits(logits)
    truth = torch.arange(k, device=logits.device).unsqueeze(1)
    return (logits.argmax(-1) == truth).float().mean(1)


class LogitsLoss(nn.Module):
    """The base of the loss modules on the discriminator's logits: a subclass names its loss
    function ``_fn(logits, weighted, *, check_finite)`` (one of this module's), and
    :meth:`forward` applies it to the logits or to each term of a
    :class:`~gali_ext.head.DiscriminatorOutput`.

    ``weights``: a ``[K, K]`` matrix of per-term weights (eqs. 3.13, 3.14), for the losses whose
    function takes them (:class:`DiscriminatorLoss`, :class:`ProductOfTermsLoss`); it replaces
    the ``2/T`` of ``weighted``. Kept as a buffer outside the state dict, so it moves with the
    module and checkpoints are those of a loss without it."""

    _fn = staticmethod(discriminator_loss)
    _own_class: bool | None = None  # True/False: the loss takes per-term weights (see forward)

    def __init__(self, weighted: bool = True, weights: Tensor | None = None) -> None:
        super().__init__()
        self.weighted = weighted
        if weights is not None:
            if self._own_class is None:
                raise ConfigError(
                    f"{type(self).__name__} takes no per-term weights: they weigh the "
                    "cross-entropy terms of DiscriminatorLoss and ProductOfTermsLoss"
                )
            weights = torch.as_tensor(weights)
            k = weights.shape[0] if weights.dim() else 0
            weights = check_term_weights(weights, k, type(self).__name__, self._own_class)
        self.register_buffer("weights", weights, persistent=False)

    def _apply_fn(self, logits: Tensor, check_finite: bool) -> Tensor:
        if self.weights is None:
            return type(self)._fn(logits, self.weighted, check_finite=check_finite)
        # the weights were checked at construction: no host sync for them here
        _check_logits(logits, type(self).__name__, check_finite)
        return _weighted_terms(_log_softmax32(logits), self.weights)

    def forward(self, logits: Tensor | DiscriminatorOutput, *, check_finite: bool = True) -> Tensor:
        """The loss of ``logits [K, B, K]``; of a :class:`~gali_ext.head.DiscriminatorOutput`,
        the joint term plus each unary term times its weight (docs/design.md, eq. 9.2).
        ``check_finite``: check each term's logits for NaN or inf first (the loss function's
        check, a host sync each); :class:`~gali_ext.GALI` passes ``False`` when the training
        step's device-side guard watches the losses instead."""
        if not isinstance(logits, DiscriminatorOutput):
            return self._apply_fn(logits, check_finite)
        total = self._apply_fn(logits.joint, check_finite)
        for weight, unary in logits.terms()[1:]:
            if weight != 0:
                total = total + weight * self._apply_fn(unary, check_finite)
        return total

    def extra_repr(self) -> str:
        if self.weights is not None:
            return f"weights={[[round(w, 6) for w in row] for row in self.weights.tolist()]}"
        return f"weighted={self.weighted}"


class DiscriminatorLoss(LogitsLoss):
    """D's loss, eq. 3 negated (see :func:`discriminator_loss`). ``logits: [K, B, K]``;
    ``weights``: a diagonal ``[K, K]`` matrix of per-class weights (eq. 3.13)."""

    _fn = staticmethod(discriminator_loss)
    _own_class = True


class ProductOfTermsLoss(LogitsLoss):
    """The generator-encoder's non-saturating product of terms, eq. 4
    (see :func:`product_of_terms_loss`). ``logits: [K, B, K]``; ``weights``: a ``[K, K]``
    matrix with a zero diagonal, the weight of each wrong-class term (eq. 3.14)."""

    _fn = staticmethod(product_of_terms_loss)
    _own_class = False


class MinimaxLoss(LogitsLoss):
    """The generator-encoder's saturating minimax loss, eq. 2 (see :func:`minimax_loss`)."""

    _fn = staticmethod(minimax_loss)


class MisclassificationLoss(LogitsLoss):
    """The generator-encoder's misclassification likelihood (see :func:`misclassification_loss`)."""

    _fn = staticmethod(misclassification_loss)


class HingeDiscriminatorLoss(LogitsLoss):
    """D's multi-class hinge, eq. 9.4 (see :func:`hinge_discriminator_loss`); BigBiGAN's hinge
    at K = 2. ``logits: [K, B, K]``."""

    _fn = staticmethod(hinge_discriminator_loss)


class HingeGeneratorLoss(LogitsLoss):
    """The generator-encoder loss of the hinge family, eq. 9.5 (see
    :func:`hinge_generator_loss`); BigBiGAN's ``y s`` at K = 2."""

    _fn = staticmethod(hinge_generator_loss)


DISCRIMINATOR_CRITERIA: dict[str, type[nn.Module]] = {
    "cross_entropy": DiscriminatorLoss,
    "hinge": HingeDiscriminatorLoss,
}
"""D's losses by name (the recipe setting ``discriminator_criterion``)."""

GENERATOR_CRITERIA: dict[str, type[nn.Module]] = {
    "product_of_terms": ProductOfTermsLoss,
    "minimax": MinimaxLoss,
    "misclassification": MisclassificationLoss,
    "hinge": HingeGeneratorLoss,
}
"""The generator-encoder losses by name (the recipe setting ``generator_criterion``)."""


def _build(
    registry: dict[str, type[nn.Module]],
    what: str,
    name: str,
    weighted: bool,
    weights: Tensor | None,
):
    cls = registry.get(name)
    if cls is None:
        raise ConfigError(f"unknown {what} criterion {name!r}; known: {', '.join(registry)}")
    if weights is None:
        return cls(weighted)
    if getattr(cls, "_own_class", None) is None:
        raise ConfigError(
            f"the {what} criterion {name!r} takes no per-term weights: they weigh the "
            "cross-entropy terms of cross_entropy (D) and product_of_terms (G and E)"
        )
    return cls(weighted, weights)


def build_discriminator_criterion(
    name: str, weighted: bool = True, weights: Tensor | None = None
) -> nn.Module:
    """D's loss ``name`` of :data:`DISCRIMINATOR_CRITERIA`; ``weights``: its per-class weights
    (a diagonal ``[K, K]`` matrix, eq. 3.13), for ``cross_entropy`` only."""
    return _build(DISCRIMINATOR_CRITERIA, "discriminator", name, weighted, weights)


def build_generator_criterion(
    name: str, weighted: bool = True, weights: Tensor | None = None
) -> nn.Module:
    """The generator-encoder loss ``name`` of :data:`GENERATOR_CRITERIA`; ``weights``: its
    per-term weights (``[K, K]``, zero diagonal, eq. 3.14), for ``product_of_terms`` only."""
    return _build(GENERATOR_CRITERIA, "generator", name, weighted, weights)


class AliceReconstructionLoss(nn.Module):
    """ALICE's explicit reconstruction penalty ``lambda * ||a - b||^2`` (docs/design.md, section 3).

    With ``a = x0, b = x1`` it is ALICE's pixel term; with pretrained features
    ``a = M(x0), b = M(x1)`` it is ALICE-PT's. The squared norm is averaged over all elements
    (a mean squared error), so lambda does not depend on the image size.
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ConfigError(f"expected a non-negative ALICE weight lambda, got {weight}")
        self.weight = weight

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape != b.shape:
            raise ShapeError(
                f"ALICE compares tensors of one shape, got {list(a.shape)} and {list(b.shape)}"
            )
        with _float32_region(a):
            return self.weight * (a.float() - b.float()).pow(2).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
