import inspect
import os

import pytest
import torch

# The suite pins down CPU behaviour (bit-exact resume, gloo DDP), also on a machine with a GPU:
# Accelerate runs on the CPU unless ACCELERATE_USE_CPU=0 is set. GPU speed is the benchmarks'.
os.environ.setdefault("ACCELERATE_USE_CPU", "1")

# A test that trains a recipe, starts processes, runs the benchmark or a study takes seconds:
# it is marked slow (besides the tests marked by hand), so that `pytest -m "not slow"` gives
# feedback in under a minute. CI runs everything.
_SLOW_CALLS = ("train(", "subprocess.", "run_benchmark(", "study(", "CliRunner", "torchrun")


def pytest_collection_modifyitems(items):
    for item in items:
        function = getattr(item, "function", None)
        if function is None or item.get_closest_marker("slow"):
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if any(call in source for call in _SLOW_CALLS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def evaluator(tmp_path_factory):
    """A 1-epoch digits evaluator classifier (a real one takes 10 epochs), trained once for the
    session; tests that change it work on a copy."""
    from gali_ext.recipes.evaluator import train_evaluator

    folder = tmp_path_factory.mktemp("evaluator") / "evaluator-digits"
    train_evaluator("digits", folder, epochs=1)
    return folder
