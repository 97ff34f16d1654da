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
                                 EMA, train_state.json, and manifest.json (sizes and SHA-256 of
                                 the files), written last: a folder whose manifest does not
                                 verify is never resumed from
    damaged-checkpoints/         checkpoints a resume passed over (kept for inspection)
    .lock                        the lock of the process training into the directory
    logs/RECIPE/                 tracker files (--log-with tensorboard)
    samples.png, reconstructions.png, grids/   image grids; summary.json at the end

Checkpoints are named by Accelerate (``ProjectConfiguration(automatic_checkpoint_naming=True)``)
and rotated by :func:`save_checkpoint`, which removes only gali-ext's own ``checkpoint_N``
folders and never saves a diverged state (:func:`state_problems`); weights are written with
``safetensors.torch.save_model`` and read with
:func:`~gali_ext.providers.pretrained.load_safetensors_into`, which names the file and the key of
any mismatch. Every file is written to a temporary name and renamed
(:mod:`gali_ext.recipes.rundir`, docs/design.md, section 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from gali_ext.errors import CheckpointError, ConfigError, DivergenceError, GaliError
from gali_ext.priors import Prior, resolve_prior
from gali_ext.providers.pretrained import load_safetensors_into
from gali_ext.recipes.checkpoints import (
    CHECKPOINTS_NAME,
    TRAIN_STATE_NAME,
    checkpoint_number,
    list_checkpoints,
    load_state_safely,
    load_train_state_json,
    rotate_checkpoints,
    save_train_state_json,
    verify_checkpoint,
    write_manifest,
)
from gali_ext.recipes.files import atomic_output, storage_errors
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.settings import RecipeConfig

__all__ = [
    "has_ema_weights",
    "DIVERGED_WEIGHT",
    "EMA_FILES",
    "RunModels",
    "TRAIN_STATE",
    "WEIGHT_FILES",
    "complete_checkpoints",
    "last_good_checkpoint",
    "load_run_models",
    "resume_checkpoint",
    "resume_hint",
    "save_checkpoint",
    "save_weights",
    "state_problems",
]

WEIGHT_FILES = ("encoder", "generator", "discriminator")
EMA_FILES = {"encoder": "encoder_ema", "generator": "generator_ema"}
TRAIN_STATE = TRAIN_STATE_NAME


def save_weights(modules: dict[str, nn.Module], out: Path) -> None:
    """Each module as ``out/NAME.safetensors`` (``safetensors.torch.save_model``; channels-last
    weights are stored contiguous), written atomically (:func:`.rundir.atomic_output`)."""

    for name, module in modules.items():
        with atomic_output(out / f"{name}.safetensors") as temporary:
            save_model(module, str(temporary), force_contiguous=True)


def complete_checkpoints(out: Path, num_processes: int = 1) -> list[Path]:
    """The checkpoints of run ``out`` whose manifest verifies (:func:`.rundir.verify_checkpoint`),
    oldest first, sorted by number."""
    found = list_checkpoints(out / CHECKPOINTS_NAME)
    return [f for f in found if not verify_checkpoint(f, num_processes)]


DIVERGED_WEIGHT = 1e6
"""A weight (or optimizer state) of larger magnitude marks a diverged state that is never saved
as a checkpoint. The digits, SVHN and CelebA runs keep every weight below 10 in magnitude; an
exploding learning rate (``--set lr=1e30``) leaves weights of about ``lr`` after one step, still
finite, so finiteness alone would not catch it."""


def state_problems(modules: dict[str, Any], optimizers: Sequence[Any] = ()) -> list[str]:
    """Why the weights of ``modules`` (name to module) and the state of ``optimizers`` are not a
    state to resume from: non-finite values, or values beyond :data:`DIVERGED_WEIGHT` in
    magnitude. An empty list for a healthy state."""

    problems = []
    named = [(name, module.state_dict().values()) for name, module in modules.items()]
    for i, optimizer in enumerate(optimizers):
        tensors = [v for state in optimizer.state_dict()["state"].values() for v in state.values()]
        named.append((f"optimizer {i}", tensors))
    for name, tensors in named:
        bad, largest = 0, 0.0
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                continue
            if tensor.is_meta or tensor.numel() == 0:
                continue
            values = tensor.detach()
            finite = torch.isfinite(values)
            bad += int((~finite).sum())
            if finite.any():
                largest = max(largest, float(values[finite].abs().max()))
        if bad:
            problems.append(f"{name} holds {bad} non-finite value(s)")
        elif largest > DIVERGED_WEIGHT:
            problems.append(f"{name} holds values up to {largest:.3g} (> {DIVERGED_WEIGHT:g})")
    return problems


def last_good_checkpoint(out: Path, num_processes: int = 1) -> tuple[Path, int] | None:
    """The newest checkpoint of run ``out`` whose manifest verifies, and its step."""
    for checkpoint in reversed(complete_checkpoints(out, num_processes)):
        try:
            return checkpoint, int(load_train_state_json(checkpoint)["step"])
        except (GaliError, KeyError, TypeError, ValueError):
            continue
    return None


def resume_hint(out: Path, num_processes: int = 1) -> str:
    """How to go on after a divergence: from the last good checkpoint, or from the start."""
    good = last_good_checkpoint(out, num_processes)
    if good is None:
        return (
            f"no checkpoint of {str(out)!r} was saved: start over with --overwrite and a "
            "smaller --set lr=..."
        )
    checkpoint, step = good
    return (
        f"the last good checkpoint is {checkpoint.name} (step {step}): continue from it with "
        f"--resume --out {str(out)!r}, e.g. with a smaller --set lr=..."
    )


def save_checkpoint(
    accelerator: Any,
    out: Path,
    step: int,
    weights: dict[str, nn.Module],
    ema: dict[str, Any],
    keep: int | None = None,
    optimizers: Sequence[Any] = (),
) -> Path:
    """One checkpoint ``checkpoints/checkpoint_N`` (docs/design.md, section 10.5): Accelerate's
    ``save_state`` (models, optimizers, random states of every process), then the EMA models and
    ``train_state.json``, then ``manifest.json`` last: a folder without a verifying manifest is
    never resumed from. Then gali-ext's checkpoints beyond the newest ``keep`` are deleted
    (:func:`.rundir.rotate_checkpoints`; nothing else in ``checkpoints/`` is touched), and
    ``weights`` (name to module) and the EMA of E and G are exported to the run directory.

    A diverged state (:func:`state_problems` of the weights, the EMA and ``optimizers``) is never
    saved: :class:`~gali_ext.errors.DivergenceError` names it and the last good checkpoint.
    A full disk or a read-only folder becomes one :class:`~gali_ext.errors.CheckpointError` or
    :class:`~gali_ext.errors.ConfigError`; the half-written folder is removed and the previous
    checkpoint stays the newest. Returns the checkpoint folder."""
    problems = state_problems({**weights, **{EMA_FILES[n]: a for n, a in ema.items()}}, optimizers)
    if problems:
        raise DivergenceError(
            f"the state diverged by step {step} ({'; '.join(problems)}): it was not saved as a "
            f"checkpoint; {resume_hint(out, accelerator.num_processes)}"
        )
    name = f"checkpoint_{accelerator.project_configuration.iteration}"
    folder = out / CHECKPOINTS_NAME / name
    main = accelerator.is_main_process
    with storage_errors(f"checkpoint {name}", folder, cleanup=folder if main else None):
        folder = Path(accelerator.save_state())
        accelerator.wait_for_everyone()  # every process's random states are on disk
        if main:
            save_weights({EMA_FILES[n]: average for n, average in ema.items()}, folder)
            save_train_state_json(folder, {"step": step, "world_size": accelerator.num_processes})
            write_manifest(folder, step)
    if main and keep is not None:
        rotate_checkpoints(out, keep)
    if main:
        save_weights({**weights, **{EMA_FILES[n]: a.module for n, a in ema.items()}}, out)
    accelerator.wait_for_everyone()
    return folder


def resume_checkpoint(accelerator: Any, out: Path, ema: dict[str, Any], checkpoint: Path) -> int:
    """Load ``checkpoint`` (chosen by :func:`.rundir.resume_decision`) into the prepared models,
    optimizers, random generators and ``ema``, without unpickling anything but tensors
    (:func:`.rundir.load_state_safely`); returns its step. Accelerate's checkpoint numbering
    continues after it."""
    state = load_train_state_json(checkpoint)
    world = state.get("world_size")
    if world != accelerator.num_processes:
        raise ConfigError(
            f"--resume: {str(out)!r} was trained by {world} process(es), this launch has "
            f"{accelerator.num_processes}; resume it with {world} so that each process reads "
            "the same shard of the data"
        )
    state = load_state_safely(accelerator, checkpoint)
    for name, average in ema.items():
        load_safetensors_into(average, checkpoint / f"{EMA_FILES[name]}.safetensors")
    accelerator.project_configuration.iteration = checkpoint_number(checkpoint) + 1
    accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    return int(state["step"])


@dataclass
class RunModels:
    """A trained run's encoder and generator, as :func:`load_run_models` loads them.

    Attributes:
        config: the run's :class:`~gali_ext.recipes.RecipeConfig`.
        encoder, generator: ``G_z(x)`` and ``G_x(z)`` on the CPU.
        latent_dim: the size of ``z``.
        weights: ``"ema"`` for the moving averages, ``"raw"`` for the trained weights.
        prior: the run's prior of ``z``, resolved once from ``config.prior``.
    """

    config: RecipeConfig
    encoder: nn.Module
    generator: nn.Module
    latent_dim: int
    weights: str
    prior: Prior


def has_ema_weights(run_dir: str | Path) -> bool:
    """Whether a run directory holds the moving averages of E and G (``*_ema.safetensors``)."""
    return all((Path(run_dir) / f"{f}.safetensors").is_file() for f in EMA_FILES.values())


def load_run_models(run_dir: str | Path, ema: bool = True) -> RunModels:
    """E and G of a run directory: the moving averages (``encoder_ema.safetensors``,
    ``generator_ema.safetensors``) when ``ema`` and the run has them, else the trained weights.

    Raises :class:`~gali_ext.errors.ConfigError` for a folder without ``config.json`` and
    :class:`~gali_ext.errors.CheckpointError` naming the file (and key) of weights that are
    missing, damaged, of another shape, or not finite (NaN or infinite values: nothing
    computed from them would mean anything).
    """

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(
            f"no run directory at {str(run)!r}: expected a folder written by `gali-ext recipe`"
        )
    if not (run / "config.json").is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory: it has no config.json")
    config = RecipeConfig.from_json(run / "config.json")
    models = build_ali_models(
        config.arch, latent_dim=config.latent_dim, num_classes=config.conditions or None
    )
    use_ema = ema and has_ema_weights(run)
    for name in ("encoder", "generator"):
        file = EMA_FILES[name] if use_ema else name
        load_safetensors_into(getattr(models, name), run / f"{file}.safetensors")
        bad = state_problems({f"{file}.safetensors": getattr(models, name)})
        if bad:
            advice = (
                "score the trained weights instead (--raw-weights)"
                if use_ema
                else "resume the run from an earlier checkpoint"
            )
            raise CheckpointError(
                f"{str(run)!r}: {bad[0]}: the weights diverged before they were saved; {advice}"
            )
    weights = "ema" if use_ema else "raw"
    prior = resolve_prior(config.prior)
    return RunModels(config, models.encoder, models.generator, models.latent_dim, weights, prior)
