"""Reference recipes: the paper's models on digits, SVHN and CelebA, trained with HF Accelerate.

``recipes.get("svhn-gali8")`` returns a :class:`RecipeConfig`; ``recipes.train.train(config,
out_dir)`` runs it (the ``gali-ext recipe NAME`` command). docs/design.md, section "Architecture",
draws the modules and the path of one run: settings -> build -> start -> loop -> summary.
"""

from gali_ext.extras import require

require("recipes", "gali_ext.recipes")  # before any module of the package needs an extra

from gali_ext.recipes.registry import available, describe, get, register  # noqa: E402
from gali_ext.recipes.settings import RecipeConfig, check_epochs  # noqa: E402

__all__ = ["RecipeConfig", "available", "check_epochs", "describe", "get", "register"]
