"""Adapters: wrap any user encoder/generator pair for gali-ext.

``GALI(encoder, generator, head, providers)`` calls ``encoder(x)`` and ``generator(z)``. An
encoder may return a latent tensor (deterministic, BiGAN/BigBiGAN), a pair ``(mu, log_sigma)``
or a ``torch.distributions.Distribution`` (see :func:`gali_ext.chains.sample_latent`). These
adapters bring other conventions to that contract:

- :class:`LatentEncoder`: ``(mu, logvar)``, ``(mu, log_sigma)``, ``(mu, sigma)``, distributions,
  dicts through a callable, and latents of another shape (BigBiGAN's ``[B, 120, 1, 1]``);
- :class:`StochasticEncoder`: a Gaussian encoder returning ``(mu, s)``, clamped for stability;
- :class:`LatentGenerator`: generators that take extra arguments (a class vector) or another
  input shape;
- :class:`EncoderGenerator`: the pair, with ``hidden_features`` for representation evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gali_ext.errors import ConfigError, ShapeError

__all__ = ["EncoderGenerator", "LatentEncoder", "LatentGenerator", "StochasticEncoder"]

_OUTPUTS = ("auto", "tensor", "mu_log_sigma", "mu_logvar", "mu_sigma", "distribution")


def _reshape(t: Tensor, shape: tuple[int, ...] | None, what: str) -> Tensor:
    if shape is None:
        return t
    if t.shape[1:].numel() != math.prod(shape):
        raise ShapeError(
            f"the encoder's {what} has shape {list(t.shape)}, which cannot be viewed as the "
            f"declared latent shape [B, {', '.join(map(str, shape))}]"
        )
    return t.reshape(t.shape[0], *shape)


class LatentEncoder(nn.Module):
    """A user encoder whose output is brought to what the chains sample from.

    Args:
        module: the user's encoder.
        output: how to read its output: ``"tensor"`` (deterministic z), ``"mu_log_sigma"``,
            ``"mu_logvar"`` (``log_sigma = logvar / 2``), ``"mu_sigma"``, ``"distribution"``, a
            callable mapping the raw output to one of those forms, or ``"auto"`` (a tensor or a
            distribution; a pair must be declared, the parameterisation is never guessed).
        latent_shape: the latent shape the generator and head use; the encoder's latent (and
            its mu and log_sigma) is reshaped to ``[B, *latent_shape]``.
        min_log_sigma: log_sigma is clamped from below at this value (None: no clamp).
    """

    def __init__(
        self,
        module: nn.Module,
        output: str | Callable[[Any], Any] = "auto",
        latent_shape: Sequence[int] | None = None,
        min_log_sigma: float | None = None,
    ) -> None:
        super().__init__()
        if not callable(output) and output not in _OUTPUTS:
            raise ConfigError(
                f"output must be one of {', '.join(_OUTPUTS)} or a callable, got {output!r}"
            )
        self.module = module
        self.output = output
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.min_log_sigma = min_log_sigma

    def _pair(self, raw: Any, kind: str) -> tuple[Tensor, Tensor]:
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
            raise ShapeError(
                f"output={kind!r} expects the encoder to return a pair, got {type(raw).__name__}"
            )
        mu, second = raw
        if kind == "mu_logvar":
            log_sigma = 0.5 * second
        elif kind == "mu_sigma":
            log_sigma = second.clamp_min(1e-12).log()
        else:
            log_sigma = second
        if self.min_log_sigma is not None:
            log_sigma = log_sigma.clamp_min(self.min_log_sigma)
        return _reshape(mu, self.latent_shape, "mu"), _reshape(
            log_sigma, self.latent_shape, "log_sigma"
        )

    def forward(
        self, x: Tensor
    ) -> Tensor | tuple[Tensor, Tensor] | torch.distributions.Distribution:
        raw = self.module(x)
        kind = self.output
        if callable(kind):
            raw, kind = kind(raw), "auto"
        if kind == "auto":
            if isinstance(raw, (tuple, list)):
                raise ConfigError(
                    "the encoder returned a pair; say what it holds with "
                    "output='mu_logvar', 'mu_log_sigma' or 'mu_sigma'"
                )
            kind = "distribution" if isinstance(raw, torch.distributions.Distribution) else "tensor"
        if kind == "tensor":
            if not isinstance(raw, Tensor):
                raise ShapeError(
                    f"output='tensor' expects a latent tensor, got {type(raw).__name__}"
                )
            return _reshape(raw, self.latent_shape, "latent")
        if kind == "distribution":
            if not isinstance(raw, torch.distributions.Distribution):
                raise ShapeError(
                    f"output='distribution' expects a Distribution, got {type(raw).__name__}"
                )
            if self.latent_shape is not None and tuple(raw.batch_shape[1:]) != self.latent_shape:
                raise ShapeError(
                    f"the encoder's distribution has batch shape {list(raw.batch_shape)}, "
                    f"expected [B, {', '.join(map(str, self.latent_shape))}]"
                )
            return raw
        return self._pair(raw, kind)


class StochasticEncoder(LatentEncoder):
    """A Gaussian encoder returning ``(mu, s)`` with ``s`` a log-sigma, log-variance or sigma
    (``parameterisation``), log_sigma clamped below at ``min_log_sigma`` for stability."""

    def __init__(
        self,
        module: nn.Module,
        parameterisation: str = "log_sigma",
        min_log_sigma: float = -10.0,
        latent_shape: Sequence[int] | None = None,
    ) -> None:
        kinds = {"log_sigma": "mu_log_sigma", "logvar": "mu_logvar", "sigma": "mu_sigma"}
        if parameterisation not in kinds:
            raise ConfigError(
                f"parameterisation must be one of {list(kinds)}, got {parameterisation!r}"
            )
        super().__init__(module, kinds[parameterisation], latent_shape, min_log_sigma)


class LatentGenerator(nn.Module):
    """A user generator called as ``module(z, *extra_args, **extra_kwargs)``.

    ``input_shape`` reshapes the library's latent ``[B, *latent_shape]`` to what the generator
    takes (e.g. ``[B, 120, 1, 1]``). A value in ``extra_kwargs`` that is callable is called with
    the batch size and device each time (a per-batch class vector for BigGAN). The output must
    be a floating ``[B, C, H, W]`` tensor.
    """

    def __init__(
        self,
        module: nn.Module,
        input_shape: Sequence[int] | None = None,
        extra_args: Sequence[Any] = (),
        extra_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.extra_args = tuple(extra_args)
        self.extra_kwargs = dict(extra_kwargs or {})

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[0]
        if self.input_shape is not None:
            if z.shape[1:].numel() != math.prod(self.input_shape):
                raise ShapeError(
                    f"latent of shape {list(z.shape)} cannot be viewed as the generator's input "
                    f"shape [B, {', '.join(map(str, self.input_shape))}]"
                )
            z = z.reshape(batch, *self.input_shape)
        kwargs = {
            k: (v(batch, z.device) if callable(v) else v) for k, v in self.extra_kwargs.items()
        }
        x = self.module(z, *self.extra_args, **kwargs)
        if (
            not isinstance(x, Tensor)
            or x.dim() != 4
            or x.shape[0] != batch
            or not x.is_floating_point()
        ):
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(
                f"the generator should return float images [{batch}, C, H, W], got {got}"
            )
        return x


class EncoderGenerator(nn.Module):
    """A user's encoder/generator pair, adapted: ``.encoder`` and ``.generator`` plug into
    :class:`gali_ext.GALI`; ``hidden_features(x)`` gives the representation to evaluate.

    Args:
        encoder, generator: the user's modules.
        encoder_output: see :class:`LatentEncoder` ``output``.
        latent_shape: the latent shape the library uses (default: whatever E returns).
        generator_input_shape: see :class:`LatentGenerator` ``input_shape``.
        generator_kwargs: see :class:`LatentGenerator` ``extra_kwargs``.
        feature_layers: dotted names of sub-modules of the user's encoder whose outputs, with
            the latent mean, make ``hidden_features`` (the paper's last three hidden layers).
    """

    def __init__(
        self,
        encoder: nn.Module,
        generator: nn.Module,
        *,
        encoder_output: str | Callable[[Any], Any] = "auto",
        latent_shape: Sequence[int] | None = None,
        generator_input_shape: Sequence[int] | None = None,
        generator_kwargs: Mapping[str, Any] | None = None,
        feature_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = LatentEncoder(encoder, encoder_output, latent_shape)
        self.generator = LatentGenerator(generator, generator_input_shape, (), generator_kwargs)
        self.latent_shape = self.encoder.latent_shape
        self.feature_layers = list(feature_layers or [])
        modules = dict(encoder.named_modules())
        unknown = [n for n in self.feature_layers if n not in modules]
        if unknown:
            raise ConfigError(
                f"the encoder has no layer {unknown[0]!r}; some of its layers: {list(modules)[1:8]}"
            )
        self._layers = [modules[n] for n in self.feature_layers]

    def hidden_features(self, x: Tensor) -> list[Tensor]:
        """``[B, d]`` features: the ``feature_layers`` outputs (or the user encoder's own
        ``hidden_features``) followed by the latent mean."""
        from gali_ext.chains import latent_mean

        user = self.encoder.module
        if not self._layers and hasattr(user, "hidden_features"):
            return [f.flatten(1) for f in user.hidden_features(x)]
        captured: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda m, i, o: captured.append(o)) for m in self._layers]
        try:
            mean = latent_mean(self.encoder(x))
        finally:
            for hook in hooks:
                hook.remove()
        return [c.flatten(1) for c in captured] + [mean.flatten(1)]
