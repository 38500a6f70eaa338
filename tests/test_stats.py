"""Accuracy tables with bootstrap CIs and the selection objective."""
import numpy as np
import pandas as pd
import pytest

from saif_utils.stats import (
    accuracy_table,
    bootstrap_ci,
    paired_diff_ci,
    ratio_ci,
    recovered_share_ci,
    selection_objective,
)


def test_bootstrap_ci_brackets_the_mean():
    mean, low, high = bootstrap_ci([1, 0, 1, 1, 0, 1, 0, 1] * 5)
    assert low < mean < high and mean == pytest.approx(0.625)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_is_a_95_percent_interval():
    # 40 Bernoulli values with mean 0.625: the normal approximation's 95 % interval is ±1.96·se = ±0.150 wide; a 50 %
    # one would be ±0.052, a 99 % one ±0.197.
    values = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 5, dtype=float)
    half_width = 1.96 * values.std() / np.sqrt(len(values))
    mean, low, high = bootstrap_ci(values)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.12)
    assert low == pytest.approx(mean - half_width, abs=0.03) and high == pytest.approx(mean + half_width, abs=0.03)


def test_accuracy_table_reports_n_cis_and_fluency():
    judged = pd.DataFrame({"task": ["a"] * 40 + ["b"] * 4, "strict": [True] * 10 + [False] * 30 + [True] * 4,
                           "loose": [True] * 40 + [False] * 4, "nll": [1.0] * 44, "repetition": [0.0] * 44,
                           "degenerate": [False] * 44})
    judged = judged.assign(checker_strict=judged["strict"], checker_loose=judged["loose"])
    table = accuracy_table(judged, ["task"]).set_index("task")
    assert table.loc["a", "n"] == 40 and table.loc["a", "strict_acc"] == 0.25
    assert table.loc["a", "strict_ci_low"] < 0.25 < table.loc["a", "strict_ci_high"]
    assert table.loc["b", "strict_ci_low"] == table.loc["b", "strict_ci_high"] == 1.0  # degenerate sample
    assert table.loc["a", "fluency"] == pytest.approx(np.exp(-1.0))


def test_selection_objective_counts_degenerate_responses_as_failures():
    table = pd.DataFrame({"checker_strict_acc": [1.0, 0.4], "checker_loose_acc": [1.0, 0.6], "strict_acc": [0.1, 0.4],
                          "loose_acc": [0.2, 0.6]})
    assert selection_objective(table).tolist() == pytest.approx([0.3, 1.0])


def test_ratio_ci_resamples_units_in_pairs():
    # Texts with very different lengths: the ratio of sums weights by length (≠ the mean of per-text ratios, 0.5).
    numer, denom = [1.0, 9.0, 2.0, 8.0], [10.0, 10.0, 1.0, 1.0]
    value, low, high = ratio_ci(numer, denom)
    assert value == pytest.approx(20 / 22)
    assert low < value < high and 0 <= low and high <= 10
    # Resampled in pairs: when numer is always half of denom, every resample gives exactly 0.5.
    assert ratio_ci([1.0, 3.0, 5.0], [2.0, 6.0, 10.0]) == pytest.approx((0.5, 0.5, 0.5))
    assert ratio_ci([2.0], [4.0]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="equal-length non-empty"):
        ratio_ci([1.0, 2.0], [1.0])


def test_round_significant_keeps_digits_zeros_signs_and_nan():
    from saif_utils.stats import round_significant

    got = round_significant([123456.0, 0.00123456, 0.0, float("nan"), -2.5e-9, 1.0000004], 3)
    np.testing.assert_array_equal(got, [123000.0, 0.00123, 0.0, np.nan, -2.5e-9, 1.0])


def test_paired_diff_ci_keeps_each_units_two_outcomes_together():
    # Two methods on the same 90 passages that differ on 6 of them (b passes where a fails): the paired CI of a − b
    # lies below 0 and is narrow; resampling the two methods independently would give one ≈ ±0.15 wide around −0.07.
    a = np.array([1.0, 0.0] * 45)
    b = a.copy()
    b[1:13:2] = 1.0
    diff, low, high = paired_diff_ci(a, b)
    assert diff == pytest.approx(-6 / 90)
    assert high < 0 and high - low < 0.12
    assert paired_diff_ci(b, b) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="equal-length non-empty"):
        paired_diff_ci([1.0, 0.0], [1.0])


def test_recovered_share_ci_is_read_between_floor_and_ceiling():
    rng = np.random.default_rng(0)
    floor = (rng.random(90) < 0.1).astype(float)
    ceiling = np.maximum(floor, rng.random(90) < 0.6)
    # The method passes exactly where the ceiling does: every resample of the triples recovers the whole gain.
    assert recovered_share_ci(ceiling, floor, ceiling) == pytest.approx((1.0, 1.0, 1.0))
    assert recovered_share_ci(floor, floor, ceiling) == pytest.approx((0.0, 0.0, 0.0))
    half = np.where(np.arange(90) % 2 == 0, ceiling, floor)
    share, low, high = recovered_share_ci(half, floor, ceiling)
    assert share == pytest.approx((half - floor).sum() / (ceiling - floor).sum())
    assert 0 < low < share < high < 1
    # A ceiling that does not beat the floor (paired CI reaching 0) leaves the share undefined.
    weak = floor.copy()
    weak[np.flatnonzero(floor == 0)[:2]] = 1.0
    assert np.isnan(recovered_share_ci(half, floor, weak)).all()
    with pytest.raises(ValueError, match="equal-length non-empty"):
        recovered_share_ci([1.0], [0.0, 1.0], [1.0])

