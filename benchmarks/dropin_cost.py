"""The worked examples switched to GALI: step time over the project's own step, D's accuracy,
and the feature passes of a batch-norm D(x), each measured in one run (ratios, not timings).

    python benchmarks/dropin_cost.py [--steps 200] [--timing-steps 30]

1. For each worked example (adapters/examples), the project's own training step and its GALI
   step (GALI-8; GALI-4 for the monolithic D, which takes two slots) run interleaved, one
   thread, and the ratio of their median times is printed.
2. D's per-class accuracy on the training batches (mean of the last fifth of ``--steps``
   digits steps, batch 16) after training each switched example.
3. The ALI-style example's batch-norm ``D(x)`` on GALI-8 with each feature pass: the same
   accuracy, and the step time relative to the fused pass (interleaved).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from gali_ext import tuple_class_accuracy
from gali_ext.adapters.examples import ali_style, bigbigan_style, monolithic_d
from gali_ext.adapters.examples.digits import digits_batches

EXAMPLES = {"bigbigan_style": "gali8", "ali_style": "gali8", "monolithic_d": "gali4"}


def own_step(module, parts, batch):
    """One step of the project's own loop (its losses, both backward, both optimizers)."""
    encoder, generator, d, opt_d, opt_eg = parts
    x, y = batch
    if module is bigbigan_style:
        d_loss, g_loss = module.bigbigan_losses(d, encoder, generator, x, y)
    elif module is ali_style:
        d_loss, g_loss = module.ali_losses(d, encoder, generator, x)
    else:
        d_loss, g_loss = module.bigan_losses(d, encoder, generator, x)
    _apply(d_loss, g_loss, d.parameters(), encoder, generator, opt_d, opt_eg)


def _apply(d_loss, g_loss, d_params, encoder, generator, opt_d, opt_eg) -> None:
    eg = [*encoder.parameters(), *generator.parameters()]
    opt_d.zero_grad()
    opt_eg.zero_grad()
    d_loss.backward(inputs=list(d_params), retain_graph=True)
    g_loss.backward(inputs=eg)
    opt_d.step()
    opt_eg.step()


def gali_step(gali, parts, batch, conditional: bool):
    """One GALI step the way the examples' loops take it (both losses from one forward)."""
    encoder, generator, d, opt_d, opt_eg = parts
    d_obj, g_obj = gali.shared_objectives(batch if conditional else batch[0])
    _apply(d_obj.loss, g_obj.loss, gali.head.parameters(), encoder, generator, opt_d, opt_eg)
    return d_obj


def build(module, preset, feature_pass=None, seed=0):
    torch.manual_seed(seed)
    if module is monolithic_d:
        encoder, generator, d = module.Encoder(), module.Generator(), module.BiGANDiscriminator()
        gali = module.gali_objective(preset, encoder, generator, d) if preset else None
    else:
        encoder, generator, d, gali, _, _ = module.build(preset, seed)
    if feature_pass is not None:
        gali.head.feature_pass = feature_pass
    params = gali.head.parameters() if gali is not None else d.parameters()
    opt_d = torch.optim.Adam(params, 1e-4, betas=(0.5, 0.999))
    opt_eg = torch.optim.Adam([*encoder.parameters(), *generator.parameters()], 1e-4)
    return gali, (encoder, generator, d, opt_d, opt_eg)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def accuracy(module, preset, steps, feature_pass=None) -> torch.Tensor:
    gali, parts = build(module, preset, feature_pass)
    tail = []
    for i, batch in enumerate(digits_batches(steps, 16, seed=0)):
        d_obj = gali_step(gali, parts, batch, module is bigbigan_style)
        if i >= steps - steps // 5:
            tail.append(tuple_class_accuracy(d_obj.logits))
    return torch.stack(tail).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--timing-steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    batches = digits_batches(args.timing_steps + 3, 16, seed=1)
    print("example          preset  GALI step / own step   D accuracy (per class)")
    for name, preset in EXAMPLES.items():
        module = {"bigbigan_style": bigbigan_style, "ali_style": ali_style}.get(name, monolithic_d)
        _, own = build(module, None)
        gali, parts = build(module, preset)
        own_times, gali_times = [], []
        for i, batch in enumerate(batches):
            t_own = timed(own_step, module, own, batch)
            t_gali = timed(gali_step, gali, parts, batch, module is bigbigan_style)
            if i >= 3:  # warm-up
                own_times.append(t_own)
                gali_times.append(t_gali)
        ratio = statistics.median(gali_times) / statistics.median(own_times)
        acc = accuracy(module, preset, args.steps)
        shown = " ".join(f"{a:.2f}" for a in acc.tolist())
        print(f"{name:<16} {preset:<7} {ratio:>6.2f}x               {acc.mean():.2f} ({shown})")
    print("\nALI-style batch-norm D(x) on GALI-8, by feature pass")
    print("pass        step time / fused   D accuracy (per class)")
    passes = ("fused", "per_chain", "per_node")
    built = {p: build(ali_style, "gali8", p) for p in passes}
    times: dict[str, list[float]] = {p: [] for p in passes}
    for i, batch in enumerate(batches):
        for p in passes:
            t = timed(gali_step, built[p][0], built[p][1], batch, False)
            if i >= 3:
                times[p].append(t)
    fused = statistics.median(times["fused"])
    for p in passes:
        acc = accuracy(ali_style, "gali8", args.steps, p)
        shown = " ".join(f"{a:.2f}" for a in acc.tolist())
        ratio = statistics.median(times[p]) / fused
        print(f"{p:<11} {ratio:>6.2f}x             {acc.mean():.2f} ({shown})")


if __name__ == "__main__":
    main()
