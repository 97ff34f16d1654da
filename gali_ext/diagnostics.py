"""What the head tells a user about their networks and inputs (docs/design.md, section 9.5).

The checks of the variables and conditions a forward pass is given; the usual fix for a user
network that failed when the head called it, or returned something else than a tensor; the
warnings about batch norm under the fused pass, a final sigmoid, and scores that look like
probabilities. :class:`~gali_ext.head.MultiClassJointDiscriminatorHead` calls these; none of
them changes what it computes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, GaliError, ProviderError, ShapeError
from .spec import parse_node
from .wiring import NetworkAdapter, first_layer_width

__all__ = [
    "batch_dependent_layers",
    "batch_norm_layers",
    "call_error",
    "check_conditions",
    "check_variables",
    "feature_shape_error",
    "output_error",
    "warn_batch_norm",
    "warn_probabilities",
    "warn_sigmoid",
]


def batch_dependent_layers(module: Any) -> list[str]:
    """Names of the sub-modules of ``module`` whose output for one row depends on the other rows
    of the batch in training mode: batch norm of any dimension (``SyncBatchNorm`` included)."""
    if not isinstance(module, nn.Module):
        return []
    batch_norm = nn.modules.batchnorm._BatchNorm
    return [
        f"{name or type(module).__name__}: {type(m).__name__}"
        for name, m in module.named_modules()
        if isinstance(m, batch_norm)
    ]


def _ends_in_sigmoid(net: Any) -> bool:
    """Whether a network's last layer (in registration order) is a sigmoid."""
    module = getattr(net, "module", net) if isinstance(net, NetworkAdapter) else net
    if isinstance(net, NetworkAdapter) and getattr(net, "score", None) is not None:
        module = net.score
    if not isinstance(module, nn.Module):
        return False
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and isinstance(leaves[-1], nn.Sigmoid)


def _required_positional(net: Any) -> int:
    """How many positional arguments a network's ``forward`` requires (0 when unknown)."""
    module = getattr(net, "module", net) if isinstance(net, NetworkAdapter) else net
    function = module.forward if isinstance(module, nn.Module) else module
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)


def _failure_hint(net: Any, inputs: Sequence[Tensor], error: Exception, joint: bool) -> str:
    """The usual fix for a user network that failed when the head called it."""
    adapter = "JointNetwork" if joint else "FeatureNetwork"
    if isinstance(error, TypeError):
        hint = f"if it takes other arguments (the condition: gali_ext.adapters.{adapter}(net, "
        hint += "condition='y')"
        if joint:
            hint += ", or the slots separately: JointNetwork(net, inputs='separate')"
        hint += "), wrap it"
        if not joint and _required_positional(net) >= 2:
            hint += (
                "; a whole D(x, z) is not a feature network: use gali_ext.adapters."
                "monolithic_head(spec, D) (specs of two slots), or give the head its image "
                "network, latent network and joint network"
            )
        return hint
    if joint and isinstance(error, RuntimeError):
        takes = first_layer_width(getattr(net, "module", net))
        given = sum(t[0].numel() if t.dim() > 1 else 1 for t in inputs)
        if takes and given != takes and given % takes == 0:
            return (
                f"its first layer takes {takes} features and the tuples give {given}: widen it "
                f"in place, gali_ext.adapters.widen_input(joint_module, {given // takes})"
            )
        return (
            "check the input shape it expects (for [B, C, 1, 1] maps: JointNetwork(net, "
            "input_shape=(-1, 1, 1)))"
        )
    return "check the input shape it expects"


def _shapes(inputs: Sequence[Tensor]) -> str:
    return ", ".join(str(list(t.shape)) for t in inputs)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)[:4]}"
    return f"a {type(value).__name__}"


def call_error(
    net: Any, inputs: Sequence[Tensor], error: Exception, what: str, joint: bool
) -> GaliError:
    """The error a user network's failure is re-raised as, naming the usual fix."""
    hint = _failure_hint(net, inputs, error, joint)
    cls = ShapeError if isinstance(error, RuntimeError) else ConfigError
    return cls(
        f"the {what} failed on input of shape {_shapes(inputs)}: "
        f"{type(error).__name__}: {error}; {hint}"
    )


def output_error(out: Any, what: str, joint: bool) -> ShapeError:
    """The error for a user network that returned something else than a tensor."""
    adapter = "JointNetwork" if joint else "FeatureNetwork"
    hint = ""
    if not joint and isinstance(out, (tuple, list)) and len(out) == 2:
        widths = [t[0].numel() if isinstance(t, Tensor) and t.dim() else 0 for t in out]
        if sorted(widths)[0] == 1 and max(widths) > 1:
            h, s = widths.index(max(widths)), widths.index(1)
            hint = (
                f"; it looks like (features, score): FeatureNetwork(net, output={h}, "
                f"score={s}) keeps its score (and any projection in its forward) as "
                "the unary head of its slots"
            )
    return ShapeError(
        f"the {what} returned {_describe(out)}, expected a tensor [N, ...]: select it "
        f"with gali_ext.adapters.{adapter}(net, output=0) (an index, a dict key, or a "
        f"callable){hint}"
    )


def feature_shape_error(
    what: str, kind: str, features: Tensor, count: int, width: int | None
) -> ShapeError:
    """The error for features of the wrong shape from a kind's feature network."""
    expected = f"[{count}, {width}]" if width is not None else f"[{count}, ...]"
    hint = ""
    if width is not None and features.dim() >= 1 and features.shape[0] == count:
        hint = (
            f": its width was taken as {width} from the network's layers; give the "
            f"real one, FeatureNetwork(net, out_features={features[0].numel()}) or "
            f"feature_dims={{{kind!r}: {features[0].numel()}}}"
        )
    return ShapeError(f"the {what} should output {expected}, got {list(features.shape)}{hint}")


def batch_norm_layers(head: Any) -> dict[str, list[str]]:
    """The batch-dependent layers of each network the head calls, by network."""
    found = {
        f"the {k!r} feature network": batch_dependent_layers(n)
        for k, n in head.feature_nets.items()
    }
    found["the joint network"] = batch_dependent_layers(head.joint)
    for slot, net in head.unary_heads.items():
        found[f"the unary head of slot {slot}"] = batch_dependent_layers(net)
    return found


def warn_batch_norm(found: Mapping[str, list[str]]) -> None:
    """Warn about the batch-dependent layers of the networks the fused pass runs."""
    for what, layers in found.items():
        if layers:
            warnings.warn(
                f"{what} has batch-dependent layers ({', '.join(layers[:3])}): the fused "
                "pass runs it once over real, generated and reconstructed inputs together, "
                "so their batch statistics mix. Leave feature_pass at 'auto' (or pass "
                "'per_chain') to run each chain's nodes together and the real and the prior "
                "chain apart, as a BiGAN loop does, or replace batch norm by spectral norm",
                UserWarning,
                stacklevel=4,
            )


def warn_sigmoid(head: Any) -> None:
    """Warn about a user network that ends in a sigmoid: the head reads logits."""
    paths = [(head.joint, "joint network")] + [
        (head.unary_heads[str(p.slots[0])], p.what) for p in head._unary if p.mode != "own"
    ]
    for net, what in paths:
        if _ends_in_sigmoid(net):
            warnings.warn(
                f"the {what} ends in a sigmoid, but the head reads logits (scores before a "
                "sigmoid): remove the final sigmoid, or select the score before it",
                UserWarning,
                stacklevel=4,
            )


def warn_probabilities(head: Any, out: Tensor, what: str) -> None:
    """Once, on the first batch: warn when a user network's scores all lie in (0, 1) with a
    mean of at least 0.2 (probabilities from a final sigmoid, read as logits)."""
    if head._checked_range or out.numel() < 8 or not out.is_floating_point():
        return
    if out.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    head._checked_range = True
    with torch.no_grad():
        low, high = out.detach().aminmax()
        mean = out.detach().float().mean()
    # Fresh logits sit near 0; probabilities near 0.5 (a sigmoid of them).
    if low.item() > 0.0 and high.item() < 1.0 and mean.item() >= 0.2:
        warnings.warn(
            f"the {what} gave only values in [0, 1] on the first batch: if they are "
            "probabilities (a final sigmoid), the head needs the logits before it; remove "
            "the sigmoid or select the score before it",
            UserWarning,
            stacklevel=2,
        )


def check_variables(head: Any, variables: Mapping[str, Tensor]) -> int:
    """Every node of the head's spec given, as a floating tensor on the head's device with one
    batch size; returns the batch size."""
    batch = None
    device = next(iter(head.parameters()), None)
    device = device.device if device is not None else None
    for i, tuple_class in enumerate(head.spec.classes):
        for name in tuple_class.nodes:
            value = variables.get(name)
            if value is None:
                raise ProviderError(
                    f"variable {name!r}, needed by class {i} {tuple_class}, was not given"
                )
            if not isinstance(value, Tensor) or not value.is_floating_point():
                got = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise ShapeError(f"variable {name!r} must be a floating tensor, got {got}")
            if device is not None and value.device != device:
                raise ShapeError(
                    f"variable {name!r} is on {value.device}, the discriminator head on "
                    f"{device}: expected every variable on {device}"
                )
            if value.dim() == 0 or value.shape[0] == 0:
                raise ShapeError(
                    f"variable {name!r} has shape {list(value.shape)}: expected a batch of "
                    "at least one [B, ...] tuple"
                )
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise ShapeError(
                    f"variable {name!r} has batch size {value.shape[0]}, expected {batch}"
                )
    assert batch is not None
    return batch


def check_conditions(
    head: Any, conditions: Mapping[str, Tensor] | None, batch: int
) -> dict[str, Tensor] | None:
    """The conditions of a conditional head by chain root (None for an unconditional one),
    each checked to be given with the batch size."""
    if not head.conditional:
        if conditions is not None:
            raise ConfigError(
                "a condition was given to an unconditional head: build it with "
                "conditions=<number of classes> (or networks that take the condition)"
            )
        return None
    if conditions is None:
        raise ConfigError(
            "this head is conditional: pass conditions={'x0': y, 'zp0': y_prior}, the "
            "condition of the real and of the prior chain"
        )
    by_root = {parse_node(k).root: v for k, v in conditions.items()}
    for root in dict.fromkeys(head._class_roots):
        value = by_root.get(root)  # type: ignore[arg-type]
        if value is None:
            raise ConfigError(f"the condition of the chain from {root!r} was not given")
        if not isinstance(value, Tensor) or value.shape[:1] != (batch,):
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ShapeError(
                f"the condition of the chain from {root!r} should have batch size {batch}, "
                f"got {got}"
            )
    return by_root
