"""The multi-class joint discriminator of GALI (docs/design.md, sections 4 and 9).

One feature network per variable kind (``Dx`` for images, ``Dz`` for latents, one per extra kind
such as pretrained features ``M``) and a joint network over the slot features of an m-tuple that
outputs K logits, one per tuple class. Optionally (section 9): per-slot *unary* heads, K logits
from one slot's features alone (BigBiGAN's ``s_x`` and ``s_z``), and a *projection* term of a
per-sample condition (Miyato & Koyama 2018) on every logit layer the head makes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from .errors import ConfigError, GaliError, ProviderError, ShapeError, SpecError
from .spec import IMAGE, LATENT, TupleSpec, parse_node

__all__ = [
    "ClassScores",
    "DiscriminatorOutput",
    "MultiClassJointDiscriminatorHead",
    "NetworkAdapter",
    "Projection",
    "SpectralMLP",
    "add_instance_noise",
    "batch_dependent_layers",
]

FEATURE_PASSES = ("fused", "per_node")


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


def add_instance_noise(
    variables: Mapping[str, Tensor],
    spec: TupleSpec,
    std: float | Tensor,
    rng: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Every image node of the spec plus Gaussian noise of standard deviation ``std``.

    One draw per distinct image node, so the fused and the per-class discriminator see the same
    noisy images (docs/design.md, section 4). Other variables are passed through.

    ``std`` is a float (no noise is drawn when it is 0; a negative, NaN or infinite one raises
    :class:`~gali_ext.errors.ConfigError`) or a 0-dim tensor on the images' device, read when
    the step runs: noise is then always drawn and scaled by it, so that a step captured in a
    CUDA graph (:class:`gali_ext.capture.CapturedStep`) follows a std that changes from step to
    step without a host sync.
    """
    if not isinstance(std, Tensor) and (not math.isfinite(float(std)) or std < 0):
        raise ConfigError(f"expected an instance-noise std >= 0 (finite), got {float(std)}")
    noisy = dict(variables)
    if isinstance(std, Tensor) or std > 0:
        for name in spec.nodes_of_kind(IMAGE):
            image = noisy[name]
            noise = torch.randn(image.shape, generator=rng, device=image.device, dtype=image.dtype)
            noisy[name] = image + std * noise
    return noisy


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
    """

    takes_condition: bool = False
    out_features: int | None = None
    feature_dim: int | None = None
    returns: str = "logits"


def batch_dependent_layers(module: Any) -> list[str]:
    """Names of the sub-modules of ``module`` whose output for one row depends on the other rows
    of the batch in training mode: batch norm of any dimension (``SyncBatchNorm`` included)."""
    if not isinstance(module, nn.Module):
        return []
    batch_norm = nn.modules.batchnorm._BatchNorm
    return [
        f"{name or type(module).__name__}: {type(m).__name__}"
        for name, m in module.named_modules()
        if isinstance(m, batch_norm)
    ]


def _declared_width(net: Any) -> int | None:
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


def _feature_width(net: Any) -> int | None:
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


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)[:4]}"
    return f"a {type(value).__name__}"


class _Path:
    """How one set of K logits is made: the joint, or one slot's unary head."""

    def __init__(self, mode: str, slots: tuple[int, ...], what: str) -> None:
        self.mode = mode  # "mlp" | "default" | "logits" | "score"
        self.slots = slots
        self.what = what


class MultiClassJointDiscriminatorHead(nn.Module):
    """GALI's discriminator ``D``: K logits for each m-tuple of a :class:`TupleSpec`.

    ``D_i(t) = softmax(joint(F_kind(t_1), ..., F_kind(t_m)))_i``, trained with the
    discriminator loss of eq. 3 (or the hinge of section 9.2), where ``F_kind`` is the feature
    network of the kind of each slot. The forward pass is fused: in one call ``Dx`` runs once
    over the concatenation of every distinct image node of the spec, ``Dz`` once over every
    distinct latent, each extra feature network once, and the joint network once over all
    ``K * B`` tuples.

    Args:
        spec: the tuple classes to tell apart.
        image_features: ``Dx``, ``[N, C, H, W] -> [N, d_x]`` (or ``[N, d_x, 1, 1]``; flattened).
        latent_features: ``Dz``, ``[N, *latent_shape] -> [N, d_z]``.
        extra_features: a feature network per extra kind (e.g. ``{"M": mlp}``).
        feature_dims: the output width of each kind's network; when omitted, a network's
            ``out_features`` attribute, or for an MLP (linear layers only) its last layer's.
        joint_hidden: widths of the default joint MLP's hidden layers (ALI's ``D(x, z)``:
            1024, 1024).
        joint: a user-made joint network instead: called on the concatenated slot features
            ``[N, sum of widths]`` (a :class:`NetworkAdapter`, e.g. ``adapters.JointNetwork``,
            for other conventions), returning K logits, or one score ``s``: at K = 2 the logits
            are ``(s, 0)`` (so ``s = l_0 - l_1``, eq. 9.3); for K > 2 the head adds a K-way
            :class:`ClassScores` layer on the features and the score.
        unary: unary heads (docs/design.md, section 9.1): ``True`` gives every slot a
            :class:`ClassScores` layer on its kind's features; a mapping from a kind
            (``"image"``) or a slot index to a network (``[N, d] -> K logits or one score``,
            shared by every slot of that kind) or ``True`` gives only those slots one.
        unary_weights: the weight of the unary terms in the losses: one float, or a mapping
            from kind or slot index to a float (default 1, BigBiGAN's sum).
        conditions: with a per-sample condition (class ids in ``[0, conditions)``, or float
            vectors of width ``conditions``), every logit layer the head makes gets a
            :class:`Projection` term (section 9.3): on the default joint's last hidden layer,
            on each unary head's slot features, on the features a user network returns.
        feature_pass: ``"fused"`` (default): each feature network runs once over every
            distinct node of its kind together; ``"per_node"``: once per distinct node, on that
            node's batch alone, and the joint once per class, so that batch-dependent layers
            (batch norm) see the batches a BiGAN loop gives them. Batch norm found in a network
            in fused mode is warned about.
        negative_slope: the default networks' leaky ReLU slope.
    """

    def __init__(
        self,
        spec: TupleSpec,
        image_features: nn.Module | None = None,
        latent_features: nn.Module | None = None,
        extra_features: Mapping[str, nn.Module] | None = None,
        *,
        feature_dims: Mapping[str, int] | None = None,
        joint_hidden: Sequence[int] = (1024, 1024),
        joint: nn.Module | None = None,
        negative_slope: float = 0.2,
        unary: bool | Mapping[str | int, nn.Module | bool] = False,
        unary_weights: float | Mapping[str | int, float] = 1.0,
        conditions: int | None = None,
        feature_pass: str = "fused",
    ) -> None:
        super().__init__()
        if not isinstance(spec, TupleSpec):
            raise SpecError(f"expected a TupleSpec, got {type(spec).__name__}")
        if feature_pass not in FEATURE_PASSES:
            raise ConfigError(
                f"feature_pass must be one of {', '.join(map(repr, FEATURE_PASSES))}, got "
                f"{feature_pass!r}"
            )
        if conditions is not None and (
            isinstance(conditions, bool) or not isinstance(conditions, int) or conditions < 1
        ):
            raise ConfigError(
                "conditions must be None or a positive int (the number of classes of the "
                f"condition, or the width of a float condition), got {conditions!r}"
            )
        self.spec = spec
        self.feature_pass = feature_pass
        self.conditions = conditions
        nets: dict[str, nn.Module] = dict(extra_features or {})
        for kind, net in ((IMAGE, image_features), (LATENT, latent_features)):
            if net is not None:
                nets[kind] = net
        missing = [k for k in spec.kinds if k not in nets]
        if missing:
            names = {IMAGE: "image_features", LATENT: "latent_features"}
            wanted = ", ".join(names.get(k, f"extra_features[{k!r}]") for k in missing)
            raise SpecError(
                f"spec {spec.name!r} has slots of kind {missing} but no feature network was "
                f"given for them: pass {wanted}"
            )
        dims = dict(feature_dims or {})
        for kind in spec.kinds:
            if kind not in dims:
                dims[kind] = _feature_width(nets[kind])
        self.feature_nets = nn.ModuleDict({k: nets[k] for k in spec.kinds})
        self.feature_dims: dict[str, int | None] = {k: dims[k] for k in spec.kinds}
        k = spec.num_classes
        m = spec.arity

        # The joint path.
        if joint is None:
            joint_in = self._width(range(m), "the default joint MLP")
            self.joint = SpectralMLP(joint_in, joint_hidden, k, negative_slope)
            hidden = joint_hidden[-1] if joint_hidden else joint_in
            self.joint_scores = Projection(hidden, k, conditions) if conditions else None
            self._joint = _Path("mlp", tuple(range(m)), "joint MLP")
        else:
            self.joint = joint
            mode, self.joint_scores = self._user_layers(
                joint, "joint network", self._width(range(m), None)
            )
            self._joint = _Path(mode, tuple(range(m)), "joint network")

        # The unary paths.
        self.unary_heads = nn.ModuleDict()
        self.unary_scores = nn.ModuleDict()
        self._unary: list[_Path] = []
        for slot, net in self._unary_networks(unary).items():
            what = f"unary head of slot {slot} ({spec.slot_kinds[slot]!r})"
            if net is True:
                d = self._width([slot], f"the {what}")
                self.unary_heads[str(slot)] = ClassScores(d, k, conditions)
                self._unary.append(_Path("default", (slot,), what))
            else:
                self.unary_heads[str(slot)] = net
                mode, extra = self._user_layers(net, what, self._width([slot], None))
                if extra is not None:
                    self.unary_scores[str(slot)] = extra
                self._unary.append(_Path(mode, (slot,), what))
        self.unary_weights = self._weights(unary_weights)

        self._class_roots = [
            roots.pop() if len(roots := {parse_node(n).root for n in c.nodes}) == 1 else None
            for c in spec.classes
        ]
        self._check_conditioning()
        if feature_pass == "fused":
            self._warn_batch_norm()

    # -- construction helpers ---------------------------------------------------------------

    def _width(self, slots: Sequence[int], needed_by: str | None) -> int | None:
        """The flattened width of the given slots' features; None (or an error naming
        ``needed_by``) when a kind's width is unknown."""
        kinds = [self.spec.slot_kinds[s] for s in slots]
        unknown = [k for k in dict.fromkeys(kinds) if self.feature_dims[k] is None]
        if unknown:
            if needed_by is None:
                return None
            kind = unknown[0]
            raise SpecError(
                f"cannot tell the output width of the {kind!r} feature network, which "
                f"{needed_by} needs: give it an int attribute out_features or pass "
                f"feature_dims={{{kind!r}: d}}"
            )
        return sum(self.feature_dims[k] for k in kinds)  # type: ignore[misc]

    def _user_layers(
        self, net: nn.Module, what: str, input_width: int | None
    ) -> tuple[str, nn.Module | None]:
        """The mode of a user network's path and the layer the head adds on it, if any."""
        k, conditions = self.spec.num_classes, self.conditions
        if not callable(net):
            raise ConfigError(f"the {what} must be callable, got {type(net).__name__}")
        adapter = isinstance(net, NetworkAdapter)
        own = net.feature_dim if adapter else None
        if adapter and net.returns == "features":
            if own is None:
                raise SpecError(f"the {what} returns features: give their width, feature_dim=d")
            return "features", ClassScores(own, k, conditions)
        width = _declared_width(net)
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

    def _unary_networks(self, unary: Any) -> dict[int, nn.Module | bool]:
        slot_kinds = self.spec.slot_kinds
        if unary is False or unary is None:
            return {}
        if unary is True:
            return {s: True for s in range(len(slot_kinds))}
        if not isinstance(unary, Mapping):
            raise ConfigError(
                "unary must be True, False, or a mapping from a kind or a slot index to a "
                f"network (or True for the default layer), got {type(unary).__name__}"
            )
        chosen: dict[int, nn.Module | bool] = {}
        for key, net in unary.items():
            slots = self._slots_of(key, "unary")
            if net is False or net is None:
                continue
            if net is not True and not isinstance(net, nn.Module):
                raise ConfigError(
                    f"unary[{key!r}] must be an nn.Module or True, got {type(net).__name__}"
                )
            for s in slots:
                chosen[s] = net
        return dict(sorted(chosen.items()))

    def _slots_of(self, key: str | int, name: str) -> list[int]:
        slot_kinds = self.spec.slot_kinds
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < len(slot_kinds):
                raise ConfigError(
                    f"{name}[{key}]: spec {self.spec.name!r} has slots 0..{len(slot_kinds) - 1}"
                )
            return [key]
        slots = [s for s, kind in enumerate(slot_kinds) if kind == key]
        if not slots:
            raise ConfigError(
                f"{name}[{key!r}]: expected a kind of spec {self.spec.name!r} "
                f"({', '.join(self.spec.kinds)}) or a slot index"
            )
        return slots

    def _weights(self, weights: float | Mapping[str | int, float]) -> tuple[float, ...]:
        slots = [p.slots[0] for p in self._unary]
        if isinstance(weights, Mapping):
            per_slot = dict.fromkeys(slots, 1.0)
            for key, value in weights.items():
                for s in self._slots_of(key, "unary_weights"):
                    if s not in per_slot:
                        raise ConfigError(f"unary_weights[{key!r}]: slot {s} has no unary head")
                    per_slot[s] = float(value)
            values = [per_slot[s] for s in slots]
        else:
            values = [float(weights)] * len(slots)
        if any(not (v >= 0) for v in values):
            raise ConfigError(f"unary weights must be >= 0, got {values}")
        return tuple(values)

    def _takes_condition(self, net: Any) -> bool:
        return isinstance(net, NetworkAdapter) and net.takes_condition

    @property
    def conditional(self) -> bool:
        """Whether D reads a per-sample condition (``conditions=`` or a network taking it)."""
        nets = [*self.feature_nets.values(), self.joint, *self.unary_heads.values()]
        return self.conditions is not None or any(self._takes_condition(n) for n in nets)

    def _check_conditioning(self) -> None:
        if not self.conditional:
            return
        mixed = [i for i, root in enumerate(self._class_roots) if root is None]
        if mixed:
            c = self.spec.classes[mixed[0]]
            raise SpecError(
                f"class {mixed[0]} {c} mixes nodes of the real chain (from x0) and of the prior "
                "chain (from zp0), which carry different conditions: a conditional head needs "
                "each class within one chain"
            )

    def _warn_batch_norm(self) -> None:
        found = {f"the {k!r} feature network": batch_dependent_layers(n)
                 for k, n in self.feature_nets.items()}  # fmt: skip
        found["the joint network"] = batch_dependent_layers(self.joint)
        for slot, net in self.unary_heads.items():
            found[f"the unary head of slot {slot}"] = batch_dependent_layers(net)
        for what, layers in found.items():
            if layers:
                warnings.warn(
                    f"{what} has batch-dependent layers ({', '.join(layers[:3])}): the fused "
                    "pass runs it once over real, generated and reconstructed inputs together, "
                    "so their batch statistics mix. Pass feature_pass='per_node' to run each "
                    "node's batch on its own (and the joint once per class), as a BiGAN loop "
                    "does, or replace batch norm by spectral norm",
                    UserWarning,
                    stacklevel=3,
                )

    # -- forward -----------------------------------------------------------------------------

    def _check_variables(self, variables: Mapping[str, Tensor]) -> int:
        batch = None
        device = next(iter(self.parameters()), None)
        device = device.device if device is not None else None
        for i, tuple_class in enumerate(self.spec.classes):
            for name in tuple_class.nodes:
                value = variables.get(name)
                if value is None:
                    raise ProviderError(
                        f"variable {name!r}, needed by class {i} {tuple_class}, was not given"
                    )
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                    raise ShapeError(f"variable {name!r} must be a floating tensor, got {got}")
                if device is not None and value.device != device:
                    raise ShapeError(
                        f"variable {name!r} is on {value.device}, the discriminator head on "
                        f"{device}: expected every variable on {device}"
                    )
                if value.dim() == 0 or value.shape[0] == 0:
                    raise ShapeError(
                        f"variable {name!r} has shape {list(value.shape)}: expected a batch of "
                        "at least one [B, ...] tuple"
                    )
                if batch is None:
                    batch = value.shape[0]
                elif value.shape[0] != batch:
                    raise ShapeError(
                        f"variable {name!r} has batch size {value.shape[0]}, expected {batch}"
                    )
        assert batch is not None
        return batch

    def _check_conditions(
        self, conditions: Mapping[str, Tensor] | None, batch: int
    ) -> dict[str, Tensor] | None:
        if not self.conditional:
            if conditions is not None:
                raise ConfigError(
                    "a condition was given to an unconditional head: build it with "
                    "conditions=<number of classes> (or networks that take the condition)"
                )
            return None
        if conditions is None:
            raise ConfigError(
                "this head is conditional: pass conditions={'x0': y, 'zp0': y_prior}, the "
                "condition of the real and of the prior chain"
            )
        by_root = {parse_node(k).root: v for k, v in conditions.items()}
        for root in dict.fromkeys(self._class_roots):
            value = by_root.get(root)  # type: ignore[arg-type]
            if value is None:
                raise ConfigError(f"the condition of the chain from {root!r} was not given")
            if not isinstance(value, Tensor) or value.shape[:1] != (batch,):
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ShapeError(
                    f"the condition of the chain from {root!r} should have batch size {batch}, "
                    f"got {got}"
                )
        return by_root

    def _prepare(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor,
        rng: torch.Generator | None,
        conditions: Mapping[str, Tensor] | None,
    ) -> tuple[dict[str, Tensor], int, dict[str, Tensor] | None]:
        """Canonical names, checked tensors and conditions, instance noise; the batch size."""
        variables = {parse_node(k).name: v for k, v in variables.items()}
        batch = self._check_variables(variables)
        by_root = self._check_conditions(conditions, batch)
        noisy = add_instance_noise(variables, self.spec, instance_noise_std, rng)
        return noisy, batch, by_root

    def _call(self, net: Any, inputs: list[Tensor], condition: Tensor | None, what: str,
              joint: bool = False) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """A user network's output (and the features an adapter returns), failures re-raised
        as :class:`GaliError` naming the fix."""
        try:
            if isinstance(net, NetworkAdapter):
                out = net(inputs, condition)
            elif joint:
                out = net(torch.cat([t.flatten(1) for t in inputs], 1))
            else:
                out = net(inputs[0])
        except (GaliError, torch.cuda.OutOfMemoryError):
            raise
        except (TypeError, AttributeError, RuntimeError, ValueError, IndexError, KeyError) as error:
            adapter = "JointNetwork" if joint else "FeatureNetwork"
            if isinstance(error, TypeError):
                hint = (
                    f"if it takes other arguments (the condition: gali_ext.adapters.{adapter}"
                    "(net, condition='y')"
                    + (
                        ", or the slots separately: JointNetwork(net, inputs='separate')"
                        if joint
                        else ""
                    )  # fmt: skip
                    + "), wrap it"
                )
            else:
                hint = (
                    "check the input shape it expects"
                    + (
                        " (for [B, C, 1, 1] maps: JointNetwork(net, input_shape=(-1, 1, 1)))"
                        if joint
                        else ""
                    )  # fmt: skip
                )
            cls = ShapeError if isinstance(error, RuntimeError) else ConfigError
            raise cls(
                f"the {what} failed on input of shape {_shapes(inputs)}: "
                f"{type(error).__name__}: {error}; {hint}"
            ) from error
        features = None
        if isinstance(net, NetworkAdapter) and isinstance(out, tuple) and len(out) == 2:
            out, features = out
        if not isinstance(out, Tensor):
            adapter = "JointNetwork" if joint else "FeatureNetwork"
            raise ShapeError(
                f"the {what} returned {_describe(out)}, expected a tensor [N, ...]: select it "
                f"with gali_ext.adapters.{adapter}(net, output=0) (an index, a dict key, or a "
                "callable)"
            )
        return out, features

    def _node_features(
        self, kind: str, names: Sequence[str], variables: Mapping[str, Tensor],
        conditions: Mapping[str, Tensor] | None, batch: int,
    ) -> list[Tensor]:  # fmt: skip
        """The features of the given nodes of one kind, from one call of the kind's network."""
        shapes = {n: tuple(variables[n].shape[1:]) for n in names}
        if len(set(shapes.values())) > 1:
            detail = ", ".join(f"{n}: {list(v)}" for n, v in shapes.items())
            raise ShapeError(f"the {kind!r} variables must share one shape, got {detail}")
        stacked = torch.cat([variables[n] for n in names])
        condition = None
        if conditions is not None:
            condition = torch.cat([conditions[parse_node(n).root] for n in names])
        net = self.feature_nets[kind]
        what = f"{kind!r} feature network"
        features, _ = self._call(net, [stacked], condition, what)
        count = len(names) * batch
        width = self.feature_dims[kind]
        if (
            features.dim() < 1
            or features.shape[0] != count
            or (width is not None and features[0].numel() != width)
        ):
            expected = f"[{count}, {width}]" if width is not None else f"[{count}, ...]"
            raise ShapeError(f"the {what} should output {expected}, got {list(features.shape)}")
        return list(features.split(batch))

    def _logits(
        self, path: _Path, net: Any, extra: Any, inputs: list[Tensor], condition: Tensor | None
    ) -> Tensor:
        """K logits of one path (joint or unary) on ``N`` tuples: ``[N, K]``."""
        k = self.spec.num_classes
        rows = inputs[0].shape[0]
        if path.mode == "mlp":
            flat = torch.cat([t.flatten(1) for t in inputs], 1)
            if extra is None:
                logits = net(flat)
            else:  # the projection reads the last hidden layer
                h = net.hidden(flat)
                logits = net[-1](h) + extra(h, condition)
        elif path.mode == "default":
            logits = net(inputs[0].flatten(1), condition)
        else:
            out, features = self._call(net, inputs, condition, path.what, path is self._joint)
            if path.mode == "features":
                return self._checked(path, self._added(path, extra, out.flatten(1), condition),
                                     rows)  # fmt: skip
            out = out.flatten(1) if out.dim() > 1 else out.unsqueeze(1)
            if features is None:
                features = torch.cat([t.flatten(1) for t in inputs], 1)
            h = features.flatten(1)
            if out.shape[0] != rows or out.shape[1] not in (1, k):
                raise ShapeError(
                    f"the {path.what} should output [{rows}, {k}] logits or [{rows}, 1] scores, "
                    f"got {list(out.shape)}"
                )
            if out.shape[1] == 1 and k > 2:
                if path.mode != "score":
                    raise ShapeError(
                        f"the {path.what} returned one score per tuple, but K={k} classes need "
                        f"{k} logits and the head was not told: give it out_features=1 (e.g. "
                        "adapters.JointNetwork(net, out_features=1, features='layer.name', "
                        "feature_dim=d)) so that the head adds a K-way layer"
                    )
                logits = self._added(path, extra, torch.cat([h, out], 1), condition)
                return self._checked(path, logits, rows)
            if out.shape[1] == 1:  # K = 2: l = (s, 0), so that s = l_0 - l_1 (eq. 9.3)
                out = torch.cat([out, torch.zeros_like(out)], 1)
            logits = out if extra is None else out + self._added(path, extra, h, condition)
        return self._checked(path, logits, rows)

    def _added(self, path: _Path, layer: Any, h: Tensor, condition: Tensor | None) -> Tensor:
        """The logits of a layer the head adds on a user network (K-way layer or projection)."""
        if h.shape[1] != layer.in_features:
            raise ShapeError(
                f"the layer the head adds on the {path.what} reads features of width "
                f"{layer.in_features}, got {list(h.shape)}"
            )
        return layer(h, condition)

    def _checked(self, path: _Path, logits: Tensor, rows: int) -> Tensor:
        k = self.spec.num_classes
        if logits.shape != (rows, k):
            raise ShapeError(
                f"the {path.what} should output [{rows}, {k}] logits, got {list(logits.shape)}"
            )
        return logits

    def _paths(self) -> list[tuple[_Path, Any, Any]]:
        paths = [(self._joint, self.joint, self.joint_scores)]
        for p in self._unary:
            key = str(p.slots[0])
            paths.append((p, self.unary_heads[key], self.unary_scores[key]
                          if key in self.unary_scores else None))  # fmt: skip
        return paths

    def _run(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float,
        rng: torch.Generator | None,
        conditions: Mapping[str, Tensor] | None,
        mode: str,
    ) -> DiscriminatorOutput:
        variables, batch, by_root = self._prepare(variables, instance_noise_std, rng, conditions)
        spec, k = self.spec, self.spec.num_classes
        class_conditions = (
            [by_root[root] for root in self._class_roots] if by_root is not None else None
        )
        # slots[i][s]: the features of slot s of class i's B tuples
        slots: list[list[Tensor]] = []
        if mode == "per_class":
            for c in spec.classes:
                slots.append([
                    self._node_features(kind, [n], variables, by_root, batch)[0]
                    for n, kind in zip(c.nodes, c.kinds)
                ])  # fmt: skip
        else:
            features: dict[str, Tensor] = {}
            for kind in spec.kinds:
                names = spec.nodes_of_kind(kind)
                groups = [names] if mode == "fused" else [[n] for n in names]
                for group in groups:
                    parts = self._node_features(kind, group, variables, by_root, batch)
                    features.update(zip(group, parts))
            slots = [[features[n] for n in c.nodes] for c in spec.classes]
        results = []
        for path, net, extra in self._paths():
            if mode == "fused":
                inputs = [torch.cat([slots[i][s] for i in range(k)]) for s in path.slots]
                condition = torch.cat(class_conditions) if class_conditions else None
                logits = self._logits(path, net, extra, inputs, condition)
                results.append(logits.view(k, batch, k))
            else:
                results.append(torch.stack([
                    self._logits(path, net, extra, [slots[i][s] for s in path.slots],
                                 class_conditions[i] if class_conditions else None)
                    for i in range(k)
                ]))  # fmt: skip
        unary = torch.stack(results[1:]) if len(results) > 1 else None
        return DiscriminatorOutput(
            results[0], unary, tuple(p.slots[0] for p in self._unary), self.unary_weights
        )

    def forward(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        conditions: Mapping[str, Tensor] | None = None,
    ) -> DiscriminatorOutput:
        """D's logits on the K tuple classes: a :class:`DiscriminatorOutput` whose ``joint`` is
        ``[K, B, K]`` (``joint[i]``: the logits on the B tuples of class i) and, with unary
        heads, ``unary`` ``[U, K, B, K]``.

        ``variables`` maps every node of the spec (canonical names, as returned by
        ``Chains.compute(spec.nodes)``) to a ``[B, ...]`` tensor. ``instance_noise_std`` adds
        Gaussian noise to every distinct image node once (:func:`add_instance_noise`).
        ``conditions`` (a conditional head only): ``{"x0": y, "zp0": y_prior}``, the condition
        of the real chain's and of the prior chain's nodes (``Chains.conditions``).
        """
        return self._run(variables, instance_noise_std, rng, conditions, self.feature_pass)

    def forward_per_class(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        conditions: Mapping[str, Tensor] | None = None,
    ) -> DiscriminatorOutput:
        """The same logits as :meth:`forward`, computed as the authors' code does.

        The whole discriminator is called once per class and every feature is recomputed for
        every occurrence of a node. A test oracle and the benchmark's baseline; prefer
        :meth:`forward`. (In training mode spectral norm's power iteration runs once per call,
        so compare the two in eval mode.)
        """
        return self._run(variables, instance_noise_std, rng, conditions, "per_class")
