"""CUDA-graph benchmark (``gali-ext bench --graphs``, benchmarks/gpu_check.sh): images/s of
ALI and GALI-8 training steps, eager against captured in a CUDA graph
(:class:`~gali_ext.capture.CapturedStep`), in fp32 and bf16, at each batch size, with the
fraction of each step the GPU is busy (from ``torch.profiler``); and :func:`graph_equality`,
the check that the captured step computes the losses and weights of
:func:`~gali_ext.trainer.train_step`.
"""

from __future__ import annotations

import copy
import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

from gali_ext.capture import CapturedStep
from gali_ext.recipes.bench_setup import benchmark_device, build_objective, synchronize
from gali_ext.recipes.files import write_text_atomic
from gali_ext.recipes.outputs import check_output_path
from gali_ext.trainer import DivergenceGuard, build_optimizer, train_step

__all__ = [
    "GRAPH_MODES",
    "GRAPH_SPECS",
    "busy_seconds",
    "format_graph_table",
    "gpu_busy",
    "graph_benchmark",
    "graph_equality",
]

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

    models, head, gali = build_objective(name, arch, device)
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
    synchronize(device)
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
    synchronize(device)
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
    synchronize(device)
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        with profile(activities=activities) as profiler:
            start = time.perf_counter()
            for _ in range(steps):
                run()
            synchronize(device)
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
    if out is not None:
        check_output_path(out, "--out", kind="file")  # before anything is measured
    dev = benchmark_device(device)
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
                        write_text_atomic(out, json.dumps(result, indent=2))
    result = _graph_result(dev, arch, rows, notes)
    print_fn("")
    print_fn(format_graph_table(result))
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2))
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

    dev = benchmark_device(device)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    results = {}
    try:
        for name in specs:
            models, head, eager = build_objective(name, arch, dev)
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
