"""Paired statistics over seeds for the study's claims (docs/design.md, section 6, eqs. 6.10-6.12).

Every recipe of a study trains on the same seeds, so two recipes are compared seed by seed:
for a claim "A is better than B on metric m" the per-seed differences ``d_s = m(A, s) - m(B, s)``
give a mean paired difference with a 95 % Student-t interval; the claim is *supported* only when
the whole interval lies on the claimed side of zero.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gali_ext.errors import ConfigError

__all__ = [
    "CLAIMS",
    "Claim",
    "LOWER_IS_BETTER",
    "PairedDifference",
    "format_paired_table",
    "paired_difference",
    "paired_table",
]

# Metrics where a smaller value is better; every other metric is better when larger.
LOWER_IS_BETTER = {
    "pixel_mse",
    "feature_mse",
    "svm_error",
    "svm_latent_error",
    "fid_inception",
    "fid_evaluator",
    "inpaint_pixel_mse",
    "inpaint_feature_mse",
}


@dataclass(frozen=True)
class PairedDifference:
    """The paired comparison of two recipes on one metric over n seeds (eqs. 6.10-6.12).

    ``mean`` is the mean paired difference ``d̄`` (A minus B), ``low``/``high`` the bounds of its
    ``confidence`` t-interval (NaN with fewer than two seeds), ``agree`` the number of seeds
    whose difference has the claimed sign (strictly), ``supported`` whether the interval
    excludes zero on the claimed side and ``contradicted`` whether it excludes zero on the other
    side (the baseline is the better one).
    """

    mean: float
    half_width: float
    low: float
    high: float
    n: int
    agree: int
    supported: bool
    confidence: float = 0.95
    contradicted: bool = False

    @property
    def verdict(self) -> str:
        """``supported``, ``contradicted`` or ``not supported`` (eq. 6.12)."""
        if self.supported:
            return "supported"
        return "contradicted" if self.contradicted else "not supported"


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    lower_is_better: bool,
    confidence: float = 0.95,
) -> PairedDifference:
    """Compare ``a`` (the recipe claimed better) with ``b``, seed by seed.

    With ``d_s = a_s - b_s`` over ``n`` seeds: ``d̄ = mean_s d_s`` (eq. 6.10), the sample standard
    deviation ``s_d`` (n - 1 in the denominator), and the interval
    ``d̄ ± t_{(1+c)/2, n-1} s_d / sqrt(n)`` (eq. 6.11) with Student's t quantile (scipy). The claim
    "a better than b" is supported when the interval's upper end is below zero
    (``lower_is_better``) or its lower end above zero, and contradicted when the interval lies
    wholly on the other side of zero (eq. 6.12).
    """
    from scipy.stats import t

    if len(a) != len(b):
        raise ConfigError(
            f"paired values need one value per seed on both sides, got {len(a)} and {len(b)}"
        )
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        raise ConfigError("paired_difference needs at least one seed")
    mean = statistics.fmean(d)
    sign = -1.0 if lower_is_better else 1.0
    agree = sum(1 for v in d if sign * v > 0)
    if n < 2:
        nan = float("nan")
        return PairedDifference(mean, nan, nan, nan, n, agree, False, confidence)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(d) / math.sqrt(n)
    low, high = mean - half, mean + half
    supported = high < 0 if lower_is_better else low > 0
    contradicted = low > 0 if lower_is_better else high < 0
    return PairedDifference(mean, half, low, high, n, agree, supported, confidence, contradicted)


@dataclass(frozen=True)
class Claim:
    """ "``better`` beats ``baseline``" on each of ``metrics`` (the paper's claim, on digits)."""

    title: str
    better: str
    baseline: str
    metrics: tuple[str, ...]


_INFERENCE = (
    "class_agreement",
    "pixel_mse",
    "feature_mse",
    "svm_error",
    "svm_latent_error",
    "fid_evaluator",
    "sample_confidence",
)

CLAIMS = [
    Claim("GALI-4 beats ALI", "digits-gali4", "digits-ali", _INFERENCE),
    Claim("GALI-8 beats GALI-4", "digits-gali8", "digits-gali4", _INFERENCE),
    Claim("GALI-8 beats ALI", "digits-gali8", "digits-ali", _INFERENCE),
    # ALICE's pixel penalty buys pixel MSE with blur; the paper: GALI-8 has the lower feature
    # MSE and FID (SVHN, Tables 1 and 3).
    Claim(
        "GALI-8 beats ALICE on features and samples",
        "digits-gali8",
        "digits-alice",
        ("feature_mse", "fid_evaluator", "class_agreement", "sample_confidence"),
    ),
    Claim(
        "GALI-mix beats ALI on inpainting",
        "digits-gali-mix",
        "digits-ali",
        ("inpaint_pixel_mse", "inpaint_feature_mse"),
    ),
    Claim(
        "GALI-PT beats GALI-4 on feature MSE", "digits-gali-pt", "digits-gali4", ("feature_mse",)
    ),
    # negative data augmentation (docs/design.md, section 2.4): does D's harder task of telling
    # real pairs from negatives give E and G better feedback than ALI's?
    Claim("GALI-NDA beats ALI", "digits-gali-nda", "digits-ali", _INFERENCE),
]


def paired_table(
    results: list[dict[str, Any]],
    claims: Sequence[Claim] = CLAIMS,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """One row per claim and metric present in both recipes' runs, paired by ``seed``.

    ``results`` are :func:`gali_ext.recipes.evaluate.evaluate_run` dicts (``recipe``, ``seed``
    and the metrics). Only seeds that both recipes ran, with the metric, are paired. Claims whose
    recipes are not both in ``results`` are left out.
    """
    by_recipe: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        if "seed" in r:
            by_recipe.setdefault(r["recipe"], {})[r["seed"]] = r
    rows = []
    for claim in claims:
        runs_a, runs_b = by_recipe.get(claim.better), by_recipe.get(claim.baseline)
        if not runs_a or not runs_b:
            continue
        for metric in claim.metrics:
            seeds = sorted(
                s
                for s in runs_a.keys() & runs_b.keys()
                if metric in runs_a[s] and metric in runs_b[s]
            )
            if not seeds:
                continue
            a = [runs_a[s][metric] for s in seeds]
            b = [runs_b[s][metric] for s in seeds]
            stats = paired_difference(a, b, metric in LOWER_IS_BETTER, confidence)
            rows.append(
                {
                    "claim": claim.title,
                    "better": claim.better,
                    "baseline": claim.baseline,
                    "metric": metric,
                    "seeds": seeds,
                    "lower_is_better": metric in LOWER_IS_BETTER,
                    **asdict(stats),
                    "verdict": stats.verdict,
                }
            )
    return rows


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def format_paired_table(rows: list[dict[str, Any]]) -> str:
    """The paired table in Markdown of :func:`paired_table`'s rows: claim, metric, mean
    difference (A - B) with its interval, seeds agreeing with the claim out of n, and the
    verdict (:attr:`PairedDifference.verdict`)."""
    lines = [
        "| claim | metric | better is | mean difference (A - B) | 95 % interval | seeds agreeing "
        "| verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        interval = (
            f"[{_number(r['low'])}, {_number(r['high'])}]"
            if not math.isnan(r["low"])
            else "n/a (one seed)"
        )
        lines.append(
            f"| {r['claim']} | {r['metric']} | {'lower' if r['lower_is_better'] else 'higher'} "
            f"| {_number(r['mean'])} | {interval} | {r['agree']}/{r['n']} | {r['verdict']} |"
        )
    return "\n".join(lines)
