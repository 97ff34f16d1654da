import os

import pytest
import torch

# The suite pins down CPU behaviour (bit-exact resume, gloo DDP), also on a machine with a GPU:
# Accelerate runs on the CPU unless ACCELERATE_USE_CPU=0 is set. GPU speed is the benchmarks'.
os.environ.setdefault("ACCELERATE_USE_CPU", "1")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
