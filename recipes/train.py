"""The reference training loop on HF Accelerate (``gali-ext recipe NAME``).

The loop stays visible, as in accelerate's examples: ``Accelerator(mixed_precision=...)``,
``prepare``, ``backward`` (inside :func:`gali_ext.trainer.train_step`), ``save_state`` and
``load_state``. Multi-GPU: ``accelerate launch -m gali_ext.cli recipe NAME ...``.

A run directory holds ``config.json``, ``metrics.jsonl``, the weights as
``encoder.safetensors``, ``generator.safetensors``, ``discriminator.safetensors``, accelerate
state under ``checkpoints/step-NNNNNNN`` (the last ``keep_checkpoints``), PNG grids of samples
and of real/reconstruction pairs, and ``summary.json`` at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gali_ext import GALI, MultiClassJointDiscriminatorHead
from gali_ext.capture import CapturedStep, tf32_mode
from gali_ext.errors import ConfigError, DataError, DivergenceError
from gali_ext.gali import build_gali
from gali_ext.losses import build_generator_criterion
from gali_ext.providers import PretrainedFeatures
from gali_ext.recipes.data import BatchStream, ImageData, data_mean, load_dataset
from gali_ext.recipes.metrics import reconstruction_mse
from gali_ext.recipes.models import ALIModels, build_ali_models
from gali_ext.recipes.visual import interleave_rows, save_image_grid
from gali_ext.trainer import build_optimizer, instance_noise_std, train_step

from . import RecipeConfig

__all__ = ["BuiltModel", "build_model", "load_data", "check_run_dir", "train", "save_weights"]

WEIGHT_FILES = ("encoder", "generator", "discriminator")


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
    models = build_ali_models(config.arch, latent_dim=config.latent_dim, channels=channels)
    gali = build_gali(
        config.spec,
        models,
        _features(config),
        alice_weight=config.alice_weight,
        generator_criterion=build_generator_criterion(config.generator_criterion),
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


def check_run_dir(out: Path, config: RecipeConfig, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix runs: an existing run directory is resumed, overwritten, or left alone.

    Returns whether ``out`` holds something to replace (the caller deletes it once everything
    else has been validated, so a failed start never destroys the previous run).
    """
    saved = out / "config.json"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(out)!r} holds no run (no config.json)")
        previous = RecipeConfig.from_json(saved)
        if previous.name != config.name:
            raise ConfigError(
                f"--resume: {str(out)!r} holds a run of {previous.name!r}, not {config.name!r}"
            )
        return False
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{str(out)!r} is a file, not a run directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            what = "a run" if saved.is_file() else "files"
            raise ConfigError(
                f"{str(out)!r} already holds {what}; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        return True
    return False


class TrainState:
    """The loop's own state that accelerate checkpoints beside the models and optimizers."""

    def __init__(self, stream: BatchStream) -> None:
        self.step = 0
        self.stream = stream

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["stream"])


def first_images(data: ImageData, count: int) -> torch.Tensor:
    """The first ``count`` images of a split, ``[N, C, H, W]`` in [-1, 1]."""
    return torch.stack([data[i][0] for i in range(min(count, len(data)))])


def save_weights(built: BuiltModel, out: Path) -> None:
    """``encoder``/``generator``/``discriminator`` ``.safetensors``, each written atomically."""
    from safetensors.torch import save_file

    modules = (built.models.encoder, built.models.generator, built.head)
    for name, module in zip(WEIGHT_FILES, modules):
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        temporary = out / f"{name}.safetensors.tmp"
        save_file(state, str(temporary))
        temporary.replace(out / f"{name}.safetensors")


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"))


def _save_checkpoint(accelerator, built: BuiltModel, out: Path, step: int, keep: int) -> None:
    """Accelerate state written to a temporary folder and renamed: a kill never leaves a
    half-written checkpoint that resume would pick up."""
    final = out / "checkpoints" / f"step-{step:07d}"
    temporary = out / "checkpoints" / f".tmp-step-{step:07d}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        save_weights(built, out)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


@torch.no_grad()
def write_grids(built: BuiltModel, images: torch.Tensor, z: torch.Tensor, out: Path, tag: str):
    """Samples ``G(z)`` and originals over their reconstructions ``G(E(x))``, as PNGs."""
    from gali_ext.recipes.metrics import eval_mode, reconstruct

    with eval_mode(built.models.generator):
        samples = built.models.generator(z)
    recon = reconstruct(built.models.encoder, built.models.generator, images)
    paths = []
    for name, grid in (("samples", samples), ("reconstructions", interleave_rows(images, recon))):
        paths.append(save_image_grid(grid, out / "grids" / f"{name}_{tag}.png"))
        shutil.copyfile(paths[-1], out / f"{name}.png")
    return paths


def _train(
    config: RecipeConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    epochs: float | None = None,
) -> Path:
    """The body of :func:`train`, after the config was validated."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    out = Path(out_dir)
    train_data = load_data(config, "train")
    test_data = load_data(config, "test")
    if epochs is not None:
        if epochs <= 0:
            raise ConfigError(f"--epochs must be positive, got {epochs}")
        batches = epochs * (len(train_data) // config.batch_size)
        config = dataclasses.replace(config, steps=max(1, math.ceil(batches / config.n_dis)))
    replace = check_run_dir(out, config, resume, overwrite)

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        # D steps leave E and G unused; G steps freeze D's parameters.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if config.shared_forward and accelerator.num_processes > 1:
        raise ConfigError(
            f"shared_forward=true runs on one process, this launch has "
            f"{accelerator.num_processes}: use the alternating schedule (shared_forward=false)"
        )
    set_seed(config.seed, device_specific=True)
    built = build_model(config, train_data.channels)
    built.models.generator.init_output_bias(data_mean(train_data))
    placement = {"device": accelerator.device, "capturable": config.cuda_graphs}
    d_optimizer = build_optimizer(
        config.optimizer, built.head.parameters(), config.lr, config.betas, **placement
    )
    g_optimizer = build_optimizer(
        config.optimizer,
        itertools.chain(built.models.encoder.parameters(), built.models.generator.parameters()),
        config.lr,
        config.betas,
        **placement,
    )
    layout = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:  # in place: the optimizers keep the same parameter objects
        built.gali.to(memory_format=layout)
    gali, d_optimizer, g_optimizer = accelerator.prepare(built.gali, d_optimizer, g_optimizer)
    step_fn = functools.partial(
        train_step, gali, d_optimizer=d_optimizer, g_optimizer=g_optimizer, n_dis=config.n_dis,
        accelerator=accelerator, shared_forward=config.shared_forward,
    )  # fmt: skip
    if config.cuda_graphs:  # refused off CUDA here, before the run directory is touched
        step_fn = CapturedStep(
            accelerator.unwrap_model(gali, keep_fp32_wrapper=False), d_optimizer, g_optimizer,
            n_dis=config.n_dis, shared_forward=config.shared_forward, capture=True,
            autocast_dtype={"bf16": torch.bfloat16}.get(config.mixed_precision),
        )  # fmt: skip
    stream = BatchStream(
        train_data, config.batch_size, seed=config.seed + 1000 * accelerator.process_index
    )
    state = TrainState(stream)
    accelerator.register_for_checkpointing(state)

    if accelerator.is_main_process:
        if replace:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(config.to_json())
    accelerator.wait_for_everyone()
    metrics_path = out / "metrics.jsonl"
    if resume:
        if _checkpoints(out):
            accelerator.load_state(str(_checkpoints(out)[-1]))
            accelerator.print(f"resumed from {_checkpoints(out)[-1]} at step {state.step}")
        if accelerator.is_main_process and metrics_path.exists():
            # Steps logged after the checkpoint are trained again: drop their old records.
            kept = [line for line in metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= state.step]  # fmt: skip
            metrics_path.write_text("".join(line + "\n" for line in kept))

    # Fixed images and latents for the grids, drawn off the training RNG stream.
    fixed = torch.Generator().manual_seed(1234)
    grid_x = first_images(test_data, 32).to(accelerator.device)
    grid_z = torch.randn(64, built.models.latent_dim, generator=fixed).to(accelerator.device)

    def batches():
        while True:
            yield next(stream)[0].to(accelerator.device, non_blocking=True, memory_format=layout)

    batch_iter = batches()
    total = config.steps
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not (progress and accelerator.is_main_process),
    )
    started = time.perf_counter()
    with bar:
        task = bar.add_task(config.name, total=total, completed=state.step, info="")
        while state.step < total:
            noise = instance_noise_std(state.step, total, config.instance_noise)
            try:
                result = step_fn(batch_iter, instance_noise=noise, step=state.step)
            except DivergenceError:
                _save_checkpoint(accelerator, built, out, state.step, config.keep_checkpoints)
                raise
            state.step += 1
            rate = config.batch_size * config.n_dis / max(result.seconds, 1e-9)
            if accelerator.is_main_process and (
                state.step % config.log_every == 0 or state.step == total
            ):
                record = {"step": state.step, "noise_std": noise, **result.as_dict()}
                record["images_per_s"] = rate
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(
                    task,
                    info=f"D {result.d_loss:.3f}  G {result.g_loss:.3f}  "
                    f"{1 / max(result.seconds, 1e-9):.1f} it/s",
                )
            bar.update(task, completed=state.step)
            if accelerator.is_main_process and state.step % config.sample_every == 0:
                write_grids(built, grid_x, grid_z, out, f"step{state.step:07d}")
            if state.step % config.checkpoint_every == 0 or state.step == total:
                _save_checkpoint(accelerator, built, out, state.step, config.keep_checkpoints)

    if accelerator.is_main_process:
        write_grids(built, grid_x, grid_z, out, f"step{state.step:07d}")
        mse = reconstruction_mse(
            built.models.encoder, built.models.generator, first_images(test_data, 2000)
        )
        summary = {
            "recipe": config.name,
            "steps": state.step,
            "seconds_this_session": time.perf_counter() - started,
            "test_pixel_mse": mse,
            "test_images": min(len(test_data), 2000),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(
            f"{config.name}: {state.step} steps, test pixel MSE {mse:.4f}, run in {out}"
        )
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
) -> Path:
    """Train a recipe into ``out_dir``; returns the run directory.

    Everything is validated (config, data files, image shapes, run directory) before anything
    is written. ``epochs`` replaces ``config.steps`` by the steps that many passes over the
    training data take.
    """
    from accelerate.state import AcceleratorState, PartialState

    config.validate()
    try:
        with tf32_mode(config.tf32):
            return _train(config, out_dir, resume=resume, overwrite=overwrite, progress=progress,
                          epochs=epochs)  # fmt: skip
    finally:
        if PartialState._shared_state and PartialState().num_processes == 1:
            # Accelerate keeps one global state per process; forget it so that the next run in
            # this process (a study, a test) may choose another mixed precision.
            AcceleratorState._reset_state(reset_partial_state=True)
