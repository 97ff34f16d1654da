"""The step-cost benchmark runs in a tiny configuration (it is a script, not a timed test)."""

import json
import subprocess
import sys
from pathlib import Path

from gali_ext.bench import SPECS, run_benchmark


def test_benchmark_reports_ratios(tmp_path):
    lines = []
    result = run_benchmark("digits", "cpu", repeats=1, warmup=0, batch=4,
                           out=tmp_path / "bench.json", print_fn=lines.append,
                           profile=True)  # fmt: skip
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["step_ratio_vs_ali"].keys() == set(SPECS) - {"ali"}
    # GALI-8 runs E and G three times where ALI runs them once, and D on twice the images
    assert 2 < saved["flop_ratio_vs_ali"]["gali8"] < 4
    assert saved["profile"].keys() == {"ali", "gali8"} and "top ops of gali8" in lines[0]
    assert all(v > 0 for v in saved["fused_speedup"].values())
    assert saved["shared_step_seconds"].keys() == set(SPECS)
    assert all(v > 0 for v in saved["shared_speedup"].values())
    assert {h["K"] for h in saved["head"].values()} == {4, 8}
    assert saved["batch_size"] == 4 and saved["image_size"] == [1, 16, 16]
    assert "| gali8 |" in lines[0] and result["device"] == "cpu"


def test_script_entry_point_help():
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "step_cost.py"), "--help"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0 and "--preset" in run.stdout


def test_variants_are_timed_interleaved_one_call_per_round():
    import torch

    from gali_ext.bench import _median_times

    calls = []
    functions = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times, peaks = _median_times(functions, torch.device("cpu"), warmup=1, repeats=2)
    assert calls == ["a", "b", "c"] * 3 and times.keys() == {"a", "b", "c"} and peaks == {}


def test_compiled_variant_compiles_every_network(monkeypatch):
    import torch

    from gali_ext.bench import step_functions

    compiled = []

    def fake_compile(module):
        compiled.append(type(module).__name__)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    steps = step_functions("digits", 4, torch.device("cpu"), ("gali_pt",), compiled=True)
    steps["gali_pt"]()
    # E, G, and the head's image, latent and pretrained-feature networks and joint MLP
    assert sorted(compiled) == sorted(
        ["GaussianEncoder", "Generator", "ImageFeatures", "LatentFeatures", "SpectralMLP",
         "SpectralMLP"]
    )  # fmt: skip


def test_table_reports_bf16_and_memory_when_measured():
    from gali_ext.bench import format_table

    specs = {"ali": 0.1, "gali8": 0.2}
    result = {
        "device": "NVIDIA H100", "torch": "2", "batch_size": 100, "image_size": [3, 32, 32],
        "threads": 1, "step_seconds": specs, "step_ratio_vs_ali": {"gali8": 2.0},
        "step_flops": {"ali": 1e9, "gali8": 3e9}, "flop_ratio_vs_ali": {"gali8": 3.0},
        "shared_step_seconds": specs, "shared_ratio_vs_ali": {"gali8": 2.0},
        "shared_speedup": {"ali": 1.0, "gali8": 1.0}, "head": {}, "fused_speedup": {},
        "precision": {
            "fp32": {"step_seconds": specs, "peak_bytes": {"ali": 2**30, "gali8": 2**31}},
            "bf16": {"step_seconds": specs, "peak_bytes": {"ali": 2**29, "gali8": 2**30}},
        },
        "bf16_speedup": {"ali": 1.5, "gali8": 2.0},
    }  # fmt: skip
    table = format_table(result)
    assert "| gali8 | 2.00x | 2048 | 1024 |" in table and "| gali8 | 3.00 | 3.00 |" in table
