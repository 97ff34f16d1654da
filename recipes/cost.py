"""What a run will cost, said before it trains: its length in steps, epochs and images, and the
FLOPs of one step, measured (``gali-ext recipe NAME --dry-run``, and the first lines of a run).

FLOPs are those of matrix products and convolutions, forward and backward, as
``torch.utils.flop_counter.FlopCounterMode`` counts them: the dry run counts one training step
on the CPU at a batch of 2 and scales it to the run's batch (every counted operation is per
image, so the count is exactly linear in the batch); a run counts its first step itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gali_ext.recipes.build import build_model, build_optimizers, resolve_steps
from gali_ext.recipes.models import arch_image_shape
from gali_ext.recipes.settings import RecipeConfig
from gali_ext.trainer import batches_per_step, train_step

__all__ = [
    "OFFICIAL_SIZES",
    "RunLength",
    "counting_first_call",
    "describe_flops",
    "dry_run_report",
    "length_text",
    "measure_step_flops",
    "run_length",
    "schedule_text",
]

OFFICIAL_SIZES: dict[tuple[str, str], int] = {
    ("digits", "train"): 1297,
    ("digits", "val"): 200,
    ("digits", "test"): 300,
    ("svhn", "train"): 73_257,
    ("svhn", "test"): 26_032,
    ("svhn", "extra"): 531_131,
    ("svhn", "train+extra"): 604_388,
    ("svhn", "val"): 5000,
    ("celeba", "train"): 162_770,
    ("celeba", "val"): 19_867,
    ("celeba", "test"): 19_962,
}
"""Images per split, as published (digits: our fixed split), for the dry run, which reads no
data."""


@dataclass(frozen=True)
class RunLength:
    """How long a run trains: ``steps`` training steps, each of ``batches_per_step`` batches
    of ``batch_size`` images on each of ``processes`` processes, over a training split of
    ``train_images`` images (``epochs``: the setting, 0 when the run was given in steps)."""

    steps: int
    epochs: float
    batches_per_step: int
    batch_size: int
    processes: int
    train_images: int

    @property
    def images_per_step(self) -> int:
        """Images one step draws, over all processes."""
        return self.batches_per_step * self.batch_size * self.processes

    @property
    def images(self) -> int:
        """Images the run draws (an image drawn twice counts twice)."""
        return self.steps * self.images_per_step

    @property
    def passes(self) -> float:
        """Passes over the training split the run makes (``images / train_images``)."""
        return self.images / max(self.train_images, 1)


def run_length(
    config: RecipeConfig, batches_per_epoch: int, train_images: int, processes: int = 1
) -> RunLength:
    """The :class:`RunLength` of ``config``, its steps resolved as the run resolves them
    (:func:`~gali_ext.recipes.build.resolve_steps`) for ``batches_per_epoch`` batches per
    process and epoch."""
    return RunLength(
        steps=resolve_steps(config, batches_per_epoch),
        epochs=config.epochs,
        batches_per_step=batches_per_step(config.n_dis, config.own_generator_batch),
        batch_size=config.batch_size,
        processes=processes,
        train_images=train_images,
    )


def schedule_text(config: RecipeConfig) -> str:
    """The step's schedule in words (docs/design.md, sections 4.4 and 4.5)."""
    if config.shared_forward:
        before = f"{config.n_dis - 1} D step(s), then " if config.n_dis > 1 else ""
        return f"{before}D and E/G stepped from one forward (shared_forward)"
    if config.own_generator_batch:
        return f"{config.n_dis} D step(s), then E/G on a batch of its own (own_generator_batch)"
    return f"{config.n_dis} D step(s), then E/G on the last D step's chains"


def length_text(config: RecipeConfig, length: RunLength) -> str:
    """One line: steps, epochs, batches and images of a run."""
    per = (
        f"{length.batches_per_step} batches of {length.batch_size}"
        + (f" on each of {length.processes} processes" if length.processes > 1 else "")
        + " per step"
    )
    given = f"{length.epochs:g} epochs" if length.epochs else f"{length.passes:.3g} epochs"
    return (
        f"{config.name}: {length.steps:,} steps = {given} of {config.dataset} "
        f"{config.train_split} ({length.train_images:,} images); {per}: "
        f"{length.images:,} images"
    )


def describe_flops(flops_per_step: int, steps: int, how: str) -> str:
    """One line: FLOPs per step (``how`` they were measured) and for ``steps`` steps."""
    return (
        f"FLOPs per step: {flops_per_step:,} ({flops_per_step:.3g}; {how}); "
        f"{flops_per_step * steps:.3g} for {steps:,} steps"
    )


def _example_batch(config: RecipeConfig, batch: int, generator: torch.Generator) -> Any:
    x = torch.rand(batch, *arch_image_shape(config.arch), generator=generator) * 2 - 1
    if not config.conditions:
        return x
    return x, torch.randint(0, config.conditions, (batch,), generator=generator)


def measure_step_flops(config: RecipeConfig, batch: int = 2) -> int:
    """The FLOPs of one training step of ``config`` at its batch size: one step counted with
    ``FlopCounterMode`` on the CPU at batch ``batch``, in float32, times
    ``batch_size / batch``. The models are built on the CPU, with one thread (a batch of 2
    gains nothing from more) and the global RNG left as they were; no data is read."""
    cpu = dataclasses.replace(
        config, cuda_graphs=False, channels_last=False, mixed_precision="no", batch_size=batch
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return _count_step(config, cpu, batch)
    finally:
        torch.set_num_threads(threads)


def _count_step(config: RecipeConfig, cpu: RecipeConfig, batch: int) -> int:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = build_model(cpu, arch_image_shape(cpu.arch)[0])
        d_optimizer, g_optimizer = build_optimizers(cpu, built, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        count = batches_per_step(cpu.n_dis, cpu.own_generator_batch)
        batches = [_example_batch(cpu, batch, generator) for _ in range(count)]
        with FlopCounterMode(display=False) as counter:
            train_step(
                built.gali,
                batches,
                d_optimizer,
                g_optimizer,
                n_dis=cpu.n_dis,
                shared_forward=cpu.shared_forward,
                own_generator_batch=cpu.own_generator_batch,
                instance_noise=cpu.instance_noise,
            )
    return counter.get_total_flops() * config.batch_size // batch


def counting_first_call(
    step: Callable[..., Any], report: Callable[[int], None]
) -> Callable[..., Any]:
    """``step``, whose first call runs under ``FlopCounterMode``; ``report(flops)`` is called
    with the FLOPs it counted (this process's), after it returned."""
    counted = False

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal counted
        if counted:
            return step(*args, **kwargs)
        counted = True
        with FlopCounterMode(display=False) as counter:
            result = step(*args, **kwargs)
        report(counter.get_total_flops())
        return result

    return call


def dry_run_report(config: RecipeConfig) -> str:
    """What ``gali-ext recipe NAME --dry-run`` prints: the run's length from the split's
    published size (:data:`OFFICIAL_SIZES`; no data is read), its schedule and main settings,
    and the FLOPs of a step measured here (:func:`measure_step_flops`). Nothing is written."""
    config.validate()
    images = OFFICIAL_SIZES[(config.dataset, config.train_split)]
    length = run_length(config, images // config.batch_size, images)
    flops = measure_step_flops(config)
    lines = [
        f"{config.name} (dry run: nothing trained or written)",
        "  " + length_text(config, length),
        f"  ({config.dataset} {config.train_split}: {images:,} images, the published size; "
        "the files are not read)",
        f"  step: {schedule_text(config)}",
        f"  settings: spec {config.spec}, lr {config.lr:g}, betas {tuple(config.betas)}, "
        f"batch {config.batch_size}, loss_weights {config.loss_weights}, output_bias "
        f"{config.output_bias}, instance noise {config.instance_noise:g} -> 0",
        "  "
        + describe_flops(
            flops,
            length.steps,
            "matmul and conv FLOPs of one step, measured on the CPU at "
            f"batch 2 and scaled to {config.batch_size}",
        ),
    ]
    return "\n".join(lines)
