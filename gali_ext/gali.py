"""The GALI objective: an encoder, a generator, a multi-class joint head and feedback providers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .chains import Chains
from .errors import ConfigError, SpecError
from .head import MultiClassJointDiscriminatorHead, SpectralMLP
from .losses import DiscriminatorLoss, ProductOfTermsLoss
from .presets import get_preset
from .providers.base import FeedbackProvider, resolve_node_functions

__all__ = ["GALI", "ObjectiveValue", "build_gali"]


@dataclass
class ObjectiveValue:
    """The value of one objective on one batch: ``loss`` (the scalar to back-propagate), the
    ``logits [K, B, K]`` it was computed from, its named parts and the step's chains."""

    loss: Tensor
    logits: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    chains: Chains | None = None


@contextmanager
def _frozen(module: nn.Module):
    """Parameters of ``module`` take no gradient inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class GALI(nn.Module):
    """GALI's game (paper eqs. 3 and 4) over a user's encoder E and generator G.

    The discriminator ``head`` classifies the K tuple classes of ``head.spec``; the
    ``providers`` make the variables those classes name beyond ``x0, z0, xp0, zp0``
    (reconstructions, masks and mixes, pretrained features) and may add loss terms. The spec is
    checked against the providers when the objective is built: a class naming a variable no
    provider makes raises :class:`~gali_ext.errors.ProviderError`.

    Use it from any training loop::

        d_loss = gali.discriminator_loss(x)   # E and G run without gradients
        g_loss = gali.generator_loss(x)       # D's parameters take no gradient

    Args:
        encoder: ``x -> z`` (a tensor, ``(mu, log_sigma)`` or a distribution; see
            :func:`~gali_ext.chains.sample_latent` and the ``adapters`` package).
        generator: ``z -> x``.
        head: the :class:`MultiClassJointDiscriminatorHead`.
        providers: feedback providers (e.g. ``[ReconstructionChain(), MaskMix()]``).
        generator_criterion: the generator-encoder loss on the logits (default
            :class:`ProductOfTermsLoss`; :class:`MinimaxLoss` and :class:`MisclassificationLoss`
            reproduce the paper's ablations).
        discriminator_criterion: D's loss on the logits (default :class:`DiscriminatorLoss`).
        latent_shape: the shape of one latent, for prior samples; read off ``E(x)`` if omitted.
    """

    def __init__(
        self,
        encoder: Callable[[Tensor], Any],
        generator: Callable[[Tensor], Tensor],
        head: MultiClassJointDiscriminatorHead,
        providers: Iterable[FeedbackProvider] = (),
        *,
        generator_criterion: nn.Module | None = None,
        discriminator_criterion: nn.Module | None = None,
        latent_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(head, MultiClassJointDiscriminatorHead):
            raise SpecError(
                f"expected a MultiClassJointDiscriminatorHead, got {type(head).__name__}"
            )
        self.encoder = encoder
        self.generator = generator
        self.head = head
        providers = list(providers)
        self.functions = resolve_node_functions(head.spec, providers)
        self.providers = nn.ModuleList(providers)
        self.generator_criterion = generator_criterion or ProductOfTermsLoss()
        self.discriminator_criterion = discriminator_criterion or DiscriminatorLoss()
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None

    @property
    def spec(self):
        """The head's :class:`~gali_ext.spec.TupleSpec`."""
        return self.head.spec

    def chains(
        self, x: Tensor, z: Tensor | None = None, rng: torch.Generator | None = None
    ) -> Chains:
        """The step's :class:`Chains` over data ``x`` (and prior sample ``z``), with the
        providers' node functions."""
        return Chains(
            x,
            self.encoder,
            self.generator,
            z=z,
            latent_shape=self.latent_shape,
            functions=self.functions,
            rng=rng,
        )

    def discriminator_objective(
        self,
        x: Tensor,
        z: Tensor | None = None,
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        differentiable_chains: bool = False,
    ) -> ObjectiveValue:
        """D's loss (eq. 3) on one batch; D sees the chain nodes detached from E and G.

        The chains run without gradients unless ``differentiable_chains=True``: then they keep
        their graph, so that the generator-encoder step on the same batch reuses them
        (``generator_objective(x, chains=d.chains)``) instead of running E and G again.
        """
        with torch.set_grad_enabled(differentiable_chains and torch.is_grad_enabled()):
            chains = self.chains(x, z, rng)
            variables = chains.compute(self.spec.nodes)
        variables = {name: value.detach() for name, value in variables.items()}
        logits = self.head(variables, instance_noise_std, rng)
        loss = self.discriminator_criterion(logits)
        return ObjectiveValue(loss, logits, {"discriminator": loss.detach()}, chains)

    def generator_objective(
        self,
        x: Tensor,
        z: Tensor | None = None,
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        chains: Chains | None = None,
    ) -> ObjectiveValue:
        """The generator-encoder loss (eq. 4 by default) plus the providers' extra terms.

        D's parameters take no gradient from it. ``chains``: the chains of a discriminator
        step on this batch, made with ``differentiable_chains=True``; their nodes (the same
        prior sample and encoder noise) are reused, so E and G do not run again. ``x`` and
        ``z`` are then ignored.
        """
        reused = chains is not None
        if chains is None:
            chains = self.chains(x, z, rng)
        variables = chains.compute(self.spec.nodes)
        differentiable = any(v.requires_grad for v in variables.values())
        if reused and torch.is_grad_enabled() and not differentiable:
            raise ConfigError(
                "the chains passed to generator_objective carry no gradient for E and G: make "
                "them with discriminator_objective(..., differentiable_chains=True)"
            )
        with _frozen(self.head):
            logits = self.head(variables, instance_noise_std, rng)
        return self._generator_terms(logits, chains)

    def shared_objectives(
        self,
        x: Tensor,
        z: Tensor | None = None,
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
    ) -> tuple[ObjectiveValue, ObjectiveValue]:
        """D's loss (eq. 3) and the generator-encoder loss (eq. 4 by default, plus the
        providers' terms) from one forward pass of the chains and the head.

        The authors' GALI-4 SVHN script trains this way: both losses come from the same
        logits, so the step needs one head pass instead of two (the alternating step shares
        the chain pass too, see ``differentiable_chains``). Both losses reach every parameter:
        back-propagate each into its own parameters only
        (``d.loss.backward(inputs=d_params, retain_graph=True)``, then
        ``g.loss.backward(inputs=g_params)``) before either optimizer steps, as
        :func:`~gali_ext.trainer.train_step` does with ``shared_forward=True``.
        """
        chains = self.chains(x, z, rng)
        variables = chains.compute(self.spec.nodes)
        logits = self.head(variables, instance_noise_std, rng)
        d_loss = self.discriminator_criterion(logits)
        d = ObjectiveValue(d_loss, logits, {"discriminator": d_loss.detach()}, chains)
        return d, self._generator_terms(logits, chains)

    def _generator_terms(self, logits: Tensor, chains: Chains) -> ObjectiveValue:
        adversarial = self.generator_criterion(logits)
        parts = {"adversarial": adversarial.detach()}
        loss = adversarial
        for i, p in enumerate(self.providers):
            extra = p.extra_loss(chains)
            if extra is not None:
                parts[f"{type(p).__name__.lower()}{i}"] = extra.detach()
                loss = loss + extra
        return ObjectiveValue(loss, logits, parts, chains)

    def forward(
        self,
        x: Tensor,
        z: Tensor | None = None,
        *,
        role: str = "generator",
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        differentiable_chains: bool = False,
        chains: Chains | None = None,
    ) -> ObjectiveValue | tuple[ObjectiveValue, ObjectiveValue]:
        """The objective of ``role`` (``"discriminator"`` or ``"generator"``) on a batch, or
        both from one pass (``role="shared"``, :meth:`shared_objectives`).

        One forward per backward, so that ``accelerator.prepare(gali)`` (DDP, autocast) wraps
        the whole step. ``differentiable_chains`` goes to :meth:`discriminator_objective`,
        ``chains`` to :meth:`generator_objective`.
        """
        if role == "discriminator":
            return self.discriminator_objective(
                x, z, instance_noise_std, rng, differentiable_chains=differentiable_chains
            )
        if role == "generator":
            return self.generator_objective(x, z, instance_noise_std, rng, chains=chains)
        if role == "shared":
            return self.shared_objectives(x, z, instance_noise_std, rng)
        raise ConfigError(f"role must be 'discriminator', 'generator' or 'shared', got {role!r}")

    def discriminator_loss(self, x: Tensor, z: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The scalar of :meth:`discriminator_objective`."""
        return self.discriminator_objective(x, z, **kwargs).loss

    def generator_loss(self, x: Tensor, z: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The scalar of :meth:`generator_objective`."""
        return self.generator_objective(x, z, **kwargs).loss


def build_gali(
    preset: str,
    models: Any,
    features: FeedbackProvider | None = None,
    *,
    alice_weight: float = 1.0,
    generator_criterion: nn.Module | None = None,
    extra_hidden: int = 512,
) -> GALI:
    """The :class:`GALI` objective of a registered preset (:mod:`gali_ext.presets`) over
    ALI-style networks.

    ``models`` is any object with the attributes ``encoder``, ``generator``, ``image_features``,
    ``latent_features``, ``joint_hidden``, ``negative_slope``, ``image_shape`` and
    ``latent_dim`` (the reference architectures of ``gali_ext.recipes.models`` are one). An
    extra kind such as ``M`` gets a spectrally normalised MLP feature network of width
    ``extra_hidden``.
    """
    registered = get_preset(preset)
    spec = registered.spec
    providers = registered.providers(features, alice_weight)
    extras: dict[str, nn.Module] = {}
    for p in providers:
        name = getattr(p, "name", None)
        if name in spec.kinds and hasattr(p, "feature_dim"):
            width = p.feature_dim(models.image_shape)
            extras[name] = SpectralMLP(
                width, (extra_hidden,), extra_hidden, models.negative_slope, activate_output=True
            )
    head = MultiClassJointDiscriminatorHead(
        spec,
        models.image_features,
        models.latent_features,
        extras,
        joint_hidden=models.joint_hidden,
        negative_slope=models.negative_slope,
    )
    return GALI(
        models.encoder,
        models.generator,
        head,
        providers,
        generator_criterion=generator_criterion,
        latent_shape=(models.latent_dim,),
    )
