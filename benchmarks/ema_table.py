"""Test pixel MSE of the trained weights and of their moving average (EMA), on the digits study
settings (600 steps, digits-ali and digits-gali8, seeds 0, 1, 2).

    python benchmarks/ema_table.py [--steps 600] [--seeds 3] [--decays 0.999,0.99]
                                   [--recipes digits-ali,digits-gali8] [--out runs/ema-table]

Each recipe, seed and decay is trained by the recipe loop (``recipes.train.train``) with
``ema_decay`` set; its ``summary.json`` holds the test pixel MSE (2000 test images, pixels in
[0, 1], as ``gali-ext eval``) of the EMA weights and of the trained ("raw") weights. The EMA does
not change training, so a recipe and seed reach the same raw weights for every decay: the script
checks that their raw MSEs agree exactly and reports them once. Finished runs are reused. The
table gives mean ± std (population, as ``gali-ext eval``) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def run(recipe: str, seed: int, decay: float, steps: int, out: Path) -> dict:
    """Train one run (unless it finished before) and return its ``summary.json``."""
    from gali_ext import recipes
    from gali_ext.recipes.train import train

    folder = out / f"{recipe}-seed{seed}-ema{decay:g}"
    if not (folder / "summary.json").is_file():
        print(
            f"training {recipe} seed {seed} with ema_decay={decay:g} for {steps} steps", flush=True
        )
        settings = {"steps": str(steps), "seed": str(seed), "ema_decay": str(decay)}
        train(recipes.get(recipe).with_overrides(settings), folder, progress=False, overwrite=True)
    return json.loads((folder / "summary.json").read_text())


def cell(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.pstdev(values):.4f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="digits-ali,digits-gali8")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--decays", default="0.999,0.99")
    parser.add_argument("--out", type=Path, default=Path("runs/ema-table"))
    args = parser.parse_args(argv)
    names = args.recipes.split(",")
    decays = [float(d) for d in args.decays.split(",")]
    if not all(0 < d < 1 for d in decays):
        raise SystemExit(f"--decays must lie in (0, 1), got {args.decays}")

    seeds = range(args.seeds)
    # one decay after the other, so that a stopped script leaves whole columns to reuse
    summary = {
        (d, n, s): run(n, s, d, args.steps, args.out) for d in decays for n in names for s in seeds
    }
    results: dict[str, dict] = {}
    for name in names:
        raw, ema = [], {d: [] for d in decays}
        for seed in seeds:
            summaries = {d: summary[d, name, seed] for d in decays}
            raws = {s["test_pixel_mse_raw"] for s in summaries.values()}
            if len(raws) != 1:
                raise SystemExit(
                    f"{name} seed {seed}: the raw weights differ between decays "
                    f"({sorted(raws)}): the EMA changed training"
                )
            raw.append(raws.pop())
            for d in decays:
                ema[d].append(summaries[d]["test_pixel_mse"])
        results[name] = {"raw": raw, **{f"ema_{d:g}": ema[d] for d in decays}}

    print(f"\nTest pixel MSE after {args.steps} steps, mean ± std over {args.seeds} seeds\n")
    header = "| recipe | trained weights | " + " | ".join(f"EMA {d:g}" for d in decays) + " |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name in names:
        cells = [cell(results[name]["raw"])]
        cells += [cell(results[name][f"ema_{d:g}"]) for d in decays]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ema_table.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
