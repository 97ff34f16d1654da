"""The layers that turn features into K logits, and the logits D outputs (docs/design.md,
sections 4 and 9).

:class:`SpectralMLP` (the default joint network), :class:`Projection` (the projection term of a
per-sample condition, eq. 9.6), :class:`ClassScores` (K logits from features, with that term),
and :class:`DiscriminatorOutput`, the joint and unary logits of the head on the K tuple classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from .errors import ConfigError, ShapeError

__all__ = ["ClassScores", "DiscriminatorOutput", "Projection", "SpectralMLP"]


class SpectralMLP(nn.Sequential):
    """An MLP of spectrally normalised linear layers with leaky ReLUs (no batch norm, no dropout).

    ``[N, ...] -> [N, out_features]``; the input is flattened. With ``activate_output=True``
    the last layer is followed by a leaky ReLU too (a feature network rather than a classifier).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        negative_slope: float = 0.2,
        activate_output: bool = False,
    ) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        sizes = [in_features, *hidden, out_features]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(spectral_norm(nn.Linear(a, b)))
            if i < len(sizes) - 2 or activate_output:
                layers.append(nn.LeakyReLU(negative_slope))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def hidden(self, x: Tensor) -> Tensor:
        """The input of the last linear layer, ``[N, last hidden width]`` (the features a
        projection term reads); ``self[-1](self.hidden(x))`` is ``self(x)`` without an output
        activation."""
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


@dataclass
class DiscriminatorOutput:
    """What the head computes on one batch of the K tuple classes.

    Attributes:
        joint: ``[K, B, K]``; ``joint[i]`` are the joint logits on the B tuples of class i.
        unary: ``[U, K, B, K]`` or None; ``unary[u, i]`` are the logits of the unary head of
            slot ``unary_slots[u]`` on the tuples of class i, from that slot's features alone
            (docs/design.md, eq. 9.1).
        unary_slots: the slots that have a unary head.
        unary_weights: the weight of each unary term in the losses (eq. 9.2).

    Every loss of :mod:`gali_ext.losses` takes it: the joint term plus the weighted unary terms,
    each computed by the same per-logits loss.
    """

    joint: Tensor
    unary: Tensor | None = None
    unary_slots: tuple[int, ...] = ()
    unary_weights: tuple[float, ...] = ()

    def terms(self) -> list[tuple[float, Tensor]]:
        """``[(1, joint), (w_u, unary[u]), ...]``: each ``[K, B, K]`` logits with its weight."""
        terms = [(1.0, self.joint)]
        if self.unary is not None:
            terms += list(zip(self.unary_weights, self.unary.unbind(0)))
        return terms

    def detach(self) -> DiscriminatorOutput:
        """The same logits, detached from the graph."""
        unary = None if self.unary is None else self.unary.detach()
        return DiscriminatorOutput(self.joint.detach(), unary, self.unary_slots, self.unary_weights)


def _check_condition(condition: Tensor, rows: int, conditions: int) -> None:
    if not isinstance(condition, Tensor):
        raise ShapeError(f"expected the condition to be a tensor, got {type(condition).__name__}")
    if condition.shape[:1] != (rows,):
        raise ShapeError(
            f"the condition has shape {list(condition.shape)}, expected [{rows}] class ids or "
            f"[{rows}, {conditions}] float vectors (one per tuple)"
        )
    if condition.is_floating_point():
        if condition.dim() != 2 or condition.shape[1] != conditions:
            raise ShapeError(
                f"a float condition must be [N, {conditions}] (conditions={conditions}), got "
                f"{list(condition.shape)}"
            )
    elif condition.dim() != 1 or condition.dtype in (torch.bool, torch.uint8):
        raise ShapeError(
            f"a class-id condition must be a long tensor [N] of ids in [0, {conditions}), got "
            f"{condition.dtype} {list(condition.shape)}"
        )


class Projection(nn.Module):
    """The projection term of a condition on features, for K logits (Miyato & Koyama 2018).

    ``p_k(h, y) = <V(y)_k, h>`` with ``V(y) = reshape(W^T y, [K, d])`` (docs/design.md,
    eq. 9.6): for class ids ``y`` (long ``[N]``) the row ``W[y]`` of an embedding table, for a
    float condition ``y: [N, n]`` the product ``y W``; a one-hot ``y`` gives the same value
    both ways. ``W: [n, K d]`` is spectrally normalised. At K = 2 the score difference
    ``p_0 - p_1 = <V_0(y) - V_1(y), h>`` is the projection discriminator's term.

    Shapes: ``h: [N, d]``, ``y: [N]`` or ``[N, n]`` -> ``[N, K]``.
    """

    def __init__(self, in_features: int, num_classes: int, conditions: int) -> None:
        super().__init__()
        if isinstance(conditions, bool) or not isinstance(conditions, int) or conditions < 1:
            raise ConfigError(
                f"conditions must be a positive int (the number of class ids, or the width of a "
                f"float condition), got {conditions!r}"
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.conditions = conditions
        embedding = nn.Embedding(conditions, num_classes * in_features)
        nn.init.normal_(embedding.weight, 0.0, 0.02)
        self.embedding = spectral_norm(embedding)

    def forward(self, h: Tensor, condition: Tensor) -> Tensor:
        _check_condition(condition, h.shape[0], self.conditions)
        if condition.is_floating_point():
            rows = condition.to(h.dtype) @ self.embedding.weight
        else:
            rows = self.embedding(condition)
        v = rows.view(h.shape[0], self.num_classes, self.in_features)
        return torch.einsum("nkd,nd->nk", v, h)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, K={self.num_classes}, conditions={self.conditions}"


class ClassScores(nn.Module):
    """K logits from features: ``l(h) = W h + b``, plus ``p(h, y)`` of :class:`Projection` when
    ``conditions`` is given (docs/design.md, eqs. 9.1 and 9.6). ``W`` is spectrally normalised.

    The head's default unary heads, and the K-way layer it puts on a user network that ends in
    one score. Shapes: ``h: [N, in_features]`` (``y: [N]`` or ``[N, n]``) -> ``[N, K]``.
    """

    def __init__(self, in_features: int, num_classes: int, conditions: int | None = None) -> None:
        super().__init__()
        self.linear = spectral_norm(nn.Linear(in_features, num_classes))
        self.projection = (
            Projection(in_features, num_classes, conditions) if conditions is not None else None
        )
        self.in_features = in_features
        self.out_features = num_classes

    def forward(self, h: Tensor, condition: Tensor | None = None) -> Tensor:
        logits = self.linear(h)
        if self.projection is not None:
            if condition is None:
                raise ConfigError("this layer projects a condition, but none was given")
            logits = logits + self.projection(h, condition)
        return logits
