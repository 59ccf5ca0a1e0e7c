"""Best-model labelling: which model wins on each file, or All_Failed when none is good enough."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

ALL_FAILED = "All_Failed"
NOISY_SYSTEM = "noisy"
LABEL_COLUMNS_FIXED = ("file", "label", "best_model", "best_ovr")

AllFailedPolicy = Literal["absolute", "relative"]


@dataclass(frozen=True)
class LabelRule:
    """How a file's scores become a label.

    absolute (the thesis rule): All_Failed when every model scores <= `threshold`.
    relative: All_Failed when no model beats the noisy input by at least `min_gain`.
    Ties go to the model listed first, so labels do not depend on dict or file order.
    """

    metric: str = "dnsmos_ovr"
    policy: AllFailedPolicy = "absolute"
    threshold: float = 2.0
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in ("absolute", "relative"):
            raise ValueError(f"unknown All_Failed policy {self.policy!r}: use absolute or relative")


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def label_one(
    model_scores: Mapping[str, float | None],
    models: Sequence[str],
    rule: LabelRule,
    noisy_score: float | None = None,
) -> tuple[str, str, float]:
    """Return (label, best_model, best_score) for one file.

    Models whose score is missing or NaN (failed on this file) cannot win. When no model
    has a score the file is All_Failed with an empty best_model.
    """
    best_model, best_score = "", math.nan
    for model in models:
        score = model_scores.get(model)
        if _finite(score) and (not _finite(best_score) or score > best_score):
            best_model, best_score = model, float(score)
    if not best_model:
        return ALL_FAILED, "", math.nan
    if rule.policy == "absolute":
        failed = best_score <= rule.threshold
    else:
        if not _finite(noisy_score):
            raise ValueError("relative All_Failed policy needs the noisy input's score")
        failed = best_score - float(noisy_score) < rule.min_gain
    return (ALL_FAILED if failed else best_model), best_model, best_score


def label_files(
    scores: Iterable[Mapping[str, object]],
    models: Sequence[str],
    rule: LabelRule,
) -> list[dict[str, object]]:
    """Turn scores.csv rows into labels.csv rows.

    `scores` rows have `file`, `system`, `status` and the metric column. Files whose noisy
    input failed (status error) get no label: they are reported in scores.csv instead.
    Output columns: file, label, best_model, best_ovr, then `<MODEL>_ovr` per model (the
    label metric's value, named `_ovr` by the contract whatever the metric).
    """
    per_file: dict[str, dict[str, float | None]] = {}
    noisy_ok: dict[str, bool] = {}
    for row in scores:
        file, system = str(row["file"]), str(row["system"])
        value = _as_float(row.get(rule.metric)) if row.get("status") == "ok" else None
        per_file.setdefault(file, {})[system] = value
        if system == NOISY_SYSTEM:
            noisy_ok[file] = row.get("status") == "ok"
    labels = []
    for file in sorted(per_file):
        if not noisy_ok.get(file, False):
            continue
        systems = per_file[file]
        label, best_model, best_score = label_one(systems, models, rule, systems.get(NOISY_SYSTEM))
        row: dict[str, object] = {
            "file": file,
            "label": label,
            "best_model": best_model,
            "best_ovr": best_score,
        }
        for model in models:
            value = systems.get(model)
            row[f"{model}_ovr"] = math.nan if value is None else value
        labels.append(row)
    return labels


def label_columns(models: Sequence[str]) -> list[str]:
    return [*LABEL_COLUMNS_FIXED, *(f"{m}_ovr" for m in models)]


def _as_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
