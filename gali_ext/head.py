"""The multi-class joint discriminator of GALI (docs/design.md, sections 4 and 9).

One feature network per variable kind (``Dx`` for images, ``Dz`` for latents, one per extra kind
such as pretrained features ``M``) and a joint network over the slot features of an m-tuple that
outputs K logits, one per tuple class. Optionally (section 9): per-slot *unary* heads, K logits
from one slot's features alone (BigBiGAN's ``s_x`` and ``s_z``), and a *projection* term of a
per-sample condition (Miyato & Koyama 2018) on every logit layer the head makes.
"""

from __future__ import annotations

import inspect
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
    "declared_width",
    "first_layer_width",
]

FEATURE_PASSES = ("auto", "fused", "per_chain", "per_node")

ADDED_LAYERS = "gali_head"
"""The name under which the head registers the layers it adds in the user's discriminator."""


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
        has_score: a feature network that also returns its own score (``(features, score)``,
            e.g. BigBiGAN's ``s_x`` with its projection term computed in ``forward``): the head
            makes it the unary head of every slot of its kind (docs/design.md, eq. 9.1).
    """

    takes_condition: bool = False
    out_features: int | None = None
    feature_dim: int | None = None
    returns: str = "logits"
    has_score: bool = False


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


def _ends_in_sigmoid(net: Any) -> bool:
    """Whether a network's last layer (in registration order) is a sigmoid."""
    module = getattr(net, "module", net) if isinstance(net, NetworkAdapter) else net
    if isinstance(net, NetworkAdapter) and getattr(net, "score", None) is not None:
        module = net.score
    if not isinstance(module, nn.Module):
        return False
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and isinstance(leaves[-1], nn.Sigmoid)


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


def _required_positional(net: Any) -> int:
    """How many positional arguments a network's ``forward`` requires (0 when unknown)."""
    module = getattr(net, "module", net) if isinstance(net, NetworkAdapter) else net
    function = module.forward if isinstance(module, nn.Module) else module
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)


def _failure_hint(net: Any, inputs: Sequence[Tensor], error: Exception, joint: bool) -> str:
    """The usual fix for a user network that failed when the head called it."""
    adapter = "JointNetwork" if joint else "FeatureNetwork"
    if isinstance(error, TypeError):
        hint = f"if it takes other arguments (the condition: gali_ext.adapters.{adapter}(net, "
        hint += "condition='y')"
        if joint:
            hint += ", or the slots separately: JointNetwork(net, inputs='separate')"
        hint += "), wrap it"
        if not joint and _required_positional(net) >= 2:
            hint += (
                "; a whole D(x, z) is not a feature network: use gali_ext.adapters."
                "monolithic_head(spec, D) (specs of two slots), or give the head its image "
                "network, latent network and joint network"
            )
        return hint
    if joint and isinstance(error, RuntimeError):
        takes = first_layer_width(getattr(net, "module", net))
        given = sum(t[0].numel() if t.dim() > 1 else 1 for t in inputs)
        if takes and given != takes and given % takes == 0:
            return (
                f"its first layer takes {takes} features and the tuples give {given}: widen it "
                f"in place, gali_ext.adapters.widen_input(joint_module, {given // takes})"
            )
        return (
            "check the input shape it expects (for [B, C, 1, 1] maps: JointNetwork(net, "
            "input_shape=(-1, 1, 1)))"
        )
    return "check the input shape it expects"


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)[:4]}"
    return f"a {type(value).__name__}"


_OWN_SCORE = object()  # a unary path from the score a feature network returns itself


class _Path:
    """How one set of K logits is made: the joint, or one slot's unary head."""

    def __init__(self, mode: str, slots: tuple[int, ...], what: str) -> None:
        self.mode = mode  # "mlp" | "default" | "logits" | "score" | "features" | "own"
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
        feature_pass: how the networks are batched (docs/design.md, section 9.7).
            ``"fused"``: each feature network runs once over every distinct node of its kind
            together, and each joint or unary path once over all ``K * B`` tuples;
            ``"per_chain"``: once per chain (the real chain's nodes ``x0, x1, ...`` together,
            the prior chain's apart), so that batch norm never mixes real and generated data
            yet still sees the difference between an image and its reconstruction, which
            GALI-8's classes turn on; ``"per_node"``: once per distinct node and the joint once
            per class, as a BiGAN loop batches ALI (its batch norm erases the differences
            between the nodes of a chain); ``"auto"`` (default): ``"per_chain"`` when a
            network has batch norm, else ``"fused"``. Batch norm found in a network with
            ``"fused"`` chosen explicitly is warned about.
        negative_slope: the default networks' leaky ReLU slope.
        discriminator: your own discriminator module, the one your code optimises and saves:
            the layers the head adds (K-way layers, projection terms, default networks) are
            registered in it as the sub-module ``gali_head``, so that ``discriminator.
            state_dict()`` and ``discriminator.parameters()`` hold them, and the first D step
            warns about any of its parameters that the head's loss never reaches (a layer its
            ``forward`` uses that the head does not call). Build the head before the D
            optimizer, and before loading a checkpoint into ``discriminator``.

    The head's own state (``self.state_dict()``) holds every parameter too; ``discriminator=``
    is for code that saves and optimises the user's module rather than the head.
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
        feature_pass: str = "auto",
        discriminator: nn.Module | None = None,
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
        if discriminator is not None and not isinstance(discriminator, nn.Module):
            raise ConfigError(
                f"discriminator must be your discriminator nn.Module (the one your code saves), "
                f"got {type(discriminator).__name__}"
            )
        self.spec = spec
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
            self._check_joint_width(joint, self._width(range(m), None))
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
            if net is _OWN_SCORE:
                kind = spec.slot_kinds[slot]
                what = f"score of the {kind!r} feature network (slot {slot})"
                extra = self._own_score_layer(kind, what)
                if extra is not None:
                    self.unary_scores[str(slot)] = extra
                self._unary.append(_Path("own", (slot,), what))
            elif net is True:
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
        batch_norm = self.batch_norm_layers()
        if feature_pass == "auto":
            feature_pass = "per_chain" if any(batch_norm.values()) else "fused"
        elif feature_pass == "fused":
            self._warn_batch_norm(batch_norm)
        self.feature_pass = feature_pass
        self._warn_sigmoid()
        self._checked_range = False
        self.__dict__["_discriminator"] = None  # not a sub-module: the user's D holds the head's
        if discriminator is not None:
            self._register_in(discriminator)

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

    def _check_joint_width(self, joint: Any, width: int | None) -> None:
        """A joint network written for one (image, latent) pair, given GALI-8's two, is refused
        here, naming the fix, rather than failing inside the user's first layer."""
        if isinstance(joint, NetworkAdapter):
            if getattr(joint, "inputs", "concat") != "concat":
                return
            joint = getattr(joint, "module", joint)
        takes = first_layer_width(joint)
        if width is None or takes is None or width == takes or width % takes:
            return
        factor = width // takes
        raise ShapeError(
            f"the joint network's first layer takes {takes} features, but the tuples of spec "
            f"{self.spec.name!r} ({self.spec.arity} slots) give it {width}, {factor} times as "
            "many (GALI-8's tuples hold two image-latent pairs): widen it in place before "
            f"building its optimizer, gali_ext.adapters.widen_input(joint_module, {factor})"
        )

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

    def _unary_networks(self, unary: Any) -> dict[int, nn.Module | bool]:
        slot_kinds = self.spec.slot_kinds
        own = {
            s: _OWN_SCORE
            for s, kind in enumerate(slot_kinds)
            if getattr(self.feature_nets[kind], "has_score", False)
        }
        chosen = self._chosen_unary(unary)
        clash = sorted(set(own) & set(chosen))
        if clash:
            kind = slot_kinds[clash[0]]
            raise ConfigError(
                f"the {kind!r} feature network returns its own score (FeatureNetwork(score=...) "
                f"or features=...), which is the unary head of the {kind!r} slots: drop "
                f"unary[{kind!r}] (or the network's score)"
            )
        return dict(sorted({**chosen, **own}.items()))

    def _chosen_unary(self, unary: Any) -> dict[int, nn.Module | bool]:
        """The unary networks the ``unary`` argument asks for, by slot."""
        slot_kinds = self.spec.slot_kinds
        if unary is False or unary is None:
            return {}
        if unary is True:
            return {
                s: True
                for s, kind in enumerate(slot_kinds)
                if not getattr(self.feature_nets[kind], "has_score", False)
            }
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
        return chosen

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

    def batch_norm_layers(self) -> dict[str, list[str]]:
        """The batch-dependent layers of each network the head calls, by network."""
        found = {
            f"the {k!r} feature network": batch_dependent_layers(n)
            for k, n in self.feature_nets.items()
        }
        found["the joint network"] = batch_dependent_layers(self.joint)
        for slot, net in self.unary_heads.items():
            found[f"the unary head of slot {slot}"] = batch_dependent_layers(net)
        return found

    def _warn_batch_norm(self, found: Mapping[str, list[str]]) -> None:
        for what, layers in found.items():
            if layers:
                warnings.warn(
                    f"{what} has batch-dependent layers ({', '.join(layers[:3])}): the fused "
                    "pass runs it once over real, generated and reconstructed inputs together, "
                    "so their batch statistics mix. Leave feature_pass at 'auto' (or pass "
                    "'per_chain') to run each chain's nodes together and the real and the prior "
                    "chain apart, as a BiGAN loop does, or replace batch norm by spectral norm",
                    UserWarning,
                    stacklevel=4,
                )

    def _warn_sigmoid(self) -> None:
        """Warn about a user network that ends in a sigmoid: the head reads logits."""
        paths = [(self.joint, "joint network")] + [
            (self.unary_heads[str(p.slots[0])], p.what) for p in self._unary if p.mode != "own"
        ]
        for net, what in paths:
            if _ends_in_sigmoid(net):
                warnings.warn(
                    f"the {what} ends in a sigmoid, but the head reads logits (scores before a "
                    "sigmoid): remove the final sigmoid, or select the score before it",
                    UserWarning,
                    stacklevel=4,
                )

    def _own_score_layer(self, kind: str, what: str) -> nn.Module | None:
        """The layer the head adds on a feature network's own score: a K-way layer on its
        features and score for K > 2, a projection term with ``conditions`` at K = 2."""
        k, conditions = self.spec.num_classes, self.conditions
        if k == 2 and conditions is None:
            return None
        width = self.feature_dims[kind]
        if width is None:
            raise SpecError(
                f"the head adds a layer on the {what}, which reads its features, of unknown "
                f"width: give FeatureNetwork(..., out_features=d) or feature_dims={{{kind!r}: d}}"
            )
        if k == 2:
            return Projection(width, k, conditions)  # type: ignore[arg-type]
        return ClassScores(width + 1, k, conditions)

    def added_layers(self) -> nn.ModuleDict:
        """The layers the head adds on the user's networks, by name: the default joint MLP,
        the K-way layers and projection terms on user networks, the default unary heads. They
        are what a checkpoint of the user's own modules misses unless the head is built with
        ``discriminator=``."""
        added = nn.ModuleDict()
        if self._joint.mode == "mlp":
            added["joint"] = self.joint
        if self.joint_scores is not None:
            added["joint_scores"] = self.joint_scores
        for path in self._unary:
            key = str(path.slots[0])
            if path.mode == "default":
                added[f"unary_{key}"] = self.unary_heads[key]
            if key in self.unary_scores:
                added[f"unary_scores_{key}"] = self.unary_scores[key]
        return added

    @property
    def discriminator(self) -> nn.Module | None:
        """The user's discriminator module the head's layers are registered in, if any."""
        return self.__dict__["_discriminator"]

    def _register_in(self, discriminator: nn.Module) -> None:
        existing = getattr(discriminator, ADDED_LAYERS, None)
        if existing is not None and len(existing):
            raise ConfigError(
                f"{type(discriminator).__name__} already has a sub-module {ADDED_LAYERS!r}: a "
                "head is registered in it; build one head per discriminator (a new D for another "
                "preset)"
            )
        if any(m is self for m in discriminator.modules()):
            raise ConfigError("discriminator= is your own D module, not the head itself")
        discriminator.add_module(ADDED_LAYERS, self.added_layers())
        self.__dict__["_discriminator"] = discriminator

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

    def _call(
        self,
        net: Any,
        inputs: list[Tensor],
        condition: Tensor | None,
        what: str,
        joint: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
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
            hint = _failure_hint(net, inputs, error, joint)
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
            hint = ""
            if not joint and isinstance(out, (tuple, list)) and len(out) == 2:
                widths = [t[0].numel() if isinstance(t, Tensor) and t.dim() else 0 for t in out]
                if sorted(widths)[0] == 1 and max(widths) > 1:
                    h, s = widths.index(max(widths)), widths.index(1)
                    hint = (
                        f"; it looks like (features, score): FeatureNetwork(net, output={h}, "
                        f"score={s}) keeps its score (and any projection in its forward) as "
                        "the unary head of its slots"
                    )
            raise ShapeError(
                f"the {what} returned {_describe(out)}, expected a tensor [N, ...]: select it "
                f"with gali_ext.adapters.{adapter}(net, output=0) (an index, a dict key, or a "
                f"callable){hint}"
            )
        return out, features

    def _node_features(
        self,
        kind: str,
        names: Sequence[str],
        variables: Mapping[str, Tensor],
        conditions: Mapping[str, Tensor] | None,
        batch: int,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The features of the given nodes of one kind, from one call of the kind's network,
        and the network's own scores of them when it returns one (``has_score``)."""
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
        out, returned = self._call(net, [stacked], condition, what)
        # A feature network with its own score gives (score, features), as a joint network
        # gives (logits, features).
        if getattr(net, "has_score", False):
            features, scores = returned, out
        else:
            features, scores = out, None
        if features is None:
            raise ShapeError(f"the {what} declares a score but returned no features")
        count = len(names) * batch
        width = self.feature_dims[kind]
        if (
            features.dim() < 1
            or features.shape[0] != count
            or (width is not None and features[0].numel() != width)
        ):
            expected = f"[{count}, {width}]" if width is not None else f"[{count}, ...]"
            hint = ""
            if width is not None and features.dim() >= 1 and features.shape[0] == count:
                hint = (
                    f": its width was taken as {width} from the network's layers; give the "
                    f"real one, FeatureNetwork(net, out_features={features[0].numel()}) or "
                    f"feature_dims={{{kind!r}: {features[0].numel()}}}"
                )
            raise ShapeError(
                f"the {what} should output {expected}, got {list(features.shape)}{hint}"
            )
        if scores is None:
            return list(features.split(batch)), None
        if scores.shape[0] != count:
            raise ShapeError(
                f"the score of the {what} should be [{count}, 1], got {list(scores.shape)}"
            )
        return list(features.split(batch)), list(scores.split(batch))

    def _logits(
        self,
        path: _Path,
        net: Any,
        extra: Any,
        inputs: list[Tensor],
        condition: Tensor | None,
        own: Tensor | None = None,
    ) -> Tensor:
        """K logits of one path (joint or unary) on ``N`` tuples: ``[N, K]``; ``own``: the
        score a feature network gave the slot (an ``"own"`` path)."""
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
            if path.mode == "own":
                out, features = own, inputs[0]
            else:
                out, features = self._call(net, inputs, condition, path.what, path is self._joint)
                self._check_range(out, path)
            if path.mode == "features":
                return self._checked(
                    path, self._added(path, extra, out.flatten(1), condition), rows
                )
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
                if path.mode not in ("score", "own"):
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

    def _check_range(self, out: Tensor, path: _Path) -> None:
        """Once, on the first batch: warn when a user network's scores all lie in (0, 1) with a
        mean of at least 0.2 (probabilities from a final sigmoid, read as logits)."""
        if self._checked_range or out.numel() < 8 or not out.is_floating_point() or out.is_meta:
            return
        if out.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        self._checked_range = True
        with torch.no_grad():
            low, high = out.detach().aminmax()
            mean = out.detach().float().mean()
        # Fresh logits sit near 0; probabilities near 0.5 (a sigmoid of them).
        if low.item() > 0.0 and high.item() < 1.0 and mean.item() >= 0.2:
            warnings.warn(
                f"the {path.what} gave only values in [0, 1] on the first batch: if they are "
                "probabilities (a final sigmoid), the head needs the logits before it; remove "
                "the sigmoid or select the score before it",
                UserWarning,
                stacklevel=2,
            )

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

    def _node_groups(self, names: Sequence[str], mode: str) -> list[list[str]]:
        """The nodes of one kind that one call of its network takes together."""
        if mode == "fused":
            return [list(names)]
        if mode == "per_chain":
            chains: dict[str, list[str]] = {}
            for n in names:
                chains.setdefault(parse_node(n).root, []).append(n)
            return list(chains.values())
        return [[n] for n in names]

    def _class_groups(self, mode: str) -> list[list[int]]:
        """The classes whose tuples one call of a joint or unary network takes together."""
        k = self.spec.num_classes
        if mode == "fused":
            return [list(range(k))]
        if mode == "per_chain":
            chains: dict[Any, list[int]] = {}
            for i, root in enumerate(self._class_roots):
                chains.setdefault(root if root is not None else ("mixed", i), []).append(i)
            return list(chains.values())
        return [[i] for i in range(k)]

    def _paths(self) -> list[tuple[_Path, Any, Any]]:
        paths = [(self._joint, self.joint, self.joint_scores)]
        for p in self._unary:
            key = str(p.slots[0])
            net = self.unary_heads[key] if key in self.unary_heads else None  # None: "own"
            extra = self.unary_scores[key] if key in self.unary_scores else None
            paths.append((p, net, extra))
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
        # slots[i][s], scores[i][s]: the features (and a feature network's own score) of
        # slot s of class i's B tuples
        slots: list[list[Tensor]] = []
        scores: list[list[Tensor | None]] = []
        if mode == "per_class":
            for c in spec.classes:
                parts = [
                    self._node_features(kind, [n], variables, by_root, batch)
                    for n, kind in zip(c.nodes, c.kinds)
                ]
                slots.append([f[0] for f, _ in parts])
                scores.append([s[0] if s is not None else None for _, s in parts])
        else:
            features: dict[str, Tensor] = {}
            own: dict[str, Tensor] = {}
            for kind in spec.kinds:
                for group in self._node_groups(spec.nodes_of_kind(kind), mode):
                    parts, part_scores = self._node_features(kind, group, variables, by_root, batch)
                    features.update(zip(group, parts))
                    own.update(zip(group, part_scores or []))
            slots = [[features[n] for n in c.nodes] for c in spec.classes]
            scores = [[own.get(n) for n in c.nodes] for c in spec.classes]
        groups = self._class_groups(mode)
        order = [i for group in groups for i in group]  # the classes as the groups list them
        results = []
        for path, net, extra in self._paths():
            per_class: list[Tensor] = []
            for group in groups:
                inputs = [torch.cat([slots[i][s] for i in group]) for s in path.slots]
                score = None
                if path.mode == "own":
                    score = torch.cat([scores[i][path.slots[0]] for i in group])  # type: ignore[misc]
                condition = None
                if class_conditions is not None:
                    condition = torch.cat([class_conditions[i] for i in group])
                logits = self._logits(path, net, extra, inputs, condition, score)
                per_class.extend(logits.split(batch))
            results.append(torch.stack([per_class[order.index(i)] for i in range(k)]))
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
