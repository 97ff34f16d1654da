"""Two processes under DDP (gloo on the CPU) stay in step: the G/E step's gradients, which flow
through the chains made in the D step, are all-reduced like D's."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("n_dis", [1, 2])
def test_two_cpu_processes_keep_identical_parameters(tmp_path, n_dis):
    out = tmp_path / "sums.json"
    worker = Path(__file__).with_name("_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(worker), str(out), str(n_dis)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 2
    rank0, rank1 = result["sums"]
    # Each rank saw other data: only all-reduced gradients keep E, G and D equal on both.
    assert rank0 == pytest.approx(rank1, rel=1e-6)
