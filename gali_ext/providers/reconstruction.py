"""Reconstructive feedback: tuple classes reaching along the chains (GALI-4, GALI-8, deeper)."""

from __future__ import annotations

from ..errors import ProviderError
from ..spec import TupleSpec, parse_node
from .base import FeedbackProvider

__all__ = ["ReconstructionChain"]


class ReconstructionChain(FeedbackProvider):
    """Lets tuple classes use reconstructions: ``x1 = G(E(x))``, ``z1 = E(G(E(x)))``,
    ``xp1 = G(E(G(z)))``, ... (paper, Fig. 1a; docs/design.md, section 1).

    Args:
        depth: the deepest chain index allowed (1 for GALI-4 and GALI-8, which use ``x1, z1,
            xp1, zp1``). ``None`` allows whatever depth the spec asks for; the chains compute
            only the nodes the spec uses, each once.
    """

    def __init__(self, depth: int | None = None) -> None:
        super().__init__()
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise ProviderError(f"ReconstructionChain depth must be an int >= 1, got {depth!r}")
        self.depth = depth
        self.chain_depth = depth if depth is not None else 10**9

    def check(self, spec: TupleSpec) -> None:
        deepest = max(parse_node(n).depth for n in spec.nodes)
        if self.depth is not None and deepest > self.depth:
            node = max(spec.nodes, key=lambda n: parse_node(n).depth)
            raise ProviderError(
                f"spec {spec.name!r} uses {node!r} at chain depth {deepest}, but "
                f"ReconstructionChain(depth={self.depth}) stops at {self.depth}"
            )

    def extra_repr(self) -> str:
        return f"depth={self.depth}"
