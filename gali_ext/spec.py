"""Tuple classes and tuple specs: what GALI's discriminator classifies (docs/design.md, section 1).

A *chain node* is named by a small expression language:

- chain atoms: ``x0`` (the data), ``z{i} = E(x{i})``, ``x{i+1} = G(z{i})`` (the real chain) and
  ``zp0`` (a prior sample), ``xp{i} = G(zp{i})``, ``zp{i+1} = E(xp{i})`` (the prior chain);
- calls ``F(node)``: ``E`` (image -> latent), ``G`` (latent -> image), ``Mask{k}`` and ``Mix{k}``
  (image -> image, the inpainting self-supervision of section 5), and any other name, such as
  ``M``, for the features of a frozen pretrained model of an image (a variable of the extra
  kind ``"M"``).

Names are canonicalised, so ``"G(E(x0))"`` and ``"x1"`` are the same node and the chains compute
it once. A :class:`TupleClass` is an ordered tuple of nodes; a :class:`TupleSpec` is K tuple classes
of equal arity m whose slots agree in kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .errors import SpecError

__all__ = [
    "IMAGE",
    "LATENT",
    "Node",
    "parse_node",
    "TupleClass",
    "TupleSpec",
]

IMAGE = "image"
LATENT = "latent"

_ATOM = re.compile(r"(xp|zp|x|z)(\d+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_MASK_FN = re.compile(r"(Mask|Mix)(\d+)")
_ATOM_KIND = {"x": IMAGE, "z": LATENT, "xp": IMAGE, "zp": LATENT}


@dataclass(frozen=True)
class Node:
    """A parsed chain node: an atom (``fn is None``) or ``fn(arg)``.

    ``name`` is the canonical spelling; ``kind`` is ``"image"``, ``"latent"`` or an extra kind
    (the name of the feature function, e.g. ``"M"``).
    """

    name: str
    kind: str
    fn: str | None = None
    arg: Node | None = None

    @property
    def atom(self) -> Node:
        """The chain atom this node is computed from (``x0`` for ``E(Mask1(x0))``)."""
        return self if self.arg is None else self.arg.atom

    @property
    def depth(self) -> int:
        """The chain index of the atom (1 for ``x1``, ``zp1`` and ``M(x1)``)."""
        return int(self.atom.name.lstrip("xzp"))

    @property
    def root(self) -> str:
        """The start of this node's chain: ``"x0"`` for the real chain (``x{i}``, ``z{i}`` and
        what is computed from them), ``"zp0"`` for the prior chain. A conditional step gives
        every node the condition of its root (docs/design.md, section 9.3)."""
        return "zp0" if self.atom.name.startswith(("xp", "zp")) else "x0"

    @property
    def functions(self) -> frozenset[str]:
        """Every function name applied anywhere inside this node."""
        if self.fn is None:
            return frozenset()
        assert self.arg is not None
        return self.arg.functions | {self.fn}


def _atom(prefix: str, index: int) -> Node:
    return Node(f"{prefix}{index}", _ATOM_KIND[prefix])


def _apply(fn: str, arg: Node, original: str) -> Node:
    """``fn(arg)`` with its kind checked, folded back onto a chain atom where it is one."""
    if fn in ("E", "G"):
        expected = IMAGE if fn == "E" else LATENT
        if arg.kind != expected:
            raise SpecError(
                f"node {original!r}: {fn} takes an {expected} node, got {arg.name!r} "
                f"of kind {arg.kind!r}"
            )
        match = _ATOM.fullmatch(arg.name)
        if match is not None:
            prefix, index = match.group(1), int(match.group(2))
            if fn == "E" and prefix == "x":
                return _atom("z", index)
            if fn == "G" and prefix == "z":
                return _atom("x", index + 1)
            if fn == "G" and prefix == "zp":
                return _atom("xp", index)
            if fn == "E" and prefix == "xp":
                return _atom("zp", index + 1)
        return Node(f"{fn}({arg.name})", LATENT if fn == "E" else IMAGE, fn, arg)
    if arg.kind != IMAGE:
        raise SpecError(
            f"node {original!r}: {fn} takes an image node, got {arg.name!r} of kind {arg.kind!r}"
        )
    kind = IMAGE if _MASK_FN.fullmatch(fn) else fn
    if kind in (IMAGE, LATENT) and not _MASK_FN.fullmatch(fn):
        raise SpecError(f"node {original!r}: {fn!r} is a reserved kind name, not a function")
    return Node(f"{fn}({arg.name})", kind, fn, arg)


def parse_node(name: str) -> Node:
    """Parse and canonicalise a chain-node name such as ``"x0"``, ``"E(Mask1(x0))"``, ``"M(x1)"``.

    Raises :class:`SpecError` naming the node when it is not in the language or a function gets
    an argument of the wrong kind (``E(z0)``).
    """
    if not isinstance(name, str):
        raise SpecError(f"a node name must be a string, got {type(name).__name__}: {name!r}")
    return _parse_node(name)


@lru_cache(maxsize=4096)
def _parse_node(name: str) -> Node:
    text = name.replace(" ", "")
    calls: list[str] = []
    # Peel "F(" prefixes and matching ")" suffixes; what is left must be a chain atom.
    while True:
        match = _IDENT.match(text)
        if match is None or match.end() >= len(text) or text[match.end()] != "(":
            break
        if not text.endswith(")"):
            raise SpecError(f"unknown node name {name!r}: unbalanced parentheses")
        calls.append(match.group(0))
        text = text[match.end() + 1 : -1]
    atom = _ATOM.fullmatch(text)
    if atom is None:
        raise SpecError(
            f"unknown node name {name!r}: expected a chain atom x<i>, z<i>, xp<i>, zp<i> "
            "or a call F(node) such as E(x0), G(zp0), Mask1(x0), Mix1(x0), M(x0)"
        )
    node = _atom(atom.group(1), int(atom.group(2)))
    for fn in reversed(calls):
        node = _apply(fn, node, name)
    return node


@dataclass(frozen=True, init=False)
class TupleClass:
    """One class of tuples the discriminator sees: an ordered tuple of chain nodes.

    ``TupleClass(("x0", "z1"))`` is the class ``(x, E(G(E(x))))`` of GALI-4. Node names are
    canonicalised on construction.
    """

    nodes: tuple[str, ...]

    def __init__(self, nodes: Iterable[str]) -> None:
        if isinstance(nodes, str) or not isinstance(nodes, Iterable):
            raise SpecError(f"a tuple class is a sequence of node names, got {nodes!r}")
        names = tuple(parse_node(n).name for n in nodes)
        if not names:
            raise SpecError("a tuple class needs at least one node")
        object.__setattr__(self, "nodes", names)

    @property
    def arity(self) -> int:
        """m, the number of variables in a tuple of this class."""
        return len(self.nodes)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The variable kind of each slot."""
        return tuple(parse_node(n).kind for n in self.nodes)

    def __repr__(self) -> str:
        return f"TupleClass(({', '.join(self.nodes)}))"


@dataclass(frozen=True, init=False)
class TupleSpec:
    """K tuple classes of equal arity m whose slots agree in kind (docs/design.md, section 1).

    The discriminator classifies a tuple into one of the K classes; ``logits[i]`` are its logits
    on tuples of class ``classes[i]``.
    """

    classes: tuple[TupleClass, ...]
    name: str

    def __init__(self, classes: Iterable[TupleClass | Sequence[str]], name: str = "custom") -> None:
        if isinstance(classes, str) or not isinstance(classes, Iterable):
            raise SpecError(f"a tuple spec is a sequence of tuple classes, got {classes!r}")
        built = tuple(c if isinstance(c, TupleClass) else TupleClass(c) for c in classes)
        if len(built) < 2:
            raise SpecError(f"a tuple spec needs K >= 2 classes, got K={len(built)}")
        arities = {c.arity for c in built}
        if len(arities) != 1:
            detail = ", ".join(f"class {i} {c} has m={c.arity}" for i, c in enumerate(built))
            raise SpecError(f"all tuple classes must have the same arity m: {detail}")
        first = built[0].kinds
        for i, c in enumerate(built[1:], start=1):
            for slot, (a, b) in enumerate(zip(first, c.kinds)):
                if a != b:
                    raise SpecError(
                        f"slot {slot} holds a {a!r} in class 0 {built[0]} but a {b!r} in "
                        f"class {i} {c}: every class must have the same kind in each slot"
                    )
        seen: dict[TupleClass, int] = {}
        for i, c in enumerate(built):
            if c in seen:
                raise SpecError(f"duplicate tuple class {c}: classes {seen[c]} and {i}")
            seen[c] = i
        object.__setattr__(self, "classes", built)
        object.__setattr__(self, "name", name)

    @property
    def num_classes(self) -> int:
        """K."""
        return len(self.classes)

    @property
    def arity(self) -> int:
        """m."""
        return self.classes[0].arity

    @property
    def slot_kinds(self) -> tuple[str, ...]:
        """The variable kind of each of the m slots."""
        return self.classes[0].kinds

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every distinct node the spec uses, in order of first appearance."""
        return tuple(dict.fromkeys(n for c in self.classes for n in c.nodes))

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every distinct variable kind, in slot order."""
        return tuple(dict.fromkeys(self.slot_kinds))

    def nodes_of_kind(self, kind: str) -> tuple[str, ...]:
        """The distinct nodes of one kind, in order of first appearance."""
        return tuple(n for n in self.nodes if parse_node(n).kind == kind)

    @property
    def functions(self) -> frozenset[str]:
        """Every function name used by the spec's nodes (``E``, ``G``, ``Mask1``, ``M``, ...)."""
        return frozenset().union(*(parse_node(n).functions for n in self.nodes))

    def __repr__(self) -> str:
        body = ", ".join(repr(c) for c in self.classes)
        return f"TupleSpec(name={self.name!r}, K={self.num_classes}, m={self.arity}, [{body}])"
