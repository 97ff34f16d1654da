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
