"""A run's settings: one typed schema (:class:`RecipeConfig`), one validator
(:meth:`RecipeConfig.validate`) and one parser of ``--set key=value`` (:func:`parse_settings`
into :meth:`RecipeConfig.with_overrides`), used by the command line and the Python API alike.
Every default is written once, as a field's default; a run resolves its settings into objects
once, where it is built (:mod:`gali_ext.recipes.build`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gali_ext.errors import ConfigError
from gali_ext.losses import DISCRIMINATOR_CRITERIA, GENERATOR_CRITERIA
from gali_ext.presets import available_presets, get_preset
from gali_ext.priors import resolve_prior
from gali_ext.recipes.authors import AUTHORS_EPOCHS, LOSS_WEIGHTS
from gali_ext.recipes.data import DATASET_SPLITS, DATASETS
from gali_ext.recipes.metrics import WATCHED_METRICS
from gali_ext.recipes.models import OUTPUT_BIASES, available_archs
from gali_ext.trainer import UNSUPPORTED_OPTIMIZERS, available_optimizers

__all__ = ["RecipeConfig", "check_epochs", "parse_settings"]


@dataclass
class RecipeConfig:
    """Everything a run needs; every field can be overridden with ``--set key=value``."""

    name: str
    dataset: str  # digits | svhn | celeba
    arch: str  # gali_ext.recipes.models architecture: digits | svhn | celeba
    spec: str  # a registered preset (gali_ext.presets), e.g. gali8
    description: str = ""
    latent_dim: int = 256
    batch_size: int = 100
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    optimizer: str = "adam"
    n_dis: int = 1
    shared_forward: bool = False  # last D step and G/E step from one forward (authors' script)
    # the G/E step on a batch of its own, with its own forward (fresh prior sample, encoder
    # noise and instance noise): with n_dis=5, the authors' ALI, ALICE and GALI-8 schedule
    own_generator_batch: bool = False
    steps: int = 10_000
    # train for this many passes over train_split instead (0: `steps` steps); resolved into
    # `steps` once where the run is built. Setting `steps` (--steps, --set steps=N) clears it
    epochs: float = 0.0
    # the data set's split the run trains on (svhn: train, extra, train+extra, ...)
    train_split: str = "train"
    instance_noise: float = 0.1
    generator_criterion: str = "product_of_terms"  # a name in gali_ext.GENERATOR_CRITERIA
    discriminator_criterion: str = "cross_entropy"  # a name in gali_ext.DISCRIMINATOR_CRITERIA
    prior: str = "normal"  # normal | truncated_normal[:BOUND] | uniform[:BOUND] (gali_ext.priors)
    # G's output bias: "channel" (the output convolution's, from the data's mean pixel) or
    # "pixel" ([C, H, W], from the first training batch: the authors' SVHN generator)
    output_bias: str = "channel"
    # the loss terms' weights: "paper" (2/T each, the paper's equations) or "authors" (the
    # authors' SVHN scripts: gali_ext.recipes.authors.loss_weight_matrices)
    loss_weights: str = "paper"
    # class-conditional G(z, y) and projection D over this many classes of the data's labels
    # (0: unconditional); batches are (x, y)
    conditions: int = 0
    unary_weight: float = 0.0  # > 0: a unary head per slot, its loss term with this weight
    # ALICE's lambda (alice, alice_pt): its default is the provider's own (AliceReconstruction)
    alice_weight: float = get_preset("alice").options["weight"]
    features_model: str = ""  # pretrained feature model M: a timm model name, or "evaluator"
    features_weights: str = ""  # local .safetensors file (evaluator: its folder); no download
    features_input_size: int = 0  # resize images to this for M (0: the model's own size)
    # folder with the SVHN .mat files or CelebA ("": ~/.cache/gali-ext/DATASET, or under
    # $XDG_CACHE_HOME); a run (`train`) records the folder it resolved
    data_dir: str = ""
    # fetch the data set into data_dir first, checksums verified (SVHN from torchvision's URLs,
    # CelebA from Google Drive); resolved once by `train` (recipes.data.prepare_data)
    download: bool = False
    seed: int = 0
    mixed_precision: str = "no"
    # images and convolution weights in channels-last (NHWC) memory format: faster
    # convolutions on tensor-core GPUs once the batch keeps the GPU busy (README, Performance)
    channels_last: bool = False
    # DataLoader worker processes that read and convert the batches (0: in the training process;
    # CelebA decodes JPEGs, so its recipes use workers)
    num_workers: int = 0
    # exponential moving average of E's and G's weights, updated after every step with
    # ema = decay * ema + (1 - decay) * weights (BigGAN, BigBiGAN); 0 turns it off
    ema_decay: float = 0.0
    # Accelerate trackers the scalars and image grids also go to, comma-separated
    # (e.g. "tensorboard"; "" for metrics.jsonl only)
    log_with: str = ""
    # the whole training step captured once and replayed as a CUDA graph (one launch per step
    # instead of thousands): for small batches, where launching kernels bounds the step.
    # CUDA only (refused on the CPU), one process, fp32 or bf16 (README, Performance)
    cuda_graphs: bool = False
    # float32 matrix products (and convolutions, which PyTorch already runs so) in TF32 on
    # tensor-core GPUs: faster, about 3 significant digits per product (gali_ext.capture.tf32_mode)
    tf32: bool = False
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 1000
    # Accelerate deletes the oldest checkpoint before it writes a new one: with 2 or more, a
    # kill while saving still leaves a complete one
    keep_checkpoints: int = 3
    # every N steps, the paper's metrics of the weights shown (the EMA's when kept) on a
    # held-out split, to metrics.jsonl, the trackers, the progress line and metrics.png
    # (docs/design.md, section 6.11; gali_ext.recipes.watch); 0 turns it off
    eval_every: int = 20_000
    # the metric the best weights are kept by, in best/ (a name of WATCHED_METRICS; whether
    # lower or higher is better is known per metric: gali_ext.recipes.stats.LOWER_IS_BETTER)
    best_metric: str = "pixel_mse"
    # the split evaluated ("": the data set's held-out split, val for digits and CelebA, test
    # for SVHN, whose val is drawn from the training file)
    eval_split: str = ""
    # a local copy of the TF Inception weights (weights-inception-2015-12-05-6726825d.pth):
    # adds FID to the metrics evaluated every eval_every steps (gali-ext recipe --fid-weights)
    fid_weights: str = ""

    @property
    def uses_features(self) -> bool:
        """Whether the preset needs the pretrained feature model M."""
        return self.spec in available_presets() and get_preset(self.spec).needs_features

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field with a bad value."""

        reason = UNSUPPORTED_OPTIMIZERS.get(str(self.optimizer).lower())
        if reason is not None:
            raise ConfigError(f"optimizer={self.optimizer!r} is invalid: {reason}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        checks = [
            (
                isinstance(self.name, str) and _NAME.fullmatch(self.name) is not None,
                "name",
                "a plain name of letters, digits, '.', '_' and '-' (it names the tracker "
                "folder logs/NAME inside the run)",
            ),
            (self.dataset in DATASETS, "dataset", ", ".join(DATASETS)),
            (self.arch in available_archs(), "arch", ", ".join(available_archs())),
            (
                self.spec in available_presets(),
                "spec",
                f"{', '.join(available_presets())}, or a preset of your own, registered first "
                "(gali-ext --import MODULE, or an installed package's gali_ext.presets entry "
                "point)",
            ),
            (self.latent_dim > 0, "latent_dim", "a positive int"),
            # every architecture has batch norm in E and G: batch statistics need two images
            (self.batch_size >= 2, "batch_size", "an int >= 2 (batch norm needs two images)"),
            (_finite(self.lr) and self.lr > 0, "lr", "a positive finite float"),
            (
                len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas),
                "betas",
                "two numbers in [0, 1), e.g. 0.5,0.999",
            ),
            (
                self.optimizer.lower() in available_optimizers(),
                "optimizer",
                ", ".join(available_optimizers()),
            ),
            (self.n_dis >= 1, "n_dis", "an int >= 1"),
            (self.steps >= 1, "steps", "an int >= 1"),
            (
                _finite(self.epochs) and self.epochs >= 0,
                "epochs",
                "a finite number >= 0 (0: train `steps` steps)",
            ),
            (
                self.train_split in DATASET_SPLITS.get(self.dataset, (self.train_split,)),
                "train_split",
                f"a split of {self.dataset}: {', '.join(DATASET_SPLITS.get(self.dataset, ()))}",
            ),
            (self.output_bias in OUTPUT_BIASES, "output_bias", ", ".join(OUTPUT_BIASES)),
            (self.loss_weights in LOSS_WEIGHTS, "loss_weights", " or ".join(LOSS_WEIGHTS)),
            (
                _finite(self.instance_noise) and self.instance_noise >= 0,
                "instance_noise",
                "a finite float >= 0",
            ),
            (
                self.generator_criterion in GENERATOR_CRITERIA,
                "generator_criterion",
                ", ".join(GENERATOR_CRITERIA),
            ),
            (
                _finite(self.alice_weight) and self.alice_weight >= 0,
                "alice_weight",
                "a finite float >= 0",
            ),
            (0 <= self.seed < 2**32, "seed", "an int in [0, 2**32)"),
            (
                self.discriminator_criterion in DISCRIMINATOR_CRITERIA,
                "discriminator_criterion",
                ", ".join(DISCRIMINATOR_CRITERIA),
            ),
            (self.conditions >= 0, "conditions", "an int >= 0 (0: unconditional)"),
            (
                _finite(self.unary_weight) and self.unary_weight >= 0,
                "unary_weight",
                "a finite float >= 0 (0: no unary heads)",
            ),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", "no, fp16 or bf16"),
            (self.num_workers >= 0, "num_workers", "an int >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay", "a float in [0, 1); 0 turns the EMA off"),
            (self.log_every >= 1, "log_every", "an int >= 1"),
            (self.sample_every >= 1, "sample_every", "an int >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", "an int >= 1"),
            (self.keep_checkpoints >= 2, "keep_checkpoints", "an int >= 2"),
            (self.eval_every >= 0, "eval_every", "an int >= 0 (0 turns the evaluation off)"),
            (self.best_metric in WATCHED_METRICS, "best_metric", ", ".join(WATCHED_METRICS)),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r} is invalid: expected {expected}")
        resolve_prior(self.prior)  # a ConfigError naming the known priors
        if self.conditions and self.dataset == "celeba":
            raise ConfigError(
                "conditions: a class-conditional recipe needs class labels (digits, svhn); "
                "CelebA's labels are 40 attributes"
            )
        if self.shared_forward and self.own_generator_batch:
            raise ConfigError(
                "shared_forward=true and own_generator_batch=true exclude each other: the G/E "
                "step either shares the last D step's forward or has a batch of its own"
            )
        if self.loss_weights == "authors":
            self._check_authors_weights()
        if self.shared_forward and self.mixed_precision == "fp16":
            raise ConfigError(
                "shared_forward=true does not work with fp16 loss scaling: use "
                "mixed_precision=bf16, or the alternating schedule (shared_forward=false)"
            )
        if self.cuda_graphs and self.mixed_precision == "fp16":
            raise ConfigError(
                "cuda_graphs=true does not work with fp16 loss scaling: use mixed_precision=bf16"
            )
        if self.uses_features and self.features_model == "evaluator" and not self.features_weights:
            raise ConfigError(
                f"recipe {self.name!r} uses the evaluator classifier as M: train it with "
                f"`gali-ext train-evaluator {self.dataset} --out DIR` and pass "
                "--set features_weights=DIR"
            )
        if self.uses_features and not (self.features_model and self.features_weights):
            raise ConfigError(
                f"recipe {self.name!r} (spec {self.spec}) needs a pretrained feature model M: "
                "pass --set features_model=<timm model name> --set "
                "features_weights=<local .safetensors file>; nothing is downloaded"
            )

    def _check_authors_weights(self) -> None:
        if self.spec not in AUTHORS_EPOCHS:
            raise ConfigError(
                f"loss_weights=authors: the authors' SVHN scripts weigh the losses of "
                f"{', '.join(sorted(AUTHORS_EPOCHS))}, not spec {self.spec!r}: use "
                "loss_weights=paper"
            )
        criteria = (self.discriminator_criterion, self.generator_criterion)
        if criteria != ("cross_entropy", "product_of_terms"):
            raise ConfigError(
                "loss_weights=authors weighs the cross-entropy terms of "
                "discriminator_criterion=cross_entropy and generator_criterion=product_of_terms"
                f", got {criteria[0]} and {criteria[1]}: use loss_weights=paper"
            )

    def check_data_size(self, num_images: int, num_processes: int = 1) -> None:
        """Raise :class:`ConfigError` when one epoch of ``num_images`` images holds no full
        batch for each of ``num_processes`` processes (nothing to train on)."""
        if num_images < self.batch_size * num_processes:
            raise ConfigError(
                f"the {self.dataset} training set has {num_images} images, fewer than one batch "
                f"of {self.batch_size} for each of {num_processes} process(es): lower batch_size"
            )

    def with_overrides(self, overrides: dict[str, str]) -> RecipeConfig:
        """A copy with ``key=value`` strings parsed to each field's type. A run's length is
        given once: ``steps`` without ``epochs`` sets ``epochs`` to 0."""
        hints = typing.get_type_hints(RecipeConfig)
        fields = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for key, text in overrides.items():
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"unknown setting {key!r}{hint} (settings: {', '.join(sorted(fields))})"
                )
            changes[key] = _parse(key, text, hints[key])
        if "steps" in changes and "epochs" not in changes:
            changes["epochs"] = 0.0
        return dataclasses.replace(self, **changes)

    def to_json(self, launch: dict[str, Any] | None = None) -> str:
        """The config as JSON (``config.json`` of a run); ``launch`` (how many processes ran
        it, see :func:`gali_ext.recipes.train.launch_info`) is recorded under ``"launch"``."""
        data = dataclasses.asdict(self)
        if launch is not None:
            data["launch"] = launch
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str | Path) -> RecipeConfig:
        """Read a run's ``config.json`` (its ``"launch"`` record is not a setting)."""
        try:
            data = json.loads(Path(path).read_text())
            data.pop("launch", None)
            data["betas"] = tuple(data["betas"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"cannot read the run config {str(path)!r}: {error}") from error


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_epochs(epochs: float) -> float:
    """``epochs`` when it is a positive finite number (``--epochs``); else :class:`ConfigError`."""
    if not (_finite(epochs) and epochs > 0):
        raise ConfigError(f"--epochs must be a positive finite number, got {epochs}")
    return float(epochs)


def parse_settings(items: list[str]) -> dict[str, str]:
    """``--set key=value`` items as ``{key: value}`` (whitespace around either stripped), for
    :meth:`RecipeConfig.with_overrides`, which parses each value to its field's type."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def _parse(key: str, text: str, hint: Any) -> Any:
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if typing.get_origin(hint) is tuple:
            parts = [float(p) for p in text.strip("()[] ").split(",")]
            if len(parts) != 2:
                raise ValueError(text)
            return tuple(parts)
    except ValueError:
        name = getattr(hint, "__name__", None) or str(hint)
        raise ConfigError(f"--set {key}={text!r}: expected a value of type {name}") from None
    raise ConfigError(f"{key} cannot be set from the command line")
