"""Shape helpers shared by the encoder and generator adapters."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from gali_ext.errors import ConfigError, ShapeError


def as_shape(shape: Sequence[int] | int | None, name: str) -> tuple[int, ...] | None:
    """``shape`` as a tuple of positive ints (an int ``d`` means ``(d,)``); None stays None."""
    if shape is None:
        return None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ConfigError(
            f"{name} must be a non-empty sequence of positive ints (one latent, without the "
            f"batch dimension), got {shape!r}"
        )
    return dims


def format_shape(shape: tuple[int, ...]) -> str:
    """``(120, 1, 1) -> "[B, 120, 1, 1]"``."""
    return "[" + ", ".join(["B", *map(str, shape)]) + "]"


def view_as(t: Tensor, shape: tuple[int, ...] | None, what: str, target: str) -> Tensor:
    """``t: [B, ...] -> [B, *shape]`` when both hold as many elements per sample.

    ``what`` names ``t`` and ``target`` names ``shape`` in the :class:`ShapeError` raised when
    they do not (``the encoder's latent of shape [3, 100, 1, 1] ... [B, 120]``).
    """
    if shape is None or tuple(t.shape[1:]) == shape:
        return t
    have, want = t.shape[1:].numel(), math.prod(shape)
    if have != want:
        raise ShapeError(
            f"{what} of shape {list(t.shape)} ({have} values per sample) cannot be viewed as "
            f"{target} {format_shape(shape)} ({want} values per sample)"
        )
    return t.reshape(t.shape[0], *shape)
