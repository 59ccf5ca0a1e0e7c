"""The quality predictor, the routing policies and the paired bootstrap on hand-made data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from serec.bootstrap import captured_share, mean_difference
from serec.policies import (
    choose_margin,
    cost_aware,
    predict_best,
    predict_best_safe,
    rank_single_models,
    top_k,
    verify,
)
from serec.predictor import PredictorError, QualityPredictor, gain_table


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Model A gains at low SNR, model B at high SNR, C never best; plus two noise features."""
    rng = np.random.default_rng(seed)
    snr = rng.uniform(-5, 20, n)
    features = np.column_stack([snr, rng.standard_normal(n), rng.standard_normal(n)])
    gains = np.column_stack([
        0.8 - 0.03 * snr,              # A: large gain on noisy files
        0.1 + 0.02 * snr,              # B: better from about 10 dB up
        np.full(n, 0.05),              # C
    ]) + 0.02 * rng.standard_normal((n, 3))
    return features, gains


def test_predictor_recovers_planted_rule_and_reloads_weights_only(tmp_path) -> None:
    features, gains = _planted(300, seed=1)
    folds = [(np.arange(300) % 3 != k, np.arange(300) % 3 == k) for k in range(3)]
    predictor, oof = QualityPredictor.fit(
        features, gains, folds, ["A", "B", "C"], ["snr", "n1", "n2"], seed=0, num_rounds=150
    )
    assert np.all(np.isfinite(oof))
    test_x, test_gains = _planted(200, seed=2)
    mean, spread = predictor.predict(test_x)
    chosen = predict_best(mean)
    truth = np.argmax(test_gains, axis=1)
    assert (chosen == truth).mean() > 0.9
    assert np.all(spread >= 0) and spread.shape == mean.shape
    # A checkpoint is plain data: weights_only loading gives back the same predictions.
    buf = io.BytesIO()
    torch.save(predictor.to_metadata(), buf)
    buf.seek(0)
    restored = QualityPredictor.from_metadata(torch.load(buf, weights_only=True))
    np.testing.assert_allclose(restored.predict(test_x)[0], mean)


def test_predictor_is_deterministic_and_skips_failed_pairs() -> None:
    features, gains = _planted(120, seed=3)
    gains[::7, 1] = np.nan  # model B failed on some files
    folds = [(np.arange(120) % 2 != k, np.arange(120) % 2 == k) for k in range(2)]
    a, oof_a = QualityPredictor.fit(features, gains, folds, ["A", "B", "C"], ["s", "a", "b"], num_rounds=30)
    b, oof_b = QualityPredictor.fit(features, gains, folds, ["A", "B", "C"], ["s", "a", "b"], num_rounds=30)
    np.testing.assert_array_equal(oof_a, oof_b)
    assert a.boosters == b.boosters


def test_predictor_errors_are_clear() -> None:
    features, gains = _planted(60, seed=4)
    with pytest.raises(PredictorError, match="at least 2 folds"):
        QualityPredictor.fit(features, gains, [(np.ones(60, bool), np.zeros(60, bool))], ["A", "B", "C"], ["s", "a", "b"])
    with pytest.raises(PredictorError, match="3 feature columns but 2 names"):
        QualityPredictor.fit(features, gains, [], ["A", "B", "C"], ["s", "a"])
    with pytest.raises(PredictorError, match="kind"):
        QualityPredictor.from_metadata({"kind": "ast"})
    with pytest.raises(PredictorError, match="retrain"):
        QualityPredictor.from_metadata({"kind": "quality_predictor", "models": ["A"]})


def test_gain_table_subtracts_noisy_and_keeps_missing_as_nan() -> None:
    scores = {("f1", "noisy"): 2.0, ("f1", "A"): 2.5, ("f2", "noisy"): 1.0, ("f2", "B"): 3.0}
    table = gain_table(scores, ["f1", "f2"], ["A", "B"], "noisy")
    np.testing.assert_allclose(table, [[0.5, np.nan], [np.nan, 2.0]])


# A hand-made predicted-gain table: 4 files x 3 models (0 is the best single model).
PREDICTED = np.array([
    [0.30, 0.10, 0.00],
    [0.30, 0.36, 0.00],   # model 1 ahead by 0.06
    [0.10, 0.50, 0.45],   # model 1 ahead by 0.40
    [0.20, 0.20, 0.90],   # model 2 ahead by 0.70
])
SECONDS_PER_AUDIO_S = [0.30, 0.02, 0.60]


def test_routing_policies_on_a_hand_made_table() -> None:
    assert predict_best(PREDICTED).tolist() == [0, 1, 1, 2]
    assert predict_best_safe(PREDICTED, best_single=0, margin=0.1).tolist() == [0, 0, 1, 2]
    assert predict_best_safe(PREDICTED, best_single=0, margin=0.5).tolist() == [0, 0, 0, 2]
    assert predict_best_safe(PREDICTED, best_single=0, margin=float("inf")).tolist() == [0, 0, 0, 0]
    assert cost_aware(PREDICTED, SECONDS_PER_AUDIO_S, 0.0).tolist() == [0, 1, 1, 2]
    # At lambda 1 the cheap model 1 takes file 0 from model 0; model 2's big gain still pays on file 3.
    assert cost_aware(PREDICTED, SECONDS_PER_AUDIO_S, 1.0).tolist() == [1, 1, 1, 2]
    assert cost_aware(PREDICTED, SECONDS_PER_AUDIO_S, 10.0).tolist() == [1, 1, 1, 1]
    assert top_k(PREDICTED, 2).tolist() == [[0, 1], [1, 0], [1, 2], [2, 0]]
    with pytest.raises(ValueError, match="k must be"):
        top_k(PREDICTED, 4)
    with pytest.raises(ValueError, match="one finite cost per model"):
        cost_aware(PREDICTED, [0.1, 0.2], 1.0)


def test_verify_keeps_the_best_scored_candidate_and_survives_failures() -> None:
    candidates = np.array([[0, 1], [1, 0], [1, 2]])
    scores = np.array([[2.0, 3.0, 9.0], [np.nan, 2.5, 0.0], [1.0, np.nan, np.nan]])
    assert verify(candidates, scores).tolist() == [1, 1, 1]


def test_margin_is_chosen_on_training_predictions() -> None:
    true_gains = np.array([[0.3, 0.0, 0.0], [0.3, 0.2, 0.0], [0.1, 0.5, 0.4], [0.2, 0.1, 0.9]])
    # File 1's prediction is wrong by a small margin: only margins >= 0.06 avoid that mistake,
    # and margins >= 0.4 lose file 2's real gain; 0.1-0.3 score the same and ties go to the larger.
    assert choose_margin(PREDICTED, true_gains, best_single=0) == 0.3
    assert rank_single_models(true_gains).tolist() == [2, 0, 1]


def test_bootstrap_interval_covers_a_known_mean() -> None:
    rng = np.random.default_rng(0)
    baseline = rng.normal(3.0, 0.3, 400)
    strategy = baseline + rng.normal(0.1, 0.2, 400)
    interval = mean_difference(strategy, baseline, seed=1)
    assert interval.low < 0.1 < interval.high
    assert interval.excludes_zero()
    same = mean_difference(baseline, baseline + rng.normal(0, 0.2, 400), seed=1)
    assert same.low < 0 < same.high


def test_captured_share_is_the_ratio_of_gains() -> None:
    baseline = np.full(100, 2.0)
    oracle = baseline + 0.4
    strategy = baseline + 0.3
    share = captured_share(strategy, baseline, oracle, seed=0)
    assert share.estimate == pytest.approx(0.75)
    assert share.low == pytest.approx(0.75) and share.high == pytest.approx(0.75)
