"""The feedback-provider interface."""

from __future__ import annotations

from torch import Tensor, nn

from ..chains import Chains, NodeFunction
from ..spec import TupleSpec

__all__ = ["FeedbackProvider"]


class FeedbackProvider(nn.Module):
    """A source of feedback for the discriminator or the generator-encoder pair.

    A provider contributes some of:

    - node functions (``Mask1``, ``Mix1``, ``M``, ...) through :meth:`function_for`, so that tuple
      classes may name the variables it makes;
    - chain depth (:attr:`chain_depth`): how far along the real and prior chains tuple classes may
      reach (``x1``, ``zp1``, ...);
    - an extra loss term for the generator-encoder pair (:meth:`extra_loss`, e.g. ALICE's
      reconstruction penalty).

    Subclasses override what they provide; the defaults provide nothing.
    """

    chain_depth: int = 0
    requires: frozenset[str] = frozenset()
    """Node functions the provider's own loss term needs from other providers."""

    def function_for(self, name: str) -> NodeFunction | None:
        """The node function this provider computes for the function name ``name``, or None."""
        return None

    def check(self, spec: TupleSpec) -> None:
        """Raise :class:`~gali_ext.errors.ProviderError` when ``spec`` asks for more than this
        provider gives (called once, when the :class:`~gali_ext.GALI` objective is built)."""

    def extra_loss(self, chains: Chains) -> Tensor | None:
        """An extra term of the generator-encoder loss for this step, or None."""
        return None
