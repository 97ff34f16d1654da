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

Ratios, not absolute times, are the result: the machines are shared and noisy. The CUDA-graph
benchmark (``gali-ext bench --graphs``) is :mod:`gali_ext.recipes.graph_bench`.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gali_ext.losses import DiscriminatorLoss
from gali_ext.presets import get_preset
from gali_ext.recipes.bench_setup import benchmark_device, build_objective, synchronize
from gali_ext.recipes.files import write_text_atomic
from gali_ext.recipes.models import build_ali_models
from gali_ext.recipes.outputs import check_output_path
from gali_ext.trainer import train_step

__all__ = ["PRESETS", "profile_tables", "run_benchmark", "step_flops", "step_functions"]

PRESETS = {"digits": {"arch": "digits", "batch": 64}, "svhn": {"arch": "svhn", "batch": 100}}
SPECS = ("ali", "gali4", "gali8", "gali_mix", "gali_pt")


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
    synchronize(device)
    times: dict[Any, list[float]] = {name: [] for name in functions}
    peaks: dict[Any, int] = {}
    for _ in range(repeats):
        for name, fn in functions.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - resident
                peaks[name] = max(peaks.get(name, 0), peak)
    return {name: statistics.median(t) for name, t in times.items()}, peaks


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
    models, head, gali = build_objective(name, arch, device)
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
            synchronize(device)
        tables[name] = profiler.key_averages().table(sort_by=sort, row_limit=rows)
    return tables


def head_times(arch: str, batch: int, device: torch.device, warmup: int, repeats: int):
    """Fused vs per-class head forward+backward for K = 4 and 8, with the losses asserted equal."""
    results = {}
    for name in ("gali4", "gali8"):
        models, head, gali = build_objective(name, arch, device)
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
    if out is not None:
        check_output_path(out, "--out", kind="file")  # before anything is timed
    dev = benchmark_device(device)
    specs = tuple(dict.fromkeys(["ali", *specs]))
    for name in specs:
        get_preset(name)  # an unknown name fails here, before anything is timed
    settings = PRESETS[preset]
    batch = batch or settings["batch"]
    arch = settings["arch"]
    image_shape = build_ali_models(arch).image_shape
    # Every variant of the step is timed in one interleaved loop (see _median_times).
    variants, compile_error = _step_variants(arch, batch, dev, specs, torch_compile, print_fn)
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
        result |= _precision_results(timed, peaks, specs)
    if profile:
        result["profile"] = profile_tables(arch, batch, dev, repeats)
    print_fn(format_table(result))
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2))
    return result


def _step_variants(
    arch: str,
    batch: int,
    dev: torch.device,
    specs: Sequence[str],
    torch_compile: bool,
    print_fn: Callable[[str], None],
) -> tuple[dict[str, dict[str, Callable[[], Any]]], str | None]:
    """The variants of the step to time, each ``{spec: step}``: alternating, shared forward,
    the documented user loop, compiled (``torch_compile``; left out with the error when
    compiling fails) and on CUDA bf16, channels-last and both."""
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
    return variants, compile_error


def _precision_results(
    timed: dict[str, dict[str, float]], peaks: dict[Any, int], specs: Sequence[str]
) -> dict[str, Any]:
    """On CUDA: step time and peak memory per precision and layout, and their speedups over
    the fp32 contiguous step."""
    steps = timed["alternating"]
    return {
        "precision": {
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
        },
        "bf16_speedup": {k: steps[k] / timed["bf16"][k] for k in specs},
        "channels_last_speedup": {k: steps[k] / timed["nhwc"][k] for k in specs},
        "channels_last_bf16_speedup": {k: steps[k] / timed["nhwc_bf16"][k] for k in specs},
    }


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
