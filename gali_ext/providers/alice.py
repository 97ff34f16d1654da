"""The ALICE baselines as providers: explicit reconstruction penalties on the generator-encoder."""

from __future__ import annotations

from torch import Tensor

from ..chains import Chains
from ..losses import AliceReconstructionLoss
from .base import FeedbackProvider

__all__ = ["AliceReconstruction"]


class AliceReconstruction(FeedbackProvider):
    """ALICE's ``lambda * ||x0 - x1||^2`` (``features=None``) or ALICE-PT's
    ``lambda * ||M(x0) - M(x1)||^2`` (``features="M"``, which needs a
    :class:`PretrainedFeatures` provider) added to the generator-encoder loss (docs/design.md,
    sections 2 and 3, eq. (3.11)).

    ``x1 = G(E(x0))`` comes from the step's chains, so it is shared with any tuple class using it.

    Args:
        weight: lambda, the penalty's weight (>= 0). This default is the one the ``alice`` and
            ``alice_pt`` presets use (their ``weight`` option, read from here).
        features: the node function whose outputs are compared (``"M"``), or None for pixels.
    """

    def __init__(self, weight: float = 1.0, features: str | None = None) -> None:
        super().__init__()
        self.loss = AliceReconstructionLoss(weight)
        self.features = features
        self.requires = frozenset() if features is None else frozenset({features})

    def extra_loss(self, chains: Chains) -> Tensor:
        if self.features is None:
            return self.loss(chains["x0"], chains["x1"])
        return self.loss(chains[f"{self.features}(x0)"], chains[f"{self.features}(x1)"])

    def extra_repr(self) -> str:
        return f"weight={self.loss.weight}, features={self.features!r}"
