"""Entry point of the ``gali-ext`` command, also as ``python -m gali_ext.cli`` (the form that
``torchrun`` and ``accelerate launch -m`` use).

The commands belong to the application, :mod:`gali_ext.recipes.cli`; ``import gali_ext`` does
not load this module.
"""

from gali_ext.recipes.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
