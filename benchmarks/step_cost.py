"""Step-cost benchmark: `python benchmarks/step_cost.py [--preset svhn] [--repeats 10]`.

The same as `gali-ext bench`; see recipes/bench.py (`gali_ext.recipes.bench`) for what it
measures.
"""

from gali_ext.recipes.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", *sys.argv[1:]])
