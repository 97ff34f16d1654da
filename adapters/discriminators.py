"""Discriminator adapters: call a user's discriminator networks the way they were written.

:class:`~gali_ext.MultiClassJointDiscriminatorHead` calls a feature network as ``net(x)`` and a
joint network on the concatenated slot features ``net([N, sum of widths])``, each returning a
tensor. These adapters (:class:`~gali_ext.head.NetworkAdapter` subclasses) bring other
conventions to that contract (docs/design.md, section 9.5):

- :class:`FeatureNetwork`: a feature network (or a unary score layer) that returns a tuple or a
  dict (``output=`` selects the tensor), or takes the condition (``condition=``);
- :class:`JointNetwork`: a joint network that takes the slots separately (``D(F, H)``), works on
  ``[B, C, 1, 1]`` maps (``input_shape=``), takes the condition, returns several outputs, ends in
  a separate score layer (BigBiGAN's ``theta_xz``, ``score=``), or ends in features on which
  the head adds the K-way layer (``returns="features"``);
- :func:`monolithic_head`: a head over a monolithic ``D(x, z)``, for specs of two slots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gali_ext.errors import ConfigError, ShapeError, SpecError
from gali_ext.head import MultiClassJointDiscriminatorHead, NetworkAdapter, declared_width
from gali_ext.spec import IMAGE, LATENT, TupleSpec
from gali_ext.wiring import kinds_by_argument

from .layers import find_layer, layer_width

__all__ = ["FeatureNetwork", "JointNetwork", "monolithic_head"]

OutputSelector = int | str | Callable[[Any], Tensor] | None


def _check_condition_arg(condition: Any) -> bool | str | None:
    if condition is None or condition is False:
        return None
    if condition is True or (isinstance(condition, str) and condition.isidentifier()):
        return condition
    raise ConfigError(
        "condition must be None (the network takes no condition), True (passed positionally "
        f"after the inputs) or the name of its keyword argument (e.g. 'y'), got {condition!r}"
    )


def _call_with_condition(
    module: Any, args: list[Tensor], condition: Tensor | None, how: bool | str | None, what: str
) -> Any:
    if how is None:
        return module(*args)
    if condition is None:
        raise ConfigError(
            f"the {what} takes the condition (condition={how!r}) but the step has none: pass "
            "batches (x, y)"
        )
    if how is True:
        return module(*args, condition)
    return module(*args, **{how: condition})


def _select(raw: Any, output: OutputSelector, what: str) -> Tensor:
    """The tensor ``output`` picks from a network's raw output."""
    if output is None:
        value = raw
    elif callable(output):
        value = output(raw)
    else:
        try:
            value = raw[output]
        except (IndexError, KeyError, TypeError) as error:
            keys = list(raw) if isinstance(raw, Mapping) else None
            have = (
                f"keys {keys}"
                if keys is not None
                else (
                    f"{len(raw)} elements" if isinstance(raw, (tuple, list)) else type(raw).__name__
                )
            )
            raise ConfigError(
                f"output={output!r} cannot be read from the {what}'s output ({have})"
            ) from error
    if not isinstance(value, Tensor):
        kind = type(value).__name__
        raise ShapeError(
            f"the {what} gave a {kind}, expected a tensor: select it with output= (an index "
            "for a tuple, a key for a dict, or a callable)"
        )
    return value


def _width(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class FeatureNetwork(NetworkAdapter):
    """A user's feature network (``Dx``, ``Dz``) or unary score layer, called as written.

    Args:
        module: the user's network, ``module(x)``.
        output: what to read from its output as the features: None (a tensor), an index (a
            tuple or list), a key (a dict) or a callable ``raw -> tensor``.
        score: what to read from the same output as the network's own score ``[N, 1]`` (an
            index, a key or a callable), for a network that returns ``(score, features)``
            with its score computed in ``forward`` (BigBiGAN's ``s_x = theta . F(x) +
            <embed(y), F(x)>``): the head makes that score the unary head of every slot of
            this kind, so the projection term inside ``forward`` keeps training (docs/design.md,
            eq. 9.1).
        features: for a network whose output is its score alone: the dotted name of the
            layer (as in ``named_modules()``) whose output is its features; the output is then
            the score (as ``score=``).
        condition: None: the network takes no condition; a name: it takes it as that keyword
            argument (``module(x, y=y)``); True: as the second positional argument.
        out_features: the width of the (flattened) features. When omitted: the named layer's
            (``features=``); the module's ``out_features`` attribute; for a selected output
            (``output=``), the input width of the network's last linear layer when that layer
            outputs one score (the features it scores), else unknown until the first batch;
            otherwise the module's last linear or convolution layer's.
        input_shape: how the network takes its input, without the batch dimension (``-1``
            allowed once): ``(256, 1, 1)`` for ALI's ``D(z)`` on ``[B, 256, 1, 1]`` latents.

    The head calls ``adapter([x], y)`` and gets ``[N, out_features]`` (``[N, C, 1, 1]`` maps are
    flattened by the head), or ``(score [N, 1], features)`` with ``score=`` or ``features=``.
    """

    def __init__(
        self,
        module: Callable[..., Any],
        *,
        output: OutputSelector = None,
        score: OutputSelector = None,
        features: str | None = None,
        condition: bool | str | None = None,
        out_features: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not callable(module):
            raise ConfigError(f"expected a callable network, got {type(module).__name__}")
        if score is not None and features is not None:
            raise ConfigError(
                "pass score= (the network returns its features and its score; output= picks "
                "the features) or features= (it returns its score; the named layer gives the "
                "features), not both"
            )
        if score is not None and output is None:
            raise ConfigError(
                "score= picks the score from the network's output; pick the features too, with "
                "output= (e.g. FeatureNetwork(net, output=1, score=0) for (score, features))"
            )
        self.module = module
        self.input_shape = (_shapes(input_shape) or [None])[0]
        self.output = output
        self.score = score
        self.feature_layer = features
        self._layer = find_layer(module, features, "the feature network") if features else None
        self.has_score = score is not None or features is not None
        self.condition = _check_condition_arg(condition)
        self.takes_condition = self.condition is not None
        self.out_features = _width(out_features, "out_features") or self._inferred_width()

    def _inferred_width(self) -> int | None:
        if self.feature_layer is not None:
            return layer_width(self.module, self.feature_layer)
        stated = getattr(self.module, "out_features", None)
        if self.output is None or (isinstance(stated, int) and not isinstance(stated, bool)):
            return declared_width(self.module)
        linears = [m for m in _modules(self.module) if isinstance(m, nn.Linear)]
        if linears and linears[-1].out_features == 1:  # a score layer: it reads the features
            return linears[-1].in_features
        return None

    def forward(
        self, inputs: Sequence[Tensor], condition: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        x = inputs[0]
        if self.input_shape is not None:
            x = _view(x, self.input_shape)
        if self._layer is None:
            raw = _call_with_condition(
                self.module, [x], condition, self.condition, "feature network"
            )
            features = _select(raw, self.output, "feature network")
            if self.score is None:
                return features
            return _select(raw, self.score, "feature network's score"), features

        def call() -> Any:
            return _call_with_condition(
                self.module, [x], condition, self.condition, "feature network"
            )

        raw, features = _hooked(self._layer, self.feature_layer, call)
        return _select(raw, self.output, "feature network"), features

    def extra_repr(self) -> str:
        parts = [f"out_features={self.out_features}"]
        if self.score is not None:
            parts.append(f"score={getattr(self.score, '__name__', self.score)!r}")
        if self.feature_layer is not None:
            parts.append(f"features={self.feature_layer!r}")
        if self.condition is not None:
            parts.append(f"condition={self.condition!r}")
        if self.output is not None:
            parts.append(f"output={getattr(self.output, '__name__', self.output)!r}")
        return ", ".join(parts)


class JointNetwork(NetworkAdapter):
    """A user's joint network, called as written, on the slot features of N tuples.

    Args:
        module: the user's network.
        inputs: ``"concat"``: one argument, the slot features concatenated along dim 1
            (``[N, C, 1, 1]`` maps stay maps when the slots are maps of one spatial size);
            ``"separate"``: one argument per slot, ``module(f_1, ..., f_m)`` (``J(F, H)``);
            ``"by_kind"``: one argument per kind, the features of that kind's slots
            concatenated in slot order: ``module(images, latents)``, the images' features
            first, then the latents', then any other kind's (``forward(self, img, latent)``
            that concatenates inside). GALI-8's ``(x0, z0, x1, z1)`` gives ``[F(x0), F(x1)]``
            and ``[H(z0), H(z1)]``, so a joint written for one pair works once widened
            (:func:`~gali_ext.adapters.widen_input`), whatever the arity.
        order: the slots in the order ``module`` takes them (default: the spec's); with
            ``inputs="by_kind"``, the kinds in the order it takes them (e.g.
            ``["latent", "image"]``).
        input_shape: how to view each argument, without the batch dimension (``-1`` allowed
            once): one shape for every argument (``(-1, 1, 1)``: ALI's 1x1-convolution joint on
            ``[B, C, 1, 1]`` maps), or a list with one shape (or None: as is) per argument.
        condition: None, True (positional, after the inputs) or a keyword name (as
            :class:`FeatureNetwork`).
        output: what to read from ``module``'s output (as :class:`FeatureNetwork`).
        out_features: the output width: K logits, or 1 for a single score; read from the
            module (or ``score``) when omitted.
        returns: ``"logits"`` (K logits or one score) or ``"features"`` (the head adds a
            K-way layer, with the projection term when the head has ``conditions``).
        features: a dotted sub-module name of ``module`` (as in ``named_modules()``) whose
            output the head reads as the tuples' features: for the K-way layer it puts on a
            network that ends in one score (K > 2), and for its projection term.
        feature_dim: the width of those features (or of the output, with
            ``returns="features"``); read from the named layer when it has ``out_features``.
        score: a score layer applied to ``module``'s output (BigBiGAN's ``theta_xz`` on
            ``J(F(x), H(z))``): the module's output becomes the features and the score layer's
            the output; a :class:`FeatureNetwork` when the score layer takes the condition.
    """

    def __init__(
        self,
        module: Callable[..., Any],
        *,
        inputs: str = "concat",
        order: Sequence[int] | Sequence[str] | None = None,
        input_shape: Sequence[int] | Sequence[Sequence[int] | None] | None = None,
        condition: bool | str | None = None,
        output: OutputSelector = None,
        out_features: int | None = None,
        returns: str = "logits",
        features: str | None = None,
        feature_dim: int | None = None,
        score: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not callable(module):
            raise ConfigError(f"expected a callable network, got {type(module).__name__}")
        if inputs not in ("concat", "separate", "by_kind"):
            raise ConfigError(f"inputs must be 'concat', 'separate' or 'by_kind', got {inputs!r}")
        if order is not None and (inputs == "by_kind") != all(isinstance(o, str) for o in order):
            expected = "kind names" if inputs == "by_kind" else "slot indices"
            raise ConfigError(f"order= lists {expected} with inputs={inputs!r}, got {order!r}")
        if returns not in ("logits", "features"):
            raise ConfigError(f"returns must be 'logits' or 'features', got {returns!r}")
        if features is not None and score is not None:
            raise ConfigError(
                "pass either features= (a layer inside the network) or score= (a score layer "
                "after it, whose input is the features), not both"
            )
        if returns == "features" and score is not None:
            raise ConfigError("returns='features' takes no score layer: the head adds it")
        self.module = module
        self.inputs = inputs
        self.order = tuple(order) if order is not None else None
        self.slot_kinds: tuple[str, ...] | None = None
        self.input_shape = _shapes(input_shape)
        self.condition = _check_condition_arg(condition)
        self.output = output
        self.returns = returns
        self.score = score
        self.feature_layer = features
        self._layer = find_layer(module, features, "the joint network") if features else None
        if score is not None:
            self.out_features = _width(out_features, "out_features") or declared_width(score)
            self.feature_dim = _width(feature_dim, "feature_dim") or declared_width(module)
        else:
            self.out_features = _width(out_features, "out_features") or (
                None if returns == "features" else declared_width(module)
            )
            named = layer_width(module, features) if features is not None else None
            self.feature_dim = _width(feature_dim, "feature_dim") or named
        score_takes = isinstance(score, NetworkAdapter) and score.takes_condition
        self.takes_condition = self.condition is not None or score_takes

    def bind(self, slot_kinds: Sequence[str]) -> None:
        """Keep the kind of each slot (the head calls it when it is built): ``"by_kind"``
        groups the slots by it."""
        self.slot_kinds = tuple(slot_kinds)

    def _by_kind(self, slots: list[Tensor]) -> list[Tensor]:
        kinds = self.slot_kinds
        if kinds is None or len(kinds) != len(slots):
            raise ConfigError(
                "JointNetwork(inputs='by_kind') groups the slots by kind, which the head tells it "
                "when it is built: give it to MultiClassJointDiscriminatorHead(joint=...), or "
                "call adapter.bind(spec.slot_kinds) to use it alone"
            )
        order = list(self.order) if self.order is not None else kinds_by_argument(kinds)
        if sorted(order) != sorted(set(kinds)):
            raise ConfigError(
                f"order={order} must list each kind of the tuples once: {sorted(set(kinds))}"
            )
        return [_concatenated([t for t, k in zip(slots, kinds) if k == kind]) for kind in order]

    def _arguments(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        slots = list(inputs)
        if self.inputs == "by_kind":
            arguments = self._by_kind(slots)
        else:
            if self.order is not None:
                if sorted(self.order) != list(range(len(slots))):
                    raise ConfigError(
                        f"order={list(self.order)} must list each of the {len(slots)} slots once"
                    )
                slots = [slots[i] for i in self.order]
            arguments = [_concatenated(slots)] if self.inputs == "concat" else slots
        shapes = self.input_shape
        if shapes is None:
            return arguments
        if len(shapes) == 1:
            shapes = shapes * len(arguments)
        if len(shapes) != len(arguments):
            raise ConfigError(
                f"input_shape lists {len(shapes)} shapes for the joint's {len(arguments)} arguments"
            )
        return [t if shape is None else _view(t, shape) for t, shape in zip(arguments, shapes)]

    def forward(
        self, inputs: Sequence[Tensor], condition: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        def call() -> Any:
            arguments = self._arguments(inputs)
            return _call_with_condition(
                self.module, arguments, condition, self.condition, "joint network"
            )

        if self._layer is not None:
            raw, features = _hooked(self._layer, self.feature_layer, call)
            return _select(raw, self.output, "joint network"), features
        out = _select(call(), self.output, "joint network")
        if self.score is not None:
            if isinstance(self.score, NetworkAdapter):
                score = self.score([out], condition)
            else:
                score = self.score(out)
            return score, out.flatten(1)
        return out

    def extra_repr(self) -> str:
        parts = [f"inputs={self.inputs!r}", f"out_features={self.out_features}"]
        if self.returns != "logits":
            parts.append(f"returns={self.returns!r}")
        if self.feature_layer is not None:
            parts.append(f"features={self.feature_layer!r}")
        if self.feature_dim is not None:
            parts.append(f"feature_dim={self.feature_dim}")
        if self.condition is not None:
            parts.append(f"condition={self.condition!r}")
        return ", ".join(parts)


def _concatenated(slots: list[Tensor]) -> Tensor:
    """The slots' features along dim 1: ``[N, C, 1, 1]`` maps of one spatial size stay maps
    (concatenated on the channel axis), anything else is flattened first."""
    same = len({tuple(t.shape[1:]) for t in slots}) == 1 or all(
        t.dim() > 2 and t.shape[2:] == slots[0].shape[2:] for t in slots
    )
    if same and slots[0].dim() > 2:
        return torch.cat(slots, 1)
    return torch.cat([t.flatten(1) for t in slots], 1)


def _modules(module: Any) -> list[nn.Module]:
    return list(module.modules()) if isinstance(module, nn.Module) else []


def _hooked(layer: nn.Module, name: str | None, call: Callable[[], Any]) -> tuple[Any, Tensor]:
    """``call()``'s result and the output of ``layer`` during it, ``[N, d]``."""
    seen: list[Any] = []
    handle = layer.register_forward_hook(lambda m, i, out: seen.append(out))
    try:
        raw = call()
    finally:
        handle.remove()
    if len(seen) != 1 or not isinstance(seen[0], Tensor):
        raise ConfigError(
            f"the feature layer {name!r} ran {len(seen)} times in one call of the network (or "
            "gave no tensor); name a layer that runs once"
        )
    return raw, seen[0].flatten(1)


def _view(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    try:
        return t.reshape(t.shape[0], *shape)
    except RuntimeError as error:
        raise ShapeError(
            f"input_shape {list(shape)}: an input of shape {list(t.shape)} cannot be viewed as "
            f"[{t.shape[0]}, {', '.join(map(str, shape))}]"
        ) from error


def _shapes(value: Any) -> list[tuple[int, ...] | None] | None:
    if value is None:
        return None
    items = list(value)
    if items and all(isinstance(d, int) and not isinstance(d, bool) for d in items):
        return [tuple(items)]
    shapes = []
    for item in items:
        if item is None:
            shapes.append(None)
        elif all(isinstance(d, int) and not isinstance(d, bool) for d in item):
            shapes.append(tuple(item))
        else:
            raise ConfigError(
                f"input_shape must be a shape such as (-1, 1, 1) or a list of shapes (or None) "
                f"per argument, got {value!r}"
            )
    return shapes


class _Inputs(nn.Identity):
    """The head's feature network for a monolithic D: the variable itself."""


def monolithic_head(
    spec: TupleSpec,
    discriminator: Callable[..., Any],
    *,
    condition: bool | str | None = None,
    output: OutputSelector = None,
    out_features: int | None = None,
    features: str | None = None,
    feature_dim: int | None = None,
    latent_shape: Sequence[int] | None = None,
    conditions: int | None = None,
    feature_pass: str = "auto",
) -> MultiClassJointDiscriminatorHead:
    """A head over a monolithic ``D(x, z)``, for a spec whose tuples have two slots, an image
    and a latent (``ali``, ``gali4``, ``alice`` or one of your own; any K).

    The head calls ``discriminator(x, z)`` once on all ``K * B`` pairs, or, for a D with batch
    norm, once per chain (``feature_pass="auto"``). A D that ends in one score ``s``
    gives the logits ``(s, 0)`` at K = 2 (BiGAN's loss exactly, docs/design.md eq. 9.3); for
    K > 2 name the layer whose output is its features (``features="joint.3"``): the head adds a
    K-way layer on those features and ``s``, so D's own layers all keep training. That layer is
    registered in ``discriminator`` (``discriminator.gali_head``), so that its own
    ``state_dict()`` and ``parameters()`` hold it.

    Args:
        spec: the tuple classes; two slots, one image and one latent.
        discriminator: the user's ``D(x, z)``.
        condition, output, out_features, features, feature_dim: as :class:`JointNetwork`.
        latent_shape: how ``D`` takes ``z`` (``(256, 1, 1)`` for ALI's maps); default: as the
            chains give it.
        conditions, feature_pass: as :class:`~gali_ext.MultiClassJointDiscriminatorHead`.

    A spec of more than two slots is refused: its tuples (GALI-8's ``(x0, z0, x1, z1)``) do not
    fit ``D(x, z)`` without dropping slots. Split D into feature networks and a joint network
    (``MultiClassJointDiscriminatorHead(spec, image_features=F, latent_features=H,
    joint=JointNetwork(J, inputs="separate"))``) to train it on such specs.
    """
    if not isinstance(spec, TupleSpec):
        raise SpecError(f"expected a TupleSpec, got {type(spec).__name__}")
    if spec.arity != 2 or set(spec.slot_kinds) != {IMAGE, LATENT}:
        raise SpecError(
            f"a monolithic D(x, z) reads one image and one latent per tuple, but spec "
            f"{spec.name!r} has {spec.arity} slots of kinds {list(spec.slot_kinds)}: it cannot "
            "be given the whole tuple without dropping slots. Use a spec of two slots "
            "(ali, gali4, alice, or your own), or split your D into an image network F, a "
            "latent network H and a joint J: MultiClassJointDiscriminatorHead(spec, "
            "image_features=F, latent_features=H, joint=JointNetwork(J, inputs='separate'))"
        )
    order = [spec.slot_kinds.index(IMAGE), spec.slot_kinds.index(LATENT)]
    shapes = None
    if latent_shape is not None:
        shapes = [None, tuple(latent_shape)]
    joint = JointNetwork(
        discriminator,
        inputs="separate",
        order=order,
        input_shape=shapes,
        condition=condition,
        output=output,
        out_features=out_features,
        features=features,
        feature_dim=feature_dim,
    )
    return MultiClassJointDiscriminatorHead(
        spec,
        _Inputs(),
        _Inputs(),
        joint=joint,
        conditions=conditions,
        feature_pass=feature_pass,
        discriminator=discriminator if isinstance(discriminator, nn.Module) else None,
    )
