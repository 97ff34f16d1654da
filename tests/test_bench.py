"""The step-cost and CUDA-graph benchmarks run in a tiny configuration (they are scripts, not
timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gali_ext.recipes.bench import SPECS, run_benchmark


def test_benchmark_reports_ratios(tmp_path):
    lines = []
    result = run_benchmark(
        "digits",
        "cpu",
        repeats=1,
        warmup=0,
        batch=4,
        out=tmp_path / "bench.json",
        print_fn=lines.append,
        profile=True,
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["step_ratio_vs_ali"].keys() == set(SPECS) - {"ali"}
    # GALI-8 runs E and G three times where ALI runs them once, and D on twice the images
    assert 2 < saved["flop_ratio_vs_ali"]["gali8"] < 4
    assert saved["profile"].keys() == {"ali", "gali8"} and "top ops of gali8" in lines[0]
    assert all(v > 0 for v in saved["fused_speedup"].values())
    assert saved["shared_step_seconds"].keys() == set(SPECS)
    assert all(v > 0 for v in saved["shared_speedup"].values())
    assert saved["documented_loop_ratio"].keys() == {"ali", "gali8"}
    assert "documented loop / train_step" in lines[0]
    assert {h["K"] for h in saved["head"].values()} == {4, 8}
    assert saved["batch_size"] == 4 and saved["image_size"] == [1, 16, 16]
    assert "| gali8 |" in lines[0] and result["device"] == "cpu"


def test_script_entry_point_help():
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "step_cost.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "--preset" in run.stdout


def test_variants_are_timed_interleaved_one_call_per_round():
    import torch

    from gali_ext.recipes.bench import _median_times

    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times, peaks = _median_times(functions, torch.device("cpu"), warmup=1, repeats=2)
    assert calls == ["a", "b", "c"] * 3 and times.keys() == {"a", "b", "c"} and peaks == {}


def test_compiled_variant_compiles_every_network(monkeypatch):
    import torch

    from gali_ext.recipes.bench import step_functions

    compiled = []

    def fake_compile(module):
        compiled.append(type(module).__name__)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    steps = step_functions("digits", 4, torch.device("cpu"), ("gali_pt",), compiled=True)
    steps["gali_pt"]()
    # E, G, and the head's image, latent and pretrained-feature networks and joint MLP
    assert sorted(compiled) == sorted(
        [
            "GaussianEncoder",
            "Generator",
            "ImageFeatures",
            "LatentFeatures",
            "SpectralMLP",
            "SpectralMLP",
        ]
    )


def test_a_failing_torch_compile_is_reported_not_fatal(tmp_path, monkeypatch):
    import torch
    from torch import nn

    class Broken(nn.Module):
        def forward(self, *args):
            raise AssertionError("expected size 256==256, stride 16==1 at dim=1\nmore")

    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    lines = []
    result = run_benchmark(
        "digits",
        "cpu",
        repeats=1,
        warmup=0,
        batch=2,
        out=None,
        print_fn=lines.append,
        torch_compile=True,
    )
    error = "AssertionError: expected size 256==256, stride 16==1 at dim=1"
    assert result["compile_error"] == error
    assert "compiled_step_seconds" not in result and result["step_seconds"].keys() == set(SPECS)
    assert lines[0].startswith("torch.compile failed") and "torch.compile failed: " in lines[-1]


def test_table_reports_bf16_and_memory_when_measured():
    from gali_ext.recipes.bench import format_table

    specs = {"ali": 0.1, "gali8": 0.2}
    result = {
        "device": "NVIDIA H100",
        "torch": "2",
        "batch_size": 100,
        "image_size": [3, 32, 32],
        "threads": 1,
        "step_seconds": specs,
        "step_ratio_vs_ali": {"gali8": 2.0},
        "step_flops": {"ali": 1e9, "gali8": 3e9},
        "flop_ratio_vs_ali": {"gali8": 3.0},
        "shared_step_seconds": specs,
        "shared_ratio_vs_ali": {"gali8": 2.0},
        "shared_speedup": {"ali": 1.0, "gali8": 1.0},
        "head": {},
        "fused_speedup": {},
        "precision": {
            "fp32": {"step_seconds": specs, "peak_bytes": {"ali": 2**30, "gali8": 2**31}},
            "bf16": {"step_seconds": specs, "peak_bytes": {"ali": 2**29, "gali8": 2**30}},
        },
        "bf16_speedup": {"ali": 1.5, "gali8": 2.0},
    }
    table = format_table(result)
    assert "| gali8 | 2.00x | 2048 | 1024 |" in table and "| gali8 | 3.00 | 3.00 |" in table
    result["channels_last_speedup"] = {"ali": 1.2, "gali8": 1.4}
    result["channels_last_bf16_speedup"] = {"ali": 1.3, "gali8": 1.9}
    table = format_table(result)
    assert "| spec | bf16 speed-up | channels-last fp32 speed-up | channels-last bf16" in table
    assert "| gali8 | 2.00x | 1.40x | 1.90x | 2048 | 1024 |" in table


def test_channels_last_step_variant_runs_on_nhwc_networks():
    import torch

    from gali_ext.recipes.bench import step_functions

    seen = []
    steps = step_functions("svhn", 2, torch.device("cpu"), ("ali",), channels_last=True)
    gali = steps["ali"].__defaults__[0]
    conv = gali.encoder.blocks[1][0]
    conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    steps["ali"]()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous()


def test_recipe_throughput_script_on_a_tiny_standin(tmp_path):
    import importlib.util

    from scipy.io import loadmat

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "recipe_throughput.py"
    spec = importlib.util.spec_from_file_location("recipe_throughput", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    summary = script.main(
        [
            "--recipes",
            "svhn-ali,svhn-gali8",
            "--precisions",
            "no,no+graphs",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--batch",
            "4",
            "--train-images",
            "16",
            "--test-images",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    mat = loadmat(tmp_path / "standin-svhn" / "train_32x32.mat")
    assert mat["X"].shape == (32, 32, 3, 16) and mat["X"].dtype == "uint8"
    assert 1 <= mat["y"].min() and mat["y"].max() <= 10
    for name in ("svhn-ali", "svhn-gali8"):
        measured = summary["results"][name]["4"]
        assert measured["no"]["images_per_s"] > 0 and measured["no"]["timed_steps"] == 2
        assert "no+graphs" not in measured  # CUDA graphs: skipped on the CPU, with a note
    assert summary["skipped"] == ["svhn-ali no+graphs", "svhn-gali8 no+graphs"]
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["results"].keys() == {"svhn-ali", "svhn-gali8"}


def test_recipe_throughput_variants_parse_to_settings():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "recipe_throughput.py"
    spec = importlib.util.spec_from_file_location("recipe_throughput", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_variant("bf16+nhwc+graphs") == (
        "bf16",
        {"channels_last": True, "cuda_graphs": True},
    )
    assert script.parse_variant("no+tf32") == ("no", {"tf32": True})
    assert script.label("no+graphs") == "fp32+graphs"
    with pytest.raises(SystemExit, match="bf16\\+fast"):
        script.parse_variant("bf16+fast")


def test_graph_benchmark_on_the_cpu_skips_the_captured_step(tmp_path):
    from gali_ext.recipes.graph_bench import graph_benchmark

    lines = []
    result = graph_benchmark(
        "digits",
        (2,),
        "cpu",
        specs=("ali",),
        precisions=("fp32",),
        seconds=0.0,
        min_steps=1,
        warmup=1,
        out=tmp_path / "g.json",
        print_fn=lines.append,
    )
    assert [r["mode"] for r in result["rows"]] == ["baseline", "eager", "eager-async"]
    assert all(r["images_per_s"] > 0 and r["d_loss"] > 0 for r in result["rows"])
    assert lines[0].startswith("captured: skipped (CUDA graphs need a CUDA device)")
    assert "eager / baseline" in result["speedups"]["modes"]["ali/2/fp32"]
    table = lines[-1]
    assert "| spec | batch | precision | baseline images/s | eager images/s" in table
    assert "GPU busy" not in table.split("note:")[0]
    assert json.loads((tmp_path / "g.json").read_text())["rows"][0]["spec"] == "ali"


def test_gpu_busy_time_is_the_union_of_activity_intervals():
    from gali_ext.recipes.graph_bench import busy_seconds

    # [0, 3] covered by two overlapping kernels, [5, 6] by one containing another
    assert busy_seconds([(1, 3), (0, 2), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    assert busy_seconds([]) == 0


def test_graph_table_reports_speedups_and_gpu_busy():
    from gali_ext.recipes.graph_bench import _graph_speedups, format_graph_table

    def row(mode, precision, rate, gpu_ms):
        return {
            "spec": "gali8",
            "batch": 100,
            "precision": precision,
            "mode": mode,
            "images_per_s": rate,
            "step_ms": 1e5 / rate,
            "gpu_busy": gpu_ms * rate / 1e5,
            "gpu_seconds_per_step": gpu_ms / 1e3,
        }

    rows = [
        row("baseline", "fp32", 1600, 16),
        row("eager", "fp32", 2000, 16),
        row("captured", "fp32", 5000, 16),
        row("captured", "bf16", 7000, 12),
    ]
    result = {
        "device": "NVIDIA H100",
        "torch": "2.11",
        "arch": "svhn",
        "rows": rows,
        "notes": [],
        "speedups": _graph_speedups(rows),
    }
    table = format_graph_table(result)
    assert result["speedups"]["modes"]["gali8/100/fp32"] == {
        "eager / baseline": 1.25,
        "captured / baseline": 3.125,
        "captured / eager": 2.5,
    }
    assert "| gali8 | 100 | fp32 | 1600 | 2000 | 5000 | 1.25x | 3.12x | 2.50x |" in table
    # GPU busy: 16 ms of GPU time in a 20 ms captured step
    busy = "| gali8 | 100 | fp32 | 26% (16.0 / 62.5) | 32% (16.0 / 50.0) | 80% (16.0 / 20.0) |"
    assert busy in table
    assert "| gali8 | 100 | - | - | 1.40x |" in table


def test_graph_equality_check_runs_on_the_cpu():
    from gali_ext.recipes.graph_bench import graph_equality

    result = graph_equality("digits", batch=3, device="cpu", specs=("ali",), steps=2)
    assert result["ali"]["allclose"] and result["ali"]["max_loss_rel_diff"] == 0.0
    assert result["ali"]["max_param_abs_diff"] == 0.0 and len(result["ali"]["eager_losses"]) == 2


def test_bench_graphs_refuses_bad_options():
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "gali_ext.cli", "bench", "--graphs", "--modes", "eager,fast"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert run.returncode == 2 and "error: --modes takes baseline, eager" in run.stderr


def test_device_intervals_read_only_gpu_activities():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from gali_ext.recipes.graph_bench import _device_intervals, busy_seconds

    def event(device, start_ns, duration_ns):
        return SimpleNamespace(
            device_type=lambda: device, start_ns=lambda: start_ns, duration_ns=lambda: duration_ns
        )

    events = [
        event(DeviceType.CPU, 0, 10**9),
        event(DeviceType.CUDA, 10**6, 2 * 10**6),
        event(DeviceType.CUDA, 2 * 10**6, 2 * 10**6),
    ]
    profiler = SimpleNamespace(
        profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events))
    )
    intervals = _device_intervals(profiler)
    assert intervals == [(1e-3, 3e-3), (2e-3, 4e-3)]  # the CPU event is left out
    assert busy_seconds(intervals) == pytest.approx(3e-3)


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """The prepared GPU script must not fail for a reason the CPU can show: device time is
    scarce, and a part that dies on a bad argument costs a lent GPU its measurement."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parts = [line for line in run.stdout.splitlines() if line.startswith("[(")]
    assert len(parts) == 5 and all(line.endswith(": done]") for line in parts), parts
    summary = (tmp_path / "summary.md").read_text()
    assert "(not measured" not in summary, summary
    for name in ("equality", "graphs-small", "graphs-big", "throughput", "step-cost"):
        assert json.loads((tmp_path / f"{name}.json").read_text())
    assert "- documented user loop / train_step step time, gali8 batch 4:" in summary
