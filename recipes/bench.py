"""Step-cost benchmark: ratios measured in one run (``gali-ext bench``, benchmarks/step_cost.py).

Reports median times (warm-up excluded) and the ratios

1. full training step (``n_dis`` D steps + 1 G/E step) of ``gali4``, ``gali8``, ``gali_mix``,
   ``gali_pt`` over ``ali``, on the same encoder, generator and discriminator networks, with
   the alternating schedule and with one shared forward (``train_step(shared_forward=True)``),
   beside the ratio of their floating-point operations (a count, the same on every machine);
2. the fused :class:`MultiClassJointDiscriminatorHead` forward+backward over the authors'
   per-class discriminator (whole D once per class, features recomputed), for K = 4 and 8,
   after asserting that both give the same loss;
3. on CUDA only: bf16 autocast over fp32 step time, and the memory a step of each allocates
   above the resident weights and optimizer state; and both again with images and
   convolution weights in channels-last (NHWC) memory format (recipe setting
   ``channels_last``), all over the NCHW fp32 step;
4. the README's loop (a D step, then the G/E step on its chains) over :func:`train_step`, for
   ``ali`` and ``gali8``.

All step variants are timed in one loop, one call of each per round, so that a machine whose
speed drifts during the run moves every median alike.

Ratios, not absolute times, are the result: the machines are shared and noisy.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gali_ext.gali import build_gali
from gali_ext.losses import DiscriminatorLoss
from gali_ext.presets import get_preset
from gali_ext.providers import PretrainedFeatures
from gali_ext.recipes.models import build_ali_models
from gali_ext.trainer import train_step

__all__ = ["PRESETS", "profile_tables", "run_benchmark", "step_flops", "step_functions"]

PRESETS = {"digits": {"arch": "digits", "batch": 64}, "svhn": {"arch": "svhn", "batch": 100}}
SPECS = ("ali", "gali4", "gali8", "gali_mix", "gali_pt")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(
    functions: dict[Any, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> tuple[dict[Any, float], dict[Any, int]]:
    """Median seconds of each function, and (CUDA) the most memory one call allocated above
    what was allocated before it (activations, gradients, workspace; not the resident weights
    and optimizer state).

    The calls are interleaved, one of each function per round, so that a machine that slows
    down or speeds up during the run moves every median alike and the ratios stay fair.
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    _sync(device)
    times: dict[Any, list[float]] = {name: [] for name in functions}
    peaks: dict[Any, int] = {}
    for _ in range(repeats):
        for name, fn in functions.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - resident
                peaks[name] = max(peaks.get(name, 0), peak)
    return {name: statistics.median(t) for name, t in times.items()}, peaks


class _FrozenFeatures(nn.Module):
    """A small frozen conv net standing in for a pretrained model M (no weights to download)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _build(preset: str, arch: str, device: torch.device, seed: int = 0):
    """E, G, head and GALI for one spec; the same seed gives the same E, G, Dx and Dz weights."""
    torch.manual_seed(seed)
    models = build_ali_models(arch)
    features = None
    if get_preset(preset).needs_features:
        features = PretrainedFeatures(_FrozenFeatures(models.image_shape[0]))
    gali = build_gali(preset, models, features)
    return models, gali.head, gali.to(device)


def step_functions(
    arch: str,
    batch: int,
    device: torch.device,
    specs: tuple[str, ...] = SPECS,
    *,
    n_dis: int = 1,
    autocast_dtype: torch.dtype | None = None,
    shared_forward: bool = False,
    compiled: bool = False,
    channels_last: bool = False,
    documented_loop: bool = False,
) -> dict[str, Callable[[], None]]:
    """One full training step per spec, each on its own networks and optimizers, ready to time.

    ``compiled``: E, G and each network of the head go through ``torch.compile`` first (the
    compilation happens in the first calls, the warm-up). ``channels_last``: the networks and
    the batch in channels-last memory format, as the recipe setting ``channels_last`` does.
    ``documented_loop``: the step is the README's loop (``discriminator_objective(x,
    differentiable_chains=True)``, then ``generator_objective(chains=d.chains)``) instead of
    :func:`train_step`.
    """
    steps = {}
    for name in specs:
        gali, d_opt, g_opt, x = _step_setup(name, arch, batch, device)
        if channels_last:
            gali.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if compiled:
            _compile_networks(gali)

        def step(gali=gali, x=x, d_opt=d_opt, g_opt=g_opt) -> None:
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                if documented_loop:
                    _documented_step(gali, x, d_opt, g_opt)
                else:
                    train_step(
                        gali,
                        [x] * n_dis,
                        d_opt,
                        g_opt,
                        n_dis=n_dis,
                        instance_noise=0.05,
                        shared_forward=shared_forward,
                    )

        steps[name] = step
    return steps


def _documented_step(gali: nn.Module, x: torch.Tensor, d_opt, g_opt) -> None:
    """The README's loop: one D step, then the G/E step on the D step's chains."""
    d = gali.discriminator_objective(x, instance_noise_std=0.05, differentiable_chains=True)
    d_opt.zero_grad()
    d.loss.backward()
    d_opt.step()
    g = gali.generator_objective(chains=d.chains, instance_noise_std=0.05)
    g_opt.zero_grad()
    g.loss.backward()
    g_opt.step()


def _compile_networks(gali: nn.Module) -> None:
    """Every network of a GALI objective replaced by its ``torch.compile`` version."""
    gali.encoder = torch.compile(gali.encoder)
    gali.generator = torch.compile(gali.generator)
    for kind in list(gali.head.feature_nets):
        gali.head.feature_nets[kind] = torch.compile(gali.head.feature_nets[kind])
    gali.head.joint = torch.compile(gali.head.joint)


def _step_setup(name: str, arch: str, batch: int, device: torch.device):
    """GALI for spec ``name``, its two optimizers and a batch of images in [-1, 1]."""
    models, head, gali = _build(name, arch, device)
    d_opt = torch.optim.Adam(head.parameters(), 1e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(
        [*models.encoder.parameters(), *models.generator.parameters()], 1e-4, betas=(0.5, 0.999)
    )
    x = torch.rand(batch, *models.image_shape, device=device) * 2 - 1
    return gali, d_opt, g_opt, x


def step_flops(
    arch: str, batch: int, device: torch.device, specs: Sequence[str] = SPECS
) -> dict[str, float]:
    """Floating-point operations of one alternating training step per spec (the matrix
    products and convolutions, forward and backward, counted by ``torch.utils.flop_counter``).

    A count, not a timing: the same on every machine, it is the floor a step's time ratio
    can approach when the step is compute-bound.
    """
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for name, step in step_functions(arch, batch, device, tuple(specs)).items():
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops[name] = float(counter.get_total_flops())
    return flops


def profile_tables(
    arch: str,
    batch: int,
    device: torch.device,
    repeats: int,
    specs: tuple[str, ...] = ("ali", "gali8"),
    rows: int = 12,
) -> dict[str, str]:
    """``torch.profiler`` tables of the top ops (by self time) over ``repeats`` alternating
    training steps of each spec, after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, step in step_functions(arch, batch, device, specs).items():
        step()
        with profile(activities=activities) as profiler:
            for _ in range(repeats):
                step()
            _sync(device)
        tables[name] = profiler.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


def head_times(arch: str, batch: int, device: torch.device, warmup: int, repeats: int):
    """Fused vs per-class head forward+backward for K = 4 and 8, with the losses asserted equal."""
    results = {}
    for name in ("gali4", "gali8"):
        models, head, gali = _build(name, arch, device)
        x = torch.rand(batch, *models.image_shape, device=device) * 2 - 1
        with torch.no_grad():
            variables = gali.chains(x).compute(head.spec.nodes)
        loss = DiscriminatorLoss()
        head.eval()  # no power iteration: both paths see the same normalised weights
        fused_loss, naive_loss = loss(head(variables)), loss(head.forward_per_class(variables))
        if not torch.allclose(fused_loss, naive_loss, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"fused {fused_loss.item()} != per-class {naive_loss.item()}")
        head.train()

        def fused(head=head, loss=loss, variables=variables) -> None:
            head.zero_grad(set_to_none=True)
            loss(head(variables)).backward()

        def naive(head=head, loss=loss, variables=variables) -> None:
            head.zero_grad(set_to_none=True)
            loss(head.forward_per_class(variables)).backward()

        times, _ = _median_times({"fused": fused, "per_class": naive}, device, warmup, repeats)
        results[name] = {
            "K": head.spec.num_classes,
            "fused_s": times["fused"],
            "per_class_s": times["per_class"],
            "loss": fused_loss.item(),
        }
    return results


def run_benchmark(
    preset: str = "digits",
    device: str | None = None,
    repeats: int = 10,
    warmup: int = 3,
    batch: int | None = None,
    out: str | Path | None = "bench.json",
    print_fn: Callable[[str], None] = print,
    profile: bool = False,
    torch_compile: bool = False,
    specs: Sequence[str] = SPECS,
) -> dict[str, Any]:
    """Run the benchmark, print a table and write ``out`` (JSON). Returns the results.

    ``specs``: registered presets to time (:mod:`gali_ext.presets`, a user's own included);
    ``ali`` is always timed too, as the reference of every ratio.

    ``profile`` adds the ``torch.profiler`` tables of the top ops of an ALI and a GALI-8 step;
    ``torch_compile`` times ALI and GALI-8 steps with compiled networks against eager ones.
    """
    specs = tuple(dict.fromkeys(["ali", *specs]))
    for name in specs:
        get_preset(name)  # an unknown name fails here, before anything is timed
    settings = PRESETS[preset]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or settings["batch"]
    arch = settings["arch"]
    image_shape = build_ali_models(arch).image_shape
    # Every variant of the step is timed in one interleaved loop (see _median_times).
    variants = {
        "alternating": step_functions(arch, batch, dev, specs),
        "shared": step_functions(arch, batch, dev, specs, shared_forward=True),
        "documented": step_functions(
            arch, batch, dev, tuple(s for s in ("ali", "gali8") if s in specs), documented_loop=True
        ),
    }
    compile_error = None
    if torch_compile:
        compiled = step_functions(arch, batch, dev, ("ali", "gali8"), compiled=True)
        try:
            for fn in compiled.values():
                fn()  # compiles here: a failure leaves the compiled variant out, not the run
        except Exception as error:  # what inductor raises varies with the torch version
            compile_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
            print_fn(f"torch.compile failed, its timings are left out: {compile_error}")
        else:
            variants["compiled"] = compiled
    if dev.type == "cuda":
        variants["bf16"] = step_functions(arch, batch, dev, specs, autocast_dtype=torch.bfloat16)
        variants["nhwc"] = step_functions(arch, batch, dev, specs, channels_last=True)
        variants["nhwc_bf16"] = step_functions(
            arch, batch, dev, specs, autocast_dtype=torch.bfloat16, channels_last=True
        )
    functions = {(v, spec): fn for v, steps in variants.items() for spec, fn in steps.items()}
    # a compiled step compiles in its first calls, and again for each grad mode
    step_warmup = max(warmup, 3) if torch_compile else warmup
    times, peaks = _median_times(functions, dev, step_warmup, repeats)
    del functions, variants
    timed = {v: {spec: t for (key, spec), t in times.items() if key == v} for v, _ in times}
    steps, shared = timed["alternating"], timed["shared"]
    heads = head_times(arch, batch, dev, warmup, repeats)
    flops = step_flops(arch, batch, dev, specs)
    result: dict[str, Any] = {
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "preset": preset,
        "batch_size": batch,
        "image_size": list(image_shape),
        "step_seconds": steps,
        "step_ratio_vs_ali": {k: v / steps["ali"] for k, v in steps.items() if k != "ali"},
        "step_flops": flops,
        "flop_ratio_vs_ali": {k: v / flops["ali"] for k, v in flops.items() if k != "ali"},
        "shared_step_seconds": shared,
        "shared_ratio_vs_ali": {k: v / shared["ali"] for k, v in shared.items() if k != "ali"},
        "shared_speedup": {k: steps[k] / shared[k] for k in specs},
        "documented_loop_ratio": {k: v / steps[k] for k, v in timed["documented"].items()},
        "head": heads,
        "fused_speedup": {k: v["per_class_s"] / v["fused_s"] for k, v in heads.items()},
    }
    if compile_error is not None:
        result["compile_error"] = compile_error
    elif torch_compile:
        result["compiled_step_seconds"] = timed["compiled"]
        result["compile_speedup"] = {k: steps[k] / v for k, v in timed["compiled"].items()}
    if dev.type == "cuda":
        result["precision"] = {
            label: {
                "step_seconds": timed[variant],
                "peak_bytes": {s: b for (v, s), b in peaks.items() if v == variant},
            }
            for label, variant in (
                ("fp32", "alternating"),
                ("bf16", "bf16"),
                ("fp32_channels_last", "nhwc"),
                ("bf16_channels_last", "nhwc_bf16"),
            )
        }
        result["bf16_speedup"] = {k: steps[k] / timed["bf16"][k] for k in specs}
        result["channels_last_speedup"] = {k: steps[k] / timed["nhwc"][k] for k in specs}
        result["channels_last_bf16_speedup"] = {k: steps[k] / timed["nhwc_bf16"][k] for k in specs}
    if profile:
        result["profile"] = profile_tables(arch, batch, dev, repeats)
    print_fn(format_table(result))
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict[str, Any]) -> str:
    """The benchmark's results as a Markdown table."""
    lines = [
        f"device: {result['device']}, torch {result['torch']}, batch {result['batch_size']}, "
        f"images {result['image_size']}, {result['threads']} threads",
        "",
        "| spec | GFLOP per step | FLOP ratio vs ali | alternating step (ms) | ratio vs ali "
        "| shared-forward step (ms) | ratio vs ali | shared speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seconds in result["step_seconds"].items():
        ratio = result["step_ratio_vs_ali"].get(name, 1.0)
        flop_ratio = result["flop_ratio_vs_ali"].get(name, 1.0)
        shared = result["shared_step_seconds"][name]
        shared_ratio = result["shared_ratio_vs_ali"].get(name, 1.0)
        lines.append(
            f"| {name} | {result['step_flops'][name] / 1e9:.2f} | {flop_ratio:.2f} "
            f"| {seconds * 1e3:.1f} | {ratio:.2f} | {shared * 1e3:.1f} "
            f"| {shared_ratio:.2f} | {result['shared_speedup'][name]:.2f}x |"
        )
    if "documented_loop_ratio" in result:
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in result["documented_loop_ratio"].items())
        lines += ["", f"documented loop / train_step step time: {ratios}"]
    lines += ["", "| head | K | fused (ms) | per-class (ms) | speed-up |", "|---|---|---|---|---|"]
    for name, h in result["head"].items():
        speedup = result["fused_speedup"][name]
        lines.append(
            f"| {name} | {h['K']} | {h['fused_s'] * 1e3:.1f} | {h['per_class_s'] * 1e3:.1f} "
            f"| {speedup:.2f}x |"
        )
    if "bf16_speedup" in result:
        # speed-ups over the NCHW fp32 step; channels-last columns in results that have them
        columns = [("bf16", "bf16_speedup")]
        if "channels_last_speedup" in result:
            columns += [
                ("channels-last fp32", "channels_last_speedup"),
                ("channels-last bf16", "channels_last_bf16_speedup"),
            ]
        lines += [
            "",
            "| spec | "
            + " | ".join(f"{c} speed-up" for c, _ in columns)
            + " | fp32 peak MiB | bf16 peak MiB |",
            "|---" * (len(columns) + 3) + "|",
        ]
        for name in result["bf16_speedup"]:
            fp32 = result["precision"]["fp32"]["peak_bytes"][name] / 2**20
            bf16 = result["precision"]["bf16"]["peak_bytes"][name] / 2**20
            speedups = " | ".join(f"{result[key][name]:.2f}x" for _, key in columns)
            lines.append(f"| {name} | {speedups} | {fp32:.0f} | {bf16:.0f} |")
    if "compile_speedup" in result:
        lines += ["", "| spec | torch.compile step (ms) | speed-up over eager |", "|---|---|---|"]
        for name, seconds in result["compiled_step_seconds"].items():
            speedup = result["compile_speedup"][name]
            lines.append(f"| {name} | {seconds * 1e3:.1f} | {speedup:.2f}x |")
    if "compile_error" in result:
        lines += ["", f"torch.compile failed: {result['compile_error']}"]
    for name, table in result.get("profile", {}).items():
        lines += ["", f"top ops of {name} steps (torch.profiler):", table]
    return "\n".join(lines)


# CUDA graphs: eager against captured steps, images/s and the GPU's busy fraction.

GRAPH_SPECS = ("ali", "gali8")
GRAPH_MODES = ("baseline", "eager", "eager-async", "captured")
"""How a step runs: ``baseline``, :func:`~gali_ext.trainer.train_step` with torch's default
(foreach) Adam, each loss checked on the host before its update (the step before CUDA graphs
and fused optimizers); ``eager``, :func:`~gali_ext.trainer.train_step` as the recipe loop calls
it, with :func:`~gali_ext.trainer.build_optimizer`'s fused Adam (its metrics read every step,
the NaN check on the device); ``eager-async``, the same step reading its metrics only at the
end of the timed loop (``train_step(sync=False)``); ``captured``, the
:class:`~gali_ext.capture.CapturedStep` replayed as a CUDA graph (CUDA only)."""


def _graph_step(
    name: str, arch: str, batch: int, device: torch.device, mode: str, precision: str
) -> tuple[Callable[[], None], Callable[[], float]]:
    """One training step of spec ``name`` in ``mode`` and ``precision`` (``fp32``/``bf16``),
    on a fixed random batch; and a function that reads the last D loss (a sync)."""
    from gali_ext.capture import CapturedStep
    from gali_ext.trainer import DivergenceGuard, build_optimizer

    models, head, gali = _build(name, arch, device)
    eg = [*models.encoder.parameters(), *models.generator.parameters()]
    captured = mode == "captured"
    if mode == "baseline":
        d_opt = torch.optim.Adam(head.parameters(), 1e-4, betas=(0.5, 0.999))
        g_opt = torch.optim.Adam(eg, 1e-4, betas=(0.5, 0.999))
    else:
        d_opt = build_optimizer("adam", head.parameters(), 1e-4, device=device, capturable=captured)
        g_opt = build_optimizer("adam", eg, 1e-4, device=device, capturable=captured)
    x = torch.rand(batch, *models.image_shape, device=device) * 2 - 1
    dtype = torch.bfloat16 if precision == "bf16" else None
    if captured:
        step = CapturedStep(gali, d_opt, g_opt, autocast_dtype=dtype, capture=True)

        def run() -> None:
            step([x], instance_noise=0.05, sync=False)

        return run, lambda: step.metrics().d_loss
    guard = DivergenceGuard()

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            train_step(
                gali,
                [x],
                d_opt,
                g_opt,
                instance_noise=0.05,
                sync=mode != "eager-async",
                guard=guard,
            )

    def read() -> float:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return train_step(gali, [x], d_opt, g_opt, instance_noise=0.05, guard=guard).d_loss

    return run, read


def _throughput(
    run: Callable[[], None], device: torch.device, seconds: float, min_steps: int, ahead: int = 3
) -> tuple[float, int]:
    """Steps per second of ``run`` over at least ``seconds`` of wall time and ``min_steps``
    steps, the device drained before and after. The host may run at most ``ahead`` steps ahead
    of the GPU (a captured step launches in microseconds: unbounded, the queue would hold
    seconds of work after the timed loop ends)."""
    _sync(device)
    pending: deque[Any] = deque()
    start, steps = time.perf_counter(), 0
    while steps < min_steps or time.perf_counter() - start < seconds:
        run()
        steps += 1
        if device.type == "cuda":
            pending.append(torch.cuda.Event())
            pending[-1].record()
            if len(pending) > ahead:
                pending.popleft().synchronize()
    _sync(device)
    return steps / (time.perf_counter() - start), steps


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` intervals: the time at least one of them
    runs (GPU activities that overlap count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _device_intervals(profiler: Any) -> list[tuple[float, float]]:
    """(start, end) in seconds of every GPU activity (kernels, copies, fills) the profiler saw."""
    from torch.autograd import DeviceType

    intervals = []
    for event in profiler.profiler.kineto_results.events():
        if event.device_type() != DeviceType.CUDA:
            continue
        if hasattr(event, "start_ns"):
            start, length = event.start_ns() * 1e-9, event.duration_ns() * 1e-9
        else:
            start, length = event.start_us() * 1e-6, event.duration_us() * 1e-6
        intervals.append((start, start + length))
    return intervals


def gpu_busy(run: Callable[[], None], device: torch.device, steps: int) -> dict[str, float]:
    """GPU time per step from ``torch.profiler`` (the union of its kernels', copies' and fills'
    intervals over ``steps`` steps, divided by ``steps``), the wall time per step under the
    profiler, and the number of GPU activities (kernels, copies, fills) seen per step: the
    captured step should show about as many as the eager one, or the profiler missed the
    kernels inside the graph.

    Only GPU activity is recorded (no CPU ops: fewer events, less overhead); if that shows
    none, the steps are profiled again with CPU activity too."""
    from torch.profiler import ProfilerActivity, profile

    run()
    _sync(device)
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        with profile(activities=activities) as profiler:
            start = time.perf_counter()
            for _ in range(steps):
                run()
            _sync(device)
            wall = time.perf_counter() - start
        intervals = _device_intervals(profiler)
        if intervals:
            break
    return {
        "gpu_seconds_per_step": busy_seconds(intervals) / steps,
        "profiled_seconds_per_step": wall / steps,
        "gpu_activities_per_step": len(intervals) / steps,
    }


def graph_benchmark(
    arch: str = "svhn",
    batches: tuple[int, ...] = (100,),
    device: str | None = None,
    specs: tuple[str, ...] = GRAPH_SPECS,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    modes: tuple[str, ...] = GRAPH_MODES,
    seconds: float = 1.0,
    min_steps: int = 5,
    warmup: int = 5,
    profile_steps: int = 3,
    out: str | Path | None = None,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Images/s of ALI and GALI-8 training steps, eager against captured in a CUDA graph, in
    fp32 and bf16, at each batch size, and the fraction of each step the GPU is busy.

    Every variant runs ``warmup`` steps (the captured one warms up, captures and replays in
    them), then as many steps as fill ``seconds`` (at least ``min_steps``): images/s is
    ``batch * steps / wall time``. On CUDA, ``profile_steps`` more steps run under
    ``torch.profiler``: the GPU-busy fraction is the GPU time per step (the union of the
    kernels' intervals) over the unprofiled wall time per step. Captured variants are skipped
    on the CPU, with a note; so is the profile. A variant that fails is reported, not fatal.
    Prints one Markdown row per variant as it is measured and the table at the end.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if dev.type != "cuda":
        if "captured" in modes:
            notes.append("captured: skipped (CUDA graphs need a CUDA device)")
        notes.append("GPU busy: not measured (no CUDA device)")
        print_fn("; ".join(notes))
    print_fn(_GRAPH_HEADER)
    for batch in batches:
        for name in specs:
            for precision in precisions:
                for mode in modes:
                    if mode == "captured" and dev.type != "cuda":
                        continue
                    row = {"spec": name, "batch": batch, "precision": precision, "mode": mode}
                    try:
                        run, read = _graph_step(name, arch, batch, dev, mode, precision)
                        for _ in range(warmup):
                            run()
                        rate, steps = _throughput(run, dev, seconds, min_steps)
                        row.update(images_per_s=rate * batch, step_ms=1e3 / rate, steps=steps)
                        if dev.type == "cuda" and profile_steps > 0:
                            busy = gpu_busy(run, dev, profile_steps)
                            row.update(busy)
                            if busy["gpu_activities_per_step"]:
                                row["gpu_busy"] = min(busy["gpu_seconds_per_step"] * rate, 1.0)
                        row["d_loss"] = read()
                    except (
                        Exception
                    ) as error:  # report and go on: one variant must not cost the run
                        row["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
                    finally:
                        run = read = None
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    print_fn(_graph_row(row))
                    result = _graph_result(dev, arch, rows, notes)
                    if out is not None:  # after every variant: a run cut short keeps its rows
                        Path(out).write_text(json.dumps(result, indent=2))
    result = _graph_result(dev, arch, rows, notes)
    print_fn("")
    print_fn(format_graph_table(result))
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def _graph_result(
    dev: torch.device, arch: str, rows: list[dict[str, Any]], notes: list[str]
) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "arch": arch,
        "rows": rows,
        "notes": notes,
        "speedups": _graph_speedups(rows),
    }


_GRAPH_HEADER = (
    "| spec | batch | precision | mode | images/s | ms/step | GPU ms/step | GPU busy "
    "| GPU activities/step | D loss |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _graph_row(row: dict[str, Any]) -> str:
    def cell(key: str, fmt: str, scale: float = 1.0) -> str:
        return format(row[key] * scale, fmt) if row.get(key) is not None else "-"

    head = f"| {row['spec']} | {row['batch']} | {row['precision']} | {row['mode']} | "
    if "error" in row:
        return head + f"failed: {row['error']} | | | | | |"
    return (
        head
        + " | ".join(
            [
                cell("images_per_s", ".0f"),
                cell("step_ms", ".2f"),
                cell("gpu_seconds_per_step", ".2f", 1e3),
                cell("gpu_busy", ".0%"),
                cell("gpu_activities_per_step", ".0f"),
                cell("d_loss", ".4f"),
            ]
        )
        + " |"
    )


def _graph_speedups(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Images/s ratios: per ``spec/batch/precision``, each mode over ``baseline`` and
    ``captured`` over ``eager``; per ``spec/batch/mode``, bf16 over fp32."""
    rate = {(r["spec"], r["batch"], r["precision"], r["mode"]): r.get("images_per_s") for r in rows}
    modes = {}
    precision = {}
    for (spec, batch, prec, mode), value in rate.items():
        if not value:
            continue
        pairs = [(mode, "baseline")] if mode != "baseline" else []
        pairs += [("captured", "eager")] if mode == "captured" else []
        for top, bottom in pairs:
            if rate.get((spec, batch, prec, bottom)):
                ratio = value / rate[(spec, batch, prec, bottom)]
                modes.setdefault(f"{spec}/{batch}/{prec}", {})[f"{top} / {bottom}"] = ratio
        fp32 = rate.get((spec, batch, "fp32", mode))
        if prec == "bf16" and fp32:
            precision.setdefault(f"{spec}/{batch}", {})[mode] = value / fp32
    return {"modes": modes, "bf16_over_fp32": precision}


def format_graph_table(result: dict[str, Any]) -> str:
    """:func:`graph_benchmark`'s results as Markdown: images/s per mode with the speed-ups,
    the GPU-busy fractions (CUDA), and bf16 over fp32."""
    rows = result["rows"]
    modes = [m for m in GRAPH_MODES if any(r["mode"] == m for r in rows)]
    keys = list(dict.fromkeys((r["spec"], r["batch"], r["precision"]) for r in rows))
    cells = {(r["spec"], r["batch"], r["precision"], r["mode"]): r for r in rows}

    def value(key: tuple, mode: str, field: str, fmt: str) -> str:
        row = cells.get((*key, mode), {})
        if "error" in row:
            return "failed"
        return format(row[field], fmt) if row.get(field) is not None else "-"

    ratios = result["speedups"]["modes"]
    ratio_names = list(dict.fromkeys(n for r in ratios.values() for n in r))
    lines = [f"device: {result['device']}, torch {result['torch']}, arch {result['arch']}", ""]
    header = ["spec", "batch", "precision"] + [f"{m} images/s" for m in modes] + ratio_names
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key in keys:
        ratio = ratios.get(f"{key[0]}/{key[1]}/{key[2]}", {})
        row = [str(k) for k in key] + [value(key, m, "images_per_s", ".0f") for m in modes]
        row += [f"{ratio[n]:.2f}x" if n in ratio else "-" for n in ratio_names]
        lines.append("| " + " | ".join(row) + " |")
    if any(r.get("gpu_busy") is not None for r in rows):
        header = ["spec", "batch", "precision"] + [f"{m} GPU busy" for m in modes]
        lines += [
            "",
            "GPU busy: GPU time per step (torch.profiler, union of kernel intervals) "
            "over the unprofiled step time; GPU ms / step ms in brackets",
            "",
        ]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for key in keys:
            row = [str(k) for k in key]
            for m in modes:
                r = cells.get((*key, m), {})
                busy = r.get("gpu_busy")
                row.append(
                    "-"
                    if busy is None
                    else f"{busy:.0%} ({r['gpu_seconds_per_step'] * 1e3:.1f} / {r['step_ms']:.1f})"
                )
            lines.append("| " + " | ".join(row) + " |")
    precision = result["speedups"]["bf16_over_fp32"]
    if precision:
        lines += [
            "",
            "| spec | batch | " + " | ".join(f"{m} bf16 / fp32" for m in modes) + " |",
            "|---|---" + "|---" * len(modes) + "|",
        ]
        for key, by_mode in precision.items():
            spec, batch = key.split("/")
            row = [f"{by_mode[m]:.2f}x" if m in by_mode else "-" for m in modes]
            lines.append(f"| {spec} | {batch} | " + " | ".join(row) + " |")
    errors = [r for r in rows if "error" in r]
    lines += [
        f"failed: {r['spec']} batch {r['batch']} {r['precision']} {r['mode']}: {r['error']}"
        for r in errors
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def graph_equality(
    arch: str = "svhn",
    batch: int = 100,
    device: str | None = None,
    specs: tuple[str, ...] = GRAPH_SPECS,
    steps: int = 6,
    n_dis: int = 1,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Losses of the captured step against :func:`~gali_ext.trainer.train_step` in fp32, same
    seed, ``steps`` steps with instance noise changing every step (the captured step's first
    three are its eager warm-up, the fourth its capture and first replay, the rest replays).

    Returns per spec the largest relative loss difference and absolute parameter difference
    and whether the losses are allclose at ``rtol``. On the CPU the captured step runs
    eagerly. cuDNN runs deterministically here.
    """
    import copy

    from gali_ext.capture import CapturedStep
    from gali_ext.trainer import build_optimizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    results = {}
    try:
        for name in specs:
            models, head, eager = _build(name, arch, dev)
            captured = copy.deepcopy(eager)
            torch.manual_seed(3)
            data = [
                [torch.rand(batch, *models.image_shape, device=dev) * 2 - 1 for _ in range(n_dis)]
                for _ in range(steps)
            ]
            noise = [0.1 * (1 - t / steps) for t in range(steps)]
            losses = {}
            for label, gali in (("eager", eager), ("captured", captured)):
                eg = [*gali.encoder.parameters(), *gali.generator.parameters()]
                opts = [
                    build_optimizer("adam", ps, 1e-4, device=dev, capturable=dev.type == "cuda")
                    for ps in (gali.head.parameters(), eg)
                ]
                torch.manual_seed(1)
                if label == "eager":
                    out = [
                        train_step(gali, x, *opts, n_dis=n_dis, instance_noise=s)
                        for x, s in zip(data, noise)
                    ]
                else:
                    step = CapturedStep(gali, *opts, n_dis=n_dis)
                    out = [step(x, instance_noise=s) for x, s in zip(data, noise)]
                losses[label] = [(m.d_loss, m.g_loss) for m in out]
            pairs = [
                (a, b)
                for ea, ca in zip(losses["eager"], losses["captured"])
                for a, b in zip(ea, ca)
            ]
            loss_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
            param_abs = max(
                (p - q).abs().max().item()
                for p, q in zip(eager.parameters(), captured.parameters())
            )
            results[name] = {
                "steps": steps,
                "max_loss_rel_diff": loss_rel,
                "max_param_abs_diff": param_abs,
                "allclose": loss_rel <= rtol,
                "eager_losses": losses["eager"],
                "captured_losses": losses["captured"],
            }
    finally:
        torch.backends.cudnn.deterministic = deterministic
    return results
