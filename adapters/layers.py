"""Layers inside a user's network: find one by name, read its width, widen a first layer.

The adapters read a user's network as written: a layer named as in ``named_modules()`` (the
features a projection term or a K-way layer reads), the width it outputs, and, for GALI-8, a
joint network written for one (image, latent) pair widened in place to take two.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gali_ext.diagnostics import describe_failure
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


def widen_input(
    module: nn.Module, factor: int, *, example_inputs: Sequence[Any] | None = None
) -> nn.Module:
    """In place: every linear or convolution layer of ``module`` that reads its input takes
    ``factor`` times its input width; returns ``module``.

    GALI-8's tuples hold two (image, latent) pairs, so a joint network ``J`` written for one
    pair reads twice the width: ``widen_input(d.J, 2)``. The layers that read the input are found
    by tracing one call of ``module`` on a probe input (in eval mode, without gradients; its
    buffers and the random state are restored): the main path and the skip path of a residual
    block, parallel branches, every layer that the input reaches before any other weighted
    layer. A layer with parameters that reads the input and is not a linear or convolution layer
    (a normalisation, an embedding) is refused by name, and so is a network that still fails on
    ``factor`` times wider inputs once widened (nothing is changed then).

    The probe has the width of ``module``'s first linear or convolution layer (in registration
    order): one tensor, that width split over the arguments of ``forward(img, latent)``, or whole
    in the first argument with class ids in the others (``forward(h, y)``); its floating
    tensors are the input, and they are what gets wider. ``example_inputs`` (the arguments of
    one call for one pair, e.g. ``(torch.zeros(2, 320),)``) replaces it for a network that
    cannot be called on such a probe.

    Each widened layer keeps its type, output width, bias, kernel, stride and padding and
    spectral normalisation (either of torch's two forms); its parameters stay the same objects
    (an optimizer that holds them keeps them) and take the values of a layer of the new width
    initialised as that type initialises itself. Widen before the first optimizer step and
    before loading a checkpoint of the widened network.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"factor must be a positive int, got {factor!r}")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"widen_input takes an nn.Module, got {type(module).__name__}")
    weighted = [nm for nm in module.named_modules() if isinstance(nm[1], _WEIGHTED)]
    if not weighted:
        raise ConfigError(f"{type(module).__name__} has no linear or convolution layer to widen")
    if weighted[0][0] == "":
        raise ConfigError(
            "widen_input widens a layer inside a network; for a single layer, build a new one "
            f"with {factor} times the input width"
        )
    if factor == 1:
        return module
    probe = _probe(module, weighted[0][1], example_inputs)
    readers, others = _input_readers(module, probe)
    name = type(module).__name__
    if others:
        raise ConfigError(
            f"the input of {name} is also read by {', '.join(others)}, which widen_input cannot "
            "widen (it widens linear and convolution layers): widen that layer by hand, or "
            "apply it after the first linear or convolution layer"
        )
    if not readers:
        raise ConfigError(f"no linear or convolution layer of {name} reads its input")
    undo = [_take(module.get_submodule(n), factor) for n in readers]
    wide = [_widened(t, factor) for t in probe]
    try:
        _traced_call(module, wide)
    except Exception as error:  # noqa: BLE001 - any failure of the user's network undoes it
        where = describe_failure(module, lambda: _traced_call(module, wide))
        for restore in undo:
            restore()
        raise ConfigError(
            f"widen_input widened the layers of {name} that read its input "
            f"({', '.join(map(repr, readers))}), but a call on {factor} times wider inputs "
            f"still fails{where}: {type(error).__name__}: {error}; nothing was changed: widen "
            "this network by hand"
        ) from error
    return module


def _widened(value: Any, factor: int) -> Any:
    """An input ``factor`` times as wide along dim 1 (features; class ids stay as they are)."""
    if isinstance(value, Tensor) and value.is_floating_point():
        return torch.cat([value] * factor, 1)
    return value


def _take(layer: nn.Module, factor: int) -> Callable[[], None]:
    """In place: ``layer`` takes ``factor`` times its input width, its parameters staying the
    same objects with the values of a newly built wider layer (and spectral norm's vectors
    resized); returns what undoes it."""
    wide = _wider(layer, factor)
    attribute = "in_features" if isinstance(layer, nn.Linear) else "in_channels"
    params = [(p, p.data, p.grad) for p in layer.parameters()]
    buffers = []
    for name, new in wide.named_parameters():
        target = layer.get_parameter(name)
        target.data, target.grad = new.data, None
    for name, new in wide.named_buffers():
        owner, _, leaf = name.rpartition(".")
        holder = layer.get_submodule(owner) if owner else layer
        buffers.append((holder, leaf, holder._buffers[leaf]))
        holder._buffers[leaf] = new
    width = getattr(layer, attribute)
    setattr(layer, attribute, getattr(wide, attribute))
    plain = "weight" in layer.__dict__  # the weight torch's older spectral_norm computes
    weight = layer.__dict__.get("weight")
    if plain:
        layer.__dict__["weight"] = wide.__dict__["weight"]

    def undo() -> None:
        for p, data, grad in params:
            p.data, p.grad = data, grad
        for holder, leaf, buffer in buffers:
            holder._buffers[leaf] = buffer
        setattr(layer, attribute, width)
        if plain:
            layer.__dict__["weight"] = weight

    return undo


def _required_positional(module: nn.Module) -> int:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)


def _probe(module: nn.Module, first: nn.Module, example_inputs: Sequence[Any] | None) -> list[Any]:
    """The arguments of one call of ``module`` for one pair: ``example_inputs``, or zeros of the
    first layer's width. A ``forward`` of several arguments is tried with that width split over
    them (``forward(img, latent)``), then whole in the first with class ids (or None) in the
    others (``forward(h, y)``); a convolution at spatial sizes 1, 4, 8, ... until one runs."""
    if example_inputs is not None:
        probe = list(example_inputs)
        if not any(isinstance(t, Tensor) and t.is_floating_point() for t in probe):
            raise ConfigError(
                "example_inputs must be the arguments of one call of the network, its features "
                "as floating tensors [N, C, ...]"
            )
        _check_probe(module, probe, "on example_inputs")
        return probe
    width = first.in_features if isinstance(first, nn.Linear) else first.in_channels
    count = max(1, _required_positional(module))
    weight = _weight(first)
    if isinstance(first, nn.Linear):
        sizes: list[tuple[int, ...]] = [(), (1, 1)]
    else:
        sizes = [(s,) * len(first.kernel_size) for s in (1, 4, 8, 16, 32, 64)]

    def zeros(w: int, size: tuple[int, ...]) -> Tensor:
        return torch.zeros(2, w, *size, dtype=weight.dtype, device=weight.device)

    ids = torch.zeros(2, dtype=torch.long, device=weight.device)
    candidates = []
    for size in sizes:
        if count > 1 and width >= count:
            candidates.append([zeros(width - count + 1, size)] + [zeros(1, size)] * (count - 1))
        candidates.append([zeros(width, size)] + [ids] * (count - 1))
        if count > 1:
            candidates.append([zeros(width, size)] + [None] * (count - 1))
    for probe in candidates:
        try:
            _traced_call(module, probe)
        except Exception:  # noqa: BLE001 - the next candidate, or the error below
            continue
        return probe
    probe = candidates[0]
    shapes = ", ".join(str(list(t.shape)) if isinstance(t, Tensor) else "None" for t in probe)
    _check_probe(
        module,
        probe,
        f"on a probe input of shape {shapes} (the width of its first layer), with which "
        "widen_input traces one call to find the layers that read its input",
    )
    return probe


def _check_probe(module: nn.Module, probe: list[Any], what: str) -> None:
    try:
        _traced_call(module, probe)
    except Exception as error:  # noqa: BLE001 - re-raised naming the fix
        where = describe_failure(module, lambda: _traced_call(module, probe))
        raise ConfigError(
            f"{type(module).__name__} fails {what}{where}: {type(error).__name__}: {error}; "
            "pass the arguments of one call for one (image, latent) pair, "
            "widen_input(module, factor, example_inputs=(...))"
        ) from error


def _traced_call(module: nn.Module, inputs: Sequence[Any]) -> Any:
    """``module(*inputs)`` in eval mode and without gradients, nothing of it changed after:
    its training flags, buffers (spectral norm's vectors, batch-norm statistics) and torch's
    random state are restored."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.random.get_rng_state()
    module.eval()
    try:
        with torch.no_grad():
            return module(*inputs)
    finally:
        for m, mode in modes:
            m.training = mode
        for b, saved in buffers:
            b.data.copy_(saved)
        torch.random.set_rng_state(rng)


class _InputFlow(TorchFunctionMode):
    """Marks every tensor computed from the module's input by torch functions (views,
    concatenations, activations, dropout, sums): what a layer reading it sees of the input."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        super().__init__()
        features = [t for t in inputs if isinstance(t, Tensor) and t.is_floating_point()]
        self.marked: dict[int, Tensor] = {id(t): t for t in features}

    def reads(self, value: Any) -> bool:
        return any(id(t) in self.marked for t in _tensors(value))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self.reads((args, kwargs)):
            for t in _tensors(out):
                self.marked[id(t)] = t
        return out


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]


def _input_readers(module: nn.Module, inputs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The names of the linear and convolution layers of ``module`` that read its input in one
    call, before any other such layer, and of the other layers with parameters that do."""
    flow = _InputFlow(inputs)
    readers: list[str] = []
    others: list[str] = []
    handles = []

    def reading(name: str, found: list[str]) -> Any:
        def hook(m: nn.Module, args: Any) -> None:
            if flow.reads(args) and name not in found:
                found.append(name)

        return hook

    def done(m: nn.Module, args: Any, out: Any) -> None:
        for t in _tensors(out):  # what a weighted layer outputs is no longer the input
            flow.marked.pop(id(t), None)

    for name, m in module.named_modules():
        if isinstance(m, _WEIGHTED):
            handles.append(m.register_forward_pre_hook(reading(name, readers)))
            handles.append(m.register_forward_hook(done))
        elif name and not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            label = f"{name!r} ({type(m).__name__})"
            handles.append(m.register_forward_pre_hook(reading(label, others)))
    try:
        with flow:
            _traced_call(module, inputs)
    finally:
        for h in handles:
            h.remove()
    return readers, others


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
