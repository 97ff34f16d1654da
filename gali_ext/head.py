"""The multi-class joint discriminator of GALI (docs/design.md, sections 4 and 9).

One feature network per variable kind (``Dx`` for images, ``Dz`` for latents, one per extra kind
such as pretrained features ``M``) and a joint network over the slot features of an m-tuple that
outputs K logits, one per tuple class. Optionally (section 9): per-slot *unary* heads, K logits
from one slot's features alone (BigBiGAN's ``s_x`` and ``s_z``), and a *projection* term of a
per-sample condition (Miyato & Koyama 2018) on every logit layer the head makes.

This module is the head's computation. The layers it makes logits with are in
:mod:`gali_ext.logits`; how it reads a user's networks while it is built (widths, the path of each
network, the unary heads, registration in the user's D) in :mod:`gali_ext.wiring`; the checks of
its inputs, the errors that name the fix and the warnings in :mod:`gali_ext.diagnostics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .diagnostics import (
    batch_dependent_layers,
    batch_norm_layers,
    call_error,
    check_conditioning,
    check_conditions,
    check_settings,
    check_variables,
    feature_shape_error,
    output_error,
    warn_batch_norm,
    warn_probabilities,
    warn_sigmoid,
)
from .errors import ConfigError, GaliError, ShapeError, SpecError
from .logits import ClassScores, DiscriminatorOutput, Projection, SpectralMLP
from .spec import IMAGE, LATENT, TupleSpec, parse_node
from .wiring import (
    OWN_SCORE,
    LogitsPath,
    NetworkAdapter,
    added_layers,
    check_joint_width,
    declared_width,
    discriminator_parts,
    feature_width,
    first_layer_width,
    own_score_layer,
    register_in,
    slots_width,
    unary_networks,
    unary_term_weights,
    user_path,
)

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
        discriminator: your own discriminator, as your code optimises and saves it: its
            module; or, for a D made of several modules of a larger model that also holds E and
            G, the list of those modules or the list of parameters your D optimizer takes
            (``model.get_disc_params()``, whose modules are the networks above that it holds).
            The layers the head adds (K-way layers, projection terms, default networks) are
            registered in it (in the module holding the joint network, for several) as the
            sub-module ``gali_head``, so that its ``state_dict()`` and ``parameters()`` hold
            them, and the first D step warns about any of its parameters that the head's loss
            never reaches (a layer its ``forward`` uses that the head does not call). Build
            the head before the D optimizer, and before loading a checkpoint.

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
        discriminator: nn.Module | Sequence[nn.Module] | Sequence[Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_settings(spec, feature_pass, FEATURE_PASSES, conditions)
        parts = discriminator_parts(discriminator) if discriminator is not None else None
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
                dims[kind] = feature_width(nets[kind])
        self.feature_nets = nn.ModuleDict({k: nets[k] for k in spec.kinds})
        self.feature_dims: dict[str, int | None] = {k: dims[k] for k in spec.kinds}
        k = spec.num_classes
        m = spec.arity

        # The joint path.
        if joint is None:
            joint_in = slots_width(self, range(m), "the default joint MLP")
            self.joint = SpectralMLP(joint_in, joint_hidden, k, negative_slope)
            hidden = joint_hidden[-1] if joint_hidden else joint_in
            self.joint_scores = Projection(hidden, k, conditions) if conditions else None
            self._joint = LogitsPath("mlp", tuple(range(m)), "joint MLP")
        else:
            self.joint = joint
            if isinstance(joint, NetworkAdapter):
                joint.bind(spec.slot_kinds)
            check_joint_width(self, joint, slots_width(self, range(m), None))
            mode, self.joint_scores = user_path(
                self, joint, "joint network", slots_width(self, range(m), None)
            )
            self._joint = LogitsPath(mode, tuple(range(m)), "joint network")

        # The unary paths.
        self.unary_heads = nn.ModuleDict()
        self.unary_scores = nn.ModuleDict()
        self._unary: list[LogitsPath] = []
        for slot, net in unary_networks(self, unary).items():
            what = f"unary head of slot {slot} ({spec.slot_kinds[slot]!r})"
            if net is OWN_SCORE:
                kind = spec.slot_kinds[slot]
                what = f"score of the {kind!r} feature network (slot {slot})"
                extra = own_score_layer(self, kind, what)
                if extra is not None:
                    self.unary_scores[str(slot)] = extra
                self._unary.append(LogitsPath("own", (slot,), what))
            elif net is True:
                d = slots_width(self, [slot], f"the {what}")
                self.unary_heads[str(slot)] = ClassScores(d, k, conditions)
                self._unary.append(LogitsPath("default", (slot,), what))
            else:
                self.unary_heads[str(slot)] = net
                mode, extra = user_path(self, net, what, slots_width(self, [slot], None))
                if extra is not None:
                    self.unary_scores[str(slot)] = extra
                self._unary.append(LogitsPath(mode, (slot,), what))
        self.unary_weights = unary_term_weights(self, unary_weights)

        self._class_roots = [
            roots.pop() if len(roots := {parse_node(n).root for n in c.nodes}) == 1 else None
            for c in spec.classes
        ]
        check_conditioning(self)
        batch_norm = self.batch_norm_layers()
        if feature_pass == "auto":
            feature_pass = "per_chain" if any(batch_norm.values()) else "fused"
        elif feature_pass == "fused":
            warn_batch_norm(batch_norm)
        self.feature_pass = feature_pass
        warn_sigmoid(self)
        self._checked_range = False
        self.__dict__["_discriminator"] = None  # not a sub-module: the user's D holds the head's
        self.__dict__["_discriminator_modules"] = []
        if parts is not None:
            register_in(self, parts)

    # -- construction helpers ---------------------------------------------------------------

    def _takes_condition(self, net: Any) -> bool:
        return isinstance(net, NetworkAdapter) and net.takes_condition

    @property
    def conditional(self) -> bool:
        """Whether D reads a per-sample condition (``conditions=`` or a network taking it)."""
        nets = [*self.feature_nets.values(), self.joint, *self.unary_heads.values()]
        return self.conditions is not None or any(self._takes_condition(n) for n in nets)

    def batch_norm_layers(self) -> dict[str, list[str]]:
        """The batch-dependent layers of each network the head calls, by network."""
        return batch_norm_layers(self)

    def added_layers(self) -> nn.ModuleDict:
        """The layers the head adds on the user's networks, by name: the default joint MLP,
        the K-way layers and projection terms on user networks, the default unary heads. They
        are what a checkpoint of the user's own modules misses unless the head is built with
        ``discriminator=``."""
        return added_layers(self)

    @property
    def discriminator(self) -> nn.Module | None:
        """The user's discriminator module the head's layers are registered in, if any."""
        return self.__dict__["_discriminator"]

    @property
    def discriminator_modules(self) -> list[nn.Module]:
        """The modules of the user's discriminator (``discriminator=``): the D itself, or the
        modules of a larger model that make it up; empty without ``discriminator=``."""
        return list(self.__dict__["_discriminator_modules"])

    # -- forward -----------------------------------------------------------------------------

    def _prepare(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor,
        rng: torch.Generator | None,
        conditions: Mapping[str, Tensor] | None,
    ) -> tuple[dict[str, Tensor], int, dict[str, Tensor] | None]:
        """Canonical names, checked tensors and conditions, instance noise; the batch size."""
        variables = {parse_node(k).name: v for k, v in variables.items()}
        batch = check_variables(self, variables)
        by_root = check_conditions(self, conditions, batch)
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

        def call() -> Any:
            if isinstance(net, NetworkAdapter):
                return net(inputs, condition)
            if joint:
                return net(torch.cat([t.flatten(1) for t in inputs], 1))
            return net(inputs[0])

        try:
            out = call()
        except (GaliError, torch.cuda.OutOfMemoryError):
            raise
        except (TypeError, AttributeError, RuntimeError, ValueError, IndexError, KeyError) as error:
            raise call_error(self, net, inputs, error, what, joint, call) from error
        features = None
        if isinstance(net, NetworkAdapter) and isinstance(out, tuple) and len(out) == 2:
            out, features = out
        if not isinstance(out, Tensor):
            raise output_error(out, what, joint)
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
            raise feature_shape_error(what, kind, features, count, width)
        if scores is None:
            return list(features.split(batch)), None
        if scores.shape[0] != count:
            raise ShapeError(
                f"the score of the {what} should be [{count}, 1], got {list(scores.shape)}"
            )
        return list(features.split(batch)), list(scores.split(batch))

    def _logits(
        self,
        path: LogitsPath,
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
                warn_probabilities(self, out, path.what)
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

    def _added(self, path: LogitsPath, layer: Any, h: Tensor, condition: Tensor | None) -> Tensor:
        """The logits of a layer the head adds on a user network (K-way layer or projection)."""
        if h.shape[1] != layer.in_features:
            raise ShapeError(
                f"the layer the head adds on the {path.what} reads features of width "
                f"{layer.in_features}, got {list(h.shape)}"
            )
        return layer(h, condition)

    def _checked(self, path: LogitsPath, logits: Tensor, rows: int) -> Tensor:
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

    def _paths(self) -> list[tuple[LogitsPath, Any, Any]]:
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
