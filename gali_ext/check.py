"""Check a switch to GALI on your own networks before training: :func:`check` (also
``gali_ext.adapters.check``, beside the adapters it checks, and ``gali-ext check``).

It runs one D step and one E/G step of your :class:`~gali_ext.GALI` objective on one of your
batches (no optimizer steps, and every buffer and the random state restored after) and reports,
per module of your discriminator, encoder and generator, in which step it takes a gradient; the
widths the head inferred; batch norm and the feature pass that handles it; the conditioning; the
prior; and what your discriminator's own ``state_dict()`` holds of the head.

It tells what the switch loses apart from what your project never trained. Lost, and an error: a
discriminator parameter the D loss never reaches, an encoder or generator parameter the E/G loss
never reaches, a gradient that leaks into the other player's step, layers the head adds that
your discriminator's checkpoints would miss. Reported, not an error: a parameter that no forward
pass reads although the module holding it runs (a layer its own code skips, such as a skip
convolution used only when the shapes differ), and, given your project's own losses as a
``baseline``, a parameter they leave untouched too.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .audit import StepAudit, reachable_leaves
from .errors import ConfigError
from .gali import GALI
from .wiring import ADDED_LAYERS, NetworkAdapter, labelled_modules, user_networks

__all__ = ["Baseline", "CheckReport", "baseline_of", "check"]


@dataclass
class CheckReport:
    """What :func:`check` found: the report's ``lines``, what your project did not train
    either (``untrained``: reported, not an error) and the ``problems`` (empty when nothing is
    lost); ``str(report)`` is the printed report."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    untrained: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        found = [f"  - {p}" for p in self.problems] or ["  none: nothing is silently lost"]
        kept = []
        if self.untrained:
            kept = ["untrained before the switch too (not a problem):"]
            kept += [f"  - {u}" for u in self.untrained]
        return "\n".join([*self.lines, *kept, "problems:", *found])


class _Uses(TorchFunctionMode):
    """Records the parameters that torch functions read and the modules that run."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[int] = set()
        self.ran: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") in ("__get__", "__set__"):
            return out  # an attribute (requires_grad, shape): nothing computed from the values
        params = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, nn.Parameter)]
        if params:
            given = {id(p) for p in params}
            if any(isinstance(t, Tensor) and id(t) not in given for t in tree_flatten(out)[0]):
                self.read.update(given)  # a computation on them (not requires_grad_())
        return out

    def enter(self, module: nn.Module, args: Any) -> None:
        self.ran.add(id(module))


@dataclass
class _Steps:
    """What the two steps reached: the parameters of each loss, those read by a forward pass,
    the modules that ran, and the ones your own losses reach (None without a baseline)."""

    d: set[int]
    g: set[int]
    uses: _Uses
    baseline_d: set[int] | None = None
    baseline_g: set[int] | None = None


def _unwrapped(net: Any) -> Any:
    while isinstance(getattr(net, "module", None), nn.Module):
        net = net.module
    return net


def _groups(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The parameters of a module grouped by its top-level sub-module (``""``: its own)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in module.named_parameters():
        top = name.split(".", 1)[0] if "." in name else ""
        groups.setdefault(top, []).append((name, p))
    return groups


def _skipped(module: nn.Module, uses: _Uses) -> set[int]:
    """The parameters of ``module`` that no torch function read although a module holding
    them ran: what its own code leaves out (a branch not taken)."""
    skipped: set[int] = set()
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if id(p) not in uses.read]
        if not own:
            continue
        parts = name.split(".") if name else []
        holders = [module.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]
        if any(id(h) in uses.ran for h in holders):
            skipped.update(id(p) for p in own)
    return skipped


def _names(params: list[str]) -> str:
    return ", ".join(params[:4]) + (" ..." if len(params) > 4 else "")


def _rows(
    who: str,
    module: nn.Module,
    steps: _Steps,
    player: str,
    report: CheckReport,
    skip: dict[str, str] | None = None,
) -> None:
    own_step, other_step = (steps.d, steps.g) if player == "D" else (steps.g, steps.d)
    own, other = ("D", "E/G") if player == "D" else ("E/G", "D")
    baseline = steps.baseline_d if player == "D" else steps.baseline_g
    skipped = _skipped(module, steps.uses)
    report.lines.append(f"{who}:")
    for top, params in _groups(module).items():
        if skip and top in skip:
            report.lines.append(f"  {top:<38} {'':>14} {'':>10}         the {skip[top]}, below")
            continue
        trainable = [(n, p) for n, p in params if p.requires_grad]
        reached = [n for n, p in trainable if id(p) in own_step]
        leaked = [n for n, p in trainable if id(p) in other_step]
        never = [(n, p) for n, p in trainable if id(p) not in own_step]
        if baseline is not None:
            untrained = [n for n, p in never if id(p) not in baseline]
            why = f"take no gradient from your project's own {own} loss either"
        else:
            untrained = [n for n, p in never if id(p) in skipped]
            why = "are never read by a forward pass, though the module holding them runs"
        lost = [n for n, p in never if n not in untrained]
        label = top or "(its own parameters)"
        if top == ADDED_LAYERS:
            label += " (the layers the head adds)"
        values = sum(p.numel() for _, p in params)
        status = f"trained in the {own} step" if reached else ""
        if untrained:
            status += "; " if status else ""
            status += f"{len(untrained)} untrained before the switch too"
            report.untrained.append(
                f"{who.split(' (')[0]} {label}: {len(untrained)} parameters {why} "
                f"({_names(untrained)})"
            )
        if lost:
            status = f"NEVER trained: {_names(lost)}"
            because = f", though your project's {own} loss trains them" if baseline else ""
            report.problems.append(
                f"{who.split(' (')[0]} {label}: {len(lost)} parameters take no gradient in the "
                f"{own} step{because} ({_names(lost)})"
            )
        if not trainable:
            status = "frozen (requires_grad=False)"
        if leaked:
            status += f"; ALSO in the {other} step"
            report.problems.append(
                f"{who.split(' (')[0]} {label}: {len(leaked)} parameters take a gradient in the "
                f"{other} step ({_names(leaked)})"
            )
        count = f"{len(params)} parameters"
        report.lines.append(f"  {label:<38} {count:>14} {values:>10,} values  {status}")


def _snapshot(modules: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    seen: dict[int, Tensor] = {}
    for m in modules:
        for b in m.buffers():
            seen.setdefault(id(b), b)
    return [(b, b.detach().clone()) for b in seen.values()]


@dataclass(frozen=True)
class Baseline:
    """What your project's own losses train: the parameters its D loss (``d``) and its E/G
    loss (``eg``) reach on one batch, by id (:func:`baseline_of`)."""

    d: frozenset[int]
    eg: frozenset[int]
    kept: tuple[Tensor, ...] = ()  # the module's parameters, alive, so that the ids stay theirs


def baseline_of(
    losses: Callable[[Any], Any], batch: Any, module: nn.Module | list[nn.Module] | None = None
) -> Baseline:
    """Run your project's own losses once, ``losses(batch) -> (d_loss, eg_loss)``, and keep
    which parameters each reaches (no backward pass): a :class:`Baseline` for :func:`check`.

    Take it before the switch when the switch changes what your own losses can run (a joint
    widened for GALI-8 no longer fits your ``forward``): ``widen_input`` keeps each widened
    layer's parameters, so the ids stay valid. ``module``: the model they run, whose buffers
    and ``requires_grad`` flags are restored after, with torch's random state.
    """
    modules = [module] if isinstance(module, nn.Module) else list(module or [])
    buffers = _snapshot(modules)
    rng = torch.random.get_rng_state()
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        out = losses(batch)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for b, saved in buffers:
            b.data.copy_(saved)
        torch.random.set_rng_state(rng)
    if (
        not isinstance(out, (tuple, list))
        or len(out) != 2
        or not all(isinstance(v, Tensor) for v in out)
    ):
        raise ConfigError(
            "your project's losses should return (D loss, E/G loss), two tensors, got "
            f"{type(out).__name__}"
        )
    kept = tuple({id(p): p for m in modules for p in m.parameters()}.values())
    return Baseline(frozenset(reachable_leaves(out[0])), frozenset(reachable_leaves(out[1])), kept)


def _discriminator_parts(
    head: Any, discriminator: nn.Module | None
) -> tuple[list[tuple[str, nn.Module]], nn.Module | None]:
    """The modules the report audits as your D, each with its row title, and the module your
    code saves (None: unknown)."""
    modules = head.discriminator_modules
    saved = discriminator if discriminator is not None else head.discriminator
    if not modules:
        only = discriminator if discriminator is not None else head
        return [(f"discriminator {type(only).__name__}", only)], discriminator
    roles = {id(m): what for what, m in user_networks(head)}
    parts = []
    for label, m in labelled_modules(head):
        title = f"discriminator {label or type(m).__name__}"
        if len(modules) > 1 and id(m) in roles:
            title += f" ({roles[id(m)]})"
        parts.append((title, m))
    return parts, saved


def check(
    gali: GALI,
    batch: Any,
    *,
    discriminator: nn.Module | None = None,
    baseline: Callable[[Any], Any] | Baseline | None = None,
    file: TextIO | None | str = "stdout",
) -> CheckReport:
    """Run one D step and one E/G step of ``gali`` on ``batch`` and report what trains.

    Args:
        gali: your objective, built as your loop uses it.
        batch: one batch, ``x`` or ``(x, y)``, as your loop gives it.
        discriminator: the module your code saves (your D, or the model holding it); default:
            the one the head was built with (``discriminator=``). The report audits the D the
            head was built with (its module, or the modules it is made of), else this module,
            else the head's own networks, saying that your checkpoints cannot be checked.
        baseline: your project's own losses, ``baseline(batch) -> (d_loss, eg_loss)`` (run
            once, not back-propagated), or a :class:`Baseline` taken from them before the
            switch (:func:`baseline_of`): a parameter they leave untouched too is reported, not
            an error, and one they train that GALI's losses do not is an error.
        file: where the report is printed: ``"stdout"`` (``sys.stdout`` when it runs), a
            file, or None (not printed).

    Returns the :class:`CheckReport`; raises :class:`~gali_ext.errors.ConfigError` listing the
    problems when anything is silently lost. Nothing of your networks changes: no parameter is
    updated, no ``.grad`` is written, and every buffer (batch-norm statistics, spectral norm's
    vectors), ``requires_grad`` flag and torch's random state are restored.
    """
    if not isinstance(gali, GALI):
        raise ConfigError(f"check takes your GALI objective, got {type(gali).__name__}")
    head = gali.head
    parts, saved = _discriminator_parts(head, discriminator)
    encoder, generator = _unwrapped(gali.encoder), _unwrapped(gali.generator)
    candidates = [head, saved, *(m for _, m in parts), encoder, generator]
    modules = [m for m in candidates if isinstance(m, nn.Module)]
    buffers = _snapshot(modules)
    rng = torch.random.get_rng_state()
    audit, checked_range = gali.audit, head._checked_range  # the first step's checks stay
    gali.audit = StepAudit()
    uses = _Uses()
    hook = nn.modules.module.register_module_forward_pre_hook(uses.enter)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with uses:
                d = gali.discriminator_objective(batch, differentiable_chains=True)
                g = gali.generator_objective(chains=d.chains)
            hook.remove()
            steps = _Steps(reachable_leaves(d.loss), reachable_leaves(g.loss), uses)
            if callable(baseline):
                baseline = baseline_of(baseline, batch, modules)
                baseline = Baseline(baseline.d, baseline.eg)
            if isinstance(baseline, Baseline):
                steps.baseline_d, steps.baseline_g = set(baseline.d), set(baseline.eg)
            elif baseline is not None:
                raise ConfigError(
                    "baseline must be your project's own losses, batch -> (d_loss, eg_loss), "
                    f"or a Baseline (gali_ext.adapters.baseline_of), got {type(baseline).__name__}"
                )
    finally:
        hook.remove()
        gali.audit, head._checked_range = audit, checked_range
        for b, saved_buffer in buffers:
            b.data.copy_(saved_buffer)
        torch.random.set_rng_state(rng)
    report = CheckReport()
    spec = head.spec
    report.lines.append(
        f"GALI check: spec {spec.name!r} (K={spec.num_classes}, {spec.arity} slots), prior "
        f"{gali.prior.name}, batch of {d.logits.shape[1]}"
        + (", against your project's own losses" if baseline is not None else "")
    )
    for title, module in parts:
        _rows(
            title, module, steps, "D", report, _players_inside(module, encoder, generator, report)
        )
    _outside_parts(head, parts, steps, report)
    for who, net in (("encoder", encoder), ("generator", generator)):
        if isinstance(net, nn.Module):
            _rows(f"{who} {type(net).__name__}", net, steps, "E/G", report)
        else:
            report.lines.append(f"{who} {type(net).__name__}: not an nn.Module, not checked")
    _head_lines(head, report)
    _state_dict_lines(head, saved, report)
    for w in caught:
        report.lines.append(f"warning: {w.message}")
    if file is not None:
        print(report, file=sys.stdout if file == "stdout" else file)
    if report.problems:
        raise ConfigError(
            "gali_ext.adapters.check: something would be silently lost:\n"
            + "\n".join(f"  - {p}" for p in report.problems)
        )
    return report


def _players_inside(
    module: nn.Module, encoder: Any, generator: Any, report: CheckReport
) -> dict[str, str]:
    """The top-level sub-modules of a D module that are (or hold) the encoder or the generator:
    a model holding all three given as the D. Their rows are the E/G step's; the head's layers
    registered in the model are then where a D optimizer over the D's parts does not look."""
    inside: dict[str, str] = {}
    for top, child in module.named_children():
        for who, net in (("encoder", encoder), ("generator", generator)):
            if isinstance(net, nn.Module) and any(m is net for m in child.modules()):
                inside[top] = who
    if inside:
        report.problems.append(
            f"the discriminator {type(module).__name__} holds the "
            f"{' and the '.join(dict.fromkeys(inside.values()))} too: the head's layers are "
            f"registered in it ({ADDED_LAYERS}), where a D optimizer over the D's own parts "
            "(model.get_disc_params()) does not see them; build the head with discriminator= "
            "the D's modules ([model.img_discriminator, ...]) or the parameters your D "
            "optimizer takes (model.get_disc_params())"
        )
    return inside


def _outside_parts(
    head: Any, parts: list[tuple[str, nn.Module]], steps: _Steps, report: CheckReport
) -> None:
    """The networks the head trains that are in none of the D's modules: with the D's
    parameters or modules listed (several), a problem (your D optimizer leaves them out); with
    one D module, their rows and a note (whether your optimizer takes them is not known)."""
    if not head.discriminator_modules and parts[0][1] is head:
        return
    inside = {id(p) for _, m in parts for p in m.parameters()}
    for what, module in user_networks(head):
        outside = [
            n for n, p in module.named_parameters() if p.requires_grad and id(p) not in inside
        ]
        if not outside:
            continue
        if len(head.discriminator_modules) > 1:
            report.problems.append(
                f"{what} ({type(module).__name__}): {len(outside)} parameters are in none of "
                f"your D's modules (discriminator=), so your D optimizer would not train them "
                f"({_names(outside)})"
            )
            continue
        _rows(
            f"also trained by the head: {type(module).__name__} ({what})",
            module,
            steps,
            "D",
            report,
        )
        report.lines.append(
            f"note: {what} is outside your discriminator module; if your D optimizer takes it "
            "too (a D spread over a larger model), give the head all of D: "
            "discriminator=[its modules] or discriminator=model.get_disc_params()"
        )


def _head_lines(head: Any, report: CheckReport) -> None:
    widths = ", ".join(
        f"{k} {w if w is not None else 'from the first batch'}"
        for k, w in head.feature_dims.items()
    )
    report.lines.append(f"widths: {widths}")
    norms = {what: layers for what, layers in head.batch_norm_layers().items() if layers}
    if norms:
        found = "; ".join(f"{what}: {', '.join(layers[:2])}" for what, layers in norms.items())
        report.lines.append(f"batch norm in D: {found}; feature pass {head.feature_pass!r}")
    else:
        report.lines.append(f"batch norm in D: none; feature pass {head.feature_pass!r}")
    readers = [
        what
        for what, net in [
            *(((f"the {k!r} feature network"), n) for k, n in head.feature_nets.items()),
            ("the joint network", head.joint),
            *((f"the unary head of slot {s}", n) for s, n in head.unary_heads.items()),
        ]
        if isinstance(net, NetworkAdapter) and net.takes_condition
    ]
    if head.conditional:
        projected = f"projection terms of {head.conditions} classes; " if head.conditions else ""
        report.lines.append(
            f"conditioning: {projected}read by {', '.join(readers) or 'the head only'}"
        )
    else:
        report.lines.append("conditioning: none (unconditional)")


def _state_dict_lines(head: Any, saved: nn.Module | None, report: CheckReport) -> None:
    added = head.added_layers()
    tensors = len(added.state_dict())
    if not tensors:
        report.lines.append("state_dict: the head adds no layers; your D's checkpoints hold it all")
        return
    if saved is None:
        report.lines.append(
            f"state_dict: the head adds {tensors} entries ({', '.join(added)}); save "
            "gali.head.state_dict(), or build the head with discriminator=your_d so that your "
            "D's own state_dict() holds them"
        )
        return
    holder = head.discriminator
    path = next((n for n, m in saved.named_modules() if m is holder), None)
    prefix = f"{path}.{ADDED_LAYERS}." if path else f"{ADDED_LAYERS}."
    keys = set(saved.state_dict())
    missing = [k for k in added.state_dict() if f"{prefix}{k}" not in keys]
    if missing:
        report.problems.append(
            f"your discriminator's state_dict() misses the {len(missing)} entries the head adds "
            f"({', '.join(added)}): build the head with discriminator=your_d"
        )
    else:
        report.lines.append(
            f"state_dict: {type(saved).__name__}'s state_dict() holds the {tensors} entries of "
            f"the layers the head adds, under '{prefix}' ({', '.join(added)})"
        )
