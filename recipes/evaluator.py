"""The frozen evaluator classifier ``M_eval`` behind the feature MSE (docs/design.md, section 6).

A small CNN trained on the domain's labels (digits or SVHN: the digit; CelebA: the 40
attributes), saved as ``evaluator.safetensors`` with ``evaluator.json`` (its shape and test
accuracy). Its last hidden layer is the feature ``M_eval(x)``. One evaluator per data set lives
in ``evaluator-DATASET`` beside the runs (:func:`default_evaluator_dir`); for digits
:func:`ensure_evaluator` trains it the first time it is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from gali_ext.errors import CheckpointError, ConfigError, first_line
from gali_ext.providers.pretrained import load_safetensors_into
from gali_ext.recipes.checkpoints import weights_mismatch
from gali_ext.recipes.data import BatchStream, ImageData, load_dataset
from gali_ext.recipes.outputs import check_output_path

__all__ = [
    "EvaluatorClassifier",
    "default_evaluator_dir",
    "ensure_evaluator",
    "load_evaluator",
    "train_evaluator",
]


class EvaluatorClassifier(nn.Module):
    """Three conv blocks, global average pooling, a hidden layer of ``feature_dim`` (the
    evaluation features) and the classifier. ``multilabel`` for CelebA's 40 attributes."""

    def __init__(
        self,
        channels: int,
        num_outputs: int,
        multilabel: bool = False,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.config = dict(
            channels=channels,
            num_outputs=num_outputs,
            multilabel=multilabel,
            width=width,
            feature_dim=feature_dim,
        )
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * width, feature_dim),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(feature_dim, num_outputs)
        self.multilabel = multilabel
        self.out_features = feature_dim

    def features(self, x: Tensor) -> Tensor:
        """``M_eval(x)``: the last hidden layer, ``[B, feature_dim]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class (or attribute) logits."""
        return self.classifier(self.body(x))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def accuracy(self, data: ImageData, batch_size: int = 500) -> float:
        """Test accuracy (mean per-attribute accuracy when multilabel)."""
        self.eval()
        correct, total = 0.0, 0
        for start in range(0, len(data), batch_size):
            images, labels = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            logits = self(images)
            if self.multilabel:
                correct += ((logits > 0).long() == labels).float().mean(1).sum().item()
            else:
                correct += (logits.argmax(1) == labels).sum().item()
            total += len(labels)
        return correct / total


def train_evaluator(
    dataset: str,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``M_eval`` on a data set's labels; writes ``evaluator.safetensors`` and
    ``evaluator.json`` into ``out_dir`` and returns the JSON (with ``test_accuracy``)."""

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(
            f"the evaluator needs epochs >= 1 (an int), got {epochs!r}: an untrained evaluator "
            "would score every run as chance"
        )
    out = check_output_path(out_dir, "--out")  # before anything is trained
    torch.manual_seed(seed)
    train = load_dataset(dataset, "train", data_dir)
    test = load_dataset(dataset, "test", data_dir)
    model = EvaluatorClassifier(train.channels, train.num_classes, dataset == "celeba")
    optimizer = torch.optim.Adam(model.parameters(), lr)
    stream = BatchStream(train, batch_size, seed)
    model.train()
    for _ in range(epochs * stream.steps_per_epoch):
        images, labels = next(stream)
        optimizer.zero_grad()
        model.loss(model(images), labels).backward()
        optimizer.step()
    accuracy = model.accuracy(test)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out / "evaluator.safetensors"),
    )
    info = {
        "dataset": dataset,
        "model": model.config,
        "test_accuracy": accuracy,
        "epochs": epochs,
        "test_images": len(test),
    }
    (out / "evaluator.json").write_text(json.dumps(info, indent=2))
    return info


# evaluator.json's "model": the arguments of EvaluatorClassifier, each with its type
_MODEL_FIELDS = {
    "channels": int,
    "num_outputs": int,
    "multilabel": bool,
    "width": int,
    "feature_dim": int,
}
# A bound on each size, so that the network can be laid out on the meta device (sizes whose
# product overflows int64 cannot) and compared with the weights file before anything is built.
_MAX_SIZE = 2**16
_TRAIN_ONE = "train one with `gali-ext train-evaluator DATASET --out FOLDER`"


def _model_settings(info: Any, path: Path) -> dict[str, Any]:
    """``info["model"]`` of an ``evaluator.json`` once each field has its type and range."""
    model = info.get("model") if isinstance(info, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(
            f'{str(path)!r} lacks "model" (the classifier\'s {", ".join(_MODEL_FIELDS)}): '
            f"not an evaluator written by gali-ext; {_TRAIN_ONE}"
        )
    unknown = sorted(model.keys() - _MODEL_FIELDS.keys())
    if unknown:
        raise CheckpointError(f'{str(path)!r}: "model" has unknown fields {unknown}')
    for key, kind in _MODEL_FIELDS.items():
        value = model.get(key)
        if kind is bool:
            valid, expected = isinstance(value, bool), "true or false"
        else:
            valid = isinstance(value, int) and not isinstance(value, bool)
            valid = valid and 1 <= value <= _MAX_SIZE
            expected = f"an int in [1, {_MAX_SIZE}]"
        if not valid:
            raise CheckpointError(
                f'{str(path)!r}: "model" field {key!r} is {value!r}: expected {expected}; '
                f"{_TRAIN_ONE}"
            )
    return model


def load_evaluator(folder: str | Path) -> EvaluatorClassifier:
    """The evaluator saved by :func:`train_evaluator` in ``folder``, frozen and in eval mode.

    ``evaluator.json`` is checked field by field, and the network it describes is compared with
    the shapes in ``evaluator.safetensors`` before it is built (a forged ``"width":
    100000000000`` allocates nothing): a :class:`~gali_ext.errors.CheckpointError` names what
    does not fit."""

    folder = Path(folder)
    try:
        info = json.loads((folder / "evaluator.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"no evaluator in {str(folder)!r} ({first_line(error)}); {_TRAIN_ONE}"
        ) from error
    settings = _model_settings(info, folder / "evaluator.json")
    with torch.device("meta"):
        skeleton = EvaluatorClassifier(**settings)
    weights = folder / "evaluator.safetensors"
    mismatch = weights_mismatch(skeleton, weights) if weights.is_file() else None
    if mismatch is not None:
        raise CheckpointError(
            f"the evaluator in {str(folder)!r} does not fit its evaluator.json ({mismatch}); "
            f"{_TRAIN_ONE}"
        )
    model = EvaluatorClassifier(**settings)
    load_safetensors_into(model, weights)
    return model.eval().requires_grad_(False)


def default_evaluator_dir(dataset: str, beside: Path | None = None) -> Path:
    """Where the evaluator of ``dataset`` lives by default: ``evaluator-DATASET`` in the folder
    ``beside`` (the runs' folder, or ``--out``), else under ``runs/``."""
    return (beside if beside is not None else Path("runs")) / f"evaluator-{dataset}"


def ensure_evaluator(
    dataset: str,
    folder: Path | None,
    data_dir: str | None = None,
    echo: Callable[[str], Any] | None = print,
) -> Path:
    """The evaluator folder; for digits one is trained when none exists yet, and ``echo`` says
    so first (about a minute on two CPU cores)."""
    folder = folder or default_evaluator_dir(dataset)
    if not (folder / "evaluator.json").is_file():
        if dataset != "digits":
            raise ConfigError(
                f"no evaluator for {dataset} in {str(folder)!r}: train one with "
                f"`gali-ext train-evaluator {dataset} --data-dir D --out {folder}`"
            )
        if echo is not None:
            echo(
                f"no evaluator classifier in {folder}: training one on the digits labels first "
                "(about 1 min on 2 CPU cores; reused afterwards)"
            )
        info = train_evaluator(dataset, folder, data_dir)
        if echo is not None:
            echo(f"evaluator: test accuracy {info['test_accuracy']:.4f}, saved in {folder}")
    return folder
