"""Generator adapter: call a user generator the way the chains do, ``x = G(z)``."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gali_ext.errors import ConfigError, ShapeError

from ._shapes import as_shape, format_shape, view_as

__all__ = ["LatentGenerator"]


class LatentGenerator(nn.Module):
    """A user generator called as ``module(z, *extra_args, **extra_kwargs)``; in a conditional
    step, with the condition ``y`` of the chain it works on as ``condition`` says.

    Args:
        module: the user's generator.
        latent_shape: the shape of one latent as the library draws it; when given, ``z`` must be
            ``[B, *latent_shape]``.
        extra_args: positional arguments passed after ``z`` on every call.
        extra_kwargs: keyword arguments passed on every call. A value that is callable (and not
            an ``nn.Module``) is called with the batch size ``B`` on each call and its result
            passed instead, moved to ``z``'s device when it is a tensor: e.g. BigGAN's class
            vector ``{"y": lambda b: torch.zeros(b, dtype=torch.long)}``.
        input_shape: the shape of one latent as the generator takes it; ``z`` is viewed as
            ``[B, *input_shape]`` (``[B, 120] -> [B, 120, 1, 1]``).
        condition: how the generator takes the per-sample condition of a conditional step
            (docs/design.md, section 9.3): a keyword name (``"y"``: ``module(z, y=y)``), True
            (``module(z, y, *extra_args)``), or False (it takes none: only D reads it). None
            (default): the generator is unconditional, and a condition reaching it is an error
            naming these choices, never silently dropped.

    Shapes: ``forward(z: [B, *latent_shape]) -> x: [B, C, H, W]``, floating point; anything else
    from the generator raises :class:`~gali_ext.errors.ShapeError`.
    """

    def __init__(
        self,
        module: Callable[..., Tensor],
        latent_shape: Sequence[int] | int | None = None,
        extra_args: Sequence[Any] | None = None,
        extra_kwargs: Mapping[str, Any] | None = None,
        input_shape: Sequence[int] | int | None = None,
        condition: bool | str | None = None,
    ) -> None:
        super().__init__()
        if not callable(module):
            raise ConfigError(f"expected the generator to be callable, got {type(module).__name__}")
        if not (
            condition is None
            or isinstance(condition, bool)
            or (isinstance(condition, str) and condition.isidentifier())
        ):
            raise ConfigError(
                "condition must be a keyword name (e.g. 'y'), True (positional, after z), False "
                f"(the generator takes none) or None, got {condition!r}"
            )
        self.condition = condition
        if extra_kwargs is not None and not isinstance(extra_kwargs, Mapping):
            raise ConfigError(f"extra_kwargs must be a mapping, got {type(extra_kwargs).__name__}")
        self.module = module
        self.latent_shape = as_shape(latent_shape, "latent_shape")
        self.input_shape = as_shape(input_shape, "input_shape")
        self.extra_args = tuple(extra_args or ())
        self.extra_kwargs = dict(extra_kwargs or {})
        if (
            self.latent_shape is not None
            and self.input_shape is not None
            and math.prod(self.latent_shape) != math.prod(self.input_shape)
        ):
            raise ConfigError(
                f"latent_shape {format_shape(self.latent_shape)} and input_shape "
                f"{format_shape(self.input_shape)} hold different numbers of values per sample"
            )

    def extra_repr(self) -> str:
        shapes = {"latent_shape": self.latent_shape, "input_shape": self.input_shape}
        parts = [f"{k}={v}" for k, v in shapes.items() if v is not None]
        if self.extra_args:
            parts.append(f"extra_args={len(self.extra_args)}")
        if self.extra_kwargs:
            parts.append(f"extra_kwargs={sorted(self.extra_kwargs)}")
        if self.condition is not None:
            parts.append(f"condition={self.condition!r}")
        return ", ".join(parts)

    def forward(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """``x = module(z, ...)``: ``[B, *latent_shape] -> [B, C, H, W]``; ``condition``: the
        per-sample condition ``[B, ...]`` of a conditional step."""
        if not isinstance(z, Tensor) or z.dim() < 2:
            got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ShapeError(f"expected latents z of shape [B, ...], got {got}")
        batch = z.shape[0]
        if self.latent_shape is not None and tuple(z.shape[1:]) != self.latent_shape:
            raise ShapeError(
                f"expected latents z of shape {format_shape(self.latent_shape)} (latent_shape), "
                f"got {list(z.shape)}"
            )
        z = view_as(z, self.input_shape, "the latent z", "the generator's input_shape")
        kwargs = {k: self._per_call(v, batch, z.device) for k, v in self.extra_kwargs.items()}
        args = list(self.extra_args)
        if condition is not None:
            if self.condition is None:
                raise ConfigError(
                    "the step is conditional but this LatentGenerator was not told how the "
                    "generator takes the condition: pass condition='name' (its keyword "
                    "argument), condition=True (positional, after z) or condition=False (it "
                    "takes none; only D reads the condition)"
                )
            if self.condition is True:
                args.insert(0, condition)
            elif isinstance(self.condition, str):
                kwargs[self.condition] = condition
        x = self.module(z, *args, **kwargs)
        if (
            not isinstance(x, Tensor)
            or x.dim() != 4
            or x.shape[0] != batch
            or not x.is_floating_point()
        ):
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(
                f"expected the generator to return float images [{batch}, C, H, W] for a batch "
                f"of {batch} latents, got {got}"
            )
        return x

    @staticmethod
    def _per_call(value: Any, batch: int, device: torch.device) -> Any:
        if not callable(value) or isinstance(value, nn.Module):
            return value
        value = value(batch)
        return value.to(device) if isinstance(value, Tensor) else value
