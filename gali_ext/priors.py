"""The prior ``p(z)`` that draws the prior chain's first node ``zp0`` (docs/design.md, section 9.4).

A prior is anything :func:`resolve_prior` accepts:

- a name: ``"normal"`` (N(0, I), the default), ``"truncated_normal"`` or
  ``"truncated_normal:BOUND"`` (N(0, I) restricted to ``[-BOUND, BOUND]`` per coordinate,
  default 2), ``"uniform"`` or ``"uniform:BOUND"`` (U(-BOUND, BOUND), default 1: BiGAN's);
- a ``torch.distributions.Distribution``, sampled with ``sample``;
- a callable ``prior(shape, device, dtype, rng) -> Tensor``.

:func:`resolve_prior` turns each into a :class:`Prior`, the one object the chains call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, ShapeError

__all__ = ["PRIORS", "Prior", "available_priors", "resolve_prior"]

PriorFunction = Callable[
    [tuple[int, ...], torch.device, torch.dtype, "torch.Generator | None"], Tensor
]


class Prior:
    """A prior over latents: ``prior(shape, device, dtype, rng)`` draws a tensor of ``shape``.

    Args:
        sample: the drawing function.
        name: how it is shown (``"truncated_normal:2.0"``).
    """

    def __init__(self, sample: PriorFunction, name: str) -> None:
        self._sample = sample
        self.name = name

    def __call__(
        self,
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rng: torch.Generator | None = None,
    ) -> Tensor:
        z = self._sample(tuple(shape), torch.device(device), dtype, rng)
        if not isinstance(z, Tensor) or tuple(z.shape) != tuple(shape):
            got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ShapeError(f"the prior {self.name} should draw a tensor {list(shape)}, got {got}")
        if not z.is_floating_point():
            raise ShapeError(f"the prior {self.name} drew {z.dtype} values, expected floats")
        return z.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"Prior({self.name})"


def _normal(shape, device, dtype, rng):
    return torch.randn(shape, generator=rng, device=device, dtype=dtype)


def _truncated_normal(bound: float) -> PriorFunction:
    """N(0, 1) restricted to ``[-bound, bound]``, by the inverse CDF of a uniform draw."""

    def sample(shape, device, dtype, rng):
        u = torch.rand(shape, generator=rng, device=device, dtype=torch.float64)
        edge = 0.5 * (1.0 + math.erf(bound / math.sqrt(2.0)))  # Phi(bound)
        p = (1.0 - edge) + u * (2.0 * edge - 1.0)  # uniform on [Phi(-b), Phi(b)]
        z = math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)
        return z.clamp(-bound, bound).to(dtype)

    return sample


def _uniform(bound: float) -> PriorFunction:
    def sample(shape, device, dtype, rng):
        return (torch.rand(shape, generator=rng, device=device, dtype=dtype) * 2 - 1) * bound

    return sample


PRIORS: dict[str, tuple[Callable[[float], PriorFunction], float | None]] = {
    "normal": (lambda _: _normal, None),
    "truncated_normal": (_truncated_normal, 2.0),
    "uniform": (_uniform, 1.0),
}
"""The named priors: name -> (factory of the bound, default bound or None when it takes none)."""


def available_priors() -> list[str]:
    """The prior names :func:`resolve_prior` accepts (``NAME`` or ``NAME:BOUND``)."""
    return list(PRIORS)


def _from_name(text: str) -> Prior:
    name, _, argument = text.partition(":")
    entry = PRIORS.get(name.strip())
    if entry is None:
        raise ConfigError(
            f"unknown prior {text!r}; known: normal, truncated_normal[:BOUND], uniform[:BOUND]"
        )
    factory, default = entry
    if default is None:
        if argument:
            raise ConfigError(f"the prior {name!r} takes no parameter, got {text!r}")
        return Prior(factory(0.0), name)
    try:
        bound = float(argument) if argument else default
    except ValueError:
        raise ConfigError(f"prior {text!r}: the bound must be a number, got {argument!r}") from None
    if not (bound > 0 and math.isfinite(bound)):
        raise ConfigError(f"prior {text!r}: the bound must be a positive number, got {bound}")
    return Prior(factory(bound), f"{name}:{bound:g}")


def _from_distribution(dist: torch.distributions.Distribution) -> Prior:
    event = tuple(dist.batch_shape + dist.event_shape)

    def sample(shape, device, dtype, rng):
        # A Distribution draws from torch's global generator; rng cannot be passed to it.
        if event and tuple(shape[1:]) != event:
            raise ShapeError(
                f"the prior {type(dist).__name__} draws latents of shape {list(event)}, the "
                f"chains need {list(shape[1:])}"
            )
        with torch.no_grad():
            return dist.sample(shape[:1] if event else shape)

    return Prior(sample, type(dist).__name__)


_PRIOR_SIGNATURE = (
    "prior(shape, device, dtype, rng) -> Tensor, or a project's own prior(n) or prior(shape) "
    "returning [n, *latent_shape]"
)


def _from_callable(fn: Callable[..., Any]) -> Prior:
    """A callable prior: the standard signature as is; a one-argument callable (a project's own
    ``sample(batch_size)`` or ``sample(shape)``) adapted on its first draw."""
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as documented
        return Prior(fn, name)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in parameters if p.kind in kinds]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    if variadic or (len(positional) >= 4 and len(required) <= 4):
        return Prior(fn, name)
    if len(required) <= 1 and positional:
        return Prior(_one_argument(fn, name), name)
    shown = ", ".join(p.name for p in required)
    raise ConfigError(f"the prior {name}({shown}) cannot be called as {_PRIOR_SIGNATURE}")


def _one_argument(fn: Callable[..., Any], name: str) -> PriorFunction:
    """Draw with ``fn(n)`` or ``fn(shape)``, whichever gives ``[n, *latent_shape]`` on the first
    draw (``rng`` does not reach it)."""
    chosen: list[str] = []

    def call(how: str, shape: tuple[int, ...]) -> Any:
        return fn(shape[0]) if how == "n" else fn(shape)

    def sample(shape, device, dtype, rng):
        if chosen:
            return call(chosen[0], shape)
        tried = []
        for how in ("n", "shape"):
            try:
                z = call(how, shape)
            except (TypeError, ValueError, RuntimeError) as error:
                tried.append(f"{name}({'n' if how == 'n' else 'shape'}): {error}")
                continue
            if isinstance(z, Tensor) and tuple(z.shape) == tuple(shape):
                chosen.append(how)
                return z
            got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            tried.append(f"{name}({'n' if how == 'n' else 'shape'}) gave {got}")
        raise ShapeError(
            f"the prior {name} should draw latents {list(shape)}; tried {'; '.join(tried)}. "
            f"Expected {_PRIOR_SIGNATURE}"
        )

    return sample


def resolve_prior(prior: Any = None) -> Prior:
    """The :class:`Prior` of a name, a ``torch.distributions.Distribution``, a callable
    ``(shape, device, dtype, rng) -> Tensor``, or a :class:`Prior`; None is ``"normal"``.

    A project's own one-argument sampler, ``sample(n)`` or ``sample(shape)``, is adapted: the
    first draw tries ``sample(n)``, then ``sample(shape)``, and keeps the one that returns
    ``[n, *latent_shape]`` (the step's ``rng`` does not reach it). A callable of another
    signature raises :class:`~gali_ext.errors.ConfigError` when it is resolved (when
    :class:`~gali_ext.GALI` is built), naming the signatures it takes.

    A distribution whose ``batch_shape + event_shape`` is empty (``Normal(0., 1.)``) draws every
    coordinate independently; otherwise it must be the latent shape, and one sample is drawn per
    row. Distributions draw from torch's global generator (the step's ``rng`` does not reach
    them); the named priors and callables use ``rng``.
    """
    if prior is None:
        return _from_name("normal")
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, str):
        return _from_name(prior)
    if isinstance(prior, torch.distributions.Distribution):
        return _from_distribution(prior)
    if callable(prior):
        return _from_callable(prior)
    raise ConfigError(
        "a prior is a name (normal, truncated_normal[:BOUND], uniform[:BOUND]), a "
        "torch.distributions.Distribution or a callable (shape, device, dtype, rng) -> Tensor, "
        f"got {type(prior).__name__}"
    )
