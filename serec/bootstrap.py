"""Paired bootstrap over files: confidence intervals for a strategy against a baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def mean_difference(
    strategy: np.ndarray,
    baseline: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Mean of strategy - baseline over files, with files resampled in pairs."""
    diff = np.asarray(strategy, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    boot = diff[_indices(diff.size, resamples, seed)].mean(axis=1)
    return Interval(float(diff.mean()), *_percentiles(boot, level))


def captured_share(
    strategy: np.ndarray,
    baseline: np.ndarray,
    oracle: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Share of the oracle's gain over the baseline that the strategy captures, resampling files.

    mean(strategy - baseline) / mean(oracle - baseline); a resample whose oracle gain is 0
    gives no ratio and is left out of the interval.
    """
    values = np.column_stack([strategy, baseline, oracle]).astype(np.float64)
    values = values[np.all(np.isfinite(values), axis=1)]
    if values.shape[0] == 0:
        return Interval(math.nan, math.nan, math.nan)
    gain, headroom = values[:, 0] - values[:, 1], values[:, 2] - values[:, 1]

    def ratio(g: np.ndarray, h: np.ndarray) -> np.ndarray:
        h_mean = h.mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(h_mean > 1e-12, g.mean(axis=-1) / h_mean, np.nan)

    idx = _indices(values.shape[0], resamples, seed)
    estimate = float(ratio(gain, headroom))
    return Interval(estimate, *_percentiles(ratio(gain[idx], headroom[idx]), level))
