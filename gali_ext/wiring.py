"""How the head wires a user's networks (docs/design.md, section 9.5).

The contract of the adapters (:class:`NetworkAdapter`), the output widths read from a network's
layers, the path each joint or unary network takes and the layer the head adds on it, the unary
heads chosen per slot, and the registration of the head's layers in the user's discriminator.
:class:`~gali_ext.head.MultiClassJointDiscriminatorHead` calls these while it is built; its
forward pass (:mod:`gali_ext.head`) only reads what they decided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .errors import ConfigError, ShapeError, SpecError
from .logits import ClassScores, Projection
from .spec import IMAGE, LATENT

__all__ = [
    "ADDED_LAYERS",
    "OWN_SCORE",
    "LogitsPath",
    "NetworkAdapter",
    "added_layers",
    "check_joint_width",
    "discriminator_parts",
    "declared_width",
    "feature_width",
    "first_layer_width",
    "kinds_by_argument",
    "labelled_modules",
    "own_score_layer",
    "register_in",
    "slots_of",
    "slots_width",
    "unary_networks",
    "unary_term_weights",
    "user_networks",
    "user_path",
]

ADDED_LAYERS = "gali_head"
"""The name under which the head registers the layers it adds in the user's discriminator."""


class NetworkAdapter(nn.Module):
    """Base class of the adapters through which the head calls a user's network
    (:mod:`gali_ext.adapters`: ``FeatureNetwork``, ``JointNetwork``).

    The head calls ``adapter(inputs, condition)``: ``inputs`` is a list of tensors ``[N, ...]``
    (one for a feature network or a unary head, one per slot for a joint network) and
    ``condition`` the condition of the N rows (or None). It returns ``[N, ...]``, or a pair
    ``(output, features)`` where ``features: [N, feature_dim]`` are what a K-way layer or a
    projection term of the head reads.

    Attributes:
        takes_condition: whether the user's network receives the condition.
        out_features: the width of the output (``d`` of a feature network; K or 1 for a joint or
            unary head), or None when unknown.
        feature_dim: the width of the returned features, or None when it returns none.
        returns: for a joint or unary network, ``"logits"`` (K logits or one score) or
            ``"features"`` (``[N, feature_dim]``, on which the head adds a K-way layer).
        has_score: a feature network that also returns its own score (``(features, score)``,
            e.g. BigBiGAN's ``s_x`` with its projection term computed in ``forward``): the head
            makes it the unary head of every slot of its kind (docs/design.md, eq. 9.1).
    """

    takes_condition: bool = False
    out_features: int | None = None
    feature_dim: int | None = None
    returns: str = "logits"
    has_score: bool = False

    def bind(self, slot_kinds: Sequence[str]) -> None:
        """Called by the head when it is built, with the kind of each slot of the inputs it
        will pass (``spec.slot_kinds`` for a joint network); the default ignores it."""


def kinds_by_argument(slot_kinds: Sequence[str]) -> list[str]:
    """The kinds of a spec's slots in the order of a joint network's arguments with one
    argument per kind (``JointNetwork(J, inputs="by_kind")``): images, latents, then the other
    kinds in the order the slots first name them."""
    kinds = list(dict.fromkeys(slot_kinds))
    first = [k for k in (IMAGE, LATENT) if k in kinds]
    return first + [k for k in kinds if k not in (IMAGE, LATENT)]


def declared_width(net: Any) -> int | None:
    """A network's output width when it says it: ``out_features``, else its last linear or
    convolution layer's."""
    width = getattr(net, "out_features", None)
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    if isinstance(net, NetworkAdapter) or not isinstance(net, nn.Module):
        return None
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = m.out_channels
    return last


def feature_width(net: Any) -> int | None:
    """A feature network's output width: its ``out_features``; for an MLP (linear layers, no
    convolution), its last linear layer's; else unknown."""
    width = getattr(net, "out_features", None)
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    if isinstance(net, NetworkAdapter) or not isinstance(net, nn.Module):
        return None
    convolutions = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
    if any(isinstance(m, convolutions) for m in net.modules()):
        return None
    linears = [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def first_layer_width(module: Any) -> int | None:
    """The input width of a network's first linear or convolution layer (in registration
    order): ``in_features`` or ``in_channels``; None when it has none."""
    if not isinstance(module, nn.Module):
        return None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return None


OWN_SCORE = object()  # a unary path from the score a feature network returns itself


class LogitsPath:
    """How one set of K logits is made: the joint, or one slot's unary head."""

    def __init__(self, mode: str, slots: tuple[int, ...], what: str) -> None:
        self.mode = mode  # "mlp" | "default" | "logits" | "score" | "features" | "own"
        self.slots = slots
        self.what = what


def slots_width(head: Any, slots: Sequence[int], needed_by: str | None) -> int | None:
    """The flattened width of the given slots' features; None (or an error naming
    ``needed_by``) when a kind's width is unknown."""
    kinds = [head.spec.slot_kinds[s] for s in slots]
    unknown = [k for k in dict.fromkeys(kinds) if head.feature_dims[k] is None]
    if unknown:
        if needed_by is None:
            return None
        kind = unknown[0]
        raise SpecError(
            f"cannot tell the output width of the {kind!r} feature network, which "
            f"{needed_by} needs: give it an int attribute out_features or pass "
            f"feature_dims={{{kind!r}: d}}"
        )
    return sum(head.feature_dims[k] for k in kinds)  # type: ignore[misc]


def check_joint_width(head: Any, joint: Any, width: int | None) -> None:
    """A joint network written for one (image, latent) pair, given GALI-8's two, is refused
    here, naming the fix, rather than failing inside the user's first layer."""
    inputs = getattr(joint, "inputs", "concat") if isinstance(joint, NetworkAdapter) else "concat"
    if inputs not in ("concat", "by_kind"):
        return
    if isinstance(joint, NetworkAdapter):
        joint = getattr(joint, "module", joint)
    takes = first_layer_width(joint)
    if width is None or takes is None or width == takes or width % takes:
        return
    if inputs == "by_kind":  # only a first layer that reads one slot of each kind
        kinds = dict.fromkeys(head.spec.slot_kinds)
        if takes != sum(head.feature_dims[k] for k in kinds):
            return
    factor = width // takes
    raise ShapeError(
        f"the joint network's first layer takes {takes} features, but the tuples of spec "
        f"{head.spec.name!r} ({head.spec.arity} slots) give it {width}, {factor} times as "
        "many (GALI-8's tuples hold two image-latent pairs): widen it in place before "
        f"building its optimizer, gali_ext.adapters.widen_input(joint_module, {factor})"
    )


def user_path(
    head: Any, net: nn.Module, what: str, input_width: int | None
) -> tuple[str, nn.Module | None]:
    """The mode of a user network's path and the layer the head adds on it, if any."""
    k, conditions = head.spec.num_classes, head.conditions
    if not callable(net):
        raise ConfigError(f"the {what} must be callable, got {type(net).__name__}")
    adapter = isinstance(net, NetworkAdapter)
    own = net.feature_dim if adapter else None
    if adapter and net.returns == "features":
        if own is None:
            raise SpecError(f"the {what} returns features: give their width, feature_dim=d")
        return "features", ClassScores(own, k, conditions)
    width = declared_width(net)
    if width is not None and width not in (1, k):
        raise SpecError(
            f"the {what} outputs {width} values per tuple; expected K={k} logits or one "
            "score (for a network that ends in features, wrap it: gali_ext.adapters."
            "JointNetwork(net, returns='features', feature_dim=d); the head adds the "
            "K-way layer)"
        )
    features = own if own is not None else input_width
    if width == 1 and k > 2:
        if features is None:
            raise SpecError(
                f"the {what} ends in one score, and K={k} classes need {k} logits: the head "
                "adds a K-way layer on the network's features and its score, and needs the "
                "features' width: name the layer (adapters.JointNetwork(net, "
                "features='layer.name', feature_dim=d)) or give feature_dims"
            )
        return "score", ClassScores(features + 1, k, conditions)
    mode = "score" if width == 1 else "logits"
    if conditions is None:
        return mode, None
    if features is None:
        raise SpecError(
            f"conditions={conditions} adds a projection term on the features of the {what}, "
            "whose width is unknown: name its features (adapters.JointNetwork(net, "
            "features='layer.name', feature_dim=d)), give feature_dims, or let the network "
            "take the condition itself (condition='y') and drop conditions="
        )
    return mode, Projection(features, k, conditions)


def own_score_layer(head: Any, kind: str, what: str) -> nn.Module | None:
    """The layer the head adds on a feature network's own score: a K-way layer on its
    features and score for K > 2, a projection term with ``conditions`` at K = 2."""
    k, conditions = head.spec.num_classes, head.conditions
    if k == 2 and conditions is None:
        return None
    width = head.feature_dims[kind]
    if width is None:
        raise SpecError(
            f"the head adds a layer on the {what}, which reads its features, of unknown "
            f"width: give FeatureNetwork(..., out_features=d) or feature_dims={{{kind!r}: d}}"
        )
    if k == 2:
        return Projection(width, k, conditions)  # type: ignore[arg-type]
    return ClassScores(width + 1, k, conditions)


def unary_networks(head: Any, unary: Any) -> dict[int, nn.Module | bool | object]:
    """The unary path of each slot that has one: a network, True (the default layer) or
    :data:`OWN_SCORE` (the score its feature network returns)."""
    slot_kinds = head.spec.slot_kinds
    own = {
        s: OWN_SCORE
        for s, kind in enumerate(slot_kinds)
        if getattr(head.feature_nets[kind], "has_score", False)
    }
    chosen = _chosen_unary(head, unary)
    clash = sorted(set(own) & set(chosen))
    if clash:
        kind = slot_kinds[clash[0]]
        raise ConfigError(
            f"the {kind!r} feature network returns its own score (FeatureNetwork(score=...) "
            f"or features=...), which is the unary head of the {kind!r} slots: drop "
            f"unary[{kind!r}] (or the network's score)"
        )
    return dict(sorted({**chosen, **own}.items()))


def _chosen_unary(head: Any, unary: Any) -> dict[int, nn.Module | bool]:
    """The unary networks the ``unary`` argument asks for, by slot."""
    slot_kinds = head.spec.slot_kinds
    if unary is False or unary is None:
        return {}
    if unary is True:
        return {
            s: True
            for s, kind in enumerate(slot_kinds)
            if not getattr(head.feature_nets[kind], "has_score", False)
        }
    if not isinstance(unary, Mapping):
        raise ConfigError(
            "unary must be True, False, or a mapping from a kind or a slot index to a "
            f"network (or True for the default layer), got {type(unary).__name__}"
        )
    chosen: dict[int, nn.Module | bool] = {}
    for key, net in unary.items():
        slots = slots_of(head.spec, key, "unary")
        if net is False or net is None:
            continue
        if net is not True and not isinstance(net, nn.Module):
            raise ConfigError(
                f"unary[{key!r}] must be an nn.Module or True, got {type(net).__name__}"
            )
        for s in slots:
            chosen[s] = net
    return chosen


def slots_of(spec: Any, key: str | int, name: str) -> list[int]:
    """The slots a key of ``unary`` or ``unary_weights`` names: a slot index, or a kind."""
    slot_kinds = spec.slot_kinds
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(slot_kinds):
            raise ConfigError(
                f"{name}[{key}]: spec {spec.name!r} has slots 0..{len(slot_kinds) - 1}"
            )
        return [key]
    slots = [s for s, kind in enumerate(slot_kinds) if kind == key]
    if not slots:
        raise ConfigError(
            f"{name}[{key!r}]: expected a kind of spec {spec.name!r} "
            f"({', '.join(spec.kinds)}) or a slot index"
        )
    return slots


def unary_term_weights(head: Any, weights: float | Mapping[str | int, float]) -> tuple[float, ...]:
    """The weight of each unary path's loss term, in the order of ``head._unary``."""
    slots = [p.slots[0] for p in head._unary]
    if isinstance(weights, Mapping):
        per_slot = dict.fromkeys(slots, 1.0)
        for key, value in weights.items():
            for s in slots_of(head.spec, key, "unary_weights"):
                if s not in per_slot:
                    raise ConfigError(f"unary_weights[{key!r}]: slot {s} has no unary head")
                per_slot[s] = float(value)
        values = [per_slot[s] for s in slots]
    else:
        values = [float(weights)] * len(slots)
    if any(not (v >= 0) for v in values):
        raise ConfigError(f"unary weights must be >= 0, got {values}")
    return tuple(values)


def added_layers(head: Any) -> nn.ModuleDict:
    """The layers the head adds on the user's networks, by name (see
    :meth:`~gali_ext.head.MultiClassJointDiscriminatorHead.added_layers`)."""
    added = nn.ModuleDict()
    if head._joint.mode == "mlp":
        added["joint"] = head.joint
    if head.joint_scores is not None:
        added["joint_scores"] = head.joint_scores
    for path in head._unary:
        key = str(path.slots[0])
        if path.mode == "default":
            added[f"unary_{key}"] = head.unary_heads[key]
        if key in head.unary_scores:
            added[f"unary_scores_{key}"] = head.unary_scores[key]
    return added


def discriminator_parts(value: Any) -> list[nn.Module] | list[Tensor]:
    """What ``discriminator=`` names: the user's D module (``[d]``), the modules a larger model
    makes it of, or the parameters the project's D optimizer takes; anything else is refused."""
    if isinstance(value, nn.Module):
        return [value]
    items: list[Any] = []
    if not isinstance(value, (str, bytes, Mapping, Tensor)):
        try:
            items = list(value)
        except TypeError:
            items = []
    if items and all(isinstance(i, nn.Module) for i in items):
        return items
    if items and all(isinstance(i, Tensor) for i in items):
        return items
    raise ConfigError(
        "discriminator must be what your code optimises and saves as D: your discriminator "
        "nn.Module, a list of the modules that make it up in a larger model "
        "([model.img_discriminator, model.latent_discriminator, model.comb_discriminator]), or "
        f"the list of parameters your D optimizer takes (model.get_disc_params()); got "
        f"{type(value).__name__}" + (" (empty)" if not items and value is not None else "")
    )


def user_networks(head: Any) -> list[tuple[str, nn.Module]]:
    """The user's modules the head calls, each with what it is to the head (``"the 'image'
    feature network"``, ``"the joint network"``, ...): adapters unwrapped, the layers the head
    makes itself left out."""
    found: list[tuple[str, Any]] = [
        (f"the {kind!r} feature network", net) for kind, net in head.feature_nets.items()
    ]
    if head._joint.mode != "mlp":
        found.append(("the joint network", head.joint))
    for path in head._unary:
        key = str(path.slots[0])
        if path.mode not in ("default", "own") and key in head.unary_heads:
            found.append((f"the unary head of slot {key}", head.unary_heads[key]))
    networks: list[tuple[str, nn.Module]] = []
    for what, net in found:
        if isinstance(net, NetworkAdapter):
            candidates = [getattr(net, "module", None), getattr(net, "score", None)]
        else:
            candidates = [net]
        for module in candidates:
            if isinstance(module, NetworkAdapter):  # a score layer given as a FeatureNetwork
                module = getattr(module, "module", None)
            if isinstance(module, nn.Module) and all(m is not module for _, m in networks):
                networks.append((what, module))
    return networks


def _owned_modules(head: Any, parameters: list[Tensor]) -> list[nn.Module]:
    """The user networks of the head whose trainable parameters are all among ``parameters``
    (the outermost of nested ones)."""
    given = {id(p) for p in parameters}
    owned = []
    for _, module in user_networks(head):
        trainable = [p for p in module.parameters() if p.requires_grad]
        if trainable and all(id(p) in given for p in trainable):
            owned.append(module)
    return [m for m in owned if not any(o is not m and _holds(o, m) for o in owned)]


def _holds(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def register_in(head: Any, parts: list[nn.Module] | list[Tensor]) -> None:
    """Register the layers the head adds in the user's discriminator as the sub-module
    :data:`ADDED_LAYERS`, so that its ``state_dict()`` and ``parameters()`` hold them.

    ``parts`` (:func:`discriminator_parts`): one module, the D itself; several modules of a
    larger model; or the parameters of the project's D optimizer, whose modules are the head's
    networks that they hold entirely. With several modules, the layers go into the one holding
    the joint network (else the first), where both the project's D optimizer and the larger
    model's checkpoints see them."""
    if all(isinstance(p, nn.Module) for p in parts):
        modules: list[nn.Module] = list(parts)  # type: ignore[arg-type]
    else:
        modules = _owned_modules(head, parts)  # type: ignore[arg-type]
        if not modules:
            raise ConfigError(
                "discriminator=: none of the networks the head calls has its parameters among "
                "the ones given; pass the parameters your D optimizer takes, after any "
                "widen_input (model.get_disc_params()), or the D's modules"
            )
    joint = head.joint if head._joint.mode != "mlp" else None
    joint = getattr(joint, "module", joint) if isinstance(joint, NetworkAdapter) else joint
    holders = [m for m in modules if isinstance(joint, nn.Module) and _holds(m, joint)]
    discriminator = holders[0] if holders else modules[0]
    existing = getattr(discriminator, ADDED_LAYERS, None)
    if existing is not None and len(existing):
        raise ConfigError(
            f"{type(discriminator).__name__} already has a sub-module {ADDED_LAYERS!r}: a "
            "head is registered in it; build one head per discriminator (a new D for another "
            "preset)"
        )
    if any(m is head for module in modules for m in module.modules()):
        raise ConfigError("discriminator= is your own D module, not the head itself")
    discriminator.add_module(ADDED_LAYERS, added_layers(head))
    head.__dict__["_discriminator"] = discriminator
    head.__dict__["_discriminator_modules"] = modules


def labelled_modules(head: Any) -> list[tuple[str, nn.Module]]:
    """The modules of the user's D (``discriminator=``), each with a label for the names of its
    parameters: ``""`` for a single module; its class name (and what the head calls it as,
    when it calls it) when the D is made of several."""
    modules = head.__dict__.get("_discriminator_modules") or []
    if len(modules) == 1:
        return [("", modules[0])]
    names = [type(m).__name__ for m in modules]
    return [
        (name if names.count(name) == 1 else f"{name}[{i}]", m)
        for i, (name, m) in enumerate(zip(names, modules))
    ]
