"""What evaluating while training costs (``eval_every``, docs/design.md, section 6.11): the time
the evaluations add to a run, as a share of its training time, measured in one run.

    python benchmarks/eval_cost.py [--recipe digits-gali4] [--steps N] [--eval-every N]
                                   [--threads N] [--evaluator DIR] [--out DIR]
    python benchmarks/eval_cost.py --run RUN_DIR     # a finished run, trained with eval_every

It trains the recipe (its own steps and ``eval_every`` unless given) through the real loop
(``recipes.train.train``) into ``--out``, with an evaluator classifier beside the run (a copy of
``--evaluator``, or one trained for 1 epoch: it costs as much to run as a 10-epoch one), so that
every metric of a digits run is evaluated: pixel MSE, the SVM, feature MSE and class agreement.
Each evaluation records its seconds in ``metrics.jsonl`` (``eval/seconds``) and the run its
seconds in ``summary.json`` (``seconds_this_session``, from the start of the loop to the end of
training); both are measured in this one run, so the machine's load affects them alike. The
cost printed is

    cost = E / (T - E),   E = sum of the evaluations' seconds, T = the run's seconds

the time the evaluations add to the same run without them. The EMA's batch-norm statistics are
refreshed before an evaluation; at the recipes' defaults every evaluation step is also a step
that draws grids (``eval_every`` a multiple of ``sample_every``), which refreshes them anyway, so
that refresh is counted as training time. ``--threads`` sets torch's threads (default 1: on a
machine shared with other jobs, 2 threads per process oversubscribe the cores).

    python benchmarks/eval_cost.py --recipe svhn-gali8 --evaluation-only [--device cuda]

times one evaluation alone (the median of ``--repeats``) of the recipe's untrained networks, for
recipes too slow to train here: SVHN on stand-in files of SVHN's format and size
(``benchmarks/recipe_throughput.py``'s random images; the SVM on untrained features of noise
has no structure to find, which makes libsvm's fits slower than on SVHN), with every metric of
the recipe but FID. Divide by the seconds of ``eval_every`` steps to get the cost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path


def cost(run: Path) -> dict:
    """The evaluations' seconds against the training's, from a finished run's files."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval/seconds" in r]
    if not evaluations:
        raise SystemExit(f"{run} has no evaluations (trained with eval_every=0?)")
    total = json.loads((run / "summary.json").read_text())["seconds_this_session"]
    seconds = [r["eval/seconds"] for r in evaluations]
    spent = sum(seconds)
    return {
        "run": str(run),
        "evaluations": len(seconds),
        "steps": [r["step"] for r in evaluations],
        "eval_seconds_each_median": statistics.median(seconds),
        "eval_seconds": spent,
        "run_seconds": total,
        "train_seconds": total - spent,
        "cost": spent / (total - spent),
        "metrics": sorted(
            k.removeprefix("eval/")
            for k, v in evaluations[-1].items()
            if k.startswith("eval/") and isinstance(v, float) and k != "eval/seconds"
        ),
    }


def time_evaluation(recipe: str, out: Path, device: str, repeats: int) -> list[float]:
    """Seconds of ``repeats`` evaluations (:class:`gali_ext.recipes.watch.Watch`) of the
    recipe's untrained E and G on ``device``, an evaluator classifier beside the run."""
    import torch

    from gali_ext import recipes
    from gali_ext.recipes.build import build_model, load_run_data
    from gali_ext.recipes.evaluator import EvaluatorClassifier
    from gali_ext.recipes.watch import Watch

    config = recipes.get(recipe)
    if config.dataset == "svhn":
        sys.path.insert(0, str(Path(__file__).parent))
        from recipe_throughput import SVHN_TEST, SVHN_TRAIN, write_standin_svhn

        data = out / "svhn"
        if not (data / "test_32x32.mat").is_file():
            write_standin_svhn(data, SVHN_TRAIN, SVHN_TEST)
        config = config.with_overrides({"data_dir": str(data)})
    train_data, _ = load_run_data(config)
    evaluator = out / f"evaluator-{config.dataset}"
    if not (evaluator / "evaluator.json").is_file():  # untrained: it costs what a trained one does
        from safetensors.torch import save_file

        model = EvaluatorClassifier(train_data.channels, train_data.num_classes)
        evaluator.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(evaluator / "evaluator.safetensors"))
        (evaluator / "evaluator.json").write_text(json.dumps({"model": model.config}))
    watch = Watch(config, train_data, out / config.name)
    built = build_model(config, train_data.channels)
    built.gali.to(device)
    models = built.models
    seconds = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = watch(models.encoder, models.generator, built.gali.prior)
        seconds.append(time.perf_counter() - started)
    print(f"{config.name}: {', '.join(sorted(metrics))} on {watch.protocol}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="digits-gali4")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--eval-every", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluator", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/eval-cost"))
    parser.add_argument("--run", type=Path, default=None, help="measure this finished run")
    parser.add_argument("--evaluation-only", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.evaluation_only:
        import torch

        torch.set_num_threads(args.threads)
        seconds = time_evaluation(args.recipe, args.out, args.device, args.repeats)
        print(
            f"one evaluation: {statistics.median(seconds):.2f} s (median of {len(seconds)}: "
            f"{', '.join(f'{s:.2f}' for s in seconds)}) on {args.device}, "
            f"{torch.get_num_threads()} torch thread(s)"
        )
        return

    if args.run is None:
        import torch

        from gali_ext import recipes
        from gali_ext.recipes.evaluator import train_evaluator
        from gali_ext.recipes.train import train

        torch.set_num_threads(args.threads)
        config = recipes.get(args.recipe)
        settings = {}
        if args.steps is not None:
            settings["steps"] = str(args.steps)
        if args.eval_every is not None:
            settings["eval_every"] = str(args.eval_every)
        config = config.with_overrides(settings)
        evaluator = args.out / f"evaluator-{config.dataset}"
        if args.evaluator is not None:
            shutil.copytree(args.evaluator, evaluator, dirs_exist_ok=True)
        elif not (evaluator / "evaluator.json").is_file():
            print(f"training a 1-epoch {config.dataset} evaluator into {evaluator}", flush=True)
            train_evaluator(config.dataset, evaluator, config.data_dir or None, epochs=1)
        args.run = args.out / config.name
        print(
            f"training {config.name}: {config.steps} steps, eval_every={config.eval_every}, "
            f"{torch.get_num_threads()} torch thread(s)",
            flush=True,
        )
        started = time.perf_counter()
        train(config, args.run, progress=False, overwrite=True)
        print(f"(the whole command took {time.perf_counter() - started:.0f} s)")
    result = cost(args.run)
    print(
        f"{result['evaluations']} evaluations at steps {result['steps']} "
        f"({', '.join(result['metrics'])})"
    )
    each = result["eval_seconds_each_median"]
    print(
        f"evaluation: {result['eval_seconds']:.1f} s (median {each:.2f} s each); "
        f"training: {result['train_seconds']:.1f} s"
    )
    print(f"cost of eval_every: {100 * result['cost']:.2f} % of training time")
    path = args.run.parent / f"{args.run.name}-eval-cost.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    sys.exit(main())
