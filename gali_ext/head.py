"""The multi-class joint discriminator of GALI (DESIGN.md section 4).

One feature network per variable kind (``Dx`` for images, ``Dz`` for latents, one per extra kind
such as pretrained features ``M``) and a joint MLP over the concatenated slot features of an
m-tuple that outputs K logits, one per tuple class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from .errors import ProviderError, ShapeError, SpecError
from .spec import IMAGE, LATENT, TupleSpec, parse_node

__all__ = ["MultiClassJointDiscriminatorHead", "SpectralMLP", "add_instance_noise"]


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


def add_instance_noise(
    variables: Mapping[str, Tensor],
    spec: TupleSpec,
    std: float | Tensor,
    rng: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Every image node of the spec plus Gaussian noise of standard deviation ``std``.

    One draw per distinct image node, so the fused and the per-class discriminator see the same
    noisy images (DESIGN.md section 4). Other variables are passed through.

    ``std`` is a float (no noise is drawn when it is 0) or a 0-dim tensor on the images' device,
    read when the step runs: noise is then always drawn and scaled by it, so that a step
    captured in a CUDA graph (:class:`gali_ext.capture.CapturedStep`) follows a std that
    changes from step to step without a host sync.
    """
    noisy = dict(variables)
    if isinstance(std, Tensor) or std > 0:
        for name in spec.nodes_of_kind(IMAGE):
            image = noisy[name]
            noise = torch.randn(image.shape, generator=rng, device=image.device, dtype=image.dtype)
            noisy[name] = image + std * noise
    return noisy


class MultiClassJointDiscriminatorHead(nn.Module):
    """GALI's discriminator ``D``: K logits for each m-tuple of a :class:`TupleSpec`.

    ``D_i(t) = softmax(joint(concat(F_kind(t_1), ..., F_kind(t_m))))_i``, trained with the
    discriminator loss of eq. 3, where ``F_kind`` is the feature network of the kind of each
    slot. The forward pass is fused: in one call ``Dx`` runs once over the concatenation of every
    distinct image node of the spec, ``Dz`` once over every distinct latent, each extra feature
    network once, and the joint MLP once over all ``K * B`` tuples.

    Args:
        spec: the tuple classes to tell apart.
        image_features: ``Dx``, ``[N, C, H, W] -> [N, d_x]``. It runs on a batch concatenating
            several distinct images, so it must have no batch-dependent layers (batch norm).
        latent_features: ``Dz``, ``[N, *latent_shape] -> [N, d_z]``.
        extra_features: a feature network per extra kind (e.g. ``{"M": mlp}``).
        feature_dims: the output width of each kind's network; read from a network's
            ``out_features`` attribute when omitted.
        joint_hidden: widths of the joint MLP's hidden layers (ALI's ``D(x, z)``: 1024, 1024).
        joint: a user-made joint network ``[N, sum of slot widths] -> [N, K]`` instead.
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
    ) -> None:
        super().__init__()
        if not isinstance(spec, TupleSpec):
            raise SpecError(f"expected a TupleSpec, got {type(spec).__name__}")
        self.spec = spec
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
                width = getattr(nets[kind], "out_features", None)
                if not isinstance(width, int):
                    raise SpecError(
                        f"cannot tell the output width of the {kind!r} feature network: give it an "
                        f"int attribute out_features or pass feature_dims={{{kind!r}: d}}"
                    )
                dims[kind] = width
        self.feature_nets = nn.ModuleDict({k: nets[k] for k in spec.kinds})
        self.feature_dims = {k: dims[k] for k in spec.kinds}
        joint_in = sum(self.feature_dims[k] for k in spec.slot_kinds)
        self.joint = (
            joint
            if joint is not None
            else SpectralMLP(joint_in, joint_hidden, spec.num_classes, negative_slope)
        )

    def _check_variables(self, variables: Mapping[str, Tensor]) -> int:
        batch = None
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
                if batch is None:
                    batch = value.shape[0]
                elif value.shape[0] != batch:
                    raise ShapeError(
                        f"variable {name!r} has batch size {value.shape[0]}, expected {batch}"
                    )
        assert batch is not None
        return batch

    def _prepare(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor,
        rng: torch.Generator | None,
    ) -> tuple[dict[str, Tensor], int]:
        """Canonical names, checked tensors, instance noise; and the batch size."""
        variables = {parse_node(k).name: v for k, v in variables.items()}
        batch = self._check_variables(variables)
        return add_instance_noise(variables, self.spec, instance_noise_std, rng), batch

    def _features(self, kind: str, batch: Tensor, count: int) -> Tensor:
        try:
            features = self.feature_nets[kind](batch)
        except RuntimeError as error:
            raise ShapeError(
                f"the {kind!r} feature network failed on input of shape {list(batch.shape)}: "
                f"{error}"
            ) from error
        features = features.flatten(1)
        if features.shape != (count, self.feature_dims[kind]):
            raise ShapeError(
                f"the {kind!r} feature network should output [{count}, "
                f"{self.feature_dims[kind]}], got {list(features.shape)}"
            )
        return features

    def _joint(self, tuples: Tensor, count: int) -> Tensor:
        logits = self.joint(tuples)
        if logits.shape != (count, self.spec.num_classes):
            raise ShapeError(
                f"the joint network should output [{count}, {self.spec.num_classes}] logits, "
                f"got {list(logits.shape)}"
            )
        return logits

    def forward(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """Logits ``[K, B, K]``: ``logits[i]`` are D's logits on the B tuples of class i.

        ``variables`` maps every node of the spec (canonical names, as returned by
        ``Chains.compute(spec.nodes)``) to a ``[B, ...]`` tensor. ``instance_noise_std`` adds
        Gaussian noise to every distinct image node once (:func:`add_instance_noise`).
        """
        variables, batch = self._prepare(variables, instance_noise_std, rng)
        features: dict[str, Tensor] = {}
        for kind in self.spec.kinds:
            names = self.spec.nodes_of_kind(kind)
            shapes = {n: tuple(variables[n].shape[1:]) for n in names}
            if len(set(shapes.values())) > 1:
                detail = ", ".join(f"{n}: {list(v)}" for n, v in shapes.items())
                raise ShapeError(f"the {kind!r} variables must share one shape, got {detail}")
            stacked = torch.cat([variables[n] for n in names])
            for name, part in zip(
                names, self._features(kind, stacked, len(names) * batch).split(batch)
            ):
                features[name] = part
        tuples = torch.stack(
            [torch.cat([features[n] for n in c.nodes], dim=1) for c in self.spec.classes]
        )
        k = self.spec.num_classes
        return self._joint(tuples.flatten(0, 1), k * batch).view(k, batch, k)

    def forward_per_class(
        self,
        variables: Mapping[str, Tensor],
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
    ) -> Tensor:
        """The same logits as :meth:`forward`, computed as the authors' code does.

        The whole discriminator is called once per class and every feature is recomputed for
        every occurrence of a node. A test oracle and the benchmark's baseline; prefer
        :meth:`forward`. (In training mode spectral norm's power iteration runs once per call,
        so compare the two in eval mode.)
        """
        variables, batch = self._prepare(variables, instance_noise_std, rng)
        logits = []
        for tuple_class in self.spec.classes:
            slots = [
                self._features(kind, variables[name], batch)
                for name, kind in zip(tuple_class.nodes, tuple_class.kinds)
            ]
            logits.append(self._joint(torch.cat(slots, dim=1), batch))
        return torch.stack(logits)
