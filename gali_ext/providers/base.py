"""The feedback-provider interface (docs/design.md, section 2.3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor, nn

from ..chains import Chains, NodeFunction
from ..errors import ProviderError, ShapeError
from ..spec import (
    IMAGE,
    LATENT,
    Node,
    Signature,
    TupleSpec,
    declare_signatures,
    declared_name_covers,
    parse_node,
)

__all__ = ["FeedbackProvider", "resolve_node_functions"]

_CORE_FUNCTIONS = frozenset({"E", "G"})


class FeedbackProvider(nn.Module):
    """A source of feedback for the discriminator or the generator-encoder pair.

    A provider contributes some of:

    - node functions (``Mask1``, ``Rot``, ``M``, ...) through :meth:`function_for`, so that tuple
      classes may name the variables it makes; :attr:`signatures` declares what each takes and
      makes, and the node language reads the kinds from there;
    - chain depth (:attr:`chain_depth`): how far along the real and prior chains tuple classes may
      reach (``x1``, ``zp1``, ...);
    - an extra loss term for the generator-encoder pair (:meth:`extra_loss`, e.g. ALICE's
      reconstruction penalty).

    Subclasses override what they provide; the defaults provide nothing. A rotation of the
    real images, for the tuple class ``(Rot(x0), z0)``::

        class Rotate(FeedbackProvider):
            signatures = {"Rot": ("image", "image")}

            def function_for(self, name):
                if name == "Rot":
                    return lambda node, chains: torch.rot90(chains[node.arg.name], 1, (2, 3))
    """

    signatures: ClassVar[Mapping[str, tuple[str, str]]] = {}
    """The node functions this provider makes, function name -> (argument kind, output kind):
    ``("image", "image")``, ``("latent", "latent")``, ``("image", "M")`` for a new kind ``M``.
    ``"Mask<k>"`` declares a family (``Mask0``, ``Mask1``, ...). Read when the class is defined,
    so that specs made afterwards know the kinds (:func:`~gali_ext.spec.declare_signatures`). A
    function the provider makes without declaring it maps an image to a new kind named after it.
    """

    chain_depth: int = 0
    requires: frozenset[str] = frozenset()
    """Node functions the provider's own loss term needs from other providers."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "signatures" in cls.__dict__:
            declare_signatures(cls, cls.signatures)

    def function_for(self, name: str) -> NodeFunction | None:
        """The node function this provider computes for the function name ``name``, or None.

        It is called ``function(node, chains)`` with the parsed :class:`~gali_ext.spec.Node`
        (``node.fn``, ``node.arg``) and the step's :class:`~gali_ext.chains.Chains`: it reads its
        argument as ``chains[node.arg.name]`` (and any other node it needs, each computed once
        per step), draws randomness from ``chains.rng`` and keeps per-step state in
        ``chains.scratch``; it returns a tensor of the declared output kind.
        """
        return None

    def signature(self, name: str) -> Signature | None:
        """The kinds of the function ``name`` when this provider makes it: its declaration in
        :attr:`signatures`, else ``image -> name`` (a new kind); None when it does not make it."""
        if self.function_for(name) is None:
            return None
        for declared, kinds in type(self).signatures.items():
            if declared_name_covers(declared, name):
                return Signature(*kinds)
        return Signature(IMAGE, name)

    def check(self, spec: TupleSpec) -> None:
        """Raise :class:`~gali_ext.errors.ProviderError` when ``spec`` asks for more than this
        provider gives (called once, when the :class:`~gali_ext.GALI` objective is built)."""

    def extra_loss(self, chains: Chains) -> Tensor | None:
        """An extra term of the generator-encoder loss for this step, or None."""
        return None


def _expected_shape(kind: str, chains: Chains) -> tuple[int, ...] | None:
    """The shape of one variable of ``kind`` in this step: the images' (``x0``), the latents'
    (the objective's latent shape, or that of a latent already computed); None for a new kind
    or a latent shape not known yet."""
    if kind == IMAGE:
        return tuple(chains["x0"].shape[1:])
    if kind == LATENT:
        if chains.latent_shape is not None:
            return tuple(chains.latent_shape)
        for name in ("zp0", "z0"):
            if name in chains:
                return tuple(chains[name].shape[1:])
    return None


class _Checked:
    """A provider's node function with its output checked against its signature: one line
    naming the provider, the node and the fix when it returns something else than a tensor of
    the batch with the shape of its declared kind (shapes only: no host sync). A class rather
    than a closure, so that it pickles when the function does."""

    def __init__(self, function: NodeFunction, signature: Signature, who: str) -> None:
        self.function, self.signature, self.who = function, signature, who

    def __call__(self, node: Node, chains: Chains) -> Tensor:
        value = self.function(node, chains)
        signature, who = self.signature, self.who
        declared = f"{who} declares {node.fn}: {signature}"
        if not isinstance(value, Tensor):
            raise ShapeError(
                f"{who}'s function {node.fn} returned a {type(value).__name__} for node "
                f"{node.name!r}: expected a tensor ({declared})"
            )
        expected = _expected_shape(signature.output, chains)
        shape = tuple(value.shape)
        if shape[:1] != (chains.batch_size,) or (expected is not None and shape[1:] != expected):
            dims = ", ".join(map(str, (chains.batch_size, *expected))) if expected else None
            want = f"[{dims}]" if dims else f"[{chains.batch_size}, ...]"
            raise ShapeError(
                f"{who}'s function {node.fn} made node {node.name!r} of shape {list(shape)}, but "
                f"{declared}, and {_plural(signature.output)} here are {want}: return "
                f"{_plural(signature.output)} of that shape, or declare the kind it makes in "
                f"{who}.signatures"
            )
        return value


def _plural(kind: str) -> str:
    return {IMAGE: "images", LATENT: "latents"}.get(kind, f"{kind!r} variables")


def resolve_node_functions(
    spec: TupleSpec, providers: Sequence[FeedbackProvider]
) -> dict[str, NodeFunction]:
    """The node function of every function name the spec and the providers' loss terms use,
    each made by exactly one provider whose declared kinds are those the spec was parsed with;
    the spec's chain depth checked against theirs.

    Raises :class:`~gali_ext.errors.ProviderError` naming the node, the provider and the fix,
    so that a preset or an objective is refused when it is built, not at its first step. Each
    provider's own :meth:`FeedbackProvider.check` runs last. The functions returned check their
    outputs against the declared kinds at run time (:class:`~gali_ext.errors.ShapeError`).
    """
    for p in providers:
        if not isinstance(p, FeedbackProvider):
            raise ProviderError(f"expected a FeedbackProvider, got {type(p).__name__}")
    wanted = set(spec.functions - _CORE_FUNCTIONS)
    for p in providers:
        wanted |= p.requires
    functions: dict[str, NodeFunction] = {}
    for name in sorted(wanted):
        users = [n for n in spec.nodes if name in parse_node(n).functions]
        where = f"the spec's node {users[0]!r}" if users else "a provider's loss term"
        makers = [p for p in providers if p.function_for(name) is not None]
        if not makers:
            have = ", ".join(type(p).__name__ for p in providers) or "none"
            raise ProviderError(
                f"{where} needs the function {name!r}, which no feedback provider makes "
                f"(providers: {have}); e.g. MaskMix makes Mask<k>/Mix<k>, "
                "PretrainedFeatures makes M"
            )
        if len(makers) > 1:
            raise ProviderError(
                f"{where} needs the function {name!r}, which several providers make: "
                f"{', '.join(type(p).__name__ for p in makers)}; keep one of them in the "
                "providers, or rename the function of the others"
            )
        maker = makers[0]
        who = type(maker).__name__
        made = maker.signature(name)
        parsed = spec.signatures.get(name)
        if parsed is not None and made != parsed:
            raise ProviderError(
                f"{where} was parsed with {name}: {parsed}, but {who} makes {name}: {made}: "
                f"declare it on the class ({who}.signatures = {{{name!r}: "
                f"({made.argument!r}, {made.output!r})}}) and make the spec after the class is "
                "defined"
            )
        functions[name] = _Checked(maker.function_for(name), made, who)
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
