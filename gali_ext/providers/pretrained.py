"""Knowledge-based feedback: features ``M(x)`` of a frozen pretrained model (GALI-PT)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..chains import Chains, NodeFunction
from ..errors import CheckpointError, ConfigError, ShapeError
from ..extras import require
from ..spec import IMAGE, LATENT, Node, Signature, function_signature
from .base import FeedbackProvider

__all__ = ["PretrainedFeatures", "load_safetensors_into"]


def _dtype_kind(dtype: torch.dtype) -> str:
    """``"bool"``, ``"complex"``, ``"float"`` or ``"int"``: what casting between keeps."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def load_safetensors_into(
    module: nn.Module, path: str | Path, ignore_prefixes: Sequence[str] = ()
) -> None:
    """Load a safetensors file into ``module``, with one clear error per problem.

    Missing keys, unexpected keys (except those under ``ignore_prefixes``, e.g. a classifier the
    feature model does not have), shape mismatches and values of another kind of dtype (integer
    weights, e.g. int8, for float parameters; float for integer buffers) raise
    :class:`CheckpointError` naming the file and the key; so does a truncated or corrupted file.
    Floating-point weights of another precision (float16 for float32) are cast.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({error})"
        ) from error
    own = module.state_dict()
    for key, value in state.items():
        if key not in own:
            if any(key.startswith(p) for p in ignore_prefixes):
                continue
            raise CheckpointError(f"{str(path)!r} has key {key!r}, which the model does not have")
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{str(path)!r}: key {key!r} has shape {list(value.shape)}, the model expects "
                f"{list(own[key].shape)}"
            )
        if _dtype_kind(value.dtype) != _dtype_kind(own[key].dtype):
            raise CheckpointError(
                f"{str(path)!r}: key {key!r} holds {value.dtype} values, the model expects "
                f"{own[key].dtype}: weights of another kind of dtype would load as garbage"
            )
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} lacks {len(missing)} key(s) the model needs, e.g. {missing[:3]}"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own})


class PretrainedFeatures(FeedbackProvider):
    """Makes the node function ``M`` (or ``name``): features of a frozen pretrained model.

    ``M(a)`` maps image ``a`` from ``image_range`` to [0, 1], resizes it bilinearly to the
    model's input size, normalises it with the model's mean and std, and returns the model's
    pooled features (or the output of the sub-module ``layer``), flattened to ``[B, d]``. The
    model is frozen (eval mode, no parameter gradients) but differentiable in its input, so the
    generator-encoder pair gets feedback through it. A node is computed once per step.

    Args:
        model: any ``nn.Module``, or the name of a timm model, built with ``pretrained=False``
            (no network access) and loaded from ``weights``.
        weights: a local ``.safetensors`` file for a timm model (optional for a module).
        name: the node function name, and so the extra kind of the head (default ``"M"``).
        input_size: ``(H, W)`` the model expects; read from a timm model's data config.
        mean, std: per-channel normalisation; read from a timm model's data config, else none.
        layer: a dotted sub-module name whose output to use instead of the pooled features.
        image_range: the range of the images fed to it.
    """

    def __init__(
        self,
        model: nn.Module | str,
        weights: str | Path | None = None,
        *,
        name: str = "M",
        input_size: tuple[int, int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        layer: str | None = None,
        image_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if (
            not isinstance(name, str)
            or not name.isidentifier()
            or name in (IMAGE, LATENT)
            or function_signature(name) != Signature(IMAGE, name)
        ):
            raise ConfigError(
                f"{name!r} cannot name a feature function: the node language or another "
                "provider gives it other kinds (features map an image to a new kind named "
                "after the function)"
            )
        self.name = name
        if isinstance(model, str):
            require("timm", "a timm model name")
            import timm

            try:
                model = timm.create_model(model, pretrained=False, num_classes=0)
            except RuntimeError as error:
                raise ConfigError(f"timm cannot build a model named {model!r}: {error}") from error
            if weights is not None:
                classifier = model.pretrained_cfg.get("classifier", "head")
                prefixes = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
                load_safetensors_into(model, weights, ignore_prefixes=prefixes)
        elif weights is not None:
            load_safetensors_into(model, weights)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"expected an nn.Module or a timm model name, got {model!r}")
        config = getattr(model, "pretrained_cfg", None) or {}
        if input_size is None and "input_size" in config:
            input_size = tuple(config["input_size"][-2:])
        mean = mean if mean is not None else config.get("mean")
        std = std if std is not None else config.get("std")
        self.model = model.eval().requires_grad_(False)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.in_channels = int(config["input_size"][0]) if "input_size" in config else None
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, -1, 1, 1))
        self.layer = layer
        self.image_range = image_range
        self._layer_module = None
        if layer is not None:
            modules = dict(self.model.named_modules())
            if layer not in modules:
                raise ConfigError(
                    f"the feature model has no layer {layer!r}; some of its layers: "
                    f"{list(modules)[1:8]}"
                )
            self._layer_module = modules[layer]

    def train(self, mode: bool = True) -> PretrainedFeatures:
        super().train(mode)
        self.model.eval()  # frozen: batch norm statistics and dropout stay in inference mode
        return self

    def features(self, images: Tensor) -> Tensor:
        """``M(images)``: ``[B, C, H, W]`` images in ``image_range`` -> ``[B, d]``."""
        if images.dim() != 4 or not images.is_floating_point():
            raise ShapeError(
                f"the feature model takes float images [B, C, H, W], got {images.dtype} "
                f"{list(images.shape)}"
            )
        low, high = self.image_range
        x = (images - low) / (high - low)
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            if x.shape[1] != 1:
                raise ShapeError(
                    f"the feature model takes {self.in_channels}-channel images, got "
                    f"{x.shape[1]} channels"
                )
            x = x.expand(-1, self.in_channels, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self._layer_module is None:
            out = self.model(x)
        else:
            captured: list[Tensor] = []
            hook = self._layer_module.register_forward_hook(lambda m, i, o: captured.append(o))
            try:
                self.model(x)
            finally:
                hook.remove()
            out = captured[0]
        out = out.flatten(1)
        # (a host sync: skipped while a CUDA graph captures the step, see gali_ext.capture)
        capturing = out.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.isfinite(out).all():
            raise ShapeError(f"the feature model {self.name!r} produced NaN or Inf features")
        return out

    def feature_dim(self, image_shape: Sequence[int]) -> int:
        """The width d of ``M`` on images of shape ``(C, H, W)`` (runs one zero image)."""
        device = next(iter(self.model.parameters()), torch.zeros(())).device
        with torch.no_grad():
            return self.features(torch.zeros(1, *image_shape, device=device)).shape[1]

    def _compute(self, node: Node, chains: Chains) -> Tensor:
        return self.features(chains[node.arg.name])

    def function_for(self, name: str) -> NodeFunction | None:
        return self._compute if name == self.name else None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, layer={self.layer!r}"
