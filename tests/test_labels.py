"""Best-model labelling on hand-built score tables: ties, NaN, both All_Failed policies."""

from __future__ import annotations

import math

import pytest

from serec.labels import ALL_FAILED, LabelRule, label_files, label_one
from serec.schema import label_columns

MODELS = ["rnnoise", "webrtc", "speex"]


def rows(file: str, noisy: float | None, **model_scores: float | None) -> list[dict]:
    out = [{"file": file, "system": "noisy", "status": "ok" if noisy is not None else "error",
            "dnsmos_ovr": "" if noisy is None else noisy}]
    for model, score in model_scores.items():
        out.append({"file": file, "system": model, "status": "error" if score is None else "ok",
                    "dnsmos_ovr": "" if score is None else score})
    return out


def test_highest_score_wins_absolute() -> None:
    label, best, score = label_one({"rnnoise": 2.5, "webrtc": 3.1, "speex": 2.9}, MODELS, LabelRule())
    assert (label, best, score) == ("webrtc", "webrtc", 3.1)


def test_tie_goes_to_first_listed_model() -> None:
    label, best, _ = label_one({"rnnoise": 3.0, "webrtc": 3.0, "speex": 2.0}, MODELS, LabelRule())
    assert label == best == "rnnoise"
    label, best, _ = label_one({"rnnoise": 3.0, "webrtc": 3.0}, ["webrtc", "rnnoise"], LabelRule())
    assert label == "webrtc"


def test_nan_and_missing_scores_cannot_win() -> None:
    label, best, score = label_one({"rnnoise": math.nan, "webrtc": 2.4}, MODELS, LabelRule())
    assert (label, best, score) == ("webrtc", "webrtc", 2.4)
    label, best, score = label_one({"rnnoise": math.nan}, MODELS, LabelRule())
    assert label == ALL_FAILED and best == "" and math.isnan(score)


def test_absolute_threshold_is_inclusive() -> None:
    rule = LabelRule(threshold=2.0)
    assert label_one({"rnnoise": 2.0, "webrtc": 1.5}, MODELS, rule)[:2] == (ALL_FAILED, "rnnoise")
    assert label_one({"rnnoise": 2.01, "webrtc": 1.5}, MODELS, rule)[0] == "rnnoise"


def test_relative_policy_uses_gain_over_noisy() -> None:
    rule = LabelRule(policy="relative", min_gain=0.1)
    assert label_one({"rnnoise": 1.55, "webrtc": 1.5}, MODELS, rule, noisy_score=1.4)[0] == "rnnoise"
    assert label_one({"rnnoise": 3.05, "webrtc": 2.9}, MODELS, rule, noisy_score=3.0)[0] == ALL_FAILED
    with pytest.raises(ValueError, match="noisy"):
        label_one({"rnnoise": 3.0}, MODELS, rule, noisy_score=None)


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError, match="policy"):
        LabelRule(policy="median")  # type: ignore[arg-type]


def test_label_files_builds_contract_rows() -> None:
    table = (rows("b.wav", 1.2, rnnoise=2.5, webrtc=None, speex=2.7)
             + rows("a.wav", 1.0, rnnoise=1.9, webrtc=1.8, speex=1.7)
             + rows("bad.wav", None, rnnoise=None, webrtc=None, speex=None))
    labels = label_files(table, MODELS, LabelRule())
    assert [r["file"] for r in labels] == ["a.wav", "b.wav"]  # bad input gets no label
    a, b = labels
    assert a["label"] == ALL_FAILED and a["best_model"] == "rnnoise" and a["best_ovr"] == 1.9
    assert b["label"] == "speex" and math.isnan(b["webrtc_ovr"]) and b["rnnoise_ovr"] == 2.5
    assert list(a) == label_columns(MODELS)


def test_lower_is_better_metrics_label_the_lowest_and_fail_above_the_threshold(monkeypatch) -> None:
    from serec.quality import METRICS, MetricSpec

    monkeypatch.setitem(METRICS, "distortion", MetricSpec("distortion", False, 16000, "toy", "DIST",
                                                          higher_is_better=False))
    absolute = LabelRule("distortion", threshold=0.5)
    assert label_one({"rnnoise": 0.3, "webrtc": 0.1, "speex": 0.2}, MODELS, absolute)[:2] == ("webrtc",) * 2
    assert label_one({"rnnoise": 0.6, "webrtc": 0.5}, MODELS, absolute)[:2] == (ALL_FAILED, "webrtc")
    relative = LabelRule("distortion", "relative", min_gain=0.1)
    assert label_one({"rnnoise": 0.35}, MODELS, relative, noisy_score=0.5)[0] == "rnnoise"
    assert label_one({"rnnoise": 0.45}, MODELS, relative, noisy_score=0.5)[0] == ALL_FAILED
    with pytest.raises(ValueError, match="label metric"):
        LabelRule("loudness")
