"""TODO build"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gali_ext.errors import ConfigError
from gali_ext.recipes import RecipeConfig

__all__ = ["check_trackers", "launch_info", "make_accelerator"]


def check_trackers(log_with: str) -> list[str]:
    """The tracker names of ``log_with`` (``"tensorboard,wandb"``), each one Accelerate knows
    and whose package is installed."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip() for name in log_with.split(",") if name.strip()]
    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"log_with={name!r} is not a tracker Accelerate knows "
                f"({', '.join(sorted(LOGGER_TYPE_TO_CLASS))})"
            )
        if name not in installed:
            extra = ' (pip install "gali-ext[tensorboard]")' if name == "tensorboard" else ""
            raise ConfigError(f"log_with={name!r}: the {name} package is not installed{extra}")
    return names


def make_accelerator(config: RecipeConfig, out: Path) -> Any:
    """The run's ``Accelerator``: checkpoints named under ``out/checkpoints`` (rotated by
    :func:`.runs.save_checkpoint`, never by Accelerate), trackers writing under ``out/logs``,
    data loaders whose shuffling depends on ``config.seed`` and the epoch only, the same on
    every process (:func:`.data.training_loader`)."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        ProjectConfiguration,
    )

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=check_trackers(config.log_with) or None,
        project_config=ProjectConfiguration(
            project_dir=str(out),
            logging_dir=str(out / "logs"),
            automatic_checkpoint_naming=True,
            # rotation is ours (runs.save_checkpoint): Accelerate's deletes whatever sits in
            # checkpoints/ (a user's best_step5 copy) and fails on names without digits
            total_limit=None,
        ),
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=config.seed, non_blocking=True
        ),
        # D steps leave E and G unused; G steps freeze D's parameters.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if config.shared_forward and accelerator.num_processes > 1:
        raise ConfigError(
            f"shared_forward=true runs on one process, this launch has "
            f"{accelerator.num_processes}: use the alternating schedule (shared_forward=false)"
        )
    return accelerator


def launch_info(accelerator: Any) -> dict[str, Any]:
    """How a run was launched, for ``config.json``: ``num_processes`` on this machine,
    ``world_size`` (processes on all machines), the distributed type and the device."""
    world = accelerator.num_processes
    return {
        "num_processes": int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        "world_size": world,
        "distributed_type": str(accelerator.distributed_type.value),
        "device": accelerator.device.type,
    }
