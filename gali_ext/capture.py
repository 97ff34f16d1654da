"""The training step replayed as a CUDA graph (docs/design.md, section 11).

At the paper's batch of 100 a GALI step launches a few thousand small kernels, and on a fast GPU
the host launching them, not the GPU running them, sets the pace. :class:`CapturedStep` records
one whole step (``n_dis`` discriminator steps, the generator-encoder step on the chains of the
last one, and both optimizers' updates) into a ``torch.cuda.CUDAGraph`` once, then replays it:
one launch per step. It uses plain ``torch.cuda.graphs``, not ``torch.compile``.

What a replay needs, and how the step provides it:

- static inputs: each step's batches are copied into buffers allocated on the first call;
- the instance-noise std is a 0-dim device tensor (:attr:`CapturedStep.instance_noise`) filled
  in place before each replay, not a Python float frozen into the graph;
- random numbers (prior samples, encoder noise, instance noise, masks) come from the default
  CUDA generator, which CUDA graphs advance on every replay; custom ``rng`` generators are
  refused;
- optimizers are built with ``capturable=True`` (their step counters live on the device);
- no host sync inside the step: the NaN guard is a device flag
  (:class:`~gali_ext.trainer.DivergenceGuard`) read at logging steps, and losses and
  accuracies are written to a static device tensor read only then.

On the CPU (``capture=False``) the same code runs eagerly, so that the tests can check that it
equals :func:`~gali_ext.trainer.train_step` and makes no host sync.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, ShapeError
from .trainer import (
    DivergenceGuard,
    StepMetrics,
    batches_per_step,
    run_step,
    unpack_metrics,
    unwrap_optimizer,
)

__all__ = ["CapturedStep", "tf32_mode"]


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Inside the block, float32 matrix products and convolutions may run in TF32 on tensor-core
    GPUs (``enabled=True``; the recipe setting ``tf32``); the previous settings come back after.

    TF32 keeps float32's range with a 10-bit mantissa (about 3 decimal digits). PyTorch's own
    defaults, which ``enabled=False`` leaves alone, run matrix products in full float32 and
    convolutions already in TF32 (``torch.backends.cudnn.allow_tf32``).
    """
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    if enabled:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


class CapturedStep:
    """One GALI training step, captured once into a CUDA graph and replayed every step after.

    The step is :func:`~gali_ext.trainer.train_step`'s alternating schedule (or its
    ``shared_forward`` one): ``n_dis`` D steps on fresh batches, then the G/E step on the chains
    of the last D step, then both optimizers' updates. The first ``warmup_steps`` calls run
    eagerly on a side stream (real training steps, which also create the optimizers' state);
    the next call captures the step and replays it; later calls only copy their batches into
    the static input buffers and replay.

    Args:
        gali: the :class:`~gali_ext.GALI` objective itself on one device (not a DDP module, and
            with accelerate: ``accelerator.unwrap_model(gali, keep_fp32_wrapper=False)``);
            mixed precision is ``autocast_dtype``'s.
        d_optimizer, g_optimizer: over the head's and over E's and G's parameters. To capture,
            every parameter group needs ``capturable=True``
            (``build_optimizer(..., capturable=True)``, which on CUDA is also ``fused``: then a
            diverged step's update is skipped on the device, see
            :class:`~gali_ext.trainer.DivergenceGuard`).
        n_dis: D steps per step; each call takes ``n_dis`` batches.
        shared_forward: the last D step and the G/E step from one forward pass.
        own_generator_batch: the G/E step on a batch of its own (one more per call), as
            :func:`~gali_ext.trainer.train_step`'s option of that name.
        autocast_dtype: ``torch.bfloat16`` to run the objective under bf16 autocast (with its
            cast cache off, as capture needs); None for float32. fp16 is refused: its loss
            scaling is not captured.
        capture: capture a CUDA graph (default: when the parameters are on CUDA). ``False``
            runs the same code eagerly, without host syncs: the CPU tests' path.
        warmup_steps: eager steps before the capture (at least 1).

    Call it as ``step(batches, instance_noise=std, step=t, sync=t % log_every == 0)``.

    Raises :class:`~gali_ext.errors.ConfigError` when the step cannot be captured (no CUDA, a
    multi-process or DDP-wrapped model, an optimizer without ``capturable``, a custom ``rng``
    generator on a provider, fp16).
    """

    def __init__(
        self,
        gali: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        g_optimizer: torch.optim.Optimizer,
        *,
        n_dis: int = 1,
        shared_forward: bool = False,
        own_generator_batch: bool = False,
        autocast_dtype: torch.dtype | None = None,
        capture: bool | None = None,
        warmup_steps: int = 3,
    ) -> None:
        parameter = next(iter(gali.parameters()), None)
        if parameter is None:
            raise ConfigError("the GALI objective has no parameters to train")
        self.device = parameter.device
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ConfigError(
                f"CUDA graphs need the model on a CUDA device, its parameters are on "
                f"{self.device}: turn cuda_graphs off (--set cuda_graphs=false)"
            )
        if n_dis < 1:
            raise ConfigError(f"n_dis must be >= 1, got {n_dis}")
        if shared_forward and own_generator_batch:
            raise ConfigError("shared_forward and own_generator_batch exclude each other")
        if warmup_steps < (1 if self.capture else 0):
            raise ConfigError(f"warmup_steps must be >= 1 before a capture, got {warmup_steps}")
        if isinstance(gali, nn.parallel.DistributedDataParallel) or (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            raise ConfigError(
                "CapturedStep runs on one process: gradients are not all-reduced inside the "
                "graph; train several processes without cuda_graphs"
            )
        if "_original_forward" in vars(gali):
            raise ConfigError(
                "pass the GALI objective itself, not accelerate's prepared model: "
                "accelerator.unwrap_model(gali, keep_fp32_wrapper=False); CapturedStep runs "
                "autocast itself (autocast_dtype)"
            )
        if autocast_dtype not in (None, torch.bfloat16):
            raise ConfigError(
                f"autocast_dtype must be torch.bfloat16 or None, got {autocast_dtype} (fp16 "
                "needs loss scaling, which is not captured: use bf16)"
            )
        if self.capture:
            for name, optimizer in (("d_optimizer", d_optimizer), ("g_optimizer", g_optimizer)):
                groups = unwrap_optimizer(optimizer).param_groups
                if not all(group.get("capturable", False) for group in groups):
                    raise ConfigError(
                        f"{name} ({type(unwrap_optimizer(optimizer)).__name__}) is not capturable: "
                        "build it with build_optimizer(..., capturable=True) or "
                        "torch.optim.Adam(..., capturable=True, fused=True)"
                    )
            for provider in getattr(gali, "providers", ()):
                if getattr(provider, "rng", None) is not None:
                    raise ConfigError(
                        f"{type(provider).__name__} draws from its own rng generator, which a "
                        "CUDA graph does not advance between replays: leave rng=None (the "
                        "default CUDA generator, seeded by torch.manual_seed)"
                    )
        self.gali = gali
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.n_dis = n_dis
        self.shared_forward = shared_forward
        self.own_generator_batch = own_generator_batch
        #: the batches each call takes
        self.batches_per_step = batches_per_step(n_dis, own_generator_batch)
        self.autocast_dtype = autocast_dtype
        self.warmup_steps = warmup_steps
        #: the instance-noise std, a 0-dim device tensor filled in place before every step
        self.instance_noise = torch.zeros((), device=self.device)
        #: the device-side NaN guard, read at synced calls
        self.guard = DivergenceGuard()
        self.calls = 0
        self._noise: bool | None = None  # whether the step draws instance noise
        self._inputs: list[Tensor] | None = None
        self._logged: Tensor | None = None
        self._parts: list[str] = []
        self._graph: Any = None
        self._side_stream: Any = None

    @property
    def captured(self) -> bool:
        """Whether the step has been captured (later calls replay it)."""
        return self._graph is not None

    def __call__(
        self,
        batches: Iterator[Tensor] | Sequence[Tensor],
        *,
        instance_noise: float = 0.0,
        step: int | None = None,
        sync: bool = True,
    ) -> StepMetrics | None:
        """Run one step on the next :attr:`batches_per_step` batches.

        ``instance_noise``: this step's std (a float; it is written into
        :attr:`instance_noise`). The step draws instance noise if the first call's std was
        positive; a later positive std after a first std of 0 is refused. ``step``: the global
        step, named if a loss diverges (default: the number of earlier calls). ``sync=True``
        waits for the device, checks the NaN flag (raising
        :class:`~gali_ext.errors.DivergenceError` for the first non-finite loss since the
        last check) and returns the step's :class:`~gali_ext.trainer.StepMetrics`;
        ``sync=False`` returns None at once.
        """
        start = time.perf_counter()
        iterator = iter(batches)
        xs = []
        for _ in range(self.batches_per_step):
            try:
                xs.append(next(iterator))
            except StopIteration:
                own = " + 1 (own_generator_batch)" if self.own_generator_batch else ""
                raise ConfigError(
                    f"the step takes n_dis={self.n_dis}{own} batches, got {len(xs)}"
                ) from None
        self._load(xs)
        self._set_noise(instance_noise)
        self.guard.at_step(step if step is not None else self.calls)
        if self._graph is not None:
            self._graph.replay()
        elif self.capture and self.calls >= self.warmup_steps:
            self._capture()
            self._graph.replay()
        elif self.capture:
            self._on_side_stream()
        else:
            self._step()
        self.calls += 1
        if not sync:
            return None
        return self.metrics(start)

    def metrics(self, start: float | None = None) -> StepMetrics:
        """The last step's metrics and the NaN flag, read in one host sync; raises
        :class:`~gali_ext.errors.DivergenceError` if a loss diverged since the last check.
        ``seconds`` is the time since ``start`` (a ``time.perf_counter()`` value), 0 without."""
        if self._logged is None:
            raise ConfigError("no step has run yet")
        packed = self.guard.packed()
        read = self._logged.double()
        if packed is not None:
            read = torch.cat([read, packed])
        values = read.cpu().tolist()
        if packed is not None:
            self.guard.raise_if_diverged(values[-4:])
            values = values[:-4]
        seconds = time.perf_counter() - start if start is not None else 0.0
        return unpack_metrics(values, self._parts, seconds)

    def _load(self, xs: list[Tensor]) -> None:
        """Copy the batches into the static input buffers (made from the first call's)."""
        if self._inputs is None:
            self._inputs = [torch.empty_like(x, device=self.device) for x in xs]
        for buffer, x in zip(self._inputs, xs):
            if not isinstance(x, Tensor) or x.shape != buffer.shape:
                got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ShapeError(
                    f"the captured step takes batches of shape {list(buffer.shape)} (those of its "
                    f"first call), got {got}: drop a last partial batch"
                )
            buffer.copy_(x, non_blocking=True)

    def _set_noise(self, std: float) -> None:
        std = float(std)
        if not (std >= 0 and math.isfinite(std)):
            raise ConfigError(f"instance_noise must be a finite float >= 0, got {std}")
        if self._noise is None:
            self._noise = std > 0
        elif std > 0 and not self._noise:
            raise ConfigError(
                "this step was built without instance noise (its first call had std 0): make a "
                "new CapturedStep to add noise"
            )
        self.instance_noise.fill_(std)

    def _call(self, x: Tensor, **kwargs: Any) -> Any:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
            cache_enabled=False,
        ):
            return self.gali(x, **kwargs)

    def _step(self) -> None:
        """The step's work, writing its metrics into the static output tensor."""
        assert self._inputs is not None
        # With the guard (on the device) watching the losses, the losses do not check their
        # logits on the host (run_step's check_finite).
        logged, parts = run_step(
            self._call,
            iter(self._inputs),
            self.d_optimizer,
            self.g_optimizer,
            n_dis=self.n_dis,
            instance_noise=self.instance_noise if self._noise else 0.0,
            backward=Tensor.backward,
            shared_forward=self.shared_forward,
            guard=self.guard,
            step=None,
            own_generator_batch=self.own_generator_batch,
        )
        if self._logged is None:
            self._logged = torch.empty_like(logged)
            self._parts = parts
        self._logged.copy_(logged)

    def _on_side_stream(self) -> None:
        """An eager warm-up step on a side stream, as capture requires."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), warnings.catch_warnings():
            # capturable optimizers warn when they step outside a capture, as here by design
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self) -> None:
        """Record one step into a CUDA graph (nothing runs until the replay)."""
        # Gradients made inside the capture live in the graph's memory pool.
        for optimizer in (self.d_optimizer, self.g_optimizer):
            optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as error:
            raise RuntimeError(
                f"capturing the training step in a CUDA graph failed ({error}); something in "
                "the step waits for the host (an .item(), a Python test on a tensor) or is not "
                "capturable: train with cuda_graphs=false"
            ) from error
        self._graph = graph
