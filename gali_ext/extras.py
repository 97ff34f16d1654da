"""The optional parts of gali-ext and the pip extra that installs each.

``pip install gali-ext`` installs the core (torch and safetensors): tuple specs, chains, the
head, the losses, the providers, :class:`~gali_ext.GALI`, the training step and the adapters.
The rest is an extra: ``recipes`` (the recipes, the data, the evaluation and the ``gali-ext``
command: Accelerate, torchvision, torchmetrics, typer, scikit-learn, ...), ``timm`` (pretrained
feature models by name), ``hub`` (sharing trained models on the Hugging Face Hub),
``tensorboard``.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "recipes": (
        "accelerate",
        "torchvision",
        "torch_optimizer",
        "timm",
        "torchmetrics",
        "torch_fidelity",
        "huggingface_hub",
        "typer",
        "rich",
        "numpy",
        "scipy",
        "sklearn",
        "PIL",
    ),
    "timm": ("timm",),
    "hub": ("huggingface_hub",),
    "tensorboard": ("tensorboard",),
}
"""The import names each extra provides (as ``pyproject.toml`` lists their distributions)."""


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def require(extra: str, what: str) -> None:
    """Raise ``ImportError`` naming the extra to install when a module of ``extra`` is
    missing: ``"{what} needs gali-ext's 'recipes' extra: pip install 'gali-ext[recipes]'
    (missing: accelerate)"``."""
    missing = [m for m in EXTRAS[extra] if _missing(m)]
    if missing:
        raise ImportError(
            f"{what} needs gali-ext's {extra!r} extra: pip install 'gali-ext[{extra}]' "
            f"(missing: {', '.join(missing)})"
        )
