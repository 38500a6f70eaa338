"""Accuracy tables and ratios of sums with 95 % bootstrap CIs, and the objective that chooses a steering configuration."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def round_significant(values, digits: int) -> np.ndarray:
    """`values` rounded to `digits` significant digits (zeros and non-finite values kept): what a draw or a ranking
    reads, so that floats that differ in their last bits between two CPUs give the same draw and the same order."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr) & (arr != 0)
    exponent = np.zeros_like(arr)
    exponent[finite] = np.floor(np.log10(np.abs(arr[finite])))
    scale = 10.0 ** (digits - 1 - exponent)
    return np.where(finite, np.round(arr * scale) / scale, arr)


def bootstrap_ci(values: Sequence[float], seed: int = 0, n_resamples: int = 2000) -> tuple[float, float, float]:
    """(mean, 95 % CI low, high) by scipy's percentile bootstrap; degenerate samples give a zero-width interval."""
    from scipy.stats import bootstrap

    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if np.all(arr == arr[0]):
        return float(arr[0]), float(arr[0]), float(arr[0])
    res = bootstrap((arr,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(arr.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_ci(numer: Sequence[float], denom: Sequence[float], seed: int = 0, n_resamples: int = 2000
             ) -> tuple[float, float, float]:
    """(Σ numer / Σ denom, 95 % CI low, high): a ratio of sums over units (e.g. texts) resampled in pairs by scipy's
    percentile bootstrap, so that tokens of one text, which are not independent, stay together."""
    from scipy.stats import bootstrap

    numer, denom = np.asarray(numer, dtype=float), np.asarray(denom, dtype=float)
    if numer.size == 0 or numer.shape != denom.shape:
        raise ValueError(f"ratio_ci: need two equal-length non-empty samples, got {numer.shape} and {denom.shape}")
    value = float(numer.sum() / denom.sum())
    if numer.size == 1:
        return value, value, value
    res = bootstrap((numer, denom), lambda a, b, axis: a.sum(axis) / b.sum(axis), paired=True, vectorized=True,
                    n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed))
    return value, float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_diff_ci(values: Sequence[float], baseline: Sequence[float], seed: int = 0, n_resamples: int = 2000
                   ) -> tuple[float, float, float]:
    """(mean of values − baseline, 95 % CI low, high) over paired units (e.g. two methods on the same passages): the
    per-unit differences are resampled, so each unit's two outcomes stay together and what the units share (an easy
    passage, a hard one) cancels."""
    values, baseline = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    if values.size == 0 or values.shape != baseline.shape:
        raise ValueError(f"paired_diff_ci: need two equal-length non-empty samples, got {values.shape} and "
                         f"{baseline.shape}")
    return bootstrap_ci(values - baseline, seed=seed, n_resamples=n_resamples)


def recovered_share_ci(values: Sequence[float], floor: Sequence[float], ceiling: Sequence[float], seed: int = 0,
                       n_resamples: int = 2000) -> tuple[float, float, float]:
    """(share of the ceiling's gain recovered, 95 % CI low, high): (mean(values) − mean(floor)) / (mean(ceiling) −
    mean(floor)) over paired units, the three outcomes of a unit resampled together (scipy's percentile bootstrap).

    NaN throughout where the ceiling does not beat the floor (the paired CI of ceiling − floor reaches 0): there is no
    gain to share. A resample in which the ceiling's gain vanishes counts as +∞ when the values gained in it (−∞ when
    they lost, 0 when neither), so such resamples widen the CI rather than being dropped.
    """
    from scipy.stats import bootstrap

    values, floor, ceiling = (np.asarray(a, dtype=float) for a in (values, floor, ceiling))
    if values.size == 0 or not values.shape == floor.shape == ceiling.shape:
        raise ValueError(f"recovered_share_ci: need three equal-length non-empty samples, got {values.shape}, "
                         f"{floor.shape} and {ceiling.shape}")
    if paired_diff_ci(ceiling, floor, seed, n_resamples)[1] <= 0:
        return np.nan, np.nan, np.nan
    share = float((values - floor).mean() / (ceiling - floor).mean())
    if np.all(values - floor == (values - floor)[0]) and np.all(ceiling - floor == (ceiling - floor)[0]):
        return share, share, share

    def statistic(v, f, c, axis):
        gained, gain = (v - f).mean(axis), (c - f).mean(axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            unbounded = np.where(gained == 0, 0.0, np.copysign(np.inf, gained))
            return np.where(gain > 0, gained / np.where(gain > 0, gain, 1), unbounded)

    with np.errstate(invalid="ignore"):  # the bootstrap's standard error of a distribution holding ±∞
        res = bootstrap((values, floor, ceiling), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                        confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
    return share, float(res.confidence_interval.low), float(res.confidence_interval.high)


def accuracy_table(judged: pd.DataFrame, keys: Sequence[str], seed: int = 0) -> pd.DataFrame:
    """One row per group of `keys`: n, strict and loose accuracy (degenerate responses count as failures) and the
    checkers' raw accuracy (`checker_*`, loops pass), each with a 95 % bootstrap CI, the degenerate rate, and fluency.

    `fluency` = exp(−mean token NLL) of the responses under the unsteered model (geometric-mean token probability:
    1 = predictable text, → 0 = gibberish). A loop is very predictable, so read it with `degenerate_rate` beside it.
    """
    rows = []
    for key, group in judged.groupby(list(keys), sort=False, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n"] = len(group)
        for name in ("strict", "loose", "checker_strict", "checker_loose"):
            mean, low, high = bootstrap_ci(group[name].astype(float), seed=seed)
            row |= {f"{name}_acc": mean, f"{name}_ci_low": low, f"{name}_ci_high": high}
        row["fluency"] = float(np.exp(-group["nll"].mean())) if "nll" in group else np.nan
        row["nll"] = float(group["nll"].mean()) if "nll" in group else np.nan
        row["repetition"] = float(group["repetition"].mean())
        row["degenerate_rate"], row["degenerate_ci_low"], row["degenerate_ci_high"] = bootstrap_ci(
            group["degenerate"].astype(float), seed=seed)
        rows.append(row)
    return pd.DataFrame(rows)


def selection_objective(table: pd.DataFrame) -> pd.Series:
    """What configurations are chosen by: strict + loose accuracy, degenerate responses counted as failures."""
    return table["strict_acc"] + table["loose_acc"]
