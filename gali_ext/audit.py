"""What the discriminator's loss reaches, and which optimizers step it (docs/design.md, 9.8).

A user who switches an existing discriminator to GALI can lose part of it without an error: a
layer their ``forward`` uses that the head never calls (a projection term computed inside
``forward``), or the layers the head adds, left out of an optimizer built before the head.
:class:`StepAudit` watches the first steps of a :class:`~gali_ext.GALI` objective for both: it
warns once about the discriminator's parameters that the D loss never reaches, and raises
:class:`~gali_ext.errors.ConfigError` when a parameter the D loss reaches is in no optimizer
that steps.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .errors import ConfigError
from .wiring import labelled_modules

__all__ = ["StepAudit", "reachable_leaves"]


def reachable_leaves(tensor: Tensor) -> set[int]:
    """The ids of the leaf tensors (parameters) that ``tensor.backward()`` would give a
    gradient: the variables of the ``AccumulateGrad`` nodes of its graph."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def discriminator_parameters(head: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """The parameters of a head and of the user's discriminator (its module, or the modules it
    is made of), by id, each with its name in the user's module where it has one (prefixed by
    the module's class name when the D has several; else ``head.NAME``)."""
    named: dict[int, tuple[str, nn.Parameter]] = {}
    for label, module in labelled_modules(head):
        for name, p in module.named_parameters():
            named.setdefault(id(p), (f"{label}.{name}" if label else name, p))
    for name, p in head.named_parameters():
        named.setdefault(id(p), (f"head.{name}", p))
    return named


_AUDITS: weakref.WeakSet[StepAudit] = weakref.WeakSet()
_HOOK: Any = None


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for audit in list(_AUDITS):
        audit.saw(optimizer)


class StepAudit:
    """The checks of an objective's first steps (module docstring).

    :meth:`discriminator_loss` is called with each D loss: on the first, it records the
    parameters the loss reaches and warns about those of the discriminator it never reaches;
    on a later one, once an optimizer has stepped, it checks that every reached parameter was
    in an optimizer that stepped, then stops watching.
    """

    def __init__(self) -> None:
        global _HOOK
        self.reached: set[int] | None = None
        self.done = False
        self._stepped: set[int] = set()
        self._optimizers: set[int] = set()
        if _HOOK is None:
            _HOOK = register_optimizer_step_pre_hook(_on_optimizer_step)
        _AUDITS.add(self)

    def __deepcopy__(self, memo: dict) -> StepAudit:
        return StepAudit()  # a copy of an objective is audited afresh

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def saw(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the parameters of an optimizer that steps (once per optimizer)."""
        if self.reached is None or id(optimizer) in self._optimizers:
            return
        self._optimizers.add(id(optimizer))
        for group in optimizer.param_groups:
            self._stepped.update(id(p) for p in group["params"])

    def discriminator_loss(self, loss: Tensor, head: nn.Module) -> None:
        """See the class docstring."""
        if self.done or not loss.requires_grad:
            return
        named = discriminator_parameters(head)
        if self.reached is None:
            self.reached = reachable_leaves(loss)
            never = [n for i, (n, p) in named.items() if p.requires_grad and i not in self.reached]
            if never:
                warnings.warn(
                    f"{len(never)} parameters of the discriminator take no gradient from GALI's "
                    f"D loss and will never train: {', '.join(never[:6])}"
                    + (f" (and {len(never) - 6} more)" if len(never) > 6 else "")
                    + ". The head does not call the layers they belong to: a score or "
                    "projection computed in a network's forward needs FeatureNetwork(net, "
                    "output=..., score=...); a layer of your D that GALI does not use can be "
                    "frozen (requires_grad_(False)). gali_ext.adapters.check lists them all",
                    UserWarning,
                    stacklevel=4,
                )
            return
        if not self._optimizers:
            return  # no optimizer has stepped yet
        self.done = True
        _AUDITS.discard(self)
        missing = [
            n
            for i, (n, p) in named.items()
            if p.requires_grad and i in self.reached and i not in self._stepped
        ]
        if missing:
            raise ConfigError(
                f"{len(missing)} parameters of the discriminator take a gradient in the D step "
                f"but are in no optimizer that stepped, so they never train: "
                f"{', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else "") + ". Build "
                "the D optimizer after the head, over head.parameters(), or over your D's "
                "parameters with the head built with discriminator=your_d (its layers are then "
                "registered in your D)"
            )
