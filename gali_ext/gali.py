"""The GALI objective: an encoder, a generator, a multi-class joint head and feedback providers.

A batch is a tensor of images, or a pair ``(x, y)`` with a per-sample condition ``y`` for a
conditional objective (docs/design.md, section 9.3); the prior of ``zp0`` is any of
:mod:`gali_ext.priors` (section 9.4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .audit import StepAudit
from .chains import Chains, ConditionSampler, split_batch
from .errors import ConfigError, ProviderError, ShapeError, SpecError
from .head import DiscriminatorOutput, MultiClassJointDiscriminatorHead, SpectralMLP
from .losses import DiscriminatorLoss, LogitsLoss, ProductOfTermsLoss
from .presets import FEATURES, get_preset
from .priors import resolve_prior
from .providers.base import FeedbackProvider, resolve_node_functions

__all__ = ["GALI", "ObjectiveValue", "build_gali"]


@dataclass
class ObjectiveValue:
    """The value of one objective on one batch: ``loss`` (the scalar to back-propagate), the
    joint ``logits [K, B, K]`` it was computed from, its named parts, the step's chains (pass
    them to :meth:`GALI.generator_objective` to reuse them) and the head's whole ``output``
    (unary logits included)."""

    loss: Tensor
    logits: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)
    chains: Chains | None = None
    output: DiscriminatorOutput | None = None


def _criterion_loss(
    criterion: nn.Module, output: DiscriminatorOutput, check_finite: bool
) -> Tensor:
    """``criterion(output)``, the library's losses (:class:`~gali_ext.losses.LogitsLoss`) told
    whether to check the logits for NaN or inf (``check_finite``); a user's own criterion, or a
    subclass of a library loss with its own ``forward(logits)``, is called on the output alone
    (and checks as its own code says)."""
    if type(criterion).forward is LogitsLoss.forward:
        return criterion(output, check_finite=check_finite)
    return criterion(output)


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

    Use it from any training loop; the generator-encoder step reuses the chains of the D step
    on the same batch, so that E and G run once per step (the loop of
    :func:`~gali_ext.trainer.train_step`)::

        d = gali.discriminator_objective(batch, differentiable_chains=True)
        d.loss.backward()  # E and G take no gradient from it
        d_optimizer.step()
        g = gali.generator_objective(chains=d.chains)  # D's parameters take no gradient
        g.loss.backward()
        g_optimizer.step()

    ``batch`` is ``x`` or ``(x, y)`` with a per-sample condition ``y`` (a conditional head).

    Args:
        encoder: ``x -> z`` (a tensor, ``(mu, log_sigma)`` or a distribution; see
            :func:`~gali_ext.chains.sample_latent` and the ``adapters`` package).
        generator: ``z -> x``; ``(z, y) -> x`` when the head is conditional.
        head: the :class:`MultiClassJointDiscriminatorHead`.
        providers: feedback providers (e.g. ``[ReconstructionChain(), MaskMix()]``).
        generator_criterion: the generator-encoder loss on the logits (default
            :class:`ProductOfTermsLoss`; :class:`MinimaxLoss` and :class:`MisclassificationLoss`
            reproduce the paper's ablations, :class:`HingeGeneratorLoss` is BigBiGAN's).
        discriminator_criterion: D's loss on the logits (default :class:`DiscriminatorLoss`;
            :class:`HingeDiscriminatorLoss` is BigBiGAN's).
        latent_shape: the shape of one latent, for prior samples; read off ``E(x)`` if omitted.
        image_shape: ``(C, H, W)`` of the images E takes; a batch of another shape raises
            :class:`~gali_ext.errors.ShapeError` before E runs.
        prior: the prior of ``zp0``: a name (``"normal"``, ``"truncated_normal:2"``,
            ``"uniform"``), a ``torch.distributions.Distribution`` or a callable
            ``(shape, device, dtype, rng) -> Tensor`` (:func:`gali_ext.priors.resolve_prior`).
        condition_sampler: draws the prior chain's condition from the batch's,
            ``(y, rng) -> y_p`` (default: ``y`` shuffled).

    Each batch is checked where it enters (:meth:`chains`): at least one image, on the
    encoder's device, of its dtype (outside autocast), of ``image_shape``; a prior sample of
    ``latent_shape``; and a batch of one image while E or G has batch norm in training mode
    raises :class:`~gali_ext.errors.ConfigError` (batch statistics need two images).
    """

    def __init__(
        self,
        encoder: Callable[[Tensor], Any],
        generator: Callable[..., Tensor],
        head: MultiClassJointDiscriminatorHead,
        providers: Iterable[FeedbackProvider] = (),
        *,
        generator_criterion: nn.Module | None = None,
        discriminator_criterion: nn.Module | None = None,
        latent_shape: Sequence[int] | None = None,
        image_shape: Sequence[int] | None = None,
        prior: Any = None,
        condition_sampler: ConditionSampler | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(head, MultiClassJointDiscriminatorHead):
            hint = ""
            if isinstance(head, nn.Module):
                hint = (
                    ": wrap your discriminator in one, gali_ext.adapters.monolithic_head(spec, "
                    "D) for a single D(x, z) (specs of two slots), or MultiClassJointDiscriminator"
                    "Head(spec, image_features=F, latent_features=H, joint=J, discriminator=D) "
                    "for a D made of parts"
                )
            raise SpecError(
                f"expected a MultiClassJointDiscriminatorHead, got {type(head).__name__}{hint}"
            )
        for what, network in (("encoder", encoder), ("generator", generator), ("head", head)):
            _check_materialised(network, what)
        self.encoder = encoder
        self.generator = generator
        self.head = head
        providers = list(providers)
        self.functions = resolve_node_functions(head.spec, providers)
        self.providers = nn.ModuleList(providers)
        self.generator_criterion = generator_criterion or ProductOfTermsLoss()
        self.discriminator_criterion = discriminator_criterion or DiscriminatorLoss()
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self._batch_norms = [
            m
            for net in (encoder, generator)
            if isinstance(net, nn.Module)
            for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.prior = resolve_prior(prior)
        self.condition_sampler = condition_sampler
        self.audit = StepAudit()

    @property
    def spec(self):
        """The head's :class:`~gali_ext.spec.TupleSpec`."""
        return self.head.spec

    def chains(
        self,
        batch: Tensor | Sequence[Tensor],
        z: Tensor | None = None,
        rng: torch.Generator | None = None,
        *,
        prior_condition: Tensor | None = None,
    ) -> Chains:
        """The step's :class:`Chains` over a batch ``x`` or ``(x, y)`` (and prior sample ``z``,
        prior condition ``prior_condition``), with the providers' node functions."""
        x, y = split_batch(batch)
        self._check_batch(x, z)
        if y is not None and not self.head.conditional:
            raise ConfigError(
                "the batch carries a condition (x, y) but the head is unconditional: pass the "
                "images alone (gali(x)), or build the head with conditions=<number of classes>"
            )
        if y is None and self.head.conditional:
            raise ConfigError(
                "the head is conditional: pass batches (x, y) with the per-sample condition y"
            )
        return Chains(
            x,
            self.encoder,
            self.generator,
            z=z,
            latent_shape=self.latent_shape,
            functions=self.functions,
            rng=rng,
            y=y,
            prior_condition=prior_condition,
            prior=self.prior,
            condition_sampler=self.condition_sampler,
        )

    def _check_batch(self, x: Tensor, z: Tensor | None) -> None:
        """Raise before E runs on a batch that cannot be right (see the class docstring)."""
        if not isinstance(x, Tensor):
            return  # Chains names the type
        if x.dim() >= 1 and x.shape[0] == 0:
            raise ShapeError(
                f"expected a batch of at least one image, got an empty batch {list(x.shape)}"
            )
        if self.image_shape is not None and tuple(x.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ShapeError(f"expected images x of shape [B, {expected}], got {list(x.shape)}")
        reference = _first_tensor(self.encoder)
        if reference is not None and x.device != reference.device:
            raise ShapeError(
                f"the images x are on {x.device}, the encoder on {reference.device}: "
                f"expected x on {reference.device} (x.to({str(reference.device)!r}))"
            )
        if (
            reference is not None
            and reference.is_floating_point()
            and x.is_floating_point()
            and x.dtype != reference.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            raise ShapeError(
                f"expected images x of dtype {reference.dtype} (the encoder's), got {x.dtype}"
            )
        if z is not None and self.latent_shape is not None:
            if not isinstance(z, Tensor) or tuple(z.shape[1:]) != self.latent_shape:
                got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
                expected = ", ".join(map(str, self.latent_shape))
                raise ShapeError(f"expected a prior sample z of shape [B, {expected}], got {got}")
        if x.dim() >= 1 and x.shape[0] == 1 and any(m.training for m in self._batch_norms):
            raise ConfigError(
                "a batch of one image cannot train an encoder or generator with batch norm "
                "(its batch statistics need at least two): use batch_size >= 2"
            )

    def _head(
        self, chains: Chains, variables: dict[str, Tensor], noise: float, rng: Any
    ) -> DiscriminatorOutput:
        return self.head(variables, noise, rng, conditions=chains.conditions)

    def discriminator_objective(
        self,
        x: Tensor | Sequence[Tensor],
        z: Tensor | None = None,
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        differentiable_chains: bool = False,
        check_finite: bool = True,
    ) -> ObjectiveValue:
        """D's loss (eq. 3) on one batch ``x`` or ``(x, y)``; D sees the chain nodes detached
        from E and G.

        The chains run without gradients unless ``differentiable_chains=True``: then they keep
        their graph, so that the generator-encoder step on the same batch reuses them
        (``generator_objective(chains=d.chains)``) instead of running E and G again.
        ``check_finite``: the loss raises :class:`~gali_ext.errors.DivergenceError` on NaN or
        inf logits (a host sync; :func:`~gali_ext.trainer.train_step` passes ``False`` when its
        device-side guard watches the losses).
        """
        with torch.set_grad_enabled(differentiable_chains and torch.is_grad_enabled()):
            chains = self.chains(x, z, rng)
            variables = chains.compute(self.spec.nodes)
        variables = {name: value.detach() for name, value in variables.items()}
        output = self._head(chains, variables, instance_noise_std, rng)
        loss = _criterion_loss(self.discriminator_criterion, output, check_finite)
        self.audit.discriminator_loss(loss, self.head)
        return ObjectiveValue(loss, output.joint, {"discriminator": loss.detach()}, chains, output)

    def generator_objective(
        self,
        x: Tensor | Sequence[Tensor] | None = None,
        z: Tensor | None = None,
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        chains: Chains | None = None,
        check_finite: bool = True,
    ) -> ObjectiveValue:
        """The generator-encoder loss (eq. 4 by default) plus the providers' extra terms.

        D's parameters take no gradient from it. ``chains``: the chains of a discriminator
        step on this batch, made with ``differentiable_chains=True``; their nodes (the same
        prior sample, encoder noise and conditions) are reused, so E and G do not run again,
        and ``x`` may be omitted (it is ignored, as is ``z``). ``check_finite``: as in
        :meth:`discriminator_objective`.
        """
        reused = chains is not None
        if chains is None:
            if x is None:
                raise ConfigError(
                    "generator_objective needs a batch x, or the chains of a discriminator step "
                    "(chains=d.chains)"
                )
            chains = self.chains(x, z, rng)
        variables = chains.compute(self.spec.nodes)
        differentiable = any(v.requires_grad for v in variables.values())
        if reused and torch.is_grad_enabled() and not differentiable:
            raise ConfigError(
                "the chains passed to generator_objective carry no gradient for E and G: make "
                "them with discriminator_objective(..., differentiable_chains=True)"
            )
        with _frozen(self.head):
            output = self._head(chains, variables, instance_noise_std, rng)
        return self._generator_terms(output, chains, check_finite)

    def shared_objectives(
        self,
        x: Tensor | Sequence[Tensor],
        z: Tensor | None = None,
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        *,
        check_finite: bool = True,
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
        ``check_finite``: as in :meth:`discriminator_objective`, for both losses.
        """
        chains = self.chains(x, z, rng)
        variables = chains.compute(self.spec.nodes)
        output = self._head(chains, variables, instance_noise_std, rng)
        d_loss = _criterion_loss(self.discriminator_criterion, output, check_finite)
        self.audit.discriminator_loss(d_loss, self.head)
        d = ObjectiveValue(d_loss, output.joint, {"discriminator": d_loss.detach()}, chains, output)
        return d, self._generator_terms(output, chains, check_finite)

    def _generator_terms(
        self, output: DiscriminatorOutput, chains: Chains, check_finite: bool
    ) -> ObjectiveValue:
        adversarial = _criterion_loss(self.generator_criterion, output, check_finite)
        parts = {"adversarial": adversarial.detach()}
        loss = adversarial
        for i, p in enumerate(self.providers):
            extra = p.extra_loss(chains)
            if extra is not None:
                parts[f"{type(p).__name__.lower()}{i}"] = extra.detach()
                loss = loss + extra
        return ObjectiveValue(loss, output.joint, parts, chains, output)

    def forward(
        self,
        x: Tensor | Sequence[Tensor] | None = None,
        z: Tensor | None = None,
        *,
        role: str = "generator",
        instance_noise_std: float | Tensor = 0.0,
        rng: torch.Generator | None = None,
        differentiable_chains: bool = False,
        chains: Chains | None = None,
        check_finite: bool = True,
    ) -> ObjectiveValue | tuple[ObjectiveValue, ObjectiveValue]:
        """The objective of ``role`` (``"discriminator"`` or ``"generator"``) on a batch, or
        both from one pass (``role="shared"``, :meth:`shared_objectives`).

        One forward per backward, so that ``accelerator.prepare(gali)`` (DDP, autocast) wraps
        the whole step. ``differentiable_chains`` goes to :meth:`discriminator_objective`,
        ``chains`` to :meth:`generator_objective`, ``check_finite`` (check the logits for NaN
        or inf in the losses, a host sync each) to all three.
        """
        if role == "discriminator":
            if x is None:
                raise ConfigError("the discriminator objective needs a batch")
            return self.discriminator_objective(
                x,
                z,
                instance_noise_std,
                rng,
                differentiable_chains=differentiable_chains,
                check_finite=check_finite,
            )
        if role == "generator":
            return self.generator_objective(
                x, z, instance_noise_std, rng, chains=chains, check_finite=check_finite
            )
        if role == "shared":
            if x is None:
                raise ConfigError("the shared objectives need a batch")
            return self.shared_objectives(x, z, instance_noise_std, rng, check_finite=check_finite)
        raise ConfigError(f"role must be 'discriminator', 'generator' or 'shared', got {role!r}")

    def discriminator_loss(
        self, x: Tensor | Sequence[Tensor], z: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """The scalar of :meth:`discriminator_objective`."""
        return self.discriminator_objective(x, z, **kwargs).loss

    def generator_loss(
        self, x: Tensor | Sequence[Tensor] | None = None, z: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """The scalar of :meth:`generator_objective`."""
        return self.generator_objective(x, z, **kwargs).loss


def _check_materialised(network: Any, what: str) -> None:
    """Refuse a network with tensors on the ``meta`` device (shapes without values)."""
    if not isinstance(network, nn.Module):
        return
    for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
        if tensor.is_meta:
            raise ConfigError(
                f"the {what}'s tensor {name!r} is on the meta device (a shape without values): "
                "materialise the module before building GALI (module.to_empty(device='cpu') "
                "then load its weights, or build it outside torch.device('meta'))"
            )


def _first_tensor(network: Any) -> Tensor | None:
    """A parameter (or buffer) of ``network`` when it is a module with one; its device and
    dtype are what its inputs must have."""
    if not isinstance(network, nn.Module):
        return None
    for tensor in network.parameters():
        return tensor
    for tensor in network.buffers():
        return tensor
    return None


def _provider_options(options: Mapping[str, Any] | None, preset: str) -> dict[str, Any]:
    """``options`` as keyword arguments for :meth:`~gali_ext.presets.Preset.providers`: a
    mapping of option names (strings other than ``features``, which is M) to values."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ProviderError(
            f"provider_options must be a mapping of option names to values, got "
            f"{type(options).__name__}"
        )
    for name in options:
        if not isinstance(name, str):
            raise ProviderError(f"provider_options names must be strings, got {name!r}")
        if name == FEATURES:
            raise ProviderError(
                f"preset {preset!r}: pass the pretrained feature model M as build_gali's "
                f"features argument, not as the provider option {FEATURES!r}"
            )
    return dict(options)


def build_gali(
    preset: str,
    models: Any,
    features: FeedbackProvider | None = None,
    *,
    provider_options: Mapping[str, Any] | None = None,
    generator_criterion: nn.Module | None = None,
    discriminator_criterion: nn.Module | None = None,
    extra_hidden: int = 512,
    prior: Any = None,
    unary: bool = False,
    unary_weights: float = 1.0,
) -> GALI:
    """The :class:`GALI` objective of a registered preset (:mod:`gali_ext.presets`) over
    ALI-style networks.

    ``models`` is any object with the attributes ``encoder``, ``generator``, ``image_features``,
    ``latent_features``, ``joint_hidden``, ``negative_slope``, ``image_shape`` and
    ``latent_dim`` (the reference architectures of ``gali_ext.recipes.models`` are one), and
    optionally ``num_classes``: a class-conditional generator ``G(z, y)``, and a head with
    projection terms of ``y`` (docs/design.md, section 9.3). An extra kind such as ``M`` gets a
    spectrally normalised MLP feature network of width ``extra_hidden``. ``prior`` and the
    criteria go to :class:`GALI`, ``unary`` and ``unary_weights`` to the head.

    ``features`` is the pretrained feature model M of the presets that need one (``gali_pt``,
    ``alice_pt``). ``provider_options`` go to the preset's provider factory and from it to the
    providers' constructors (:meth:`~gali_ext.presets.Preset.providers`): ``{"weight": 0.25}``
    is ALICE's lambda for ``alice`` and ``alice_pt`` (eq. (3.11) of docs/design.md),
    ``{"fill": 0.0}`` the masks' fill for ``gali_mix``. An option left out keeps the provider's
    own default; one the preset does not take raises :class:`ProviderError` listing those it
    takes (``get_preset(preset).options``).
    """
    registered = get_preset(preset)
    spec = registered.spec
    options = _provider_options(provider_options, preset)
    providers = registered.providers(features, **options)
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
        unary=unary,
        unary_weights=unary_weights,
        conditions=getattr(models, "num_classes", None),
    )
    return GALI(
        models.encoder,
        models.generator,
        head,
        providers,
        generator_criterion=generator_criterion,
        discriminator_criterion=discriminator_criterion,
        latent_shape=(models.latent_dim,),
        image_shape=getattr(models, "image_shape", None),
        prior=prior,
    )
