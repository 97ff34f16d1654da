"""A run directory: what ``gali-ext recipe`` writes into it, and how to read it back.

::

    config.json                  the RecipeConfig, and under "launch" the processes that ran it
    metrics.jsonl                one JSON record per logged step
    encoder.safetensors          E, G and D as of the last checkpoint
    generator.safetensors
    discriminator.safetensors
    encoder_ema.safetensors      the moving averages of E and G (ema_decay > 0)
    generator_ema.safetensors
    checkpoints/checkpoint_N/    Accelerate's save_state (models, optimizers, RNG states), the
                                 EMA, and train_state.json, written last: a folder without it
                                 was cut short by a kill and is never resumed from
    logs/RECIPE/                 tracker files (--log-with tensorboard)
    samples.png, reconstructions.png, grids/   image grids; summary.json at the end

Checkpoints are named and rotated by Accelerate (``ProjectConfiguration(
automatic_checkpoint_naming=True, total_limit=keep_checkpoints)``); weights are written with
``safetensors.torch.save_model`` and read with
:func:`~gali_ext.providers.pretrained.load_safetensors_into`, which names the file and the key of
any mismatch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gali_ext.errors import ConfigError
from gali_ext.providers.pretrained import load_safetensors_into

from . import RecipeConfig

__all__ = [
    "EMA_FILES",
    "TRAIN_STATE",
    "WEIGHT_FILES",
    "RunModels",
    "complete_checkpoints",
    "load_run_models",
    "resume_checkpoint",
    "save_checkpoint",
    "save_weights",
]

WEIGHT_FILES = ("encoder", "generator", "discriminator")
EMA_FILES = {"encoder": "encoder_ema", "generator": "generator_ema"}
TRAIN_STATE = "train_state.json"


def save_weights(modules: dict[str, nn.Module], out: Path) -> None:
    """Each module as ``out/NAME.safetensors`` (``safetensors.torch.save_model``; channels-last
    weights are stored contiguous), written to a temporary name and renamed."""
    from safetensors.torch import save_model

    for name, module in modules.items():
        temporary = out / f"{name}.safetensors.tmp"
        save_model(module, str(temporary), force_contiguous=True)
        temporary.replace(out / f"{name}.safetensors")


def complete_checkpoints(out: Path) -> list[Path]:
    """The checkpoints of run ``out`` that hold ``train_state.json``, oldest first."""
    folders = (out / "checkpoints").glob("checkpoint_*")
    numbered = [(int(f.name.rpartition("_")[2]), f) for f in folders if f.name[11:].isdigit()]
    return [f for _, f in sorted(numbered) if (f / TRAIN_STATE).is_file()]


def save_checkpoint(
    accelerator: Any, out: Path, step: int, weights: dict[str, nn.Module], ema: dict[str, Any]
) -> Path:
    """Accelerate's state (``checkpoints/checkpoint_N``, the oldest beyond ``keep_checkpoints``
    deleted), the EMA models, then ``train_state.json``; ``weights`` (name to module) and the EMA
    of E and G are also exported to the run directory. Returns the checkpoint folder."""
    folder = Path(accelerator.save_state())
    accelerator.wait_for_everyone()  # every process's RNG state is on disk
    if accelerator.is_main_process:
        save_weights({EMA_FILES[name]: average for name, average in ema.items()}, folder)
        state = {"step": step, "world_size": accelerator.num_processes}
        (folder / TRAIN_STATE).write_text(json.dumps(state))
        save_weights({**weights, **{EMA_FILES[n]: a.module for n, a in ema.items()}}, out)
    accelerator.wait_for_everyone()
    return folder


def resume_checkpoint(accelerator: Any, out: Path, ema: dict[str, Any]) -> int:
    """Load the newest complete checkpoint of ``out`` into the prepared models, optimizers, RNGs
    and ``ema``; returns its step (0 when there is none). Checkpoints cut short by a kill are
    deleted, and Accelerate's checkpoint numbering continues after the one loaded."""
    complete = complete_checkpoints(out)
    newest = complete[-1] if complete else None
    if accelerator.is_main_process:
        for folder in (out / "checkpoints").glob("checkpoint_*"):
            if folder not in complete:
                accelerator.print(f"deleting {folder}: incomplete (the run stopped saving it)")
                shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    if newest is None:
        return 0
    state = json.loads((newest / TRAIN_STATE).read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ConfigError(
            f"--resume: {str(out)!r} was trained by {state['world_size']} process(es), this "
            f"launch has {accelerator.num_processes}; resume it with {state['world_size']} "
            "so that each process reads the same shard of the data"
        )
    accelerator.load_state(str(newest))
    for name, average in ema.items():
        load_safetensors_into(average, newest / f"{EMA_FILES[name]}.safetensors")
    accelerator.project_configuration.iteration = int(newest.name.rpartition("_")[2]) + 1
    accelerator.print(f"resumed from {newest} at step {state['step']}")
    return int(state["step"])


@dataclass
class RunModels:
    """A trained run's encoder and generator, as :func:`load_run_models` loads them.

    Attributes:
        config: the run's :class:`~gali_ext.recipes.RecipeConfig`.
        encoder, generator: ``G_z(x)`` and ``G_x(z)`` on the CPU.
        latent_dim: the size of ``z``.
        weights: ``"ema"`` for the moving averages, ``"raw"`` for the trained weights.
    """

    config: RecipeConfig
    encoder: nn.Module
    generator: nn.Module
    latent_dim: int
    weights: str


def load_run_models(run_dir: str | Path, ema: bool = True) -> RunModels:
    """E and G of a run directory: the moving averages (``encoder_ema.safetensors``,
    ``generator_ema.safetensors``) when ``ema`` and the run has them, else the trained weights.

    Raises :class:`~gali_ext.errors.ConfigError` for a folder without ``config.json`` and
    :class:`~gali_ext.errors.CheckpointError` naming the file (and key) of weights that are
    missing, damaged or of another shape.
    """
    from gali_ext.recipes.models import build_ali_models

    run = Path(run_dir)
    config = RecipeConfig.from_json(run / "config.json")
    models = build_ali_models(config.arch, latent_dim=config.latent_dim,
                              num_classes=config.conditions or None)  # fmt: skip
    use_ema = ema and all((run / f"{f}.safetensors").is_file() for f in EMA_FILES.values())
    for name in ("encoder", "generator"):
        file = EMA_FILES[name] if use_ema else name
        load_safetensors_into(getattr(models, name), run / f"{file}.safetensors")
    weights = "ema" if use_ema else "raw"
    return RunModels(config, models.encoder, models.generator, models.latent_dim, weights)
