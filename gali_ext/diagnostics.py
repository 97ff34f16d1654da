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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, GaliError, ProviderError, ShapeError, SpecError
from .spec import TupleSpec, parse_node
from .wiring import NetworkAdapter, first_layer_width, kinds_by_argument

__all__ = [
    "batch_dependent_layers",
    "batch_norm_layers",
    "call_error",
    "check_conditioning",
    "check_conditions",
    "check_settings",
    "check_variables",
    "describe_failure",
    "failing_layer",
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


def _positional(net: Any) -> list[str] | None:
    """The required positional arguments of a network's ``forward`` (None when unknown)."""
    module = getattr(net, "module", net) if isinstance(net, NetworkAdapter) else net
    function = module.forward if isinstance(module, nn.Module) else module
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty]


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _in_width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def failing_layer(module: Any, call: Callable[[], Any]) -> tuple[str, nn.Module, tuple] | None:
    """Where ``call()`` fails inside ``module``: the innermost of its sub-modules whose forward
    was running when it raised, with its name and its inputs; None when ``call()`` does not
    raise or fails outside every sub-module. ``call()`` runs without gradients, and the
    buffers of ``module`` and torch's random state are restored after it."""
    if not isinstance(module, nn.Module):
        return None
    names = {id(m): n for n, m in module.named_modules()}
    running: list[tuple[str, nn.Module, tuple]] = []

    def enter(m: nn.Module, args: tuple) -> None:
        if id(m) in names:
            running.append((names[id(m)], m, args))

    def leave(m: nn.Module, args: tuple, out: Any) -> None:
        if running and running[-1][1] is m:
            running.pop()

    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    rng = torch.random.get_rng_state()
    hooks = [
        nn.modules.module.register_module_forward_pre_hook(enter),
        nn.modules.module.register_module_forward_hook(leave),
    ]
    try:
        with torch.no_grad():
            call()
    except Exception:  # noqa: BLE001 - the failure being located
        return running[-1] if running else None
    finally:
        for h in hooks:
            h.remove()
        for b, saved in buffers:
            b.data.copy_(saved)
        torch.random.set_rng_state(rng)
    return None


def _received(layer: nn.Module, args: tuple) -> tuple[int, Tensor] | None:
    """The width a linear or convolution layer received (features or channels), and the
    tensor; None for another layer."""
    if not isinstance(layer, _WEIGHTED) or not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if x.dim() == 0:
        return None
    return (x.shape[-1] if isinstance(layer, nn.Linear) else x.shape[1] if x.dim() > 1 else 0), x


def describe_failure(module: Any, call: Callable[[], Any]) -> str:
    """`` in its layer 'name' (Linear, 320 input features), which receives [2, 640]``: where
    ``call()`` fails inside ``module`` (:func:`failing_layer`), or ``""``."""
    found = failing_layer(module, call)
    if found is None or found[0] == "":
        return ""
    name, layer, args = found
    what = type(layer).__name__
    if isinstance(layer, _WEIGHTED):
        unit = "features" if isinstance(layer, nn.Linear) else "channels"
        what += f", {_in_width(layer)} input {unit}"
    got = f", which receives {list(args[0].shape)}" if args and isinstance(args[0], Tensor) else ""
    return f" in its layer {name!r} ({what}){got}"


def _argument_hint(head: Any, net: Any, inputs: Sequence[Tensor], joint: bool) -> str:
    """For a ``TypeError``: the adapter setting that passes what the network's ``forward``
    takes; never the one already in use."""
    adapter = "JointNetwork" if joint else "FeatureNetwork"
    wrapped = isinstance(net, NetworkAdapter)
    condition = getattr(net, "condition", None) if wrapped else None
    current = getattr(net, "inputs", "concat") if wrapped else "concat"
    kinds = len(kinds_by_argument(head.spec.slot_kinds))
    given = {"concat": 1, "separate": len(inputs), "by_kind": kinds}.get(current, 1) if joint else 1
    given += condition is True
    names = _positional(net)
    if names is None or len(names) == given:
        return (
            "the TypeError is raised inside its forward, which takes the arguments it is "
            "given: check that code"
        )
    hints = []
    takes = len(names)
    if joint and takes == kinds and current != "by_kind":
        hints.append(
            "one argument per kind (the images' features, then the latents'): "
            "JointNetwork(net, inputs='by_kind')"
        )
    if joint and takes == len(inputs) != kinds and current != "separate":
        hints.append("one argument per slot: JointNetwork(net, inputs='separate')")
    if joint and takes == 1 and current != "concat":
        hints.append("the slots concatenated in one argument: JointNetwork(net, inputs='concat')")
    if not hints and takes == given + 1 and condition is None:
        hints.append(f"the condition: gali_ext.adapters.{adapter}(net, condition={names[-1]!r})")
    if not joint and takes >= 2 + (condition is True):
        hints.append(
            "a whole D(x, z) is not a feature network: use gali_ext.adapters."
            "monolithic_head(spec, D) (specs of two slots), or give the head its image "
            "network, latent network and joint network"
        )
    if not hints:
        return f"its forward requires {takes} positional arguments ({', '.join(names)}): wrap it"
    return f"its forward requires {takes} positional arguments ({', '.join(names)}); for " + (
        "; for ".join(hints)
    )


def _shape_hint(net: Any, inputs: Sequence[Tensor], joint: bool, rerun: Callable[[], Any]) -> str:
    """For a ``RuntimeError``: the layer where the network fails and the fix of the usual
    cause (a joint written for one pair, partly widened, or on [B, C, 1, 1] maps)."""
    module = getattr(net, "module", net) if isinstance(net, NetworkAdapter) else net
    found = failing_layer(module, rerun)
    received = _received(found[1], found[2]) if found is not None and found[0] else None
    if found is not None and received is not None:
        name, layer = found[0], found[1]
        got, x = received
        takes = _in_width(layer)
        unit = "features" if isinstance(layer, nn.Linear) else "channels"
        if not isinstance(layer, nn.Linear) and x.dim() == 2:
            return (
                f"its layer {name!r} is a convolution and receives {list(x.shape)}: for "
                "[B, C, 1, 1] maps, JointNetwork(net, input_shape=(-1, 1, 1))"
                if joint
                else f"its layer {name!r} is a convolution and receives {list(x.shape)}: give "
                "FeatureNetwork(net, input_shape=(...)) the shape it takes"
            )
        if got != takes:
            where = f"its layer {name!r} takes {takes} {unit} and receives {got}"
            if joint and got > takes and got % takes == 0:
                factor = got // takes
                widened = [
                    n
                    for n, m in module.named_modules()
                    if isinstance(m, _WEIGHTED) and _in_width(m) == got and m is not layer
                ]
                if widened:
                    return (
                        f"{where}, as {widened[0]!r} does after widening: it reads the joint's "
                        "input too and was left at one pair's width. Widen every layer that "
                        "reads the input at once, before building the optimizer: "
                        f"gali_ext.adapters.widen_input(joint_module, {factor}) on the joint as "
                        "written for one pair (it traces one call and widens the main, skip and "
                        "parallel paths)"
                    )
                return (
                    f"{where}, {factor} times as many (GALI-8's tuples hold two image-latent "
                    "pairs): widen the joint in place before building its optimizer, "
                    f"gali_ext.adapters.widen_input(joint_module, {factor})"
                )
            return f"{where}: check the input shape it expects"
    if joint:
        takes = first_layer_width(module)
        given = sum(t[0].numel() if t.dim() > 1 else 1 for t in inputs)
        if takes and given != takes and given % takes == 0:
            return (
                f"its first layer takes {takes} features and the tuples give {given}: widen it "
                f"in place, gali_ext.adapters.widen_input(joint_module, {given // takes})"
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
    head: Any,
    net: Any,
    inputs: Sequence[Tensor],
    error: Exception,
    what: str,
    joint: bool,
    rerun: Callable[[], Any],
) -> GaliError:
    """The error a user network's failure is re-raised as, naming the usual fix; ``rerun()``
    calls the network again as it failed (to find the layer where it fails)."""
    if isinstance(error, TypeError):
        hint = _argument_hint(head, net, inputs, joint)
    elif isinstance(error, RuntimeError):
        hint = _shape_hint(net, inputs, joint, rerun)
    else:
        hint = "check the input shape it expects"
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
    if head._checked_range or out.numel() < 8 or not out.is_floating_point() or out.is_meta:
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


def check_settings(
    spec: Any, feature_pass: str, passes: Sequence[str], conditions: int | None
) -> None:
    """The head's spec, feature pass and number of conditions, checked when it is built."""
    if not isinstance(spec, TupleSpec):
        raise SpecError(f"expected a TupleSpec, got {type(spec).__name__}")
    if feature_pass not in passes:
        raise ConfigError(
            f"feature_pass must be one of {', '.join(map(repr, passes))}, got {feature_pass!r}"
        )
    if conditions is not None and (
        isinstance(conditions, bool) or not isinstance(conditions, int) or conditions < 1
    ):
        raise ConfigError(
            "conditions must be None or a positive int (the number of classes of the "
            f"condition, or the width of a float condition), got {conditions!r}"
        )


def check_conditioning(head: Any) -> None:
    """A conditional head needs each tuple class within one chain (one condition per tuple)."""
    if not head.conditional:
        return
    mixed = [i for i, root in enumerate(head._class_roots) if root is None]
    if mixed:
        c = head.spec.classes[mixed[0]]
        raise SpecError(
            f"class {mixed[0]} {c} mixes nodes of the real chain (from x0) and of the prior "
            "chain (from zp0), which carry different conditions: a conditional head needs "
            "each class within one chain"
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
