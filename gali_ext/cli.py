"""Entry point of the ``gali-ext`` command, also as ``python -m gali_ext.cli`` (the form that
``torchrun`` and ``accelerate launch -m`` use).

The commands belong to the application, :mod:`gali_ext.recipes.cli`; ``import gali_ext`` does
not load this module.
"""

import sys

try:
    from gali_ext.recipes.cli import app, main
except ImportError as error:  # the core alone: the command needs the recipes extra
    if "gali-ext[" not in str(error):
        raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
