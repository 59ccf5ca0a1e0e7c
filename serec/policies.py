"""Routing policies on a predicted-gain table: which enhancer(s) to run on each file.

Every policy takes the quality predictor's predicted gain per (file, model) and returns
model indices, so the same code routes new recordings and scores strategies on a test
split. Settings that need choosing (the safe policy's margin) are chosen on the training
files' out-of-fold predictions, never on the files being evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Margins (in the label metric's units) tried for predict_best_safe on inner validation.
MARGIN_GRID: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, float("inf"))


def _check(predicted: np.ndarray) -> np.ndarray:
    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.ndim != 2 or predicted.shape[1] == 0:
        raise ValueError(f"predicted gains must be (files, models), got shape {predicted.shape}")
    return predicted


def predict_best(predicted: np.ndarray) -> np.ndarray:
    """The model with the highest predicted gain (ties to the model listed first)."""
    return np.argmax(_check(predicted), axis=1)


def predict_best_safe(predicted: np.ndarray, best_single: int, margin: float) -> np.ndarray:
    """The best single model unless another's predicted gain beats it by more than `margin`."""
    predicted = _check(predicted)
    top = np.argmax(predicted, axis=1)
    advantage = predicted[np.arange(len(top)), top] - predicted[:, best_single]
    return np.where(advantage > margin, top, best_single)


def cost_aware(predicted: np.ndarray, seconds_per_audio_s: Sequence[float], cost_lambda: float) -> np.ndarray:
    """Maximise predicted gain minus cost_lambda x the model's seconds per audio second."""
    predicted = _check(predicted)
    cost = np.asarray(seconds_per_audio_s, dtype=np.float64)
    if cost.shape != (predicted.shape[1],) or not np.all(np.isfinite(cost)):
        raise ValueError(f"need one finite cost per model ({predicted.shape[1]}), got {cost.tolist()}")
    return np.argmax(predicted - cost_lambda * cost[None, :], axis=1)


def top_k(predicted: np.ndarray, k: int) -> np.ndarray:
    """(files, k): the k models with the highest predicted gain, best first (stable ties)."""
    predicted = _check(predicted)
    if not 1 <= k <= predicted.shape[1]:
        raise ValueError(f"k must be between 1 and the number of models ({predicted.shape[1]}), got {k}")
    return np.argsort(-predicted, axis=1, kind="stable")[:, :k]


def verify(candidates: np.ndarray, verified_scores: np.ndarray) -> np.ndarray:
    """Of each file's candidate models, the one whose output scored best (DNSMOS at run time).

    `verified_scores` is (files, models); a candidate whose score is NaN (it failed) loses;
    when every candidate failed the first candidate is kept.
    """
    candidates = np.asarray(candidates)
    scores = np.take_along_axis(np.asarray(verified_scores, dtype=np.float64), candidates, axis=1)
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    return candidates[np.arange(len(candidates)), np.argmax(scores, axis=1)]


def rank_single_models(true_gains: np.ndarray) -> np.ndarray:
    """Model indices by mean true gain on training files, best first (failures count as 0 gain)."""
    means = np.nanmean(np.where(np.isfinite(true_gains), true_gains, 0.0), axis=0)
    return np.argsort(-means, kind="stable")


def choose_margin(
    oof_predicted: np.ndarray, true_gains: np.ndarray, best_single: int, grid: Sequence[float] = MARGIN_GRID
) -> float:
    """The margin whose safe routing has the highest mean true gain on the training files.

    `oof_predicted` are out-of-fold predictions (each file predicted by models that did not
    see it), so this is inner validation. Ties go to the larger margin: it deviates from
    the best single model less often for the same measured quality.
    """
    filled = np.where(np.isfinite(true_gains), true_gains, -np.inf)
    rows = np.arange(filled.shape[0])
    best_margin, best_value = grid[0], -np.inf
    for margin in grid:
        value = float(np.mean(filled[rows, predict_best_safe(oof_predicted, best_single, margin)]))
        if value >= best_value:
            best_margin, best_value = margin, value
    return float(best_margin)
