"""The ``gali-ext`` command line: train recipes, list them, draw samples from a run.

Each command imports the modules it needs inside its function: importing them all here doubles
the start of every command (``gali-ext --version``: 7.0 s instead of 3.0 s on the project's
machine), for the libraries only some commands use (torchmetrics, huggingface_hub, ...).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import typer

from gali_ext.errors import ConfigError, GaliError
from gali_ext.recipes.settings import parse_settings

app = typer.Typer(
    help="Generalized Adversarially Learned Inference: train and inspect GALI models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from gali_ext import __version__

        typer.echo(f"gali-ext {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    imports: list[str] = typer.Option(
        [],
        "--import",
        help="Import a Python module first, e.g. one that calls gali_ext.register_preset "
        "(repeatable): `gali-ext --import my_presets recipe digits-gali4 --set spec=mine`. A "
        "run records it; a resume names it when it is missing.",
    ),
) -> None:
    """Generalized Adversarially Learned Inference: train and inspect GALI models."""
    from gali_ext.recipes.plugins import import_module

    for name in imports:
        import_module(name)


def _path(value: str) -> Path | str:
    """The parser of every path option and argument: a :class:`Path`, or ``""`` for an empty
    one, which the command refuses (``Path("")`` would be the current folder; click would turn
    an error raised here into a usage box)."""
    return Path(value) if value.strip() else ""


def _output(
    value: Path | str | None, default: Path | str, option: str = "--out", kind: str = "folder"
) -> Path:
    """An output path (``default`` when not given), checked before any work by the one check
    of every output (:func:`gali_ext.recipes.outputs.check_output_path`)."""
    from gali_ext.recipes.outputs import check_output_path

    return check_output_path(default if value is None else value, option, kind=kind)


def _given(value: Path | str, option: str) -> Path:
    """An input path, refusing an empty one."""
    if value == "":
        raise ConfigError(f"{option} '' is empty: expected a path")
    return Path(value)


BEST_HELP = (
    "Use the best weights by the run's best_metric (its best/, kept while training with "
    "eval_every), not its last ones."
)


@app.command()
def recipe(
    name: str = typer.Argument(..., help="Recipe name; `gali-ext recipes` lists them."),
    out: Path = typer.Option(None, help="Run directory (default: runs/NAME).", parser=_path),
    steps: int = typer.Option(None, help="Training steps (each n_dis D steps + 1 G/E step)."),
    epochs: float = typer.Option(None, help="Train for this many passes over the data instead."),
    mixed_precision: str = typer.Option(None, help="no, fp16 (CUDA) or bf16."),
    seed: int = typer.Option(None, help="Random seed."),
    data_dir: Path = typer.Option(
        None,
        help="Folder with the SVHN .mat files or CelebA (default: ~/.cache/gali-ext/DATASET).",
        parser=_path,
    ),
    download: bool = typer.Option(
        False, "--download", help="Fetch SVHN or CelebA into --data-dir first, checksums verified."
    ),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace the run --out holds."),
    trust_checkpoint: bool = typer.Option(
        False,
        help="With --resume: continue a run of gali-ext 0.1.0, whose checkpoints have no "
        "manifest (its files are read as tensors only; a manifest is written for them).",
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a setting: --set lr=2e-4."),
    log_with: str = typer.Option(
        None, help="Also log to these Accelerate trackers, e.g. tensorboard (run/logs/)."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print what the run will cost (steps, epochs, images, FLOPs per step measured "
        "here) and exit: nothing is trained, read or written.",
    ),
    fid_weights: Path = typer.Option(
        None,
        help="A local copy of weights-inception-2015-12-05-6726825d.pth: adds FID to the "
        "metrics evaluated every eval_every steps (--set fid_weights=FILE).",
        parser=_path,
    ),
) -> None:
    """Train a reference recipe (e.g. `gali-ext recipe digits-gali4`)."""
    from gali_ext import recipes
    from gali_ext.recipes.train import train

    if steps is not None and epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if trust_checkpoint and not resume:
        raise ConfigError("--trust-checkpoint goes with --resume (it adopts a run's checkpoint)")
    out = _output(out, Path("runs") / name)
    if data_dir is not None:
        data_dir = _given(data_dir, "--data-dir")
    config = recipes.get(name)
    if resume and (out / "config.json").is_file():
        from gali_ext.recipes.plugins import check_run_preset

        saved = recipes.RecipeConfig.from_json(out / "config.json")
        check_run_preset(out, saved.spec, f"recipe {saved.name} --resume --out {out}")
        if saved.name != name:
            raise ConfigError(
                f"--resume: {str(out)!r} holds a run of {saved.name!r}, not {name!r}: resume it "
                f"with `gali-ext recipe {saved.name} --resume --out {out}`, or train {name} "
                "into another --out"
            )
        config = saved
    config = config.with_overrides(parse_settings(set_))
    options = {
        "steps": steps,
        "epochs": 0.0 if steps is not None else None,  # --steps replaces a recipe's epochs
        "mixed_precision": mixed_precision,
        "seed": seed,
        "data_dir": None if data_dir is None else str(data_dir),
        "log_with": log_with,
        "download": download or None,
        "fid_weights": None if fid_weights is None else str(_given(fid_weights, "--fid-weights")),
    }
    config = dataclasses.replace(config, **{k: v for k, v in options.items() if v is not None})
    if dry_run:
        from gali_ext.recipes.cost import dry_run_report
        from gali_ext.recipes.settings import check_epochs

        if epochs is not None:
            config = dataclasses.replace(config, epochs=check_epochs(epochs))
        typer.echo(dry_run_report(config))
        return
    train(
        config,
        out,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        epochs=epochs,
        trust_checkpoint=trust_checkpoint,
    )


@app.command("presets")
def list_presets() -> None:
    """List the registered presets (tuple classes and providers), one line each."""
    from gali_ext import available_presets, get_preset

    width = max(len(n) for n in available_presets())
    for name in available_presets():
        preset = get_preset(name)
        spec = preset.spec
        typer.echo(f"{name:<{width}}  K={spec.num_classes} m={spec.arity}  {preset.title}")


@app.command("recipes")
def list_recipes() -> None:
    """List the recipes, one line each."""
    from gali_ext import recipes

    width = max(len(n) for n in recipes.available())
    for name in recipes.available():
        typer.echo(f"{name:<{width}}  {recipes.describe(name)}")


@app.command()
def sample(
    run_dir: Path = typer.Argument(
        ..., help="A run directory written by `gali-ext recipe`.", parser=_path
    ),
    out: Path = typer.Option(
        None, help="Where to write the PNGs (default: RUN_DIR).", parser=_path
    ),
    raw_weights: bool = typer.Option(
        False, "--raw-weights", help="Use the trained weights, not their moving average (EMA)."
    ),
    best: bool = typer.Option(False, "--best", help=BEST_HELP),
) -> None:
    """Write grids of samples G(z) and of test images over their reconstructions G(E(x)), as
    samples-ema.png and reconstructions-ema.png (-raw without EMA weights, -best-ema with
    --best); the run's own
    samples.png and reconstructions.png stay as training left them. A class-conditional run
    (docs/design.md, section 6.10) gets one row of samples G(z, y) per class y, reconstructions
    G(E(x), y) with each image's own label, and reconstructions-shuffled-*.png with a shuffled
    label."""
    import torch

    from gali_ext.recipes.build import first_images, grids, load_data
    from gali_ext.recipes.runs import load_run_models
    from gali_ext.recipes.visual import save_image_grid

    run_dir = _given(run_dir, "RUN_DIR")
    folder = _output(out, run_dir.resolve())  # by default beside the run's own grids
    run = load_run_models(run_dir, ema=not raw_weights, best=best)
    test = load_data(run.config, "test")
    images = first_images(test, 32)
    label = "the moving average (EMA) of the weights" if run.weights == "ema" else "the weights"
    if run.best:
        label = f"the best {label[4:]} ({run.best['metric']} {run.best['value']:.4g}, step "
        label += f"{run.best['step']})"
    classes = run.config.conditions
    if classes:
        _sample_conditional(run, images, test.labels_tensor()[: len(images)], folder, label)
        return
    z = run.prior((64, run.latent_dim), rng=torch.Generator().manual_seed(0))
    for name, grid in grids(run.encoder, run.generator, images, z).items():
        path = save_image_grid(grid, folder / f"{name}-{run.tag}.png")
        typer.echo(f"{name} of {label}: {path}")


CLASS_ROW_SAMPLES = 8  # samples per class row of a class-conditional run's grid


def _sample_conditional(run, images, labels, folder: Path, label: str) -> None:  # noqa: ANN001
    """The grids of a class-conditional run (docs/design.md, section 6.10): samples
    ``G(z_c, k)``, row k for class k and the same ``CLASS_ROW_SAMPLES`` latents ``z_c`` in every
    row; test images over ``G(E(x), y)`` with their own labels, and over ``G(E(x), y_perm)``
    with the labels shuffled (:func:`~gali_ext.recipes.metrics.shuffled_labels`, seed 0)."""
    import torch

    from gali_ext.recipes.build import grids
    from gali_ext.recipes.metrics import reconstruct, shuffled_labels
    from gali_ext.recipes.visual import interleave_rows, save_image_grid

    classes, n = run.config.conditions, CLASS_ROW_SAMPLES
    rng = torch.Generator().manual_seed(0)
    z = run.prior((n, run.latent_dim), rng=rng)
    sample_labels = torch.arange(classes).repeat_interleave(n)
    made = grids(run.encoder, run.generator, images, z.repeat(classes, 1), (labels, sample_labels))
    permuted = shuffled_labels(labels)
    shuffled = reconstruct(run.encoder, run.generator, images, labels=permuted)
    made["reconstructions-shuffled"] = interleave_rows(images, shuffled)
    captions = {
        "samples": f"G(z, y): row k has y = k (k = 0 to {classes - 1} from the top), the same "
        f"{n} latents z in every row",
        "reconstructions": "rows of test images x, each over G(E(x), y) with x's own label y",
        "reconstructions-shuffled": "rows of test images x, each over G(E(x), y_perm) with a "
        "shuffled label: x's class kept is inference, y_perm's class is the label copied",
    }
    row_labels = {"samples": [f"y={k}" for k in range(classes)]}
    for name, caption in captions.items():
        columns = n if name == "samples" else 8
        path = folder / f"{name}-{run.tag}.png"
        save_image_grid(made[name], path, columns=columns, row_labels=row_labels.get(name))
        typer.echo(f"{name} of {label}: {path}")
        typer.echo(f"  {caption}")
    for what, values in (("y", labels), ("y_perm", permuted)):
        rows = [" ".join(str(int(v)) for v in values[i : i + 8]) for i in range(0, len(values), 8)]
        typer.echo(f"  {what} of the test images, row by row: {' | '.join(rows)}")


@app.command("train-evaluator")
def train_evaluator_command(
    dataset: str = typer.Argument(..., help="digits, svhn or celeba."),
    out: Path = typer.Option(
        None,
        help="Folder for evaluator.safetensors (default: runs/evaluator-DATASET).",
        parser=_path,
    ),
    data_dir: Path = typer.Option(None, help="Folder with SVHN or CelebA.", parser=_path),
    epochs: int = typer.Option(10, help="Training epochs."),
) -> None:
    """Train the evaluator classifier M_eval behind the feature MSE, the reconstruction class
    agreement and the sample metrics; prints its test accuracy."""
    from gali_ext.recipes.evaluator import default_evaluator_dir, train_evaluator

    folder = _output(out, default_evaluator_dir(dataset))
    if data_dir is not None:
        data_dir = _given(data_dir, "--data-dir")
    if epochs < 1:
        raise ConfigError(
            f"--epochs must be >= 1, got {epochs}: an untrained evaluator would score every run "
            "as chance"
        )
    typer.echo(
        f"training the {dataset} evaluator classifier for {epochs} epochs "
        "(digits: about 1 min on 2 CPU cores)"
    )
    info = train_evaluator(dataset, folder, data_dir, epochs=epochs)
    typer.echo(
        f"evaluator for {dataset}: test accuracy {info['test_accuracy']:.4f}, saved in {folder}"
    )


@app.command("eval")
def eval_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories.", parser=_path),
    evaluator: Path = typer.Option(
        None,
        help="Evaluator folder (default: evaluator-DATASET in --out; for digits it is trained "
        "there when missing, about 1 min).",
        parser=_path,
    ),
    markdown: bool = typer.Option(False, help="Print the table as Markdown."),
    out: Path = typer.Option(
        None,
        help="Folder for eval.json and the evaluator (default: the first run's folder).",
        parser=_path,
    ),
    svm_samples: int = typer.Option(None, help="Labelled images per SVM draw (paper: 1000)."),
    svm_draws: int = typer.Option(None, help="SVM draws to average (paper: 100)."),
    fid_weights: Path = typer.Option(
        None,
        help="A local copy of weights-inception-2015-12-05-6726825d.pth (torch-fidelity's "
        "release v0.2.0: the TF Inception behind published FIDs): adds FID on that network.",
        parser=_path,
    ),
    inception_weights: Path = typer.Option(None, hidden=True, parser=_path),  # removed
    raw_weights: bool = typer.Option(
        False, help="Score the trained weights, not their moving average (EMA) when a run has one."
    ),
    best: bool = typer.Option(False, "--best", help=BEST_HELP),
) -> None:
    """The paper's metrics and the evaluator's (reconstruction class agreement, confident
    samples, class coverage) for trained runs: mean ± std over the seeds of a recipe. A
    class-conditional run gets the class-conditional sample accuracy and the reconstruction
    agreement with its own and a shuffled label instead (docs/design.md, section 6.10)."""
    import json

    from gali_ext.recipes.evaluate import (
        check_same_weights,
        check_svm_options,
        evaluate_run,
        format_table,
        summarise,
        table_notes,
    )
    from gali_ext.recipes.evaluator import default_evaluator_dir
    from gali_ext.recipes.fid import (
        STANDARD_WEIGHTS_FILE,
        STANDARD_WEIGHTS_URL,
        StandardInceptionFID,
        fid_networks,
    )
    from gali_ext.recipes.files import write_text_atomic
    from gali_ext.recipes.settings import RecipeConfig

    if inception_weights is not None:
        raise ConfigError(
            "--inception-weights (timm's inception_v3) was removed: FID is now computed on the "
            f"TF Inception of published FIDs, pass --fid-weights {STANDARD_WEIGHTS_FILE} "
            f"(from {STANDARD_WEIGHTS_URL})"
        )
    check_svm_options(svm_samples, svm_draws)
    run_dirs = [_given(run, "RUN_DIRS") for run in run_dirs]
    if fid_weights is not None:
        fid_weights = _given(fid_weights, "--fid-weights")
    check_same_weights(run_dirs, ema=not raw_weights)
    folder = _output(out, run_dirs[0].resolve().parent)
    if evaluator is not None:
        evaluator = _given(evaluator, "--evaluator")
        if not (evaluator / "evaluator.json").is_file():  # an evaluator is trained there
            evaluator = _output(evaluator, evaluator, "--evaluator")
    inception = StandardInceptionFID(fid_weights) if fid_weights else None
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for run in run_dirs:
        dataset = RecipeConfig.from_json(run / "config.json").dataset
        results.append(
            evaluate_run(
                run,
                evaluator or default_evaluator_dir(dataset, folder),
                svm_samples,
                svm_draws,
                inception=inception,
                echo=typer.echo,
                ema=not raw_weights,
                best=best,
            )
        )
    summary = summarise(results)
    networks = fid_networks(results)
    path = folder / "eval.json"
    saved = {"results": results, "summary": summary, "fid_networks": networks}
    write_text_atomic(path, json.dumps(saved, indent=2))
    typer.echo(format_table(summary, markdown=markdown))
    for line in table_notes(results, networks):
        typer.echo(line)
    typer.echo(f"Results in {path}")


def _default_jobs() -> int:
    import os

    return 2 if (os.cpu_count() or 1) >= 2 else 1


@app.command("study")
def study_command(
    dataset: str = typer.Argument("digits", help="Only digits: the study runs on the CPU."),
    out: Path = typer.Option("runs/study-digits", help="Study folder.", parser=_path),
    steps: int = typer.Option(None, help="Training steps per run (default: 2000)."),
    seeds: int = typer.Option(None, help="Seeds per recipe, 0 .. N-1 (default: 5)."),
    jobs: int = typer.Option(
        None, help="Runs trained at once, each in its own process (default: 2 on 2+ cores)."
    ),
    threads: int = typer.Option(
        None, help="Torch threads per run (default: cores // jobs); results depend on it."
    ),
    progress: bool = typer.Option(True, help="Show progress bars (one job only)."),
    svm_samples: int = typer.Option(None, help="Labelled images per SVM draw (digits: 500)."),
    svm_draws: int = typer.Option(None, help="SVM draws to average (digits: 10)."),
    recipes: str = typer.Option(None, help="Comma-separated recipes (default: all seven)."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting in every recipe."),
) -> None:
    """Train digits-ali, -alice, -gali4, -gali8, -gali-pt, -gali-mix, -gali-nda over seeds,
    compare them, and test the paper's claims seed by seed (paired.md)."""
    from gali_ext.recipes.study import STUDY_SEEDS, STUDY_STEPS, study

    out = _output(out, "runs/study-digits")
    if dataset != "digits":
        raise ConfigError(f"the study runs on digits only, got {dataset!r}")
    names = [r.strip() for r in recipes.split(",")] if recipes else None
    study(
        out,
        steps=STUDY_STEPS if steps is None else steps,
        seeds=STUDY_SEEDS if seeds is None else seeds,
        recipes=names,
        progress=progress,
        echo=typer.echo,
        svm_samples=svm_samples,
        svm_draws=svm_draws,
        overrides=parse_settings(set_),
        jobs=_default_jobs() if jobs is None else jobs,
        threads=threads,
    )


@app.command()
def bench(
    preset: str = typer.Option("digits", help="digits (CPU-sized) or svhn (ALI SVHN, batch 100)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    repeats: int = typer.Option(10, help="Timed repetitions per measurement (median reported)."),
    warmup: int = typer.Option(3, help="Untimed warm-up repetitions."),
    batch: int = typer.Option(None, help="Batch size (default: the preset's)."),
    out: Path = typer.Option("bench.json", help="Where to write the JSON results.", parser=_path),
    profile: bool = typer.Option(False, help="Also print the top ops of ALI and GALI-8 steps."),
    torch_compile: bool = typer.Option(
        False, "--compile", help="Also time ALI and GALI-8 with torch.compile."
    ),
    specs: str = typer.Option(
        None, help="Comma-separated presets to time (default: ali,gali4,gali8,gali_mix,gali_pt)."
    ),
    graphs: bool = typer.Option(
        False,
        "--graphs",
        help="Instead: images/s of ALI and GALI-8 steps, eager vs captured in a CUDA graph, "
        "fp32 vs bf16, with the GPU-busy fraction from torch.profiler (CUDA; on the CPU the "
        "captured variants are skipped).",
    ),
    batches: str = typer.Option(
        None, help="--graphs: comma-separated batch sizes, e.g. 100,1000 (default: --batch)."
    ),
    modes: str = typer.Option(
        "baseline,eager,eager-async,captured", help="--graphs: the step variants to time."
    ),
    seconds: float = typer.Option(1.0, help="--graphs: seconds of timed steps per variant."),
) -> None:
    """Step cost of K classes, fused vs per-class head, and mixed precision, as ratios."""
    import math

    from gali_ext.recipes.bench import PRESETS, SPECS, run_benchmark
    from gali_ext.recipes.bench_setup import benchmark_device
    from gali_ext.recipes.graph_bench import GRAPH_MODES, graph_benchmark

    out = _output(out, "bench.json", kind="file")
    benchmark_device(device)  # a --device this machine lacks is refused before anything runs
    ranges = (("--repeats", repeats, 1), ("--warmup", warmup, 0), ("--batch", batch, 2))
    for option, value, minimum in ranges:
        if value is not None and value < minimum:
            raise ConfigError(f"{option} must be an int >= {minimum}, got {value}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"--seconds must be a positive finite number, got {seconds}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown benchmark preset {preset!r}; presets: {', '.join(PRESETS)}")
    if graphs:
        sizes = batches or str(batch or PRESETS[preset]["batch"])
        try:
            sizes_list = tuple(int(b) for b in sizes.split(","))
        except ValueError:
            raise ConfigError(f"--batches: expected sizes like 100,1000, got {sizes!r}") from None
        chosen = tuple(m for m in modes.split(",") if m)
        unknown = [m for m in chosen if m not in GRAPH_MODES]
        if unknown or min(sizes_list) < 1:
            raise ConfigError(
                f"--modes takes {', '.join(GRAPH_MODES)}; --batches positive "
                f"sizes; got {modes!r}, {sizes!r}"
            )
        graph_benchmark(
            PRESETS[preset]["arch"],
            sizes_list,
            device,
            modes=chosen,
            seconds=seconds,
            warmup=max(warmup, 5),
            out=out,
            print_fn=typer.echo,
        )
        return
    names = tuple(n.strip() for n in specs.split(",")) if specs else SPECS
    run_benchmark(
        preset,
        device,
        repeats,
        warmup,
        batch,
        out,
        print_fn=typer.echo,
        profile=profile,
        torch_compile=torch_compile,
        specs=names,
    )


@app.command("check")
def check_command(
    factory: str = typer.Argument(
        ...,
        help="MODULE:FUNCTION returning (gali, batch), (gali, batch, discriminator) or (gali, "
        "batch, discriminator, baseline): your GALI objective, one batch as your loop gives it, "
        "optionally the module your code saves (or None) and your project's own losses, "
        "baseline(batch) -> (d_loss, eg_loss).",
    ),
) -> None:
    """One D step and one E/G step on your own networks: what trains in which step, the widths,
    batch norm, conditioning, the prior and your checkpoints' contents; exit 1 when anything
    would be silently lost."""
    from gali_ext.check import check
    from gali_ext.recipes.plugins import import_module

    module_name, sep, function_name = factory.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(f"expected MODULE:FUNCTION (e.g. my_project.gali:build), got {factory!r}")
    module = import_module(module_name, option="check")
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{factory}: {module_name} has no function {function_name!r}")
    built = function()
    if not isinstance(built, tuple) or len(built) not in (2, 3, 4):
        raise ConfigError(
            f"{factory} should return (gali, batch), (gali, batch, discriminator) or (gali, "
            f"batch, discriminator, baseline), got {type(built).__name__}"
        )
    gali, batch, *rest = built
    try:
        check(
            gali,
            batch,
            discriminator=rest[0] if rest else None,
            baseline=rest[1] if len(rest) > 1 else None,
        )
    except ConfigError as error:
        typer.echo(f"error: {str(error).splitlines()[0]}", err=True)
        raise typer.Exit(1) from error


@app.command("export")
def export_command(
    run_dir: Path = typer.Argument(
        ..., help="A run directory written by `gali-ext recipe`.", parser=_path
    ),
    out: Path = typer.Argument(..., help="A new or empty folder for the export.", parser=_path),
    raw_weights: bool = typer.Option(
        False, "--raw-weights", help="Export the trained weights, not their moving average (EMA)."
    ),
    push_to_hub: str = typer.Option(
        None, "--push-to-hub", help="Also upload the folder to this Hub model repo (user/name)."
    ),
    private: bool = typer.Option(False, help="--push-to-hub: create the repository private."),
    license: str = typer.Option("mit", help="The license in the model card's front matter."),
    best: bool = typer.Option(False, "--best", help=BEST_HELP),
) -> None:
    """Write a run's E and G as a Hugging Face Hub model folder: safetensors, config.json and a
    model card with the run's settings, summary.json metrics and grids (docs/design.md,
    section 10.11); load them back with HubEncoder/HubGenerator.from_pretrained."""
    from gali_ext.recipes.export import check_repo_id, export_run
    from gali_ext.recipes.export import push_to_hub as upload

    run_dir = _given(run_dir, "RUN_DIR")
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    made = export_run(
        run_dir, out, ema=not raw_weights, license=license, repo_id=push_to_hub, best=best
    )
    label = "the moving average (EMA) of" if made.weights == "ema" else "the trained"
    where = f"{run_dir}'s best/" if best else str(run_dir)
    typer.echo(f"exported {label} E and G of {where} to {made.folder}: {', '.join(made.files)}")
    if push_to_hub is not None:
        url = upload(made.folder, push_to_hub, private=private or None)
        typer.echo(f"pushed {made.folder} to https://huggingface.co/{push_to_hub} ({url})")


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """``warning: ...`` for what a run directory reports (a skipped checkpoint, a dropped
    metrics line); Python's usual format for the rest."""
    from gali_ext.recipes.files import RunDirectoryWarning

    if issubclass(category, RunDirectoryWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main() -> None:
    """Entry point of the ``gali-ext`` script: bad input ends in one line on stderr, exit 2;
    repairs of a run directory are one ``warning: ...`` line each."""
    warnings.formatwarning = _format_warning
    try:
        app()
    except GaliError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
