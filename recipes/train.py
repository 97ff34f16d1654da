"""The reference training loop on HF Accelerate (``gali-ext recipe NAME``).

:func:`train_loop` reads like Accelerate's ``examples/by_feature`` scripts: an ``Accelerator``
(:func:`make_accelerator`), ``prepare`` of the GALI module, both optimizers and a sharded
``DataLoader``, the steps (``backward`` is inside :func:`gali_ext.trainer.train_step`),
``save_state`` checkpoints and ``log`` to any tracker. The helpers around it each do one job.
Several processes: ``torchrun --nproc_per_node N -m gali_ext.cli recipe NAME`` (CPU, gloo) or
``accelerate launch --multi_gpu --num_processes N -m gali_ext.cli recipe NAME``.

What a run directory holds is described in :mod:`gali_ext.recipes.runs`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gali_ext import GALI, MultiClassJointDiscriminatorHead
from gali_ext.capture import CapturedStep, tf32_mode
from gali_ext.errors import ConfigError, DataError, DivergenceError, first_line
from gali_ext.gali import build_gali
from gali_ext.losses import build_discriminator_criterion, build_generator_criterion
from gali_ext.priors import resolve_prior
from gali_ext.providers import PretrainedFeatures
from gali_ext.recipes.build import check_trackers, make_accelerator
from gali_ext.recipes.data import (
    ImageData,
    data_mean,
    endless_batches,
    load_dataset,
    training_loader,
)
from gali_ext.recipes.files import (
    append_metrics,
    storage_errors,
    write_bytes_atomic,
    write_text_atomic,
)
from gali_ext.recipes.lock import RunLock
from gali_ext.recipes.metrics import eval_mode, reconstruct, reconstruction_mse
from gali_ext.recipes.models import ALIModels, build_ali_models
from gali_ext.recipes.rundir import (
    METRICS_NAME,
    check_out_path,
    remove_temporaries,
)
from gali_ext.recipes.runs import (
    WEIGHT_FILES,
    load_run_models,
    resume_hint,
    save_checkpoint,
    save_weights,
)
from gali_ext.recipes.start import StartPlan, check_run_dir, decided_on_main, plan_start, start_run
from gali_ext.recipes.visual import image_grid, interleave_rows, save_image_grid
from gali_ext.trainer import StepMetrics, build_optimizer, instance_noise_std, train_step

from . import RecipeConfig, check_epochs

__all__ = [
    "BuiltModel",
    "RunLog",
    "WEIGHT_FILES",
    "build_ema",
    "build_model",
    "check_conditions",
    "first_images",
    "grids",
    "load_data",
    "load_run_models",
    "refresh_ema_statistics",
    "save_weights",
    "train",
    "train_loop",
]


@dataclass
class BuiltModel:
    """The networks of a recipe and the GALI objective over them."""

    models: ALIModels
    head: MultiClassJointDiscriminatorHead
    gali: GALI


def _features(config: RecipeConfig) -> PretrainedFeatures | None:
    """The pretrained feature model M of a recipe, or None when its spec does not use one."""
    if not config.uses_features:
        return None
    if config.features_model == "evaluator":
        from gali_ext.recipes.evaluator import load_evaluator

        # The evaluator classifier takes images in [-1, 1] as they are: an identity range map.
        evaluator = load_evaluator(config.features_weights)
        return PretrainedFeatures(evaluator.body, image_range=(0.0, 1.0))
    size = config.features_input_size
    return PretrainedFeatures(
        config.features_model, config.features_weights, input_size=(size, size) if size else None
    )


def build_model(config: RecipeConfig, channels: int) -> BuiltModel:
    """Encoder, generator, discriminator head and :class:`GALI` objective for a recipe."""
    models = build_ali_models(
        config.arch,
        latent_dim=config.latent_dim,
        channels=channels,
        num_classes=config.conditions or None,
    )
    gali = build_gali(
        config.spec,
        models,
        _features(config),
        alice_weight=config.alice_weight,
        generator_criterion=build_generator_criterion(config.generator_criterion),
        discriminator_criterion=build_discriminator_criterion(config.discriminator_criterion),
        prior=config.prior,
        unary=config.unary_weight > 0,
        unary_weights=config.unary_weight,
    )
    return BuiltModel(models, gali.head, gali)


def load_data(config: RecipeConfig, split: str) -> ImageData:
    """A split of the recipe's data set, checked against the architecture's image shape."""
    from gali_ext.recipes.models import arch_image_shape

    data = load_dataset(config.dataset, split=split, data_dir=config.data_dir or None)
    expected = arch_image_shape(config.arch)
    got = (data.channels, data.image_size, data.image_size)
    if tuple(expected[1:]) != got[1:] or expected[0] != got[0]:
        raise DataError(
            f"recipe {config.name!r} (arch {config.arch!r}) expects images of shape "
            f"{list(expected)}, the {config.dataset} data gives {list(got)}"
        )
    return data


def check_conditions(config: RecipeConfig, data: ImageData) -> None:
    """Refuse a class-conditional recipe whose ``conditions`` are fewer than the classes of the
    data's labels (G's and D's class embeddings would be indexed out of range)."""
    if not config.conditions:
        return
    labels = data.labels_tensor()
    if labels.ndim != 1:
        raise DataError(
            f"conditions={config.conditions}: the {config.dataset} labels are not classes "
            f"(shape {list(labels.shape)}): expected conditions=0"
        )
    classes = int(labels.max()) + 1
    if config.conditions < classes:
        raise ConfigError(
            f"conditions={config.conditions} is invalid: the {config.dataset} labels are the "
            f"classes 0..{classes - 1}: expected conditions={classes} (or 0 for an "
            "unconditional run)"
        )


def build_optimizers(config: RecipeConfig, built: BuiltModel, device: Any) -> tuple[Any, Any]:
    """D's optimizer over the head, and one over E's and G's parameters together (fused on
    CUDA; capturable when the step is replayed as a CUDA graph)."""
    models = built.models
    eg = itertools.chain(models.encoder.parameters(), models.generator.parameters())
    return tuple(
        build_optimizer(
            config.optimizer,
            params,
            config.lr,
            config.betas,
            device=device,
            capturable=config.cuda_graphs,
        )
        for params in (built.head.parameters(), eg)
    )


def make_step(
    config: RecipeConfig, accelerator: Any, gali: Any, d_optimizer: Any, g_optimizer: Any
) -> Callable[..., StepMetrics]:
    """The training step the loop calls, ``step_fn(batches, instance_noise=, step=)``:
    :func:`~gali_ext.trainer.train_step`, or with ``cuda_graphs`` a
    :class:`~gali_ext.capture.CapturedStep` (refused off CUDA, before anything is written)."""
    if config.cuda_graphs:
        return CapturedStep(
            accelerator.unwrap_model(gali, keep_fp32_wrapper=False),
            d_optimizer,
            g_optimizer,
            n_dis=config.n_dis,
            shared_forward=config.shared_forward,
            capture=True,
            autocast_dtype={"bf16": torch.bfloat16}.get(config.mixed_precision),
        )
    return functools.partial(
        train_step,
        gali,
        d_optimizer=d_optimizer,
        g_optimizer=g_optimizer,
        n_dis=config.n_dis,
        accelerator=accelerator,
        shared_forward=config.shared_forward,
    )


def build_ema(models: ALIModels, decay: float) -> dict[str, Any]:
    """Moving averages of E and G (``torch.optim.swa_utils.AveragedModel``): after each update,
    ``ema = decay * ema + (1 - decay) * w`` for every weight (eq. 10.2), the first update copying
    ``w``. Buffers are not averaged: :func:`refresh_ema_statistics` recomputes the batch-norm
    statistics before the averages are shown or saved. ``{}`` when ``decay`` is 0."""
    if decay == 0:
        return {}
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return {
        name: AveragedModel(
            getattr(models, name), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False
        ).requires_grad_(False)
        for name in ("encoder", "generator")
    }


# Inputs the EMA's batch-norm statistics are recomputed from (BigGAN's "standing statistics").
EMA_STATISTICS_INPUTS = 1024


class _Unpack(torch.nn.Module):
    """``module(*inputs)`` from one argument: ``update_bn`` calls its model with one."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        return self.module(*inputs)


def refresh_ema_statistics(
    ema: dict[str, Any],
    images: torch.Tensor,
    latents: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 64,
) -> None:
    """Recompute the batch-norm running statistics of the EMA of E from ``images`` and of G from
    ``latents`` (with ``labels`` for a class-conditional G), in batches of ``batch_size``, as the
    equal-weight mean of the batches' statistics (eq. 10.3, ``torch.optim.swa_utils.update_bn``).

    Averaged weights give other activations than any of the weights averaged, so averaging the
    running statistics too (or keeping the trained network's) leaves E's and G's normalisation
    wrong: on digits such an EMA reconstructs barely above chance. Networks without batch norm
    are left as they are."""
    from torch.optim.swa_utils import update_bn

    for name, inputs in (("encoder", images), ("generator", latents)):
        if name not in ema:
            continue
        module = ema[name].module
        device = next(module.parameters()).device
        batches = []
        for start in range(0, len(inputs), batch_size):
            args = [inputs[start : start + batch_size].to(device)]
            if name == "generator" and labels is not None:
                args.append(labels[start : start + batch_size].to(device))
            batches.append([tuple(args)])  # update_bn passes batch[0], the tuple, to _Unpack
        update_bn(batches, _Unpack(module))


def _ema_statistics_inputs(
    config: RecipeConfig, train_data: ImageData
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What :func:`refresh_ema_statistics` runs E and G on in a run: the first
    ``EMA_STATISTICS_INPUTS`` training images, as many latents from the run's prior (seeded,
    off the training RNG stream) and, for a class-conditional run, those images' labels."""
    images = first_images(train_data, EMA_STATISTICS_INPUTS)
    rng = torch.Generator().manual_seed(4321)
    latents = resolve_prior(config.prior)((len(images), config.latent_dim), rng=rng)
    labels = train_data.labels_tensor()[: len(images)] if config.conditions else None
    return images, latents, labels


def _steps_for_epochs(config: RecipeConfig, epochs: float | None, batches: int) -> RecipeConfig:
    """``config`` with ``steps`` replaced by what ``epochs`` passes over the data take, each
    process drawing ``batches`` of its shard per epoch and ``n_dis`` batches per step."""
    if epochs is None:
        return config
    return dataclasses.replace(config, steps=max(1, math.ceil(epochs * batches / config.n_dis)))


def first_images(data: ImageData, count: int) -> torch.Tensor:
    """The first ``count`` images of a split, ``[N, C, H, W]`` in [-1, 1]."""
    return data.images_tensor(count)


@torch.no_grad()
def grids(
    encoder: Any,
    generator: Any,
    images: torch.Tensor,
    z: torch.Tensor,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``samples`` ``G(z)``, and ``reconstructions``: rows of ``images`` each over its row of
    ``G(E(x))``; ``[N, C, H, W]`` in [-1, 1]. ``labels``: for a class-conditional G, the
    images' classes and the samples' (``G(z, y)``)."""
    device = next(generator.parameters()).device
    with eval_mode(generator):
        extra = (labels[1].to(device),) if labels is not None else ()
        samples = generator(z.to(device), *extra)
    image_labels = labels[0] if labels is not None else None
    recon = reconstruct(encoder, generator, images.to(device), labels=image_labels)
    return {"samples": samples, "reconstructions": interleave_rows(images.to(device), recon)}


class RunLog:
    """What a run reports, from the main process: each logged step to ``metrics.jsonl`` and the
    Accelerate trackers (scalars, D's accuracy per tuple class), grids of samples and
    reconstructions (PNG files, and trackers that take images), ``summary.json`` at the end, and
    the progress bar. Grids and the summary show the EMA of E and G when there is one."""

    def __init__(
        self,
        accelerator,
        out: Path,
        config: RecipeConfig,
        step: int,
        progress: bool,
        test_data: ImageData,
        weights: dict[str, Any],
        ema: dict[str, Any],
    ):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.accelerator, self.out, self.config = accelerator, out, config
        self.main = accelerator.is_main_process
        self.weights, self.ema, self.test_data = weights, ema, test_data
        self.shown = [ema[n].module if ema else weights[n] for n in ("encoder", "generator")]
        fixed = torch.Generator().manual_seed(1234)  # grid latents, off the training RNG stream
        self.grid_x = first_images(test_data, 32)
        self.grid_z = resolve_prior(config.prior)((64, config.latent_dim), rng=fixed)
        # a class-conditional run: the test images' labels, and each class in turn for samples
        self.grid_labels = None
        if config.conditions:
            self.grid_labels = (
                test_data.labels_tensor()[: len(self.grid_x)],
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
        rate = self.config.batch_size * self.config.n_dis / max(metrics.seconds, 1e-9)
        record = {"step": step, "noise_std": noise, **metrics.as_dict(), "images_per_s": rate}
        append_metrics(self.out / METRICS_NAME, record)
        scalars = {k: v for k, v in record.items() if isinstance(v, float)}
        scalars |= {f"d_accuracy/class_{i}": a for i, a in enumerate(metrics.class_accuracy)}
        self.accelerator.log(scalars, step=step)
        self.bar.update(
            self.task,
            info=f"D {metrics.d_loss:.3f}  G {metrics.g_loss:.3f}  "
            f"{1 / max(metrics.seconds, 1e-9):.1f} it/s",
        )

    def grids(self, step: int) -> None:
        """Each of :func:`grids` as ``grids/NAME_stepNNNNNNN.png`` and ``NAME.png``, and to the
        trackers that take images."""
        if not self.main:
            return
        for name, batch in grids(*self.shown, self.grid_x, self.grid_z, self.grid_labels).items():
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
        from .evaluate import default_evaluator_dir, summary_metrics
        from .evaluator import load_evaluator

        folder = default_evaluator_dir(self.config.dataset, self.out.resolve().parent)
        if not (folder / "evaluator.json").is_file():
            return {}
        config = self.config
        metrics = summary_metrics(
            *self.shown,
            self.test_data,
            load_evaluator(folder),
            latent_dim=config.latent_dim,
            prior=config.prior,
            conditions=config.conditions,
        )
        metrics.pop("pixel_mse", None)  # already there, as test_pixel_mse
        return metrics

    def finish(self, step: int) -> None:
        """Last grids, and ``summary.json``: the test pixel MSE of the weights shown (the EMA's
        when there is one, the trained weights' then as ``test_pixel_mse_raw``) and
        :meth:`evaluator_metrics`; the float ones go to the trackers too."""
        self.grids(step)
        if not self.main:
            return
        x = first_images(self.test_data, 2000)
        y = self.test_data.labels_tensor()[: len(x)] if self.config.conditions else None
        mse = reconstruction_mse(*self.shown, x, labels=y)
        summary = {
            "recipe": self.config.name,
            "steps": step,
            "test_pixel_mse": mse,
            "weights": "ema" if self.ema else "raw",
            "test_images": len(x),
            "seconds_this_session": time.perf_counter() - self.started,
        }
        if self.ema:
            w = self.weights
            summary["test_pixel_mse_raw"] = reconstruction_mse(
                w["encoder"], w["generator"], x, labels=y
            )
        summary.update(self.evaluator_metrics())
        self.accelerator.log(
            {f"summary/{k}": v for k, v in summary.items() if isinstance(v, float)}, step=step
        )
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        which = " (EMA weights)" if self.ema else ""
        self.accelerator.print(
            f"{self.config.name}: {step} steps, test pixel MSE {mse:.4f}{which}, run in {self.out}"
        )


def train_loop(
    config: RecipeConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    epochs: float | None,
    trust_checkpoint: bool = False,
) -> Path:
    """The body of :func:`train`, after the config was validated: checks the run directory,
    takes its lock (main process), builds, starts or resumes, trains."""
    train_data, test_data = load_data(config, "train"), load_data(config, "test")
    check_conditions(config, train_data)
    check_run_dir(out, config, resume, overwrite)  # read-only: refuse before locking anything
    accelerator = make_accelerator(config, out)
    config.check_data_size(len(train_data), accelerator.num_processes)
    lock = RunLock(out)
    try:

        def locked_plan() -> StartPlan:
            lock.acquire()
            remove_temporaries(out)
            return plan_start(
                out, config, resume, overwrite, accelerator.num_processes, trust_checkpoint
            )

        plan = decided_on_main(accelerator, locked_plan)
        return _train_locked(
            accelerator, config, out, plan, train_data, test_data, progress=progress, epochs=epochs
        )
    finally:
        lock.release()


def _train_locked(
    accelerator: Any,
    config: RecipeConfig,
    out: Path,
    plan: StartPlan,
    train_data: ImageData,
    test_data: ImageData,
    *,
    progress: bool,
    epochs: float | None,
) -> Path:
    """Build, start (:func:`start_run`) and train, holding the run's lock."""
    from accelerate.utils import set_seed

    set_seed(config.seed, device_specific=True)
    try:
        built = build_model(config, train_data.channels)
    except (MemoryError, RuntimeError) as error:  # torch's allocator raises RuntimeError
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        first = first_line(error)
        raise ConfigError(
            f"cannot build the models of {config.name} (latent_dim={config.latent_dim}, "
            f"batch_size={config.batch_size}): out of memory ({first[:200]}); expected settings "
            "whose models fit in memory"
        ) from None
    built.models.generator.init_output_bias(data_mean(train_data))
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:  # in place: the optimizers keep the same parameter objects
        built.gali.to(memory_format=layout)
    d_optimizer, g_optimizer = build_optimizers(config, built, accelerator.device)
    loader = training_loader(
        train_data,
        config.batch_size,
        config.seed,
        config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    gali, d_optimizer, g_optimizer, loader = accelerator.prepare(
        built.gali, d_optimizer, g_optimizer, loader
    )
    step_fn = make_step(config, accelerator, gali, d_optimizer, g_optimizer)
    ema = build_ema(built.models, config.ema_decay)
    config = _steps_for_epochs(config, epochs, len(loader))
    optimizers = (d_optimizer, g_optimizer)
    step = start_run(accelerator, out, config, plan, ema, optimizers, built.gali)
    batches = endless_batches(
        loader, accelerator, step * config.n_dis, layout, with_labels=config.conditions > 0
    )
    weights = dict(zip(WEIGHT_FILES, (built.models.encoder, built.models.generator, built.head)))
    if ema:
        refresh = functools.partial(
            refresh_ema_statistics,
            ema,
            *_ema_statistics_inputs(config, train_data),
            batch_size=config.batch_size,
        )
    with RunLog(accelerator, out, config, step, progress, test_data, weights, ema) as log:
        while step < config.steps:
            noise = instance_noise_std(step, config.steps, config.instance_noise)
            try:
                metrics = step_fn(batches, instance_noise=noise, step=step)
            except DivergenceError as error:
                # Nothing is saved: the state that gave non-finite values (perhaps halfway
                # through a step) would diverge again when resumed. The checkpoints saved so far
                # passed state_problems.
                hint = resume_hint(out, accelerator.num_processes)
                raise DivergenceError(f"{error}; {hint}") from error
            step += 1
            for name, average in ema.items():
                average.update_parameters(weights[name])
            log.step(step, noise, metrics)
            shown = step % config.sample_every == 0
            saved = step % config.checkpoint_every == 0 or step == config.steps
            if ema and (shown or saved):
                refresh()
            if shown:
                log.grids(step)
            if saved:
                save_checkpoint(
                    accelerator,
                    out,
                    step,
                    weights,
                    ema,
                    config.keep_checkpoints,
                    (d_optimizer, g_optimizer),
                )
        log.finish(step)
    accelerator.end_training()
    return out


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

    Everything is validated (config, trackers, data files and their size, image shapes, run
    directory, the settings a resume changes) before anything is written; the main process
    holds the run directory's lock (:class:`.rundir.RunLock`) for the whole run. ``epochs``
    replaces ``config.steps`` by the steps that many passes over the training data take (with
    ``N`` processes each pass is split ``N`` ways). ``trust_checkpoint`` lets ``resume``
    continue a run of gali-ext 0.1.0, whose checkpoints have no manifest
    (:func:`.rundir.adopt_checkpoint`).
    """
    from accelerate.state import AcceleratorState, PartialState

    config.validate()
    check_out_path(out_dir)
    check_trackers(config.log_with)
    if epochs is not None:
        check_epochs(epochs)
    try:
        with tf32_mode(config.tf32):
            return train_loop(
                config,
                Path(out_dir),
                resume=resume,
                overwrite=overwrite,
                progress=progress,
                epochs=epochs,
                trust_checkpoint=trust_checkpoint,
            )
    finally:
        if PartialState._shared_state and PartialState().num_processes == 1:
            # Accelerate keeps one AcceleratorState per process and refuses a second
            # Accelerator with another mixed precision; it has no public reset. Like
            # Accelerate's own test scripts, forget the state after a one-process run, so that a
            # study or a test suite may train runs of different precision one after another.
            AcceleratorState._reset_state(reset_partial_state=True)
