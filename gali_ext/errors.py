"""The exceptions gali-ext raises on bad input.

Every error a user can cause through the public API is one of these, so that a research loop can
catch ``GaliError`` and nothing cryptic escapes from deep inside torch. Each subclass also derives
from the builtin exception a Python user would expect (``ValueError`` for bad values).
"""

from __future__ import annotations

__all__ = [
    "GaliError",
    "SpecError",
    "ShapeError",
    "ProviderError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "DivergenceError",
    "first_line",
]


class GaliError(Exception):
    """Base class of every error gali-ext raises on purpose."""


class SpecError(GaliError, ValueError):
    """A tuple class or tuple spec is malformed (arity, kinds, unknown nodes, duplicates, K < 2)."""


class ShapeError(GaliError, ValueError):
    """A tensor has the wrong shape, dtype or values (logits not ``[K, B, K]``, NaN features)."""


class ProviderError(GaliError, ValueError):
    """A chain node was asked for that no feedback provider makes."""


class DataError(GaliError, ValueError):
    """A data directory is missing files or holds malformed ones."""


class ConfigError(GaliError, ValueError):
    """A recipe name, ``--set`` override or run directory is invalid."""


class CheckpointError(GaliError, ValueError):
    """A checkpoint or safetensors file is unreadable or does not fit the model."""


class DivergenceError(GaliError, RuntimeError):
    """A loss, or the logits it is computed from, became NaN or infinite during training."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error quotes of the error it replaces."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
