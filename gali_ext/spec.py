"""Tuple classes and tuple specs: what GALI's discriminator classifies (docs/design.md, section 1).

A *chain node* is named by a small expression language:

- chain atoms: ``x0`` (the data), ``z{i} = E(x{i})``, ``x{i+1} = G(z{i})`` (the real chain) and
  ``zp0`` (a prior sample), ``xp{i} = G(zp{i})``, ``zp{i+1} = E(xp{i})`` (the prior chain);
- calls ``F(node)``: ``E`` (image -> latent), ``G`` (latent -> image), and the node functions
  of the feedback providers, whose kinds the providers declare (:class:`Signature`):
  ``Mask{k}`` and ``Mix{k}`` map an image to an image (MaskMix, the inpainting
  self-supervision of section 5), a user's ``Rot`` may map an image to an image or a
  ``Perturb`` a latent to a latent. A name no provider class declares, such as ``M`` (the
  features of a frozen pretrained model), maps an image to a variable of a new kind named after
  it (``"M"``).

Names are canonicalised, so ``"G(E(x0))"`` and ``"x1"`` are the same node and the chains compute
it once. A :class:`TupleClass` is an ordered tuple of nodes; a :class:`TupleSpec` is K tuple classes
of equal arity m whose slots agree in kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from .errors import ProviderError, SpecError

__all__ = [
    "IMAGE",
    "LATENT",
    "Node",
    "Signature",
    "declare_signatures",
    "declared_name_covers",
    "function_signature",
    "parse_node",
    "TupleClass",
    "TupleSpec",
]

IMAGE = "image"
LATENT = "latent"

_ATOM = re.compile(r"(xp|zp|x|z)(\d+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_ATOM_KIND = {"x": IMAGE, "z": LATENT, "xp": IMAGE, "zp": LATENT}
_CORE = {"E": (IMAGE, LATENT), "G": (LATENT, IMAGE)}
_INDEX = "<k>"  # in a declared name, any index: "Mask<k>" declares Mask0, Mask1, ...


class Signature(NamedTuple):
    """The kinds a node function takes and makes (docs/design.md, section 1.3):
    ``Signature("image", "image")`` for a rotation of an image, ``("latent", "latent")`` for a
    perturbed code, ``("image", "M")`` for the features ``M`` of an image (a new kind)."""

    argument: str
    output: str

    def __str__(self) -> str:
        return f"{self.argument} -> {self.output}"


@dataclass(frozen=True)
class _Declaration:
    signature: Signature
    owner: str  # the declaring class, for messages: "Rotate (module my_presets)"
    key: str  # its module and qualified name: a class defined again replaces its declarations


_EXACT: dict[str, _Declaration] = {}
_FAMILIES: dict[str, tuple[re.Pattern[str], _Declaration]] = {}  # "Mask<k>" -> its names


def _family(name: str) -> re.Pattern[str]:
    head, _, tail = name.partition(_INDEX)
    return re.compile(re.escape(head) + r"\d+" + re.escape(tail))


def declared_name_covers(declared: str, name: str) -> bool:
    """Whether the declared function name ``declared`` (a name, or a family such as
    ``"Mask<k>"``) covers the function ``name`` (``Mask1`` for ``"Mask<k>"``)."""
    return declared == name or (
        _INDEX in declared and _family(declared).fullmatch(name) is not None
    )


def _declaration(name: str) -> _Declaration | None:
    """Who declared the function ``name`` (a name or a family ``Mask<k>``), or None."""
    found = _EXACT.get(name)
    if found is None:
        found = next((d for regex, d in _FAMILIES.values() if regex.fullmatch(name)), None)
    return found


def _check_kind(kind: object, what: str) -> str:
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ProviderError(
            f"{what}: a kind is a name such as 'image', 'latent' or 'M', got {kind!r}"
        )
    return kind


def declare_signatures(owner: type, signatures: Mapping[str, Signature | tuple[str, str]]) -> None:
    """Add ``owner``'s node functions to the node language: name -> (argument kind, output
    kind). A name may stand for a family, ``"Mask<k>"`` declaring ``Mask0``, ``Mask1``, ...

    :class:`~gali_ext.providers.FeedbackProvider` calls it for every subclass with its
    ``signatures``, when the class is defined; specs parsed afterwards read the kinds from here.
    One name has one meaning: a name another class declares with other kinds raises
    :class:`~gali_ext.errors.ProviderError` naming both (the same class defined again, as a
    notebook does, replaces its own declarations).
    """
    who = f"{owner.__qualname__} (module {owner.__module__})"
    key = f"{owner.__module__}.{owner.__qualname__}"
    if not isinstance(signatures, Mapping):
        raise ProviderError(
            f"{who}: signatures must map each function name to (argument kind, output kind), "
            f"e.g. {{'Rot': ('image', 'image')}}, got {type(signatures).__name__}"
        )
    for name, kinds in signatures.items():
        what = f"{who} declares {name!r}"
        bare = name.replace(_INDEX, "0", 1) if isinstance(name, str) else name
        if not isinstance(name, str) or not bare.isidentifier() or _INDEX in bare:
            raise ProviderError(
                f"{what}: a function name is an identifier such as 'Rot', or a family with one "
                f"index such as 'Mask{_INDEX}'"
            )
        if bare in _CORE or name in (IMAGE, LATENT):
            raise ProviderError(f"{what}: E, G, 'image' and 'latent' are the node language's own")
        if not isinstance(kinds, (tuple, list)) or len(kinds) != 2:
            raise ProviderError(
                f"{what}: expected (argument kind, output kind), e.g. ('image', 'image'), "
                f"got {kinds!r}"
            )
        signature = Signature(_check_kind(kinds[0], what), _check_kind(kinds[1], what))
        declaration = _Declaration(signature, who, key)
        family = _INDEX in name
        clashes = [_EXACT.get(name)] if not family else [_FAMILIES.get(name, (None, None))[1]]
        if family:
            regex = _family(name)
            clashes += [d for n, d in _EXACT.items() if regex.fullmatch(n)]
        else:
            clashes += [d for regex, d in _FAMILIES.values() if regex.fullmatch(name)]
        for other in clashes:
            if other is not None and other.key != key and other.signature != signature:
                raise ProviderError(
                    f"{what} as {signature}, but {other.owner} declares it {other.signature}: "
                    "one function name has one meaning in the node language; rename one of them"
                )
        if family:
            _FAMILIES[name] = (_family(name), declaration)
        else:
            _EXACT[name] = declaration
    _parse_node.cache_clear()


def function_signature(name: str) -> Signature:
    """The kinds of the node function ``name``: ``E`` and ``G``, a provider's declaration
    (:func:`declare_signatures`), else ``image -> name``, a new kind named after the function."""
    if name in _CORE:
        return Signature(*_CORE[name])
    found = _declaration(name)
    return found.signature if found is not None else Signature(IMAGE, name)


def _undeclared_hint(*names: str) -> str:
    """For a kind clash: the functions of ``names`` that no provider class declares, and how to
    declare one (their kind is their own name until then)."""
    undeclared = sorted(
        f
        for n in names
        for f in parse_node(n).functions
        if f not in _CORE and _declaration(f) is None and parse_node(n).kind == f
    )
    if not undeclared:
        return ""
    fn = undeclared[0]
    return (
        f" ({fn!r} is a new kind because no provider class declares the function {fn}: "
        f"declare its kinds on the provider, e.g. signatures = {{{fn!r}: ('image', 'image')}}, "
        "before the spec is made)"
    )


def _article(kind: str) -> str:
    return {IMAGE: "an image", LATENT: "a latent"}.get(kind, f"a {kind!r}")


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
                f"node {original!r}: {fn} takes {_article(expected)} node, got {arg.name!r} "
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
    if fn in (IMAGE, LATENT):
        raise SpecError(f"node {original!r}: {fn!r} is a reserved kind name, not a function")
    declared = _declaration(fn)
    signature = function_signature(fn)
    if arg.kind != signature.argument:
        who = (
            f"as {declared.owner} declares it"
            if declared is not None
            else "as every function no provider class declares (a new kind)"
        )
        raise SpecError(
            f"node {original!r}: {fn} takes {_article(signature.argument)} node ({who}), got "
            f"{arg.name!r} of kind {arg.kind!r}"
        )
    return Node(f"{fn}({arg.name})", signature.output, fn, arg)


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
    kinds: tuple[str, ...] = field(compare=False, repr=False)
    """The variable kind of each slot, as the node language gave them when the class was made."""

    def __init__(self, nodes: Iterable[str]) -> None:
        if isinstance(nodes, str) or not isinstance(nodes, Iterable):
            raise SpecError(f"a tuple class is a sequence of node names, got {nodes!r}")
        parsed = [parse_node(n) for n in nodes]
        if not parsed:
            raise SpecError("a tuple class needs at least one node")
        object.__setattr__(self, "nodes", tuple(n.name for n in parsed))
        object.__setattr__(self, "kinds", tuple(n.kind for n in parsed))

    @property
    def arity(self) -> int:
        """m, the number of variables in a tuple of this class."""
        return len(self.nodes)

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
    signatures: dict[str, Signature] = field(compare=False, repr=False)
    """The kinds of every node function the spec calls other than E and G, as the providers
    declared them when the spec was made (:func:`function_signature`); the objective checks
    its providers against them."""

    def __init__(self, classes: Iterable[TupleClass | Sequence[str]], name: str = "custom") -> None:
        if isinstance(classes, str) or not isinstance(classes, Iterable):
            raise SpecError(f"a tuple spec is a sequence of tuple classes, got {classes!r}")
        # a TupleClass made earlier is parsed again: kinds are those declared now
        built = tuple(TupleClass(c.nodes if isinstance(c, TupleClass) else c) for c in classes)
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
                        f"slot {slot} holds {_article(a)} in class 0 {built[0]} but "
                        f"{_article(b)} in class {i} {c}: every class must have the same kind "
                        "in each slot" + _undeclared_hint(built[0].nodes[slot], c.nodes[slot])
                    )
        seen: dict[TupleClass, int] = {}
        for i, c in enumerate(built):
            if c in seen:
                raise SpecError(f"duplicate tuple class {c}: classes {seen[c]} and {i}")
            seen[c] = i
        object.__setattr__(self, "classes", built)
        object.__setattr__(self, "name", name)
        kinds = {n: k for c in built for n, k in zip(c.nodes, c.kinds)}
        object.__setattr__(self, "_kinds", kinds)
        used = frozenset().union(*(parse_node(n).functions for n in kinds)) - set(_CORE)
        object.__setattr__(self, "signatures", {f: function_signature(f) for f in sorted(used)})

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
        return tuple(n for n in self.nodes if self._kinds[n] == kind)

    @property
    def functions(self) -> frozenset[str]:
        """Every function name used by the spec's nodes (``E``, ``G``, ``Mask1``, ``M``, ...)."""
        return frozenset().union(*(parse_node(n).functions for n in self.nodes))

    def __repr__(self) -> str:
        body = ", ".join(repr(c) for c in self.classes)
        return f"TupleSpec(name={self.name!r}, K={self.num_classes}, m={self.arity}, [{body}])"
