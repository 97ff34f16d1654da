"""The feedback-provider interface."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..chains import Chains, NodeFunction
from ..errors import ProviderError
from ..spec import TupleSpec, parse_node

__all__ = ["FeedbackProvider", "resolve_node_functions"]

_CORE_FUNCTIONS = frozenset({"E", "G"})


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


def resolve_node_functions(
    spec: TupleSpec, providers: Sequence[FeedbackProvider]
) -> dict[str, NodeFunction]:
    """The node function of every function name the spec and the providers' loss terms use,
    each made by exactly one provider; the spec's chain depth checked against theirs.

    Raises :class:`~gali_ext.errors.ProviderError` naming the node and the provider that would
    make it, so that a preset or an objective is refused when it is built, not at its first
    step. Each provider's own :meth:`FeedbackProvider.check` runs last.
    """
    for p in providers:
        if not isinstance(p, FeedbackProvider):
            raise ProviderError(f"expected a FeedbackProvider, got {type(p).__name__}")
    wanted = set(spec.functions - _CORE_FUNCTIONS)
    for p in providers:
        wanted |= p.requires
    functions: dict[str, NodeFunction] = {}
    for name in sorted(wanted):
        makers = [p for p in providers if p.function_for(name) is not None]
        if not makers:
            users = [n for n in spec.nodes if name in parse_node(n).functions]
            where = f"the spec's node {users[0]!r}" if users else "a provider's loss term"
            have = ", ".join(type(p).__name__ for p in providers) or "none"
            raise ProviderError(
                f"{where} needs the function {name!r}, which no feedback provider makes "
                f"(providers: {have}); e.g. MaskMix makes Mask<k>/Mix<k>, "
                "PretrainedFeatures makes M"
            )
        if len(makers) > 1:
            raise ProviderError(
                f"the function {name!r} is made by several providers: "
                f"{', '.join(type(p).__name__ for p in makers)}"
            )
        functions[name] = makers[0].function_for(name)
    allowed = max((p.chain_depth for p in providers), default=0)
    for name in spec.nodes:
        node = parse_node(name)
        if node.depth > allowed:
            raise ProviderError(
                f"the spec's node {name!r} is on the reconstruction chain (depth "
                f"{node.depth}); add providers.ReconstructionChain() to the providers"
                + ("" if allowed == 0 else f" with depth >= {node.depth}")
            )
    for p in providers:
        p.check(spec)
    return functions
