"""One GALI training step and its schedule (docs/design.md, section 4).

:func:`train_step` runs ``n_dis`` discriminator steps (D sees the chains detached from E and G)
then one generator-encoder step (no gradient for D) on the chains of the last D step, on HF
Accelerate objects or plain ones, so a user's own loop can call it. With
``shared_forward=True`` the last D step and the G/E step come from one forward pass, as in the
authors' GALI-4 script. The reference loop that calls it is ``recipes.train``
(``--set shared_forward=true``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DivergenceError
from .losses import tuple_class_accuracy

__all__ = [
    "StepMetrics",
    "available_optimizers",
    "build_optimizer",
    "instance_noise_std",
    "train_step",
]


def _check_noise(std: float, what: str) -> None:
    if not math.isfinite(float(std)) or std < 0:
        raise ConfigError(f"expected {what} >= 0 (finite), got {float(std)}")


def instance_noise_std(step: int, total_steps: int, initial: float = 0.1) -> float:
    """Instance-noise std at ``step``: ``initial * (T - t) / T``, linear from ``initial`` to 0."""
    _check_noise(initial, "an initial instance-noise std")
    if total_steps <= 0:
        return 0.0
    return initial * max(total_steps - step, 0) / total_steps


UNSUPPORTED_OPTIMIZERS: dict[str, str] = {
    "lbfgs": "it needs a closure that evaluates the loss again (step(closure)), and train_step "
    "makes one backward pass per step",
    "sparseadam": "it needs sparse gradients (nn.Embedding(sparse=True)); the GALI networks "
    "have dense ones: use adam",
    "lookahead": "it wraps another optimizer: build Lookahead(Adam(params)) yourself and pass "
    "it to train_step",
    "adahessian": "it needs second derivatives (backward(create_graph=True)), which train_step "
    "does not take",
    "muon": "it updates 2-D weight matrices only, and the networks also have biases and "
    "normalisation weights",
    "optimizer": "it is the abstract base class of all optimizers",
}
"""Optimizers of ``torch.optim`` and ``torch_optimizer`` that :func:`train_step` cannot drive,
with the reason :func:`build_optimizer` gives when asked for one."""


@functools.cache
def _optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    import torch_optimizer

    lookup = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    for n in dir(torch_optimizer):
        lookup.setdefault(n.lower(), getattr(torch_optimizer, n))
    return {
        name: cls
        for name, cls in lookup.items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    }


def available_optimizers() -> list[str]:
    """The optimizer names :func:`build_optimizer` accepts (lower case), sorted: those of
    ``torch.optim`` and ``torch_optimizer`` that one backward pass per step can drive."""
    return sorted(n for n in _optimizer_classes() if n not in UNSUPPORTED_OPTIMIZERS)


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, betas: Sequence[float] = (0.5, 0.999)
) -> torch.optim.Optimizer:
    """An optimizer by name (case-insensitive): one of :func:`available_optimizers`, from
    ``torch.optim`` (``"Adam"``, ``"RMSprop"``) or ``torch_optimizer`` (``"RAdam"``).

    Adam-like optimizers get ``betas`` (the paper's (0.5, 0.999)), which must be two numbers in
    [0, 1). Optimizers :func:`train_step` cannot drive (L-BFGS, SparseAdam, Lookahead, ...:
    :data:`UNSUPPORTED_OPTIMIZERS`), an unknown name, a learning rate that is not a positive
    finite number, or settings the optimizer refuses raise :class:`ConfigError`.
    """
    import inspect

    key = str(name).lower()
    if key in UNSUPPORTED_OPTIMIZERS:
        raise ConfigError(
            f"optimizer {name!r} cannot be used: {UNSUPPORTED_OPTIMIZERS[key]} (optimizers: "
            f"{', '.join(available_optimizers())})"
        )
    cls = _optimizer_classes().get(key)
    if cls is None:
        raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(available_optimizers())}")
    try:
        rate = float(lr)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"expected a learning rate > 0 (finite), got {lr!r}")
    kwargs: dict[str, Any] = {"lr": lr}
    if "betas" in inspect.signature(cls.__init__).parameters:
        values = tuple(betas)
        if len(values) != 2 or not all(
            isinstance(b, (int, float)) and math.isfinite(b) and 0 <= b < 1 for b in values
        ):
            raise ConfigError(f"expected betas of two numbers in [0, 1), got {values!r}")
        kwargs["betas"] = values
    try:
        return cls(list(params), **kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"optimizer {name!r} refused lr={lr!r}, betas: {error}") from error


@dataclass
class StepMetrics:
    """What one training step measured: D's loss (mean over its ``n_dis`` steps), the
    generator-encoder loss and its parts, D's accuracy per tuple class, and the wall time."""

    d_loss: float
    g_loss: float
    parts: dict[str, float] = field(default_factory=dict)
    class_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "d_loss": self.d_loss,
            "g_loss": self.g_loss,
            **self.parts,
            "d_accuracy": self.class_accuracy,
            "step_time": self.seconds,
        }


def _check_finite(value: Tensor, name: str, step: int | None) -> None:
    if not torch.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise DivergenceError(f"the {name} became {value.item()}{where}")


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_step(
    gali: nn.Module,
    batches: Iterator[Any] | Sequence[Any],
    d_optimizer: torch.optim.Optimizer,
    g_optimizer: torch.optim.Optimizer,
    *,
    n_dis: int = 1,
    instance_noise: float = 0.0,
    accelerator: Any = None,
    step: int | None = None,
    shared_forward: bool = False,
) -> StepMetrics:
    """One GALI step: ``n_dis`` D steps on fresh batches, then one G/E step on the last batch.

    The G/E step reuses the chains of the last D step (made with
    ``differentiable_chains=True``): the same prior sample and encoder noise, E and G run once
    for both steps, and the G/E step still sees the updated D.

    Args:
        gali: a :class:`~gali_ext.GALI` (or it wrapped by ``accelerator.prepare``); called as
            ``gali(x, role="discriminator" | "generator" | "shared", instance_noise_std=...)``.
        batches: at least ``n_dis`` batches, each images ``x`` or a pair ``(x, y)`` with a
            per-sample condition ``y`` (a conditional head); an iterator is advanced ``n_dis``
            times.
        d_optimizer: over the head's parameters; g_optimizer: over E's and G's.
        accelerator: an ``accelerate.Accelerator``; its ``backward`` is used when given.
        step: the global step, named in the error if a loss becomes NaN or infinite.
        shared_forward: the last D step and the G/E step share one forward pass
            (:meth:`~gali_ext.GALI.shared_objectives`, the authors' GALI-4 script): both
            gradients are taken at the same parameters, then both optimizers step. It saves a
            head pass per step. Alternating (the default) lets the G/E step see the D that was
            just updated. One process only, and not with fp16 loss scaling
            (bf16 is fine): DDP reduces gradients once per backward, and the scaler's update
            after the D step would change the scale the G/E gradients were made with.

    Raises :class:`~gali_ext.errors.DivergenceError` on a NaN or infinite loss, before any
    optimizer applies it.
    """
    if n_dis < 1:
        raise ConfigError(f"n_dis must be >= 1, got {n_dis}")
    _check_noise(instance_noise, "an instance-noise std")
    if shared_forward and accelerator is not None:
        if accelerator.num_processes > 1:
            raise ConfigError("shared_forward runs on one process; use the alternating schedule")
        if getattr(accelerator, "scaler", None) is not None:
            raise ConfigError("shared_forward does not work with fp16 loss scaling; use bf16")
    start = time.perf_counter()
    backward = accelerator.backward if accelerator is not None else Tensor.backward
    iterator = iter(batches)
    drawn = 0

    def next_batch() -> Tensor:
        nonlocal drawn
        try:
            batch = next(iterator)
        except StopIteration:
            raise ConfigError(
                f"train_step needs n_dis={n_dis} batches, the batches ran out after {drawn}"
            ) from None
        drawn += 1
        return batch

    def objective(x: Tensor, **kwargs: Any) -> Any:
        try:
            return gali(x, instance_noise_std=instance_noise, **kwargs)
        except DivergenceError as error:
            if step is None:
                raise
            raise DivergenceError(f"{error}, at step {step}") from error

    d_values = []
    d_steps = n_dis - 1 if shared_forward else n_dis
    for i in range(d_steps):
        x = next_batch()
        d_optimizer.zero_grad(set_to_none=True)
        # The last D step keeps the chains' graph: the G/E step below reuses them.
        reuse = not shared_forward and i == d_steps - 1
        d = objective(x, role="discriminator", differentiable_chains=reuse)
        _check_finite(d.loss.detach(), "discriminator loss", step)
        backward(d.loss)
        d_optimizer.step()
        d_values.append(d.loss.detach())
    if shared_forward:
        x = next_batch()
        d, g = objective(x, role="shared")
        _check_finite(d.loss.detach(), "discriminator loss", step)
        _check_finite(g.loss.detach(), "generator-encoder loss", step)
        d_optimizer.zero_grad(set_to_none=True)
        g_optimizer.zero_grad(set_to_none=True)
        # Both backward passes before either step: an optimizer step changes D's weights in
        # place, which the second pass still needs.
        backward(d.loss, inputs=_parameters(d_optimizer), retain_graph=True)
        backward(g.loss, inputs=_parameters(g_optimizer))
        d_optimizer.step()
        g_optimizer.step()
        d_values.append(d.loss.detach())
    else:
        g_optimizer.zero_grad(set_to_none=True)
        g = objective(x, role="generator", chains=d.chains)
        _check_finite(g.loss.detach(), "generator-encoder loss", step)
        backward(g.loss)
        g_optimizer.step()
    # One host sync for everything logged.
    logged = torch.stack([torch.stack(d_values).mean(), g.loss.detach(), *g.parts.values()])
    values = logged.float().cpu().tolist()
    accuracy = tuple_class_accuracy(d.logits.detach()).cpu().tolist()
    return StepMetrics(
        d_loss=values[0],
        g_loss=values[1],
        parts=dict(zip(g.parts, values[2:])),
        class_accuracy=accuracy,
        seconds=time.perf_counter() - start,
    )
