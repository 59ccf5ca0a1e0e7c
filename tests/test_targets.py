"""The selector's targets in tables.md: each checked against its bar, and the limits' arithmetic."""

from __future__ import annotations

from serec.targets import best_single_row, limits_text, target_checks


def _row(gain: float, lo: float, hi: float, captured: float, compute: float, **extra: float) -> dict:
    return {"gain_over_best_single": gain, "gain_ci_low": lo, "gain_ci_high": hi,
            "oracle_gain_captured": captured, "compute_vs_best_single": compute, "files": 10,
            "recommender_seconds": 0.0, "dnsmos_seconds": 0.0, "total_seconds": 10.0, **extra}


def test_each_target_is_met_or_missed_by_its_own_bar() -> None:
    rows = {
        "always_a": _row(0, 0, 0, 0, 1),
        "predict_best_safe": _row(-0.05, -0.12, 0.0, -0.4, 2.0),  # not significantly below: met
        "predict_best": _row(0.05, 0.0, 0.1, 0.49, 2.0),  # just under half: missed
        "verify_top2": _row(0.09, 0.05, 0.12, 0.86, 2.5),
        "verify_fixed_top2": _row(0.09, 0.05, 0.12, 0.86, 3.0),  # equal share: not "more than"
    }
    assert [ok for _, _, ok in target_checks(rows, 2)] == [True, False, True, False, True]
    rows["predict_best_safe"]["gain_ci_high"] = -0.001
    assert target_checks(rows, 2)[0] == (
        "`predict_best_safe` never significantly below the best single model", "-0.050 [-0.120, -0.001]", False)
    assert target_checks({"always_a": rows["always_a"]}, 2) == []


def test_limits_compare_headroom_with_the_predictor_error_and_compute() -> None:
    rows = {
        "always_a": _row(0, 0, 0, 0, 1, total_seconds=20.0),
        "oracle": _row(0.1, 0.05, 0.15, 1, 1),
        "predict_best": _row(0, 0, 0, 0, 2, recommender_seconds=30.0),
        "verify_top2": _row(0, 0, 0, 0, 5, recommender_seconds=30.0, dnsmos_seconds=40.0),
    }
    assert best_single_row(rows) is rows["always_a"]
    text = limits_text(rows, [0.2, 0.4], 0.25, 2)
    assert "+0.100 above the best single model" in text and "0.300 per model (3.0x that headroom)" in text
    assert "25% of the checked training labels" in text
    # 3 s of recommender and 4 s of scoring per file against 2 s for the best single model
    assert "starts at 2.50x" in text and "adds 2.00 s per candidate" in text and "alone are 3.50x" in text
