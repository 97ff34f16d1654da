"""Training throughput of whole recipes on stand-in data sized like SVHN, fp32 against bf16.

    python benchmarks/recipe_throughput.py [--recipes svhn-ali,svhn-gali8] [--steps 300]

Real SVHN cannot be downloaded where this project is tested, so the script writes random
``train_32x32.mat`` and ``test_32x32.mat`` files in SVHN's own format and size (73,257 and
26,032 images), then trains each recipe through the real recipe loop (``recipes.train.train``:
HF Accelerate, checkpoints, logging) once per mixed-precision mode (``bf16+nhwc``: with the
recipe setting ``channels_last``). It reports the median
images/s of the logged steps after the first ``--warmup`` steps, and the ratios bf16 / fp32 and
recipe / first recipe, all measured in this one run. The images are noise: the numbers are
throughput only, never quality. bf16 needs CUDA (or a CPU with bf16 support; slow there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import numpy as np

SVHN_TRAIN, SVHN_TEST = 73_257, 26_032


def write_standin_svhn(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """Random uint8 images and labels 1..10 in SVHN's ``.mat`` layout (X: 32 x 32 x 3 x N)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        x = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
        y = rng.integers(1, 11, size=(count, 1)).astype(np.uint8)
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return folder


def measure(recipe: str, variant: str, steps: int, warmup: int, data_dir: Path, out: Path,
            batch: int | None) -> dict:  # fmt: skip
    """Train ``recipe`` for ``steps`` steps; the median images/s of the steps after ``warmup``.

    ``variant``: Accelerate's mixed precision (``no``, ``bf16``, ``fp16``), ``+nhwc`` for
    channels-last memory format.
    """
    from gali_ext import recipes
    from gali_ext.recipes.train import train

    precision, _, layout = variant.partition("+")
    config = dataclasses.replace(
        recipes.get(recipe),
        steps=steps,
        mixed_precision=precision,
        channels_last=layout == "nhwc",
        data_dir=str(data_dir),
        log_every=1,
        sample_every=10**9,
        checkpoint_every=10**9,
        **({"batch_size": batch} if batch else {}),
    )
    run = train(config, out / f"{recipe}-{variant}", overwrite=True, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r["images_per_s"] for r in records if r["step"] > warmup]
    if not timed:
        raise SystemExit(f"--steps {steps} leaves no step after --warmup {warmup} to time")
    return {"images_per_s": statistics.median(timed), "timed_steps": len(timed),
            "batch_size": config.batch_size, "n_dis": config.n_dis}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="svhn-ali,svhn-gali8")
    parser.add_argument(
        "--precisions", default="no,bf16", help="no, fp16 or bf16, each optionally +nhwc"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the median")
    parser.add_argument("--batch", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--train-images", type=int, default=SVHN_TRAIN)
    parser.add_argument("--test-images", type=int, default=SVHN_TEST)
    parser.add_argument("--out", type=Path, default=Path("runs/recipe-throughput"))
    args = parser.parse_args(argv)

    import torch

    names = args.recipes.split(",")
    precisions = args.precisions.split(",")
    for variant in precisions:
        precision, _, layout = variant.partition("+")
        if precision not in ("no", "fp16", "bf16") or layout not in ("", "nhwc"):
            raise SystemExit(f"--precisions: {variant!r} is not no, fp16 or bf16, optionally "
                             "followed by +nhwc (e.g. bf16+nhwc)")  # fmt: skip
    print(f"writing stand-in SVHN ({args.train_images} + {args.test_images} random images)")
    data_dir = write_standin_svhn(args.out / "standin-svhn", args.train_images, args.test_images)
    results: dict[str, dict[str, dict]] = {}
    for name in names:
        for precision in precisions:
            print(f"training {name} ({precision}) for {args.steps} steps", flush=True)
            results.setdefault(name, {})[precision] = measure(
                name, precision, args.steps, args.warmup, data_dir, args.out, args.batch
            )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nRecipe throughput on stand-in SVHN, {device}, torch {torch.__version__}, "
          f"median of {args.steps - args.warmup} steps after {args.warmup}\n")  # fmt: skip
    base = precisions[0]
    label = {p: p.replace("no", "fp32", 1) if p.startswith("no") else p for p in precisions}
    header = "| recipe | " + " | ".join(f"{label[p]} images/s" for p in precisions)
    header += "".join(f" | {label[p]} / {label[base]}" for p in precisions[1:])
    header += f" | {label[base]} throughput / {names[0]}'s |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in names:
        rates = {p: results[name][p]["images_per_s"] for p in precisions}
        cells = [f"{rates[p]:.0f}" for p in precisions]
        cells += [f"{rates[p] / rates[base]:.2f}x" for p in precisions[1:]]
        cells.append(f"{rates[base] / results[names[0]][base]['images_per_s']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    summary = {"device": device, "torch": torch.__version__, "steps": args.steps,
               "warmup": args.warmup, "results": results}  # fmt: skip
    (args.out / "throughput.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
