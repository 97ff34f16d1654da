"""Paired statistics over seeds against hand-computed values (docs/design.md, section 6)."""

import math

import pytest

from gali_ext.errors import ConfigError
from gali_ext.recipes.stats import (
    CLAIMS,
    Claim,
    format_paired_table,
    paired_difference,
    paired_table,
)

# Student's t quantiles from tables: t_{0.975, 2} and t_{0.975, 4}
T_975_2 = 4.302653
T_975_4 = 2.776445


def test_mean_and_t_interval_of_three_differences():
    # differences 1, 2, 3: mean 2, sample std 1, half-width t_{0.975,2} / sqrt(3) = 2.4841
    result = paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], lower_is_better=False)
    assert result.mean == pytest.approx(2.0)
    assert result.half_width == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-6)
    assert (result.low, result.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), rel=1e-5)
    assert result.n == 3 and result.agree == 3
    assert not result.supported  # the interval [-0.48, 4.48] holds zero: every seed agrees, yet


def test_supported_only_when_the_interval_excludes_zero_on_the_claimed_side():
    # differences (a - b) -1.0, -1.2, -0.8, -1.0, -1.0: mean -1, sample std sqrt(0.02)
    a = [0.0, 0.0, 0.0, 0.0, 0.0]
    b = [1.0, 1.2, 0.8, 1.0, 1.0]
    half = T_975_4 * math.sqrt(0.08 / 4) / math.sqrt(5)
    lower = paired_difference(a, b, lower_is_better=True)
    assert lower.mean == pytest.approx(-1.0) and lower.half_width == pytest.approx(half, rel=1e-6)
    assert lower.supported and lower.agree == 5
    # the same numbers for a metric where higher is better: the claim goes the wrong way
    higher = paired_difference(a, b, lower_is_better=False)
    assert not higher.supported and higher.agree == 0
    assert higher.contradicted and higher.verdict == "contradicted"
    assert not lower.contradicted and lower.verdict == "supported"
    # differences 1, 2, 3: the interval [-0.48, 4.48] holds zero on both claims
    tie = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], lower_is_better=True)
    assert not tie.supported and not tie.contradicted and tie.verdict == "not supported"
    # a tie in one seed counts as not agreeing
    assert paired_difference([1.0, 2.0], [1.0, 1.0], lower_is_better=False).agree == 1


def test_one_seed_has_no_interval_and_supports_nothing():
    result = paired_difference([0.5], [0.1], lower_is_better=False)
    assert result.mean == pytest.approx(0.4) and result.agree == 1 and result.n == 1
    assert math.isnan(result.low) and math.isnan(result.high) and not result.supported


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="got 2 and 1"):
        paired_difference([1.0, 2.0], [1.0], lower_is_better=True)
    with pytest.raises(ConfigError, match="at least one seed"):
        paired_difference([], [], lower_is_better=True)
    with pytest.raises(ConfigError, match="confidence"):
        paired_difference([1.0, 2.0], [0.0, 0.0], lower_is_better=True, confidence=1.5)


def test_paired_table_pairs_runs_by_seed():
    claim = Claim("B beats A", "b", "a", ("pixel_mse", "class_agreement"))
    results = [
        {"recipe": "a", "seed": 0, "pixel_mse": 0.5, "class_agreement": 0.2},
        {"recipe": "a", "seed": 1, "pixel_mse": 0.7, "class_agreement": 0.3},
        {"recipe": "a", "seed": 2, "pixel_mse": 0.9},  # b has no seed 2: left out
        # listed in another order than a's: pairing goes by seed, not by position
        {"recipe": "b", "seed": 1, "pixel_mse": 0.4, "class_agreement": 0.6},
        {"recipe": "b", "seed": 0, "pixel_mse": 0.4, "class_agreement": 0.1},
        {"recipe": "(raw pixels)", "svm_error": 3.0},  # a reference row, no seed
    ]
    rows = paired_table(results, [claim, Claim("absent", "c", "a", ("pixel_mse",))])
    assert [(r["claim"], r["metric"]) for r in rows] == [
        ("B beats A", "pixel_mse"),
        ("B beats A", "class_agreement"),
    ]
    mse, agreement = rows
    # pixel MSE differences (0.4 - 0.5, 0.4 - 0.7) = (-0.1, -0.3): mean -0.2, both agree
    assert mse["seeds"] == [0, 1] and mse["mean"] == pytest.approx(-0.2) and mse["agree"] == 2
    # t_{0.975,1} = 12.706: half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert mse["half_width"] == pytest.approx(12.7062 * 0.1, rel=1e-4) and not mse["supported"]
    # class agreement differences (0.1 - 0.2, 0.6 - 0.3) = (-0.1, 0.3): one seed agrees
    assert agreement["mean"] == pytest.approx(0.1) and agreement["agree"] == 1
    assert not agreement["lower_is_better"] and mse["lower_is_better"]
    table = format_paired_table(rows)
    assert "| B beats A | pixel_mse | lower | -0.2 | [-1.47, 1.07] | 2/2 | not supported |" in table


def test_the_study_claims_name_the_paper_comparisons():
    pairs = {(c.better, c.baseline) for c in CLAIMS}
    assert pairs == {
        ("digits-gali4", "digits-ali"),
        ("digits-gali8", "digits-gali4"),
        ("digits-gali8", "digits-ali"),
        ("digits-gali8", "digits-alice"),
        ("digits-gali-mix", "digits-ali"),
        ("digits-gali-pt", "digits-gali4"),
        ("digits-gali-nda", "digits-ali"),
    }
    mix = next(c for c in CLAIMS if c.better == "digits-gali-mix")
    assert mix.metrics == ("inpaint_pixel_mse", "inpaint_feature_mse")
    one_seed = format_paired_table(
        paired_table(
            [
                {"recipe": "digits-gali-pt", "seed": 0, "feature_mse": 1.0},
                {"recipe": "digits-gali4", "seed": 0, "feature_mse": 2.0},
            ]
        )
    )
    assert "n/a (one seed) | 1/1 | not supported |" in one_seed
