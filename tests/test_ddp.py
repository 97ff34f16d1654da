"""Two processes under DDP (gloo on the CPU): the G/E step's gradients, which flow through the
chains made in the D step, are all-reduced like D's; and the recipe's data loader gives each
process its own shard of every epoch."""

import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Two ranks of ``worker`` under torchrun (gloo). On a loaded machine a launch now and then
    dies before training (a rank aborted by gloo, a port taken between free_port() and its use,
    the time limit): such a launch is tried once more, on a fresh port. A real failure fails
    both times, and the tests assert on what the ranks computed."""
    for attempt in range(2):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(worker),
            *args,
        ]
        try:
            run = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=Path(__file__).parent.parent,
            )
        except subprocess.TimeoutExpired as error:
            if attempt:
                raise
            print(f"torchrun timed out, trying again: {error}")
            continue
        if run.returncode == 0 or attempt:
            return run
        print(f"torchrun failed, trying again: {run.stderr[-2000:]}")
    raise AssertionError("unreachable")


@pytest.mark.parametrize("n_dis", [1, 2])
def test_two_cpu_processes_keep_identical_parameters(tmp_path, n_dis):
    out = tmp_path / "sums.json"
    run = torchrun(Path(__file__).with_name("_ddp_worker.py"), str(out), str(n_dis))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 2
    rank0, rank1 = result["sums"]
    # Each rank saw other data: only all-reduced gradients keep E, G and D equal on both.
    assert rank0 == pytest.approx(rank1, rel=1e-6)


def test_two_processes_share_each_epoch_and_one_epoch_is_one_pass(tmp_path):
    run = torchrun(Path(__file__).with_name("_ddp_data_worker.py"), str(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2]
    # 64 toy images in batches of 8: 8 batches per epoch, 4 for each process
    assert [r["batches_per_epoch"] for r in ranks] == [4, 4]
    for epoch in (0, 1):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        batches = [order[i : i + 8] for i in range(0, 64, 8)]
        for rank in (0, 1):  # process r takes batches r, r + 2, ... of the epoch's order
            assert ranks[rank]["epochs"][epoch] == sum(batches[rank::2], [])
        assert sorted(ranks[0]["epochs"][epoch] + ranks[1]["epochs"][epoch]) == list(range(64))
    for rank in (0, 1):  # a resume at batch 5 continues with batch 1 of epoch 1
        assert ranks[rank]["after_resume"] == ranks[rank]["epochs"][1][8:]

    # train(digits-ali, epochs=1) on 2 processes: 1297 // 64 = 20 batches, 10 per process,
    # so 10 steps that together train on 1280 different images, each at most once
    from gali_ext.recipes.data import load_digits

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["steps"] == 10
    assert (saved["launch"]["num_processes"], saved["launch"]["world_size"]) == (2, 2)
    digits = load_digits("train").images
    available = Counter(image.numpy().tobytes().hex() for image in digits)
    trained = Counter(ranks[0]["trained"] + ranks[1]["trained"])
    assert sum(trained.values()) == 1280
    assert all(count <= available[image] for image, count in trained.items())

    # G's per-pixel output bias: set once on each rank, from the mean of both ranks' first
    # batches (64 images each), so that the ranks start from the same G
    first = [
        np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in r["trained"][:64]])
        for r in ranks
    ]
    expected = (np.concatenate(first).astype(np.float64) / 255).mean(0).reshape(1, 16, 16)
    for r in ranks:
        assert len(r["bias_means"]) == 1
        np.testing.assert_allclose(np.array(r["bias_means"][0]), expected, atol=1e-6)
