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
    best/                        the best weights of E and G by best_metric (eval_every > 0),
                                 with best.json (metric, value, step); never rotated
    metrics.png                  the metrics evaluated every eval_every steps, against steps
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

import json
import os
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
from gali_ext.recipes.files import (
    atomic_output,
    fsync_directory,
    remove_path,
    storage_errors,
    write_json_atomic,
)
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.rundir import BEST_NAME, BEST_RECORD, BEST_STAGING
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
    "read_best",
    "recover_best",
    "resume_checkpoint",
    "resume_hint",
    "save_best",
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


def save_best(out: Path, modules: dict[str, nn.Module], record: dict[str, Any]) -> Path:
    """Replace ``best/`` of run ``out`` by ``modules`` (name to module: the encoder and generator
    evaluated, as ``NAME.safetensors``) and ``record`` (``best.json``: the metric, its value,
    the step, ...), so that a kill at any moment leaves a complete ``best/``, or a complete
    ``best.next/`` or ``best.old/`` that :func:`recover_best` makes ``best/`` again
    (docs/design.md, section 10.1): the new folder is written in full as ``best.next/`` (each
    file atomically, ``best.json`` last), the current one renamed ``best.old/``, ``best.next/``
    renamed ``best/``, and ``best.old/`` removed. Returns ``best/``."""
    out = Path(out)
    best, (staging, old) = out / BEST_NAME, (out / name for name in BEST_STAGING)
    with storage_errors("the best weights", staging, cleanup=staging):
        remove_path(staging)
        staging.mkdir()
        save_weights(modules, staging)
        write_json_atomic(staging / BEST_RECORD, record)
    with storage_errors("the best weights", best):
        remove_path(old)
        if best.is_dir():
            os.replace(best, old)
        os.replace(staging, best)
        fsync_directory(out)
        remove_path(old)
    return best


def recover_best(out: Path) -> Path | None:
    """Finish, or undo, a replacement of ``best/`` that a kill interrupted (:func:`save_best`):
    without ``best/``, a complete ``best.next/`` (its ``best.json`` written) becomes ``best/``,
    else ``best.old/`` goes back; what is left of the two is removed. Call it holding the run's
    lock. Returns ``best/``, or None when the run has none."""
    out = Path(out)
    best, (staging, old) = out / BEST_NAME, (out / name for name in BEST_STAGING)
    with storage_errors("the best weights", best):
        if not best.is_dir():
            if (staging / BEST_RECORD).is_file():
                os.replace(staging, best)
            elif old.is_dir():
                os.replace(old, best)
        for leftover in (staging, old):
            remove_path(leftover)
    return best if best.is_dir() else None


def read_best(out: Path) -> dict[str, Any] | None:
    """``best/best.json`` of run ``out``: ``metric``, its ``value``, the ``step`` and which
    ``weights`` (``ema`` or ``raw``) were evaluated; None when the run has no best weights."""
    path = Path(out) / BEST_NAME / BEST_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    fields = {"metric": str, "value": (int, float), "step": int}
    if not (
        isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items())
    ):
        raise CheckpointError(
            f"{str(path)!r} is not a record of the best weights (expected a JSON object with "
            f"metric, value and step): remove {str(path.parent)!r} to keep the best anew"
        )
    return record


@dataclass
class RunModels:
    """A trained run's encoder and generator, as :func:`load_run_models` loads them.

    Attributes:
        config: the run's :class:`~gali_ext.recipes.RecipeConfig`.
        encoder, generator: ``G_z(x)`` and ``G_x(z)`` on the CPU.
        latent_dim: the size of ``z``.
        weights: ``"ema"`` for the moving averages, ``"raw"`` for the trained weights.
        prior: the run's prior of ``z``, resolved once from ``config.prior``.
        best: ``best/best.json`` when E and G are the best weights (:func:`read_best`).
    """

    config: RecipeConfig
    encoder: nn.Module
    generator: nn.Module
    latent_dim: int
    weights: str
    prior: Prior
    best: dict[str, Any] | None = None

    @property
    def tag(self) -> str:
        """Which weights, in file names: ``ema``, ``raw``, ``best-ema`` or ``best-raw``."""
        return f"best-{self.weights}" if self.best else self.weights


def has_ema_weights(run_dir: str | Path) -> bool:
    """Whether a run directory holds the moving averages of E and G (``*_ema.safetensors``)."""
    return all((Path(run_dir) / f"{f}.safetensors").is_file() for f in EMA_FILES.values())


def load_run_models(run_dir: str | Path, ema: bool = True, best: bool = False) -> RunModels:
    """E and G of a run directory: the moving averages (``encoder_ema.safetensors``,
    ``generator_ema.safetensors``) when ``ema`` and the run has them, else the trained weights;
    with ``best``, the best weights by the run's ``best_metric`` (``best/``, the moving
    averages or the trained weights as the run evaluated them; ``ema`` does not apply).

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
        config.arch,
        latent_dim=config.latent_dim,
        num_classes=config.conditions or None,
        output_bias=config.output_bias,
    )
    record = read_best(run) if best else None
    if best and record is None:
        raise ConfigError(
            f"{str(run)!r} has no best weights ({BEST_NAME}/{BEST_RECORD}): a run keeps them "
            "from its first evaluation on (--set eval_every=N, N > 0); leave out the best "
            "weights option to use its last ones"
        )
    use_ema = ema and has_ema_weights(run)
    for name in ("encoder", "generator"):
        if record is not None:
            path = run / BEST_NAME / f"{name}.safetensors"
        else:
            path = run / f"{EMA_FILES[name] if use_ema else name}.safetensors"
        load_safetensors_into(getattr(models, name), path)
        bad = state_problems({str(path.relative_to(run)): getattr(models, name)})
        if bad:
            advice = (
                "score the trained weights instead (--raw-weights)"
                if use_ema and record is None
                else "resume the run from an earlier checkpoint"
            )
            raise CheckpointError(
                f"{str(run)!r}: {bad[0]}: the weights diverged before they were saved; {advice}"
            )
    weights = str(record.get("weights", "raw")) if record else "ema" if use_ema else "raw"
    prior = resolve_prior(config.prior)
    return RunModels(
        config, models.encoder, models.generator, models.latent_dim, weights, prior, record
    )
