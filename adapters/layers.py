"""Layers inside a user's network: find one by name, read its width, widen a first layer.

The adapters read a user's network as written: a layer named as in ``named_modules()`` (the
features a projection term or a K-way layer reads), the width it outputs, and, for GALI-8, a
joint network written for one (image, latent) pair widened in place to take two.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from gali_ext.errors import ConfigError

__all__ = ["find_layer", "layer_width", "widen_input"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_layer(module: Any, name: str, what: str = "the encoder") -> nn.Module:
    """The sub-module of ``module`` called ``name`` (as in ``named_modules()``); an unknown name
    raises :class:`~gali_ext.errors.ConfigError` naming ``what`` and the closest valid names."""
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"naming a layer needs {what} to be an nn.Module, got {type(module).__name__}"
        )
    modules = dict(module.named_modules())
    modules.pop("", None)
    if name in modules:
        return modules[name]
    valid = list(modules)
    close = difflib.get_close_matches(name, valid, n=3)
    shown = close or valid[:6]
    more = "" if len(shown) == len(valid) else f" (of {len(valid)})"
    raise ConfigError(
        f"{what} {type(module).__name__} has no layer {name!r}; "
        + (f"valid names include {', '.join(map(repr, shown))}{more}" if valid else "it has none")
    )


def layer_width(module: nn.Module, name: str) -> int | None:
    """The width of the output of the layer ``name`` inside ``module``: its ``out_features``,
    else that of the last linear or convolution layer at or before it (in registration order),
    so that an activation after a linear layer has the linear layer's width."""
    layer = find_layer(module, name, "the network")
    width = getattr(layer, "out_features", None)
    if isinstance(width, int) and not isinstance(width, bool):
        return width
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, _WEIGHTED):
            last = m.out_channels
        if m is layer:
            for inner in m.modules():  # a container: its own last layer
                if isinstance(inner, nn.Linear):
                    last = inner.out_features
                elif isinstance(inner, _WEIGHTED):
                    last = inner.out_channels
            return last
    return last


def widen_input(module: nn.Module, factor: int) -> nn.Module:
    """In place: ``module``'s first linear or convolution layer (in registration order) takes
    ``factor`` times its input width; returns ``module``.

    GALI-8's tuples hold two (image, latent) pairs, so a joint network ``J`` written for one
    pair reads twice the width: ``widen_input(d.J, 2)``. The new layer has the old one's type,
    output width, bias, kernel, stride and padding, is initialised as that type initialises
    itself, and keeps spectral normalisation (either of torch's two forms). Widen before
    building the optimizer and before loading a checkpoint of the widened network: the layer's
    parameters are new tensors.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"factor must be a positive int, got {factor!r}")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"widen_input takes an nn.Module, got {type(module).__name__}")
    found = next((nm for nm in module.named_modules() if isinstance(nm[1], _WEIGHTED)), None)
    if found is None:
        raise ConfigError(f"{type(module).__name__} has no linear or convolution layer to widen")
    name, layer = found
    if factor == 1:
        return module
    wide = _wider(layer, factor)
    if name == "":
        raise ConfigError(
            "widen_input widens a layer inside a network; for a single layer, build a new one "
            f"with {factor} times the input width"
        )
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, wide)
    return module


def _wider(layer: nn.Module, factor: int) -> nn.Module:
    weight = _weight(layer)
    kwargs: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(layer, nn.Linear):
        wide: nn.Module = nn.Linear(
            layer.in_features * factor, layer.out_features, bias=layer.bias is not None, **kwargs
        )
    else:
        if layer.groups != 1:
            raise ConfigError("widen_input cannot widen a grouped convolution")
        wide = type(layer)(
            layer.in_channels * factor,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            **kwargs,
        )
    if parametrize.is_parametrized(layer, "weight"):
        kinds = {type(p).__name__ for p in layer.parametrizations.weight}
        if kinds != {"_SpectralNorm"}:
            raise ConfigError(
                f"widen_input keeps spectral normalisation only; the layer has {sorted(kinds)}"
            )
        norm = layer.parametrizations.weight[0]
        return spectral_norm(
            wide, n_power_iterations=norm.n_power_iterations, eps=norm.eps, dim=norm.dim
        )
    hooks = [h for h in layer._forward_pre_hooks.values() if type(h).__name__ == "SpectralNorm"]
    if hooks:
        old = hooks[0]
        return torch.nn.utils.spectral_norm(
            wide, n_power_iterations=old.n_power_iterations, eps=old.eps, dim=old.dim
        )
    return wide


def _weight(layer: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return getattr(layer, "weight_orig", layer.weight)
