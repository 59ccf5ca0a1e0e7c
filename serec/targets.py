"""The quality selector's targets, checked on an experiment's test split, and what limits them.

The targets are the project's bar for adaptive routing (README "The quality selector"):
`predict_best_safe` never significantly below the best single model, `predict_best`
capturing at least half of the oracle's gain, and `verify_top<k>` capturing at least 85 %,
more than `verify_fixed_top<k>`, at no more than 2.5x the best single model's compute.
tables.md states each with its measured figure and, from the same files, the numbers that
bound them: the oracle's headroom against the predictor's out-of-fold error, how often
the labels flip with the scoring level, and the recommender's own compute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SAFE_POLICY = "predict_best_safe"
PREDICT_POLICY = "predict_best"
PREDICT_CAPTURED = 0.50
VERIFY_CAPTURED = 0.85
VERIFY_COMPUTE = 2.5


def best_single_row(rows: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The always_<MODEL> row the strategies were compared against (gain 0, compute 1x)."""
    for name, row in rows.items():
        if name.startswith("always_") and row["gain_over_best_single"] == 0 and row["compute_vs_best_single"] == 1:
            return row
    return None


def target_checks(rows: Mapping[str, Mapping[str, Any]], verify_k: int) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target whose strategies are in `rows`."""
    safe, predicted = rows.get(SAFE_POLICY), rows.get(PREDICT_POLICY)
    verify, fixed = rows.get(f"verify_top{verify_k}"), rows.get(f"verify_fixed_top{verify_k}")
    checks = []
    if safe is not None:
        checks.append((f"`{SAFE_POLICY}` never significantly below the best single model",
                       f"{safe['gain_over_best_single']:+.3f} [{safe['gain_ci_low']:+.3f}, {safe['gain_ci_high']:+.3f}]",
                       safe["gain_ci_high"] >= 0))
    if predicted is not None:
        captured = predicted["oracle_gain_captured"]
        checks.append((f"`{PREDICT_POLICY}` captures >= {PREDICT_CAPTURED:.0%} of the oracle's gain",
                       f"{captured:.0%}", captured >= PREDICT_CAPTURED))
    if verify is not None:
        captured = verify["oracle_gain_captured"]
        checks.append((f"`verify_top{verify_k}` captures >= {VERIFY_CAPTURED:.0%}", f"{captured:.0%}",
                       captured >= VERIFY_CAPTURED))
        if fixed is not None:
            checks.append((f"`verify_top{verify_k}` captures more than `verify_fixed_top{verify_k}`",
                           f"{captured:.0%} vs {fixed['oracle_gain_captured']:.0%}",
                           captured > fixed["oracle_gain_captured"]))
        checks.append((f"`verify_top{verify_k}` at <= {VERIFY_COMPUTE:g}x the best single model's compute",
                       f"{verify['compute_vs_best_single']:.2f}x", verify["compute_vs_best_single"] <= VERIFY_COMPUTE))
    return checks


def limits_text(rows: Mapping[str, Mapping[str, Any]], oof_mae: list[float], label_changes: float | None,
                verify_k: int) -> str:
    """What bounds the targets, in numbers from the same run."""
    oracle, single = rows.get("oracle"), best_single_row(rows)
    parts = []
    if oracle is not None:
        headroom = oracle["gain_over_best_single"]
        text = f"the oracle is only {headroom:+.3f} above the best single model on these files"
        if oof_mae and headroom > 0:
            mae = sum(oof_mae) / len(oof_mae)
            text += (f", while the predictor's out-of-fold error on the training folds is {mae:.3f} per model "
                     f"({mae / headroom:.1f}x that headroom), so where models are close its ranking is mostly noise")
        parts.append(text)
    if label_changes is not None:
        parts.append(f"{label_changes:.0%} of the checked training labels change with the DNSMOS scoring level "
                     "alone (section \"Scoring level\"), a measure of how many files are near ties")
    predicted, verify = rows.get(PREDICT_POLICY), rows.get(f"verify_top{verify_k}")
    if single is not None and predicted is not None and single["total_seconds"] > 0:
        files = predicted["files"]
        recommender = predicted["recommender_seconds"] / files
        per_file = single["total_seconds"] / files
        text = (f"the recommender costs {recommender:.2f} s per file (its features are a DNSMOS pass) against "
                f"{per_file:.2f} s for the best single model, so a predicted policy starts at "
                f"{1 + recommender / per_file:.2f}x its compute")
        if verify is not None and verify["dnsmos_seconds"] > 0:
            scoring = verify["dnsmos_seconds"] / files
            text += f", and a verify policy adds {scoring / verify_k:.2f} s per candidate scored"
            floor = (recommender + scoring) / per_file
            if floor > VERIFY_COMPUTE:
                text += (f": prediction and scoring alone are {floor:.2f}x the best single model's compute, "
                         f"above the {VERIFY_COMPUTE:g}x target before any enhancer runs")
        parts.append(text)
    return "; ".join(parts)
