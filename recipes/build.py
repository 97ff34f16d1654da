"""Build once, then run: a run's settings resolved into the objects it trains with.

:func:`build_run` turns a validated :class:`~gali_ext.recipes.settings.RecipeConfig` into a
:class:`BuiltRun`: the data (:func:`load_run_data`), the networks and the :class:`GALI`
objective with its resolved prior (:func:`build_model`), both optimizers, the sharded loader,
the training step (:func:`make_step`: eager or a captured CUDA graph) and the EMA of E and G
(:func:`build_ema`), all prepared by the run's ``Accelerator`` (:func:`make_accelerator`). The
loop (:func:`gali_ext.recipes.train.train`) receives these objects and resolves nothing again.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from gali_ext import GALI, MultiClassJointDiscriminatorHead
from gali_ext.capture import CapturedStep
from gali_ext.errors import ConfigError, DataError, first_line
from gali_ext.gali import build_gali
from gali_ext.losses import build_discriminator_criterion, build_generator_criterion
from gali_ext.presets import get_preset
from gali_ext.providers import PretrainedFeatures
from gali_ext.recipes.authors import loss_weight_matrices
from gali_ext.recipes.data import (
    ImageData,
    data_mean,
    endless_batches,
    load_dataset,
    training_loader,
)
from gali_ext.recipes.evaluator import load_evaluator
from gali_ext.recipes.metrics import eval_mode, reconstruct
from gali_ext.recipes.models import ALIModels, arch_image_shape, build_ali_models
from gali_ext.recipes.runs import WEIGHT_FILES
from gali_ext.recipes.settings import RecipeConfig
from gali_ext.recipes.visual import interleave_rows
from gali_ext.trainer import StepMetrics, batches_per_step, build_optimizer, train_step

__all__ = [
    "BuiltModel",
    "BuiltRun",
    "EMA_STATISTICS_INPUTS",
    "build_ema",
    "build_model",
    "build_optimizers",
    "build_run",
    "check_conditions",
    "check_trackers",
    "first_images",
    "grids",
    "launch_info",
    "load_data",
    "load_run_data",
    "make_accelerator",
    "make_step",
    "refresh_ema_statistics",
    "resolve_steps",
]


def check_trackers(log_with: str) -> list[str]:
    """The tracker names of ``log_with`` (``"tensorboard,wandb"``), each one Accelerate knows
    and whose package is installed."""

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
        # The evaluator classifier takes images in [-1, 1] as they are: an identity range map.
        evaluator = load_evaluator(config.features_weights)
        return PretrainedFeatures(evaluator.body, image_range=(0.0, 1.0))
    size = config.features_input_size
    return PretrainedFeatures(
        config.features_model, config.features_weights, input_size=(size, size) if size else None
    )


def provider_options(config: RecipeConfig) -> dict[str, Any]:
    """The options a run gives its preset's feedback providers: ALICE's lambda
    (``alice_weight``) is the ``weight`` of the presets that take one (alice, alice_pt); the
    other presets take none."""
    return {"weight": config.alice_weight} if "weight" in get_preset(config.spec).options else {}


def build_model(config: RecipeConfig, channels: int) -> BuiltModel:
    """Encoder, generator, discriminator head and :class:`GALI` objective for a recipe."""
    models = build_ali_models(
        config.arch,
        latent_dim=config.latent_dim,
        channels=channels,
        num_classes=config.conditions or None,
        output_bias=config.output_bias,
    )
    d_weights, g_weights = loss_weight_matrices(config.loss_weights, config.spec)
    gali = build_gali(
        config.spec,
        models,
        _features(config),
        provider_options=provider_options(config),
        generator_criterion=build_generator_criterion(
            config.generator_criterion, weights=g_weights
        ),
        discriminator_criterion=build_discriminator_criterion(
            config.discriminator_criterion, weights=d_weights
        ),
        prior=config.prior,
        unary=config.unary_weight > 0,
        unary_weights=config.unary_weight,
    )
    return BuiltModel(models, gali.head, gali)


def load_data(config: RecipeConfig, split: str) -> ImageData:
    """A split of the recipe's data set, checked against the architecture's image shape."""

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
            own_generator_batch=config.own_generator_batch,
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
        own_generator_batch=config.own_generator_batch,
    )


def build_ema(models: ALIModels, decay: float) -> dict[str, Any]:
    """Moving averages of E and G (``torch.optim.swa_utils.AveragedModel``): after each update,
    ``ema = decay * ema + (1 - decay) * w`` for every weight (eq. 10.2), the first update copying
    ``w``. Buffers are not averaged: :func:`refresh_ema_statistics` recomputes the batch-norm
    statistics before the averages are shown or saved. ``{}`` when ``decay`` is 0."""
    if decay == 0:
        return {}

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


def load_run_data(config: RecipeConfig) -> tuple[ImageData, ImageData]:
    """The training split (``config.train_split``) and the test split of a run, checked against
    its architecture's image shape and, for a class-conditional run, against ``conditions``
    (:func:`check_conditions`)."""
    train_data, test_data = load_data(config, config.train_split), load_data(config, "test")
    check_conditions(config, train_data)
    return train_data, test_data


def resolve_steps(config: RecipeConfig, batches_per_epoch: int) -> int:
    """The run's training steps: ``config.steps``, or with ``config.epochs > 0`` the steps that
    many passes take, ``ceil(epochs * batches_per_epoch / batches per step)`` (at least 1),
    each step drawing ``n_dis`` batches (one more with ``own_generator_batch``)."""
    if not config.epochs:
        return config.steps
    per_step = batches_per_step(config.n_dis, config.own_generator_batch)
    return max(1, math.ceil(config.epochs * batches_per_epoch / per_step))


@dataclass
class BuiltRun:
    """A run resolved once from its settings by :func:`build_run`: everything the loop trains,
    checkpoints and reports with.

    ``config`` has ``steps`` resolved from ``epochs`` (:func:`resolve_steps`); ``built.gali``
    is the objective as
    built (its ``prior`` the resolved prior every latent of the run is drawn from), ``step``
    the training step over the prepared objective, optimizers and data; ``weights`` are what a
    checkpoint saves (:data:`.runs.WEIGHT_FILES`), ``shown`` what grids and the summary show
    (the EMA of E and G when there is one).
    """

    config: RecipeConfig
    train_data: ImageData
    test_data: ImageData
    built: BuiltModel
    optimizers: tuple[Any, Any]
    loader: Any
    step: Callable[..., StepMetrics]
    ema: dict[str, Any]
    memory_format: torch.memory_format

    @property
    def weights(self) -> dict[str, torch.nn.Module]:
        """E, G and the discriminator head by their weight files' names
        (:data:`.runs.WEIGHT_FILES`): what a checkpoint saves."""
        models = self.built.models
        return dict(zip(WEIGHT_FILES, (models.encoder, models.generator, self.built.head)))

    @property
    def shown(self) -> list[torch.nn.Module]:
        """``[E, G]`` as grids and the summary show them: the EMA's when the run keeps one."""
        weights, ema = self.weights, self.ema
        return [ema[n].module if ema else weights[n] for n in ("encoder", "generator")]

    @property
    def batches_per_step(self) -> int:
        """The batches each training step draws (:func:`~gali_ext.trainer.batches_per_step`)."""
        return batches_per_step(self.config.n_dis, self.config.own_generator_batch)

    def batches(self, accelerator: Any, step: int) -> Iterator[Any]:
        """This process's batches from training step ``step`` on (:func:`.data.endless_batches`)."""
        return endless_batches(
            self.loader,
            accelerator,
            step * self.batches_per_step,
            self.memory_format,
            with_labels=self.config.conditions > 0,
        )

    def init_output_bias(self, accelerator: Any, batches: Iterator[Any]) -> Iterator[Any]:
        """G's per-pixel output bias (``output_bias="pixel"``) from the first batch of
        ``batches``, the authors' initialisation (eq. 4.3; over all processes' first batches,
        averaged); returns the same batches, the first one included. Call it on a fresh run's
        batches only: a resumed run keeps its trained bias. ``output_bias="channel"`` was set
        from the data's mean when the run was built: ``batches`` is returned as it is."""
        if self.config.output_bias != "pixel":
            return batches
        first = next(batches)
        images = first[0] if isinstance(first, (tuple, list)) else first
        mean = ((images.detach().double() + 1) / 2).mean(0)
        if accelerator.num_processes > 1:
            mean = accelerator.reduce(mean.to(accelerator.device), reduction="mean")
        self.built.models.generator.init_output_bias(mean.clamp(0.0, 1.0))
        return itertools.chain([first], batches)

    def update_ema(self) -> None:
        """One EMA update of E and G after a step (eq. 10.2); nothing without an EMA."""
        weights = self.weights
        for name, average in self.ema.items():
            average.update_parameters(weights[name])

    @functools.cached_property
    def ema_statistics_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the EMA's batch-norm statistics are recomputed from: the first
        :data:`EMA_STATISTICS_INPUTS` training images, as many latents from the run's prior
        (seeded, off the training RNG stream) and, for a class-conditional run, the images'
        labels."""
        images = first_images(self.train_data, EMA_STATISTICS_INPUTS)
        latents = self.built.gali.prior(
            (len(images), self.config.latent_dim), rng=torch.Generator().manual_seed(4321)
        )
        labels = self.train_data.labels_tensor()[: len(images)] if self.config.conditions else None
        return images, latents, labels

    def refresh_ema_statistics(self) -> None:
        """The EMA's batch-norm statistics recomputed (eq. 10.3) from
        :attr:`ema_statistics_inputs`, before the averages are shown or saved."""
        refresh_ema_statistics(
            self.ema, *self.ema_statistics_inputs, batch_size=self.config.batch_size
        )


def build_run(
    config: RecipeConfig,
    accelerator: Any,
    train_data: ImageData,
    test_data: ImageData,
    epochs: float | None = None,
) -> BuiltRun:
    """Resolve a validated config once into the objects a run trains with: the seed set, the
    models and :class:`GALI` (its prior and loss weights resolved), G's per-channel output
    bias at the data mean (a per-pixel one is set from the first batch:
    :meth:`BuiltRun.init_output_bias`), the memory format, both optimizers, the sharded loader,
    all prepared by ``accelerator``, the step (:func:`make_step`), the EMA and ``steps`` for
    ``config.epochs`` (or ``epochs``, which replaces it: :func:`resolve_steps`). Out of memory
    while building is a :class:`ConfigError` naming the settings."""
    set_seed(config.seed, device_specific=True)
    try:
        built = build_model(config, train_data.channels)
    except (MemoryError, RuntimeError) as error:  # torch's allocator raises RuntimeError
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        raise ConfigError(
            f"cannot build the models of {config.name} (latent_dim={config.latent_dim}, "
            f"batch_size={config.batch_size}): out of memory ({first_line(error)[:200]}); "
            "expected settings whose models fit in memory"
        ) from None
    if config.output_bias == "channel":
        built.models.generator.init_output_bias(data_mean(train_data))
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last:  # in place: the optimizers keep the same parameter objects
        built.gali.to(memory_format=memory_format)
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
    step = make_step(config, accelerator, gali, d_optimizer, g_optimizer)
    ema = build_ema(built.models, config.ema_decay)
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    # each process draws len(loader) batches of its shard per epoch
    config = dataclasses.replace(config, steps=resolve_steps(config, len(loader)))
    return BuiltRun(
        config,
        train_data,
        test_data,
        built,
        (d_optimizer, g_optimizer),
        loader,
        step,
        ema,
        memory_format,
    )
