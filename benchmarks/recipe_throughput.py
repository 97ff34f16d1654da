"""Training throughput of whole recipes on stand-in data sized like SVHN: fp32, bf16, CUDA graphs.

    python benchmarks/recipe_throughput.py [--recipes svhn-ali,svhn-gali8] [--steps 300]
        [--precisions no,bf16,no+graphs,bf16+graphs] [--batch 100,1000 --steps 300,100]

Real SVHN cannot be downloaded where this project is tested, so the script writes random
``train_32x32.mat`` and ``test_32x32.mat`` files in SVHN's own format and size (73,257 and
26,032 images), then trains each recipe through the real recipe loop (``recipes.train.train``:
HF Accelerate, checkpoints, logging) once per variant: a mixed-precision mode, optionally with
the recipe settings ``channels_last`` (``+nhwc``), ``cuda_graphs`` (``+graphs``, CUDA only:
skipped with a note on the CPU) and ``tf32`` (``+tf32``). It reports the median
images/s of the logged steps after the first ``--warmup`` steps, and each variant's ratio to the
first one, all measured in this one run. The images are noise: the numbers are
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


OPTIONS = {"nhwc": "channels_last", "graphs": "cuda_graphs", "tf32": "tf32"}
"""Variant suffixes and the recipe setting each turns on (``bf16+nhwc+graphs``)."""


def parse_variant(variant: str) -> tuple[str, dict[str, bool]]:
    """``"bf16+graphs"`` -> ``("bf16", {"cuda_graphs": True})``: Accelerate's mixed precision
    (``no``, ``fp16``, ``bf16``) and recipe settings turned on by ``+nhwc`` (channels-last),
    ``+graphs`` (CUDA graphs) and ``+tf32``."""
    precision, *options = variant.split("+")
    if precision not in ("no", "fp16", "bf16") or any(o not in OPTIONS for o in options):
        raise SystemExit(
            f"--precisions: {variant!r} is not no, fp16 or bf16, optionally followed "
            f"by +{', +'.join(OPTIONS)} (e.g. bf16+nhwc+graphs)"
        )
    return precision, {OPTIONS[o]: True for o in options}


def label(variant: str) -> str:
    """The variant's column name: ``no`` reads ``fp32``."""
    return "fp32" + variant[2:] if variant.startswith("no") else variant


def measure(
    recipe: str, variant: str, steps: int, warmup: int, data_dir: Path, out: Path, batch: int | None
) -> dict:
    """Train ``recipe`` for ``steps`` steps; the median images/s of the steps after ``warmup``.

    ``variant``: see :func:`parse_variant`.
    """
    from gali_ext import recipes
    from gali_ext.recipes.train import train

    precision, settings = parse_variant(variant)
    config = dataclasses.replace(
        recipes.get(recipe),
        steps=steps,
        epochs=0.0,  # a length in steps, not the recipe's epochs
        train_split="train",  # the stand-in's (throughput does not depend on the split)
        mixed_precision=precision,
        data_dir=str(data_dir),
        log_every=1,
        sample_every=10**9,
        checkpoint_every=10**9,
        **settings,
        **({"batch_size": batch} if batch else {}),
    )
    run = train(
        config, out / f"{recipe}-{config.batch_size}-{variant}", overwrite=True, progress=False
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r["images_per_s"] for r in records if r["step"] > warmup]
    if not timed:
        raise SystemExit(f"--steps {steps} leaves no step after --warmup {warmup} to time")
    return {
        "images_per_s": statistics.median(timed),
        "timed_steps": len(timed),
        "batch_size": config.batch_size,
        "n_dis": config.n_dis,
    }


def _per_batch(text: str, batches: list, name: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if len(values) == 1:
        values *= len(batches)
    if len(values) != len(batches):
        raise SystemExit(f"--{name}: give one value or one per batch size ({len(batches)})")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="svhn-ali,svhn-gali8")
    parser.add_argument(
        "--precisions",
        default="no,bf16",
        help="no, fp16 or bf16, each optionally +nhwc, +graphs (CUDA graphs), +tf32",
    )
    parser.add_argument("--steps", default="300", help="one count, or one per --batch")
    parser.add_argument(
        "--warmup",
        default="50",
        help="steps left out of the median (each batch size's, like --steps)",
    )
    parser.add_argument(
        "--batch", default=None, help="batch sizes, e.g. 100,1000 (default: the recipe's)"
    )
    parser.add_argument("--train-images", type=int, default=SVHN_TRAIN)
    parser.add_argument("--test-images", type=int, default=SVHN_TEST)
    parser.add_argument("--out", type=Path, default=Path("runs/recipe-throughput"))
    args = parser.parse_args(argv)

    import torch

    names = args.recipes.split(",")
    precisions = args.precisions.split(",")
    for variant in precisions:
        parse_variant(variant)
    batches: list[int | None] = [int(b) for b in args.batch.split(",")] if args.batch else [None]
    steps = _per_batch(args.steps, batches, "steps")
    warmups = _per_batch(args.warmup, batches, "warmup")
    cuda = torch.cuda.is_available()
    print(f"writing stand-in SVHN ({args.train_images} + {args.test_images} random images)")
    data_dir = write_standin_svhn(args.out / "standin-svhn", args.train_images, args.test_images)
    results: dict[str, dict[str, dict[str, dict]]] = {}
    skipped = []
    for batch, count, warmup in zip(batches, steps, warmups):
        for name in names:
            for variant in precisions:
                size = batch or _recipe_batch(name)
                if "graphs" in variant.split("+") and not cuda:
                    skipped.append(f"{name} {variant}")
                    print(
                        f"{name} batch {size} {variant}: skipped (CUDA graphs need a CUDA device)",
                        flush=True,
                    )
                    continue
                print(f"training {name} batch {size} ({variant}) for {count} steps", flush=True)
                try:
                    measured = measure(name, variant, count, warmup, data_dir, args.out, batch)
                except Exception as error:  # one variant must not cost the others
                    measured = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
                print(f"  {json.dumps(measured)}", flush=True)
                results.setdefault(name, {}).setdefault(str(size), {})[variant] = measured
                _write(args.out, results, steps, warmups, skipped)  # a run cut short keeps these
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"\nRecipe throughput on stand-in SVHN, {device}, torch {torch.__version__}, "
        f"images/s: median of the steps after the warm-up "
        f"(steps {args.steps}, warm-up {args.warmup})\n"
    )
    shown = [p for p in precisions if not ("graphs" in p.split("+") and not cuda)]
    base = shown[0]
    header = "| recipe | batch | " + " | ".join(f"{label(p)} images/s" for p in shown)
    header += "".join(f" | {label(p)} / {label(base)}" for p in shown[1:]) + " |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, by_batch in results.items():
        for size, measured in by_batch.items():
            rates = {p: measured.get(p, {}).get("images_per_s") for p in shown}
            cells = [f"{rates[p]:.0f}" if rates[p] else "failed" for p in shown]
            cells += [
                f"{rates[p] / rates[base]:.2f}x" if rates[p] and rates[base] else "-"
                for p in shown[1:]
            ]
            print(f"| {name} | {size} | " + " | ".join(cells) + " |")
    if skipped:
        print(f"\nskipped (CUDA graphs need a CUDA device): {', '.join(skipped)}")
    return _write(args.out, results, steps, warmups, skipped)


def _write(out: Path, results: dict, steps: list, warmups: list, skipped: list) -> dict:
    """``throughput.json``: the device, torch version and every measurement so far."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {
        "device": device,
        "torch": torch.__version__,
        "steps": steps,
        "warmup": warmups,
        "results": results,
        "skipped": skipped,
    }
    (out / "throughput.json").write_text(json.dumps(summary, indent=2))
    return summary


def _recipe_batch(name: str) -> int:
    from gali_ext import recipes

    return recipes.get(name).batch_size


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
