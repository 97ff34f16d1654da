"""Encoder adapters: bring a user encoder's output to what the chains sample from.

:func:`gali_ext.chains.sample_latent` takes a latent tensor ``z`` (a deterministic encoder), a
pair ``(mu, log_sigma)`` (reparameterised as ``z = mu + exp(log_sigma) * eps``,
``eps ~ N(0, I)``) or a ``torch.distributions.Distribution`` (``rsample()``). Encoders written
for other code bases return ``(mu, logvar)``, ``(mu, sigma)``, dicts, or latents of another
shape; :class:`LatentEncoder` converts them, with

    log_sigma = logvar / 2            (output="mu_logvar")
    log_sigma = log(sigma)            (output="mu_sigma")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from gali_ext.errors import ConfigError, ShapeError

from ._shapes import as_shape, format_shape, view_as

__all__ = ["LatentEncoder", "LatentOutput", "StochasticEncoder"]

#: what a :class:`LatentEncoder` returns: what :func:`gali_ext.chains.sample_latent` accepts
LatentOutput = Tensor | tuple[Tensor, Tensor] | Distribution

OUTPUTS = ("auto", "tensor", "mu_log_sigma", "mu_logvar", "mu_sigma", "distribution")
_PAIRS = {"mu_log_sigma": "(mu, log_sigma)", "mu_logvar": "(mu, logvar)", "mu_sigma": "(mu, sigma)"}


def to_log_sigma(second: Tensor, output: str) -> Tensor:
    """The log standard deviation from the second element of a Gaussian encoder's pair.

    ``output="mu_log_sigma"``: ``second`` itself; ``"mu_logvar"``: ``second / 2``;
    ``"mu_sigma"``: ``log(second)`` (sigma clamped at the dtype's smallest normal number).
    """
    if output == "mu_logvar":
        return 0.5 * second
    if output == "mu_sigma":
        return second.clamp_min(torch.finfo(second.dtype).tiny).log()
    return second


class LatentEncoder(nn.Module):
    """A user encoder whose output is brought to the contract of ``sample_latent``.

    Args:
        module: the user's encoder ``x -> output``.
        output: what ``module(x)`` returns:

            - ``"tensor"``: a latent ``z: [B, ...]`` (BiGAN, BigBiGAN); returned as is;
            - ``"mu_logvar"``: ``(mu, logvar)``; returns ``(mu, logvar / 2)``;
            - ``"mu_log_sigma"``: ``(mu, log_sigma)``; returned as is;
            - ``"mu_sigma"``: ``(mu, sigma)``; returns ``(mu, log(sigma))``;
            - ``"distribution"``: a ``torch.distributions.Distribution`` with ``rsample``;
            - ``"auto"``: a tensor or a distribution. A pair is refused with a
              :class:`~gali_ext.errors.ConfigError`: whether it holds a log-variance, a
              log-sigma or a sigma cannot be told from the values, so it is never guessed;
            - a callable mapping the raw output (a dict, an object with attributes) to a tensor,
              a distribution or the pair ``(mu, log_sigma)`` that ``sample_latent`` takes, e.g.
              ``lambda out: (out["mu"], 0.5 * out["logvar"])``.
        latent_shape: the shape of one latent as the generator and the head use it; the latent
            (or ``mu`` and ``log_sigma``) is viewed as ``[B, *latent_shape]``, so a BigBiGAN
            encoder's ``[B, 120, 1, 1]`` becomes ``[B, 120]``. A distribution is not reshaped;
            its ``batch_shape + event_shape`` must already be ``[B, *latent_shape]``.
        flatten: view the latent as ``[B, d]`` (instead of naming ``latent_shape=(d,)``).
        min_log_sigma: clamp ``log_sigma`` from below at this value (None: no clamp); see
            :class:`StochasticEncoder`.

    Shapes: ``forward(x: [B, ...])`` returns ``z: [B, *latent_shape]``, or
    ``(mu, log_sigma)``, each ``[B, *latent_shape]``, or the distribution. Errors:
    :class:`~gali_ext.errors.ShapeError` when the output is not what ``output`` says, its batch
    size is not ``x``'s, or it does not fit ``latent_shape``.
    """

    def __init__(
        self,
        module: Callable[[Tensor], Any],
        output: str | Callable[[Any], Any] = "auto",
        latent_shape: Sequence[int] | int | None = None,
        flatten: bool = False,
        *,
        min_log_sigma: float | None = None,
    ) -> None:
        super().__init__()
        if not callable(module):
            raise ConfigError(f"expected the encoder to be callable, got {type(module).__name__}")
        if not callable(output) and output not in OUTPUTS:
            raise ConfigError(
                f"output must be one of {', '.join(map(repr, OUTPUTS))} or a callable that maps "
                f"the encoder's output to one of them, got {output!r}"
            )
        shape = as_shape(latent_shape, "latent_shape")
        if flatten and shape is not None:
            raise ConfigError(
                f"pass either latent_shape={shape} or flatten=True, not both (flatten=True is "
                "latent_shape=(d,) with d read off the encoder's output)"
            )
        if min_log_sigma is not None and not math.isfinite(min_log_sigma):
            raise ConfigError(f"min_log_sigma must be a finite number, got {min_log_sigma!r}")
        self.module = module
        self.output = output
        self.latent_shape = shape
        self.flatten = bool(flatten)
        self.min_log_sigma = min_log_sigma

    def extra_repr(self) -> str:
        output = getattr(self.output, "__name__", "callable") if callable(self.output) else None
        parts = [f"output={output or repr(self.output)}"]
        if self.latent_shape is not None:
            parts.append(f"latent_shape={self.latent_shape}")
        if self.flatten:
            parts.append("flatten=True")
        if self.min_log_sigma is not None:
            parts.append(f"min_log_sigma={self.min_log_sigma}")
        return ", ".join(parts)

    def forward(self, x: Tensor) -> LatentOutput:
        raw = self.module(x)
        batch = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None
        if callable(self.output):
            try:
                selected = self.output(raw)
            except (AttributeError, TypeError, IndexError, KeyError, ValueError) as error:
                raise ConfigError(
                    f"the encoder's output= callable failed on {_described(raw)}: "
                    f"{type(error).__name__}: {error}; write it for what the encoder returns "
                    "(e.g. output=lambda out: (out[0], out[1]) for (mu, log_sigma, ...))"
                ) from error
            return self._read(selected, None, batch)
        return self._read(raw, self.output, batch)

    def _read(self, raw: Any, output: str | None, batch: int | None) -> LatentOutput:
        """``output`` None: the result of an ``output`` callable."""
        source = "the encoder" if output is not None else "output=callable"
        if output in ("auto", None):
            if isinstance(raw, Tensor):
                output = "tensor"
            elif isinstance(raw, Distribution):
                output = "distribution"
            elif isinstance(raw, (tuple, list)) and len(raw) == 2 and output is None:
                output = "mu_log_sigma"  # the callable's contract: sample_latent's own pair
            elif isinstance(raw, (tuple, list)) and len(raw) == 2:
                raise ConfigError(
                    "the encoder returned a pair, and whether its second element is a "
                    "log-variance, a log-sigma or a sigma is not guessed: pass "
                    "output='mu_logvar' for (mu, logvar), output='mu_log_sigma' for "
                    "(mu, log_sigma) or output='mu_sigma' for (mu, sigma)"
                )
            else:
                raise ShapeError(
                    f"expected {source} to return a latent tensor, a pair or a "
                    f"torch.distributions.Distribution, got {_describe(raw)}; for a dict or an "
                    "object pass output=callable, e.g. output=lambda out: out['z']"
                )
        if output == "tensor":
            return self._latent(raw, source, batch)
        if output == "distribution":
            return self._distribution(raw, source, batch)
        return self._pair(raw, output, source, batch)

    def _view(self, t: Tensor, what: str) -> Tensor:
        if self.flatten:
            return t.flatten(1)
        return view_as(t, self.latent_shape, what, "the declared latent_shape")

    def _latent(self, z: Any, source: str, batch: int | None) -> Tensor:
        if not isinstance(z, Tensor):
            raise ShapeError(
                f"output='tensor' expects {source} to return a latent tensor, got {_describe(z)}"
            )
        _check_tensor(z, f"the latent from {source}", batch)
        return self._view(z, "the encoder's latent")

    def _pair(self, raw: Any, output: str, source: str, batch: int | None) -> tuple[Tensor, Tensor]:
        names = _PAIRS[output]
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
            raise ShapeError(
                f"output={output!r} expects {source} to return a pair {names}, got {_describe(raw)}"
            )
        mu, second = raw
        for name, t in zip(names.strip("()").split(", "), raw):
            if not isinstance(t, Tensor):
                raise ShapeError(f"{name} of {source}'s pair {names} is {_describe(t)}")
            _check_tensor(t, f"{name} of {source}'s pair {names}", batch)
        if mu.shape != second.shape:
            raise ShapeError(
                f"{source}'s pair {names} has mu of shape {list(mu.shape)} but the second "
                f"element of shape {list(second.shape)}; expected equal shapes"
            )
        log_sigma = to_log_sigma(second, output)
        if self.min_log_sigma is not None:
            log_sigma = log_sigma.clamp_min(self.min_log_sigma)
        return self._view(mu, "the encoder's mu"), self._view(log_sigma, "the encoder's log_sigma")

    def _distribution(self, d: Any, source: str, batch: int | None) -> Distribution:
        if not isinstance(d, Distribution):
            raise ShapeError(
                f"output='distribution' expects {source} to return a "
                f"torch.distributions.Distribution, got {_describe(d)}"
            )
        shape = tuple(d.batch_shape + d.event_shape)
        if not shape or (batch is not None and shape[0] != batch):
            raise ShapeError(
                f"{source}'s {type(d).__name__} has batch_shape + event_shape {list(shape)}; "
                f"expected [{batch if batch is not None else 'B'}, ...]: one latent per image"
            )
        want = self.latent_shape
        if self.flatten and len(shape) != 2:
            want = (math.prod(shape[1:]),)
        if want is not None and shape[1:] != want:
            raise ShapeError(
                f"{source}'s {type(d).__name__} has batch_shape + event_shape {list(shape)}, "
                f"expected {format_shape(want)}; a distribution is not reshaped: return its "
                "parameters as a pair, or reshape them in an output=callable"
            )
        return d


class StochasticEncoder(LatentEncoder):
    """A Gaussian encoder ``x -> (mu, s)``, with log_sigma clamped from below for stability.

    ``parameterisation`` says what ``s`` is: ``"log_sigma"``, ``"logvar"`` (``log_sigma =
    s / 2``) or ``"sigma"`` (``log_sigma = log s``). Returns ``(mu, max(log_sigma,
    min_log_sigma))``; the clamp keeps ``exp(log_sigma)`` away from 0, where the encoder's
    entropy and its gradients blow up. A :class:`LatentEncoder` with the matching ``output``.
    """

    PARAMETERISATIONS = {"log_sigma": "mu_log_sigma", "logvar": "mu_logvar", "sigma": "mu_sigma"}

    def __init__(
        self,
        module: Callable[[Tensor], Any],
        parameterisation: str = "log_sigma",
        min_log_sigma: float = -10.0,
        *,
        latent_shape: Sequence[int] | int | None = None,
        flatten: bool = False,
    ) -> None:
        output = self.PARAMETERISATIONS.get(parameterisation)
        if output is None:
            raise ConfigError(
                f"parameterisation must be one of {', '.join(map(repr, self.PARAMETERISATIONS))}"
                f", got {parameterisation!r}"
            )
        super().__init__(module, output, latent_shape, flatten, min_log_sigma=min_log_sigma)
        self.parameterisation = parameterisation


def _check_tensor(t: Tensor, what: str, batch: int | None) -> None:
    if t.dim() < 2 or not t.is_floating_point():
        raise ShapeError(
            f"expected {what} to be a floating-point tensor [B, ...] with at least 2 dimensions, "
            f"got {t.dtype} {list(t.shape)}"
        )
    if batch is not None and t.shape[0] != batch:
        raise ShapeError(
            f"expected {what} to have the images' batch size {batch}, got {list(t.shape)}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _described(raw: Any) -> str:
    """What an encoder returned, for an error: a tensor's shape, a tuple's element shapes."""
    if isinstance(raw, Tensor):
        return f"a tensor {list(raw.shape)}"
    if isinstance(raw, (tuple, list)):
        parts = [str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__ for t in raw]
        return f"a {type(raw).__name__} of {len(raw)} ({', '.join(parts)})"
    return f"a {type(raw).__name__}"
