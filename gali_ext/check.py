"""Check a switch to GALI on your own networks before training: :func:`check` (also
``gali_ext.adapters.check``, beside the adapters it checks, and ``gali-ext check``).

It runs one D step and one E/G step of your :class:`~gali_ext.GALI` objective on one of your
batches (no optimizer steps, and every buffer and the random state restored after) and reports,
per module of your discriminator, encoder and generator, in which step it takes a gradient; the
widths the head inferred; batch norm and the feature pass that handles it; the conditioning; the
prior; and what your discriminator's own ``state_dict()`` holds of the head. Anything silently
lost is an error: a discriminator parameter the D loss never reaches, an encoder or generator
parameter the E/G loss never reaches, a gradient that leaks into the other player's step, or
layers the head adds that your discriminator's checkpoints would miss.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from .audit import StepAudit, reachable_leaves
from .errors import ConfigError
from .gali import GALI
from .wiring import ADDED_LAYERS, NetworkAdapter

__all__ = ["CheckReport", "check"]


@dataclass
class CheckReport:
    """What :func:`check` found: the report's ``lines`` and its ``problems`` (empty when
    nothing is lost); ``str(report)`` is the printed report."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        found = [f"  - {p}" for p in self.problems] or ["  none: nothing is silently lost"]
        return "\n".join([*self.lines, "problems:", *found])


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


def _rows(
    who: str,
    module: nn.Module,
    own_step: set[int],
    other_step: set[int],
    own: str,
    other: str,
    report: CheckReport,
) -> None:
    report.lines.append(f"{who} {type(module).__name__}:")
    for top, params in _groups(module).items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        reached = [n for n, p in trainable if id(p) in own_step]
        leaked = [n for n, p in trainable if id(p) in other_step]
        never = [n for n, p in trainable if id(p) not in own_step]
        label = top or "(its own parameters)"
        if top == ADDED_LAYERS:
            label += " (the layers the head adds)"
        values = sum(p.numel() for _, p in params)
        status = f"trained in the {own} step" if reached and not never else ""
        if never:
            status = f"NEVER trained: {', '.join(never[:4])}" + (" ..." if len(never) > 4 else "")
            report.problems.append(
                f"{who} {label}: {len(never)} parameters take no gradient in the {own} step "
                f"({', '.join(never[:4])})"
            )
        if not trainable:
            status = "frozen (requires_grad=False)"
        if leaked:
            status += f"; ALSO in the {other} step"
            report.problems.append(
                f"{who} {label}: {len(leaked)} parameters take a gradient in the {other} step "
                f"({', '.join(leaked[:4])})"
            )
        count = f"{len(params)} parameters"
        report.lines.append(f"  {label:<38} {count:>14} {values:>10,} values  {status}")


def _snapshot(modules: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    seen: dict[int, Tensor] = {}
    for m in modules:
        for b in m.buffers():
            seen.setdefault(id(b), b)
    return [(b, b.detach().clone()) for b in seen.values()]


def check(
    gali: GALI,
    batch: Any,
    *,
    discriminator: nn.Module | None = None,
    file: TextIO | None = sys.stdout,
) -> CheckReport:
    """Run one D step and one E/G step of ``gali`` on ``batch`` and report what trains.

    Args:
        gali: your objective, built as your loop uses it.
        batch: one batch, ``x`` or ``(x, y)``, as your loop gives it.
        discriminator: your own discriminator module (the one your code saves); default: the
            one the head was built with (``discriminator=``). Without either, the report covers
            the head's networks and says that your checkpoints' contents cannot be checked.
        file: where the report is printed (None: not printed).

    Returns the :class:`CheckReport`; raises :class:`~gali_ext.errors.ConfigError` listing the
    problems when anything is silently lost. Nothing of your networks changes: no parameter is
    updated, no ``.grad`` is written, and every buffer (batch-norm statistics, spectral norm's
    vectors) and torch's random state are restored.
    """
    if not isinstance(gali, GALI):
        raise ConfigError(f"check takes your GALI objective, got {type(gali).__name__}")
    head = gali.head
    owner = discriminator if discriminator is not None else head.discriminator
    encoder, generator = _unwrapped(gali.encoder), _unwrapped(gali.generator)
    modules = [m for m in (head, owner, encoder, generator) if isinstance(m, nn.Module)]
    buffers = _snapshot(modules)
    rng = torch.random.get_rng_state()
    audit, checked_range = gali.audit, head._checked_range  # the first step's checks stay
    gali.audit = StepAudit()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = gali.discriminator_objective(batch, differentiable_chains=True)
            d_step = reachable_leaves(d.loss)
            g = gali.generator_objective(chains=d.chains)
            g_step = reachable_leaves(g.loss)
    finally:
        gali.audit, head._checked_range = audit, checked_range
        for b, saved in buffers:
            b.data.copy_(saved)
        torch.random.set_rng_state(rng)
    report = CheckReport()
    spec = head.spec
    report.lines.append(
        f"GALI check: spec {spec.name!r} (K={spec.num_classes}, {spec.arity} slots), prior "
        f"{gali.prior.name}, batch of {d.logits.shape[1]}"
    )
    d_module = owner if owner is not None else head
    _rows("discriminator", d_module, d_step, g_step, "D", "E/G", report)
    for who, net in (("encoder", encoder), ("generator", generator)):
        if isinstance(net, nn.Module):
            _rows(who, net, g_step, d_step, "E/G", "D", report)
        else:
            report.lines.append(f"{who} {type(net).__name__}: not an nn.Module, not checked")
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
    _state_dict_lines(head, owner, report)
    for w in caught:
        report.lines.append(f"warning: {w.message}")
    if file is not None:
        print(report, file=file)
    if report.problems:
        raise ConfigError(
            "gali_ext.adapters.check: something would be silently lost:\n"
            + "\n".join(f"  - {p}" for p in report.problems)
        )
    return report


def _state_dict_lines(head: Any, owner: nn.Module | None, report: CheckReport) -> None:
    added = head.added_layers()
    tensors = len(added.state_dict())
    if not tensors:
        report.lines.append("state_dict: the head adds no layers; your D's checkpoints hold it all")
        return
    if owner is None:
        report.lines.append(
            f"state_dict: the head adds {tensors} entries ({', '.join(added)}); save "
            "gali.head.state_dict(), or build the head with discriminator=your_d so that your "
            "D's own state_dict() holds them"
        )
        return
    keys = set(owner.state_dict())
    missing = [k for k in added.state_dict() if f"{ADDED_LAYERS}.{k}" not in keys]
    if missing:
        report.problems.append(
            f"your discriminator's state_dict() misses the {len(missing)} entries the head adds "
            f"({', '.join(added)}): build the head with discriminator=your_d"
        )
    else:
        report.lines.append(
            f"state_dict: your discriminator's state_dict() holds the {tensors} entries of the "
            f"layers the head adds, under '{ADDED_LAYERS}.' ({', '.join(added)})"
        )
