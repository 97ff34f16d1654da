"""One GALI training step and its schedule (docs/design.md, section 4).

:func:`train_step` runs ``n_dis`` discriminator steps (D sees the chains detached from E and G)
then one generator-encoder step (no gradient for D) on the chains of the last D step, on HF
Accelerate objects or plain ones, so a user's own loop can call it. With
``shared_forward=True`` the last D step and the G/E step come from one forward pass, as in the
authors' GALI-4 script; with ``own_generator_batch=True`` the G/E step draws a batch of its own
and runs its own forward, as in their ALI and GALI-8 scripts. The reference loop that calls it
is ``recipes.train`` (``--set shared_forward=true``, ``--set own_generator_batch=true``).

Its NaN guard reads no loss on the host when the optimizers can skip an update on the device
(:class:`DivergenceGuard`; torch's fused optimizers, which :func:`build_optimizer` gives on
CUDA): the step's one host sync is then the read of its metrics, and ``sync=False`` defers that
to the loop's logging steps. :class:`gali_ext.capture.CapturedStep` runs the same step as a
CUDA graph.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DivergenceError
from .losses import tuple_class_accuracy

__all__ = [
    "DivergenceGuard",
    "StepMetrics",
    "available_optimizers",
    "batches_per_step",
    "build_optimizer",
    "instance_noise_std",
    "run_step",
    "train_step",
    "unpack_metrics",
    "unwrap_optimizer",
]


def _check_noise(std: float, what: str) -> None:
    if not math.isfinite(float(std)) or std < 0:
        raise ConfigError(f"expected {what} >= 0 (finite), got {float(std)}")


def batches_per_step(n_dis: int, own_generator_batch: bool = False) -> int:
    """The batches one :func:`train_step` draws: ``n_dis``, plus one when the G/E step has a
    batch of its own (``own_generator_batch``)."""
    return n_dis + int(own_generator_batch)


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


def _is_optimizer(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


@functools.cache
def _optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    lookup = {n.lower(): getattr(torch.optim, n) for n in dir(torch.optim)}
    try:
        import torch_optimizer
    except ImportError:  # an install without it (e.g. a GPU image): torch.optim's only
        torch_optimizer = None
    for n in dir(torch_optimizer) if torch_optimizer is not None else ():
        lookup.setdefault(n.lower(), getattr(torch_optimizer, n))
    return {name: cls for name, cls in lookup.items() if _is_optimizer(cls)}


def available_optimizers() -> list[str]:
    """The optimizer names :func:`build_optimizer` accepts (lower case), sorted: those of
    ``torch.optim`` and ``torch_optimizer`` that one backward pass per step can drive."""
    return sorted(n for n in _optimizer_classes() if n not in UNSUPPORTED_OPTIMIZERS)


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    lr: float,
    betas: Sequence[float] = (0.5, 0.999),
    *,
    device: torch.device | str | None = None,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """An optimizer by name (case-insensitive): one of :func:`available_optimizers`, from
    ``torch.optim`` (``"Adam"``, ``"RMSprop"``) or ``torch_optimizer`` (``"RAdam"``).

    Adam-like optimizers get ``betas`` (the paper's (0.5, 0.999)), which must be two numbers in
    [0, 1). ``device``: where the parameters will train (default: where they are now). On CUDA
    an optimizer that has a fused implementation (Adam, AdamW, SGD, Adagrad) gets
    ``fused=True``: one kernel per step instead of a few per parameter, and the device-side NaN
    guard of :func:`train_step` can skip its update without a host sync. ``capturable=True``:
    an optimizer whose step can be captured in a CUDA graph
    (:class:`gali_ext.capture.CapturedStep`); one without that option is refused.

    Optimizers :func:`train_step` cannot drive (L-BFGS, SparseAdam, Lookahead, ...:
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
    params = list(params)
    if device is None:
        device = params[0].device if params else "cpu"
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"lr": lr}
    if "betas" in accepted:
        values = tuple(betas)
        if len(values) != 2 or not all(
            isinstance(b, (int, float)) and math.isfinite(b) and 0 <= b < 1 for b in values
        ):
            raise ConfigError(f"expected betas of two numbers in [0, 1), got {values!r}")
        kwargs["betas"] = values
    if torch.device(device).type == "cuda" and "fused" in accepted:
        kwargs["fused"] = True
    if capturable:
        if "capturable" not in accepted:
            raise ConfigError(
                f"optimizer {name!r} cannot be captured in a CUDA graph (it has no capturable "
                "option): use adam or adamw, or turn cuda_graphs off"
            )
        kwargs["capturable"] = True
    try:
        return cls(params, **kwargs)
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


def _raise_if_not_finite(value: Tensor, name: str, step: int | None) -> None:
    """The host-side guard (one sync): for optimizers that cannot skip an update on the device."""
    if not torch.isfinite(value):
        where = f" at step {step}" if step is not None else ""
        raise DivergenceError(f"the {name} became {value.item()}{where}")


def _parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that steps: the one inside an ``accelerate``
    ``AcceleratedOptimizer``, or ``optimizer`` itself when it is not wrapped."""
    return getattr(optimizer, "optimizer", optimizer)


class DivergenceGuard:
    """The NaN guard of a training loop, kept on the device: no host sync until :meth:`check`.

    :meth:`watch` records whether a loss is finite. From the first non-finite one on,
    :attr:`skip` is 1, and :meth:`step` skips an optimizer's update on the device, through the
    ``found_inf`` protocol that ``torch.amp.GradScaler`` uses (optimizers with
    ``_step_supports_amp_scaling``: torch's fused Adam, AdamW, SGD and Adagrad, which
    :func:`build_optimizer` gives on CUDA). The weights therefore stay those from before the
    divergence, as with the host-side check, which stops before the optimizer steps.
    :meth:`check` reads the flag (one sync) and raises :class:`~gali_ext.errors.DivergenceError`
    naming the first non-finite loss, its value and its step.

    One guard serves a whole run when host syncs are deferred to logging steps
    (``train_step(..., sync=False, guard=guard)``, :class:`~gali_ext.capture.CapturedStep`):
    a divergence in an unsynced step is raised at the next check, and every update after it is
    skipped.
    """

    def __init__(self) -> None:
        self._healthy: Tensor | None = None  # float 1 until a watched value is non-finite
        self._skip: Tensor | None = None  # 1 - healthy: GradScaler's found_inf
        self._record: Tensor | None = None  # float64 [step, what, value] of the first one
        self._step: Tensor | None = None
        self._names: list[str] = []
        self._pending_step = -1.0

    @staticmethod
    def can_skip(optimizer: torch.optim.Optimizer) -> bool:
        """Whether the guard can skip ``optimizer``'s update on the device (``found_inf``)."""
        return bool(getattr(unwrap_optimizer(optimizer), "_step_supports_amp_scaling", False))

    @property
    def skip(self) -> Tensor | None:
        """``[]`` float tensor on the device, 1 once a watched value was non-finite, else 0
        (None before the first :meth:`watch`)."""
        return self._skip

    def at_step(self, step: int | None) -> None:
        """The step the next watched values belong to (written on the device, no sync)."""
        self._pending_step = -1.0 if step is None else float(step)
        if self._step is not None:
            self._step.fill_(self._pending_step)

    def watch(self, value: Tensor, what: str) -> None:
        """Record whether the scalar ``value`` (a loss) is finite; ``what`` names it."""
        value = value.detach()
        if self._healthy is None:
            device = value.device
            self._healthy = torch.ones((), device=device)
            self._skip = torch.zeros((), device=device)
            self._record = torch.zeros(3, dtype=torch.float64, device=device)
            self._step = torch.full((), self._pending_step, dtype=torch.float64, device=device)
        if what not in self._names:
            self._names.append(what)
        value = value.double().sum()
        bad = ~torch.isfinite(value)
        first = bad & (self._healthy > 0)
        code = self._step.new_full((), float(self._names.index(what)))
        record = torch.stack([self._step, code, value])
        self._record.copy_(torch.where(first, record, self._record))
        self._healthy.mul_(~bad)
        self._skip.copy_(1 - self._healthy)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``, skipped on the device once a watched value was non-finite
        (when :meth:`can_skip`; otherwise a plain step)."""
        inner = unwrap_optimizer(optimizer)
        if self._skip is None or not self.can_skip(optimizer) or hasattr(inner, "found_inf"):
            optimizer.step()
            return
        inner.found_inf = self._skip
        try:
            optimizer.step()
        finally:
            del inner.found_inf

    def packed(self) -> Tensor | None:
        """``[healthy, step, what, value]`` as one float64 device tensor, to be read together
        with a step's metrics in one transfer (:meth:`raise_if_diverged`)."""
        if self._healthy is None:
            return None
        return torch.cat([self._healthy.double().view(1), self._record])

    def raise_if_diverged(self, packed: Sequence[float]) -> None:
        """Raise :class:`DivergenceError` if the host copy of :meth:`packed` says so."""
        healthy, step, what, value = packed
        if healthy == 0:
            where = f" at step {int(step)}" if step >= 0 else ""
            name = self._names[int(what)]
            raise DivergenceError(f"the {name} became {value}{where}")

    def check(self) -> None:
        """Read the flag (one host sync); raise :class:`DivergenceError` if it is set."""
        packed = self.packed()
        if packed is not None:
            self.raise_if_diverged(packed.tolist())


def run_step(
    call: Callable[..., Any],
    batches: Iterator[Tensor],
    d_optimizer: torch.optim.Optimizer,
    g_optimizer: torch.optim.Optimizer,
    *,
    n_dis: int,
    instance_noise: float | Tensor,
    backward: Callable[..., None],
    shared_forward: bool,
    guard: DivergenceGuard | None,
    step: int | None,
    own_generator_batch: bool = False,
) -> tuple[Tensor, list[str]]:
    """The work of one step, with no host sync when ``guard`` is given (else the host-side
    check before each optimizer step): returns ``[mean D loss, G/E loss, *parts, *accuracy]``
    as one float32 device tensor, and the names of the parts. ``call`` runs the objective
    (``gali(x, role=..., check_finite=...)``); the losses check their logits for NaN or inf
    on the host (``check_finite``) exactly when the step checks the losses there, without a
    ``guard``. :func:`train_step` and :class:`~gali_ext.capture.CapturedStep` share this
    function, so that the captured step computes what the eager one does."""

    def finite(value: Tensor, name: str) -> None:
        if guard is None:
            _raise_if_not_finite(value.detach(), name, step)
        else:
            guard.watch(value, name)

    def update(optimizer: torch.optim.Optimizer) -> None:
        if guard is None:
            optimizer.step()
        else:
            guard.step(optimizer)

    drawn = 0

    def next_batch() -> Tensor:
        nonlocal drawn
        try:
            batch = next(batches)
        except StopIteration:
            needed = f"n_dis={n_dis}" + (
                " + 1 (own_generator_batch)" if own_generator_batch else ""
            )
            raise ConfigError(
                f"train_step needs {needed} batches, the batches ran out after {drawn}"
            ) from None
        drawn += 1
        return batch

    def objective(x: Tensor, **kwargs: Any) -> Any:
        try:
            return call(x, check_finite=guard is None, **kwargs)
        except DivergenceError as error:  # non-finite logits, found by the losses
            if step is None:
                raise
            raise DivergenceError(f"{error}, at step {step}") from error

    d_values = []
    d_steps = n_dis - 1 if shared_forward else n_dis
    for i in range(d_steps):
        x = next_batch()
        d_optimizer.zero_grad(set_to_none=True)
        # The last D step keeps the chains' graph: the G/E step below reuses them (unless it
        # draws a batch of its own).
        reuse = not (shared_forward or own_generator_batch) and i == d_steps - 1
        d = objective(
            x, role="discriminator", instance_noise_std=instance_noise, differentiable_chains=reuse
        )
        finite(d.loss, "discriminator loss")
        backward(d.loss)
        update(d_optimizer)
        d_values.append(d.loss.detach())
    if shared_forward:
        x = next_batch()
        d, g = objective(x, role="shared", instance_noise_std=instance_noise)
        finite(d.loss, "discriminator loss")
        finite(g.loss, "generator-encoder loss")
        d_optimizer.zero_grad(set_to_none=True)
        g_optimizer.zero_grad(set_to_none=True)
        # Both backward passes before either step: an optimizer step changes D's weights in
        # place, which the second pass still needs.
        backward(d.loss, inputs=_parameters(d_optimizer), retain_graph=True)
        backward(g.loss, inputs=_parameters(g_optimizer))
        update(d_optimizer)
        update(g_optimizer)
        d_values.append(d.loss.detach())
    else:
        chains = d.chains
        if own_generator_batch:  # its own forward: fresh prior, encoder and instance noise
            x, chains = next_batch(), None
        g_optimizer.zero_grad(set_to_none=True)
        g = objective(x, role="generator", instance_noise_std=instance_noise, chains=chains)
        finite(g.loss, "generator-encoder loss")
        backward(g.loss)
        update(g_optimizer)
    losses = torch.stack([torch.stack(d_values).mean(), g.loss.detach(), *g.parts.values()])
    accuracy = tuple_class_accuracy(d.logits.detach())
    return torch.cat([losses.float(), accuracy.float()]), list(g.parts)


def unpack_metrics(values: Sequence[float], parts: list[str], seconds: float) -> StepMetrics:
    """The :class:`StepMetrics` of one step from the host copy of :func:`run_step`'s tensor:
    ``values`` is ``[mean D loss, G/E loss, *parts, *accuracy]``, ``parts`` the names of the
    parts (as :func:`run_step` returns them), ``seconds`` the step's wall time."""
    return StepMetrics(
        d_loss=values[0],
        g_loss=values[1],
        parts=dict(zip(parts, values[2 : 2 + len(parts)])),
        class_accuracy=list(values[2 + len(parts) :]),
        seconds=seconds,
    )


def train_step(
    gali: nn.Module,
    batches: Iterator[Any] | Sequence[Any],
    d_optimizer: torch.optim.Optimizer,
    g_optimizer: torch.optim.Optimizer,
    *,
    n_dis: int = 1,
    instance_noise: float | Tensor = 0.0,
    accelerator: Any = None,
    step: int | None = None,
    shared_forward: bool = False,
    sync: bool = True,
    guard: DivergenceGuard | None = None,
    own_generator_batch: bool = False,
) -> StepMetrics | None:
    """One GALI step: ``n_dis`` D steps on fresh batches, then one G/E step on the last batch.

    The G/E step reuses the chains of the last D step (made with
    ``differentiable_chains=True``): the same prior sample and encoder noise, E and G run once
    for both steps, and the G/E step still sees the updated D. With
    ``own_generator_batch=True`` it draws a batch of its own instead (docs/design.md,
    section 4.4).

    Args:
        gali: a :class:`~gali_ext.GALI` (or it wrapped by ``accelerator.prepare``); called as
            ``gali(x, role="discriminator" | "generator" | "shared", instance_noise_std=...)``.
        batches: at least ``n_dis`` batches (``n_dis + 1`` with ``own_generator_batch``,
            :func:`batches_per_step`), each images ``x`` or a pair ``(x, y)`` with a per-sample
            condition ``y`` (a conditional head); an iterator is advanced that many times.
        d_optimizer: over the head's parameters; g_optimizer: over E's and G's.
        instance_noise: the std of the instance noise (:func:`~gali_ext.add_instance_noise`),
            a float or a 0-dim tensor on the device.
        accelerator: an ``accelerate.Accelerator``; its ``backward`` is used when given.
        step: the global step, named in the error if a loss becomes NaN or infinite.
        shared_forward: the last D step and the G/E step share one forward pass
            (:meth:`~gali_ext.GALI.shared_objectives`, the authors' GALI-4 script): both
            gradients are taken at the same parameters, then both optimizers step. It saves a
            head pass per step. Alternating (the default) lets the G/E step see the D that was
            just updated. One process only, and not with fp16 loss scaling
            (bf16 is fine): DDP reduces gradients once per backward, and the scaler's update
            after the D step would change the scale the G/E gradients were made with.
        own_generator_batch: the G/E step takes one more batch and runs its own forward on it
            (a fresh prior sample, encoder noise and instance noise), as the authors' ALI,
            ALICE and GALI-8 SVHN scripts do (with ``n_dis=5``: D alone on five batches, then
            E and G alone on a sixth). It costs an E and G pass without gradients per step.
            Not with ``shared_forward``.
        sync: read the step's metrics on the host (one sync, at the end) and return them;
            ``False`` returns None without waiting for the device, so that a loop syncs only at
            its logging steps. It needs ``guard``.
        guard: a :class:`DivergenceGuard` kept across steps; the NaN check of an unsynced step
            is then raised at the next synced one.

    Raises :class:`~gali_ext.errors.DivergenceError` on a NaN or infinite loss, and no optimizer
    applies it. When both optimizers can skip an update on the device
    (:meth:`DivergenceGuard.can_skip`: torch's fused optimizers, which
    :func:`build_optimizer` gives on CUDA) and no fp16 loss scaler is active, the check costs no
    host sync inside the step: the updates are skipped on the device and the error is raised
    when the step's metrics are read. Otherwise each loss is checked on the host before its
    optimizer steps (a sync each). ``StepMetrics.seconds`` is the wall time of the call,
    including the wait for the device.
    """
    if n_dis < 1:
        raise ConfigError(f"n_dis must be >= 1, got {n_dis}")
    if shared_forward and own_generator_batch:
        raise ConfigError(
            "shared_forward and own_generator_batch exclude each other: the G/E step either "
            "shares the last D step's forward or has a batch of its own"
        )
    if not isinstance(instance_noise, Tensor):  # a device tensor is not read on the host
        _check_noise(instance_noise, "an instance-noise std")
    if not sync and guard is None:
        raise ConfigError(
            "train_step(sync=False) needs a DivergenceGuard kept across steps (guard=...), so "
            "that a NaN loss of an unsynced step is reported at the next synced one"
        )
    scaler = getattr(accelerator, "scaler", None) if accelerator is not None else None
    if shared_forward and accelerator is not None:
        if accelerator.num_processes > 1:
            raise ConfigError("shared_forward runs on one process; use the alternating schedule")
        if scaler is not None:
            raise ConfigError("shared_forward does not work with fp16 loss scaling; use bf16")
    start = time.perf_counter()
    backward = accelerator.backward if accelerator is not None else Tensor.backward
    on_device = scaler is None and all(
        DivergenceGuard.can_skip(o) for o in (d_optimizer, g_optimizer)
    )
    if on_device:
        guard = guard if guard is not None else DivergenceGuard()
        guard.at_step(step)
    # With the guard on the device, the losses' own host-side check of the logits is off
    # (run_step's check_finite): the guard catches what it would, without a sync in the step.
    logged, parts = run_step(
        gali,
        iter(batches),
        d_optimizer,
        g_optimizer,
        n_dis=n_dis,
        instance_noise=instance_noise,
        backward=backward,
        shared_forward=shared_forward,
        guard=guard if on_device else None,
        step=step,
        own_generator_batch=own_generator_batch,
    )
    if not sync:
        return None
    # One host sync for everything logged and the device-side NaN flag.
    packed = guard.packed() if on_device else None
    read = logged.double() if packed is None else torch.cat([logged.double(), packed])
    values = read.cpu().tolist()
    if packed is not None:
        guard.raise_if_diverged(values[-4:])
        values = values[:-4]
    elif guard is not None:
        guard.check()  # a guard passed in from earlier device-checked steps
    return unpack_metrics(values, parts, time.perf_counter() - start)
