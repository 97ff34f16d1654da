"""The reference training loop on HF Accelerate (``gali-ext recipe NAME``).

:func:`train` reads top to bottom like Accelerate's ``examples/by_feature`` scripts: the
settings validated, the data loaded, the run directory checked, an ``Accelerator``
(:func:`.build.make_accelerator`), the start decided under the run's lock (:mod:`.start`), the
run built once (:func:`.build.build_run`: models, optimizers and loader prepared, the step, the
EMA), then the loop: steps, ``save_state`` checkpoints, ``log`` to any tracker, and the summary
(:class:`RunLog`). Several processes: ``torchrun --nproc_per_node N -m gali_ext.cli recipe
NAME`` (CPU, gloo) or ``accelerate launch --multi_gpu --num_processes N -m gali_ext.cli recipe
NAME``.

What a run directory holds is described in :mod:`gali_ext.recipes.runs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState, PartialState
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from gali_ext.capture import tf32_mode
from gali_ext.errors import DivergenceError
from gali_ext.recipes.build import (
    BuiltRun,
    build_run,
    check_trackers,
    first_images,
    grids,
    load_run_data,
    make_accelerator,
)
from gali_ext.recipes.cost import counting_first_call, describe_flops, length_text, run_length
from gali_ext.recipes.data import prepare_data
from gali_ext.recipes.evaluator import default_evaluator_dir, load_evaluator
from gali_ext.recipes.files import (
    append_metrics,
    read_metrics,
    storage_errors,
    write_bytes_atomic,
    write_text_atomic,
)
from gali_ext.recipes.lock import RunLock
from gali_ext.recipes.metrics import reconstruction_mse, summary_metrics
from gali_ext.recipes.outputs import check_output_path
from gali_ext.recipes.rundir import METRICS_NAME, remove_temporaries
from gali_ext.recipes.runs import (
    resume_hint,
    save_checkpoint,
)
from gali_ext.recipes.settings import RecipeConfig, check_epochs
from gali_ext.recipes.start import StartPlan, check_run_dir, decided_on_main, plan_start, start_run
from gali_ext.recipes.visual import image_grid, save_image_grid, save_metric_plot
from gali_ext.recipes.watch import EVAL_PREFIX, BestWeights, Watch, metric_series, progress_text
from gali_ext.trainer import StepMetrics, instance_noise_std

__all__ = ["RunLog", "reset_accelerator_state_after", "train"]


class RunLog:
    """What a run reports, from the main process: each logged step to ``metrics.jsonl`` and the
    Accelerate trackers (scalars, D's accuracy per tuple class), grids of samples and
    reconstructions (PNG files, and trackers that take images), ``summary.json`` at the end, and
    the progress bar. Grids and the summary show the EMA of E and G when there is one. With a
    ``watch`` (``eval_every > 0``), the paper's metrics of those weights on a held-out split
    (:meth:`evaluate`), the best weights by ``best_metric`` in ``best/`` and ``metrics.png``."""

    def __init__(
        self,
        accelerator: Any,
        out: Path,
        run: BuiltRun,
        step: int,
        progress: bool,
        watch: Watch | None = None,
    ) -> None:
        self.accelerator, self.out, self.run = accelerator, out, run
        self.config = config = run.config
        self.main = accelerator.is_main_process
        self.test_data = run.test_data
        fixed = torch.Generator().manual_seed(1234)  # grid latents, off the training RNG stream
        self.grid_x = first_images(run.test_data, 32)
        self.grid_z = run.built.gali.prior((64, config.latent_dim), rng=fixed)
        # a class-conditional run: the test images' labels, and each class in turn for samples
        self.grid_labels = None
        if config.conditions:
            self.grid_labels = (
                run.test_data.labels_tensor()[: len(self.grid_x)],
                torch.arange(64) % config.conditions,
            )
        if self.main and config.log_with:
            settings = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in dataclasses.asdict(config).items()
            }
            # TensorBoard hides what an interrupted run logged after the checkpoint resumed from.
            purge = {"tensorboard": {"purge_step": step + 1}} if step else {}
            with storage_errors("the tracker logs", out / "logs"):
                accelerator.init_trackers(config.name, config=settings, init_kwargs=purge)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            disable=not (progress and self.main),
        )
        self.task = self.bar.add_task(config.name, total=config.steps, completed=step, info="")
        self.started = time.perf_counter()
        self.info = {"train": "", "eval": ""}
        self.watch = watch if self.main else None
        self.best: BestWeights | None = None
        self.evaluations: list[dict[str, Any]] = []
        if self.watch is not None:
            self.watch.load(accelerator.device)
            self.best = BestWeights(out, config.best_metric)  # read back on a resumed run
            self.evaluations = [
                r for r in read_metrics(out / METRICS_NAME) if EVAL_PREFIX + "pixel_mse" in r
            ]
            if self.evaluations:  # a resumed run: its last evaluation on the progress line
                last = self.evaluations[-1]
                shown = {k.removeprefix(EVAL_PREFIX): v for k, v in last.items()}
                self.info["eval"] = progress_text(last["step"], shown, self.best)

    def __enter__(self) -> RunLog:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def step(self, step: int, noise: float, metrics: StepMetrics) -> None:
        """Record step ``step`` every ``log_every`` steps and at the last one."""
        self.bar.update(self.task, completed=step)
        if not self.main or (step % self.config.log_every and step != self.config.steps):
            return
        rate = self.config.batch_size * self.run.batches_per_step / max(metrics.seconds, 1e-9)
        record = {"step": step, "noise_std": noise, **metrics.as_dict(), "images_per_s": rate}
        append_metrics(self.out / METRICS_NAME, record)
        scalars = {k: v for k, v in record.items() if isinstance(v, float)}
        scalars |= {f"d_accuracy/class_{i}": a for i, a in enumerate(metrics.class_accuracy)}
        self.accelerator.log(scalars, step=step)
        self.info["train"] = (
            f"D {metrics.d_loss:.3f}  G {metrics.g_loss:.3f}  "
            f"{1 / max(metrics.seconds, 1e-9):.1f} it/s"
        )
        self.bar.update(self.task, info="  ".join(t for t in self.info.values() if t))

    def evaluate(self, step: int) -> dict[str, Any]:
        """The paper's metrics of the weights shown (:class:`.watch.Watch`; docs/design.md,
        section 6.11) at step ``step``: one ``metrics.jsonl`` record (``eval/NAME``, with the
        weights evaluated, the protocol (split, SVM sizes) and the seconds it took), the
        trackers, the progress line, ``best/`` when ``best_metric`` improved, and
        ``metrics.png``. Returns the record (empty off the main process or without a watch)."""
        if self.watch is None:
            return {}
        started = time.perf_counter()
        metrics = self.watch(*self.run.shown, self.run.built.gali.prior)
        seconds = time.perf_counter() - started
        weights = "ema" if self.run.ema else "raw"
        record: dict[str, Any] = {"step": step}
        record.update({EVAL_PREFIX + name: value for name, value in metrics.items()})
        record[EVAL_PREFIX + "seconds"] = seconds
        record[EVAL_PREFIX + "weights"] = weights
        record[EVAL_PREFIX + "protocol"] = self.watch.protocol
        modules = dict(zip(("encoder", "generator"), self.run.shown))
        details = {"weights": weights, "split": self.watch.split}
        if self.best.update(step, metrics, modules, details):
            record[EVAL_PREFIX + "best"] = self.best.metric
        append_metrics(self.out / METRICS_NAME, record)
        scalars = {k: v for k, v in record.items() if isinstance(v, float)}
        self.accelerator.log(scalars, step=step)
        self.evaluations.append(record)
        self.plot()
        self.info["eval"] = progress_text(step, metrics, self.best)
        self.bar.update(self.task, info="  ".join(t for t in self.info.values() if t))
        return record

    def plot(self) -> None:
        """``metrics.png``: each evaluated metric against steps, the best one marked."""
        if self.evaluations:
            series, marks = metric_series(self.evaluations, self.best)
            save_metric_plot(series, self.out / "metrics.png", marks)

    def grids(self, step: int) -> None:
        """Each of :func:`grids` as ``grids/NAME_stepNNNNNNN.png`` and ``NAME.png``, and to the
        trackers that take images."""
        if not self.main:
            return
        for name, batch in grids(
            *self.run.shown, self.grid_x, self.grid_z, self.grid_labels
        ).items():
            path = save_image_grid(batch, self.out / "grids" / f"{name}_step{step:07d}.png")
            write_bytes_atomic(self.out / f"{name}.png", path.read_bytes())
            for tracker in self.accelerator.trackers:
                if hasattr(tracker, "log_images"):
                    tracker.log_images({name: image_grid(batch)[None]}, step=step)

    def evaluator_metrics(self) -> dict[str, float]:
        """The evaluator's metrics of the weights shown (reconstruction class agreement,
        confident samples, class coverage: docs/design.md, section 6), when an evaluator of the
        data set is at hand beside the run (``evaluator-DATASET``, as `gali-ext eval` and the
        study keep it); a class-conditional run gets those of docs/design.md, section 6.10."""

        folder = default_evaluator_dir(self.config.dataset, self.out.resolve().parent)
        if not (folder / "evaluator.json").is_file():
            return {}
        config = self.config
        metrics = summary_metrics(
            *self.run.shown,
            self.test_data,
            load_evaluator(folder),
            latent_dim=config.latent_dim,
            prior=self.run.built.gali.prior,
            conditions=config.conditions,
        )
        metrics.pop("pixel_mse", None)  # already there, as test_pixel_mse
        return metrics

    def finish(self, step: int) -> None:
        """Last grids, and ``summary.json``: the test pixel MSE of the weights shown (the EMA's
        when there is one, the trained weights' then as ``test_pixel_mse_raw``) and
        :meth:`evaluator_metrics`; the float ones go to the trackers too; ``metrics.png``
        again."""
        self.grids(step)
        if not self.main:
            return
        self.plot()
        x = first_images(self.test_data, 2000)
        y = self.test_data.labels_tensor()[: len(x)] if self.config.conditions else None
        mse = reconstruction_mse(*self.run.shown, x, labels=y)
        summary = {
            "recipe": self.config.name,
            "steps": step,
            "test_pixel_mse": mse,
            "weights": "ema" if self.run.ema else "raw",
            "test_images": len(x),
            "seconds_this_session": time.perf_counter() - self.started,
        }
        if self.run.ema:
            w = self.run.weights
            summary["test_pixel_mse_raw"] = reconstruction_mse(
                w["encoder"], w["generator"], x, labels=y
            )
        summary.update(self.evaluator_metrics())
        self.accelerator.log(
            {f"summary/{k}": v for k, v in summary.items() if isinstance(v, float)}, step=step
        )
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        which = " (EMA weights)" if self.run.ema else ""
        self.accelerator.print(
            f"{self.config.name}: {step} steps, test pixel MSE {mse:.4f}{which}, run in {self.out}"
        )


def train(
    config: RecipeConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    epochs: float | None = None,
    trust_checkpoint: bool = False,
) -> Path:
    """Train a recipe into ``out_dir``; returns the run directory.

    Everything is validated (config, the paths written to (:func:`.outputs.check_output_path`),
    trackers, data files and their size, image shapes, run directory, the settings a resume
    changes) before anything is written; the main process
    holds the run directory's lock (:class:`.lock.RunLock`) for the whole run. The data folder
    is resolved (and with ``config.download`` fetched) first (:func:`.data.prepare_data`).
    ``epochs`` replaces ``config.epochs``: the steps that many passes over the training data
    take replace ``config.steps`` (with ``N`` processes each pass is split ``N`` ways). The run
    prints its length first and the FLOPs of a step after its first step
    (:mod:`.cost`). ``trust_checkpoint`` lets
    ``resume`` continue a run of gali-ext 0.1.0, whose checkpoints have no manifest
    (:func:`.checkpoints.adopt_checkpoint`).
    """
    config.validate()
    out = check_output_path(out_dir, "--out")
    check_trackers(config.log_with)
    if epochs is not None:
        config = dataclasses.replace(config, epochs=check_epochs(epochs))
    folder = prepare_data(
        config.dataset, config.data_dir, config.download, splits=(config.train_split,)
    )
    config = dataclasses.replace(config, data_dir=folder)
    with tf32_mode(config.tf32), reset_accelerator_state_after():
        train_data, test_data = load_run_data(config)
        # the held-out split read and best_metric checked (it is one the run evaluates)
        watch = Watch(config, train_data, out) if config.eval_every else None
        check_run_dir(out, config, resume, overwrite)  # read-only: refuse before locking anything
        accelerator = make_accelerator(config, out)
        config.check_data_size(len(train_data), accelerator.num_processes)
        lock = RunLock(out)
        try:

            def decide() -> StartPlan:  # on the main process, holding the lock
                lock.acquire()
                remove_temporaries(out)
                return plan_start(
                    out, config, resume, overwrite, accelerator.num_processes, trust_checkpoint
                )

            plan = decided_on_main(accelerator, decide)
            run = build_run(config, accelerator, train_data, test_data)
            config = run.config
            step = start_run(accelerator, out, plan, run)
            length = run_length(config, len(run.loader), len(train_data), accelerator.num_processes)
            accelerator.print(length_text(config, length))
            batches = run.batches(accelerator, step)
            if step == 0:  # a per-pixel output bias from the first batch; a resume keeps its own
                batches = run.init_output_bias(accelerator, batches)
            how = "matmul and conv FLOPs, counted on the first step"
            step_fn = counting_first_call(
                run.step,
                lambda flops: accelerator.print(describe_flops(flops, config.steps, how)),
            )
            with RunLog(accelerator, out, run, step, progress, watch) as log:
                while step < config.steps:
                    noise = instance_noise_std(step, config.steps, config.instance_noise)
                    try:
                        metrics = step_fn(batches, instance_noise=noise, step=step)
                    except DivergenceError as error:
                        # Nothing is saved: the state that gave non-finite values (perhaps
                        # halfway through a step) would diverge again when resumed. The
                        # checkpoints saved so far passed state_problems.
                        hint = resume_hint(out, accelerator.num_processes)
                        raise DivergenceError(f"{error}; {hint}") from error
                    step += 1
                    run.update_ema()
                    log.step(step, noise, metrics)
                    shown = step % config.sample_every == 0
                    saved = step % config.checkpoint_every == 0 or step == config.steps
                    evaluated = config.eval_every > 0 and step % config.eval_every == 0
                    if run.ema and (shown or saved or evaluated):
                        run.refresh_ema_statistics()
                    if evaluated:
                        log.evaluate(step)
                    if shown:
                        log.grids(step)
                    if saved:
                        save_checkpoint(
                            accelerator,
                            out,
                            step,
                            run.weights,
                            run.ema,
                            config.keep_checkpoints,
                            run.optimizers,
                        )
                log.finish(step)
            accelerator.end_training()
            return out
        finally:
            lock.release()


@contextlib.contextmanager
def reset_accelerator_state_after() -> Iterator[None]:
    """Accelerate keeps one ``AcceleratorState`` per process and refuses a second
    ``Accelerator`` with another mixed precision; it has no public reset. Like Accelerate's own
    test scripts, forget the state after a one-process run, so that a study or a test suite may
    train runs of different precision one after another."""
    try:
        yield
    finally:
        if PartialState._shared_state and PartialState().num_processes == 1:
            AcceleratorState._reset_state(reset_partial_state=True)
