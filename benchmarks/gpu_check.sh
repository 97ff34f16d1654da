#!/usr/bin/env bash
# GPU check of the captured training step (issue 18), in one run on one GPU:
#   (a) the captured step's losses equal the eager step's (fp32, same seed, CUDA);
#   (b) images/s of ALI and GALI-8 steps, eager vs captured, fp32 vs bf16, at batch 100 (with
#       the GPU-busy fraction from torch.profiler: part (c)) and batch 1000;
#   (d) the recipe loop's images/s (svhn-ali, svhn-gali8; batch 100 and 1000; fp32 and bf16;
#       eager and cuda_graphs) on stand-in SVHN;
#   (e) the README's user loop (discriminator_objective + generator_objective) against
#       train_step, GALI-8 at batch 100 (`gali-ext bench`'s documented-loop ratio).
# Then a Markdown summary. Each part runs in its own process under its own time limit, so a
# failure or a timeout loses only that part; everything is printed as it comes and written to
# $OUT (gpu_check.log, equality.json, graphs-small.json, graphs-big.json, throughput.json,
# step-cost.json, summary.md). About 5 minutes on an H100; it stops starting parts after
# GPU_CHECK_SECONDS (default 440).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # tiny sizes on the CPU: the plumbing only
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-440}))
WORK=$(mktemp -d)
DEVICE=cuda PRESET=svhn B1=100 B2=1000 STEPS=120,40 WARMUP=30,10 IMAGES=12000 TEST_IMAGES=2000
SECONDS_PER_VARIANT=1.0 REPEATS=20
if [[ ${GPU_CHECK_DRY_RUN:-0} == 1 ]]; then  # the digits nets on the CPU: plumbing only
  DEVICE=cpu PRESET=digits B1=4 B2=8 STEPS=3,3 WARMUP=1,1 IMAGES=64 TEST_IMAGES=16
  SECONDS_PER_VARIANT=0.01 REPEATS=2  # the CLI takes only positive seconds; min_steps bounds it
fi
export GPU_CHECK_DEVICE=$DEVICE GPU_CHECK_ARCH=$PRESET GPU_CHECK_B1=$B1

section() { echo; echo "=== $1 (t = $(($(date +%s) - START)) s)"; }

# run_part NAME LIMIT_S COMMAND...: never fails the script; the limit shrinks to what is left.
run_part() {
  local name=$1 limit=$2 left status
  shift 2
  left=$((DEADLINE - $(date +%s)))
  ((left < limit)) && limit=$left
  section "$name (limit ${limit} s)"
  if ((limit < 15)); then
    echo "[$name: skipped, no time left]"
    return 0
  fi
  if timeout -s INT -k 10 "$limit" "$@"; then
    echo "[$name: done]"
  else
    status=$?
    echo "[$name: FAILED or timed out, exit status $status]"
  fi
}

section "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
"$PY" - <<'PYEOF' || true
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("accelerate", "typer", "rich", "safetensors", "timm", "scipy", "sklearn", "PIL",
             "numpy", "torch_optimizer"):
    try:
        module = importlib.import_module(name)
        print(f"  have {name} {getattr(module, '__version__', '')}")
    except ImportError:
        print(f"  MISSING {name}" + (" (only needed for its own optimizers)"
                                    if name == "torch_optimizer" else ""))
PYEOF

section "install gali-ext (no dependencies, nothing downloaded)"
if "$PY" -c "import gali_ext, sys; sys.exit(not gali_ext.__file__.startswith('$PWD/'))" 2>/dev/null; then
  echo "gali_ext already imports from this checkout"
elif ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/pip.log" 2>&1; then
  tail -5 "$WORK/pip.log"
  echo "pip install failed: importing gali_ext from this checkout (PYTHONPATH) instead"
  # the installed layout: recipes/ and adapters/ as gali_ext.recipes and gali_ext.adapters
  ln -sfn "$PWD/recipes" gali_ext/recipes
  ln -sfn "$PWD/adapters" gali_ext/adapters
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import gali_ext, gali_ext.capture, gali_ext.recipes.graph_bench; print('gali_ext', gali_ext.__version__, gali_ext.__file__)"

run_part "(a) captured step == eager step, fp32, CUDA" 60 "$PY" - "$OUT/equality.json" <<'PYEOF'
import json, os, sys
from gali_ext.recipes.graph_bench import graph_equality
results = {}
device, batch = os.environ["GPU_CHECK_DEVICE"], int(os.environ["GPU_CHECK_B1"])
for label, kwargs in (("n_dis 1", {}), ("n_dis 2", {"specs": ("gali8",), "n_dis": 2})):
    result = graph_equality(os.environ["GPU_CHECK_ARCH"], batch=batch, device=device, steps=6,
                            **kwargs)
    for spec, r in result.items():
        results[f"{spec}, {label}"] = r
        print(f"{spec} {label}: allclose={r['allclose']} max loss rel diff "
              f"{r['max_loss_rel_diff']:.2e}, max param abs diff {r['max_param_abs_diff']:.2e}")
        print("  eager   ", [tuple(round(v, 5) for v in p) for p in r["eager_losses"]])
        print("  captured", [tuple(round(v, 5) for v in p) for p in r["captured_losses"]])
    json.dump(results, open(sys.argv[1], "w"), indent=2)
PYEOF

run_part "(b, c) step images/s and GPU busy, batch $B1" 130 \
  "$PY" -m gali_ext.cli bench --preset "$PRESET" --device "$DEVICE" --graphs --batches "$B1" \
  --seconds "$SECONDS_PER_VARIANT" --out "$OUT/graphs-small.json"

run_part "(d) recipe loop images/s, stand-in SVHN" 170 \
  "$PY" benchmarks/recipe_throughput.py --recipes svhn-ali,svhn-gali8 \
  --precisions no,bf16,no+graphs,bf16+graphs --batch "$B1,$B2" --steps "$STEPS" \
  --warmup "$WARMUP" --train-images "$IMAGES" --test-images "$TEST_IMAGES" --out "$WORK/recipes"
cp "$WORK/recipes/throughput.json" "$OUT/throughput.json" 2>/dev/null || true

run_part "(e) documented user loop vs train_step, batch $B1" 60 \
  "$PY" -m gali_ext.cli bench --preset "$PRESET" --device "$DEVICE" --specs gali8 --batch "$B1" \
  --repeats "$REPEATS" --out "$OUT/step-cost.json"

run_part "(b) step images/s, batch $B2" 90 \
  "$PY" -m gali_ext.cli bench --preset "$PRESET" --device "$DEVICE" --graphs --batches "$B2" \
  --modes baseline,eager,captured --seconds "$SECONDS_PER_VARIANT" --out "$OUT/graphs-big.json"

section "summary"
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
B1 = os.environ["GPU_CHECK_B1"]


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


import torch
print(f"## GPU check: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
      f"torch {torch.__version__}\n")
print("Command: `bash benchmarks/gpu_check.sh`\n")
equality = load("equality.json")
print(f"### (a) captured vs eager, fp32, batch {B1}, 6 steps, same seed\n")
if equality:
    print("| spec | losses allclose (rtol 1e-4) | max loss rel diff | max param abs diff |")
    print("|---|---|---|---|")
    for key, r in equality.items():
        print(f"| {key} | {r['allclose']} | {r['max_loss_rel_diff']:.2e} | "
              f"{r['max_param_abs_diff']:.2e} |")
else:
    print("(not measured: see the log)")
for name in ("graphs-small.json", "graphs-big.json"):
    result = load(name)
    sizes = sorted({r["batch"] for r in result["rows"]}) if result else "?"
    print(f"\n### (b, c) training step, batch {sizes} (`gali-ext bench --graphs`)\n")
    if result:
        from gali_ext.recipes.graph_bench import format_graph_table
        print(format_graph_table(result))
    else:
        print("(not measured: see the log)")
print("\n### (d) recipe loop, stand-in SVHN (`benchmarks/recipe_throughput.py`)\n")
loop = load("throughput.json")
rates = {}
if loop:
    variants = ["no", "bf16", "no+graphs", "bf16+graphs"]
    print("| recipe | batch | fp32 | bf16 | fp32 graphs | bf16 graphs | fp32 graphs / fp32 "
          "| bf16 graphs / fp32 graphs |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe, by_batch in loop["results"].items():
        for batch, measured in by_batch.items():
            r = {v: measured.get(v, {}).get("images_per_s") for v in variants}
            rates[(recipe, batch)] = r
            cell = lambda v: f"{r[v]:.0f}" if r[v] else "-"
            ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if r[a] and r[b] else "-"
            print(f"| {recipe} | {batch} | " + " | ".join(cell(v) for v in variants)
                  + f" | {ratio('no+graphs', 'no')} | {ratio('bf16+graphs', 'no+graphs')} |")
else:
    print("(not measured: see the log)")

print("\n### Targets\n")
gali8 = rates.get(("svhn-gali8", B1), {})
best = max((gali8.get(v) or 0) for v in ("no+graphs", "bf16+graphs"))
if best and gali8.get("no"):
    print(f"- svhn-gali8, batch {B1}, recipe loop: best captured {best:.0f} images/s = "
          f"{best / gali8['no']:.2f}x this run's eager fp32 ({gali8['no']:.0f}; fused Adam) and "
          f"{best / 1641:.2f}x the README's eager fp32 figure (1641, another H100 run); "
          f"target >= 3x: {'met' if best / 1641 >= 3 else 'NOT met'} against 1641")
steps = load("graphs-small.json")
if steps:
    for row in steps["rows"]:
        if row.get("gpu_busy") is not None and row["mode"] in ("baseline", "captured"):
            print(f"- GPU busy, {row['spec']} batch {B1} {row['precision']} {row['mode']}: "
                  f"{row['gpu_busy']:.0%}" + (" (target >= 80%)" if row["mode"] == "captured" else ""))
    for key, by_mode in steps["speedups"]["bf16_over_fp32"].items():
        if "captured" in by_mode:
            print(f"- bf16 / fp32 captured step, {key}: {by_mode['captured']:.2f}x (target >= 1.3x)")
cost = load("step-cost.json")
for spec, ratio in (cost or {}).get("documented_loop_ratio", {}).items():
    print(f"- documented user loop / train_step step time, {spec} batch {B1}: {ratio:.2f} "
          f"(target <= 1.10)")
for recipe in ("svhn-ali", "svhn-gali8"):
    r = rates.get((recipe, B1), {})
    if r.get("bf16+graphs") and r.get("no+graphs"):
        print(f"- bf16 / fp32 captured, recipe loop, {recipe} batch {B1}: "
              f"{r['bf16+graphs'] / r['no+graphs']:.2f}x (target >= 1.3x)")
PYEOF
echo
echo "gpu_check: $(($(date +%s) - START)) s in all; logs and JSON in $OUT"
