"""One GALI training step and its schedule (docs/design.md, section 4).

:func:`train_step` runs ``n_dis`` discriminator steps (D sees the chains detached from E and G)
then one generator-encoder step (no gradient for D) on the chains of the last D step, on HF
Accelerate objects or plain ones, so a user's own loop can call it. With
``shared_forward=True`` the last D step and the G/E step come from one forward pass, as in the
authors' GALI-4 script. The reference loop that calls it is ``recipes.train``
(``--set shared_forward=true``).
"""

from __future__ import annotations

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
    "build_optimizer",
    "instance_noise_std",
    "train_step",
]


def instance_noise_std(step: int, total_steps: int, initial: float = 0.1) -> float:
    """Instance-noise std at ``step``: ``initial * (T - t) / T``, linear from ``initial`` to 0."""
    if total_steps <= 0:
        return 0.0
    return initial * max(total_steps - step, 0) / total_steps


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float, betas: Sequence[float] = (0.5, 0.999)
) -> torch.optim.Optimizer:
    """An optimizer by name: any of ``torch.optim`` (``"Adam"``, ``"adam"``, ``"RMSprop"``)
    or of ``torch_optimizer`` (``"RAdam"``, ``"Lookahead"`` is not one: it wraps another).

    Adam-like optimizers get ``betas`` (the paper's (0.5, 0.999)).
    """
    import inspect

    import torch_optimizer

    lookup = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    for n in dir(torch_optimizer):
        lookup.setdefault(n.lower(), getattr(torch_optimizer, n))
    cls = lookup.get(name.lower())
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted(
            k
            for k, v in lookup.items()
            if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)
        )
        raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(known)}")
    kwargs: dict[str, Any] = {"lr": lr}
    if "betas" in inspect.signature(cls.__init__).parameters:
        kwargs["betas"] = tuple(betas)
    return cls(list(params), **kwargs)


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
    if shared_forward and accelerator is not None:
        if accelerator.num_processes > 1:
            raise ConfigError("shared_forward runs on one process; use the alternating schedule")
        if getattr(accelerator, "scaler", None) is not None:
            raise ConfigError("shared_forward does not work with fp16 loss scaling; use bf16")
    start = time.perf_counter()
    backward = accelerator.backward if accelerator is not None else Tensor.backward
    iterator = iter(batches)
    d_values = []
    d_steps = n_dis - 1 if shared_forward else n_dis
    for i in range(d_steps):
        x = next(iterator)
        d_optimizer.zero_grad(set_to_none=True)
        # The last D step keeps the chains' graph: the G/E step below reuses them.
        reuse = not shared_forward and i == d_steps - 1
        d = gali(x, role="discriminator", instance_noise_std=instance_noise,
                 differentiable_chains=reuse)  # fmt: skip
        _check_finite(d.loss.detach(), "discriminator loss", step)
        backward(d.loss)
        d_optimizer.step()
        d_values.append(d.loss.detach())
    if shared_forward:
        x = next(iterator)
        d, g = gali(x, role="shared", instance_noise_std=instance_noise)
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
        g = gali(x, role="generator", instance_noise_std=instance_noise, chains=d.chains)
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
