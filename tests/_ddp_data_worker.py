"""One rank of tests/test_ddp.py's data test, under ``torchrun --nproc_per_node 2`` (gloo).

Writes ``OUT/rank<r>.json``: the toy image indices this rank drew in two epochs of the recipe
loader (64 images, batches of 8, two workers), the indices after a resume at batch 5, the
pixels of every image ``train(digits-ali, epochs=1)`` trained this rank on, and the mean pixels
G's per-pixel output bias was set from (``output_bias=pixel``).
"""

import json
import sys
from pathlib import Path

import torch

import gali_ext.recipes.build as build
import gali_ext.recipes.train as loop
from gali_ext import recipes
from gali_ext.recipes.data import ImageData, endless_batches, training_loader
from gali_ext.recipes.models import Generator


def indices(batch):
    """Image i of the toy set is filled with the value i."""
    return ((batch[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def main(out: Path) -> None:
    config = recipes.get("digits-ali").with_overrides({"seed": "3"})
    accelerator = build.make_accelerator(config, out / "toy")
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 1, 2, 2).clone()
    toy = ImageData("toy", "train", images, torch.arange(64) % 10, 10)
    loader = accelerator.prepare(training_loader(toy, 8, seed=3, num_workers=2))
    batches = endless_batches(loader, accelerator)
    epochs = [sum((indices(next(batches)) for _ in range(len(loader))), []) for _ in range(2)]
    resumed = endless_batches(loader, accelerator, start=5)
    after_resume = sum((indices(next(resumed)) for _ in range(3)), [])

    trained = []
    real_step = build.train_step

    def recording(gali, batches, *args, **kwargs):
        drawn = [next(batches) for _ in range(kwargs["n_dis"])]
        trained.extend(
            ((x + 1) * 127.5).round().to(torch.uint8).numpy().tobytes().hex()
            for batch in drawn
            for x in batch
        )
        return real_step(gali, iter(drawn), *args, **kwargs)

    build.train_step = recording
    bias_means = []
    real_init = Generator.init_output_bias

    def init_recording(generator, mean):
        bias_means.append(mean.tolist())
        return real_init(generator, mean)

    Generator.init_output_bias = init_recording
    settings = {
        "output_bias": "pixel",
        "batch_size": "64",
        "log_every": "1",
        "sample_every": "1000",
        "checkpoint_every": "1000",
    }
    loop.train(config.with_overrides(settings), out / "run", progress=False, epochs=1)
    result = {
        "processes": accelerator.num_processes,
        "batches_per_epoch": len(loader),
        "epochs": epochs,
        "after_resume": after_resume,
        "trained": trained,
        "bias_means": bias_means,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
