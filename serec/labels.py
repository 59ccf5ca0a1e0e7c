"""Best-model labelling: which model wins on each file, or All_Failed when none is good enough."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serec.quality import METRIC_NAMES, METRICS
from serec.schema import label_score_column

ALL_FAILED = "All_Failed"
NOISY_SYSTEM = "noisy"


@dataclass(frozen=True)
class LabelPolicy:
    """When a file's best model still counts as failed (the file is labelled All_Failed).

    `failed(best, noisy, rule)` gets the best model's score and the noisy input's (None when
    unscored), both multiplied by the metric's sign so that higher is always better;
    `describe(rule)` says the rule in words for tables.md.
    """

    name: str
    failed: Callable[[float, float | None, LabelRule], bool]
    describe: Callable[[LabelRule], str]
    needs_noisy_score: bool = False


def _worse(rule: LabelRule) -> str:
    return "<=" if rule.sign > 0 else ">="


# The policies by name (--all_failed_policy); docs/architecture.md says how to add one.
LABEL_POLICIES: dict[str, LabelPolicy] = {
    policy.name: policy
    for policy in (
        LabelPolicy(
            "absolute",  # the thesis rule
            failed=lambda best, noisy, rule: best <= rule.sign * rule.threshold,
            describe=lambda rule: f"All_Failed when every model's {rule.metric} "
            f"{_worse(rule)} {rule.threshold:g}",
        ),
        LabelPolicy(
            "relative",
            failed=lambda best, noisy, rule: best - noisy < rule.min_gain,
            describe=lambda rule: f"All_Failed when no model beats the noisy input's "
            f"{rule.metric} by at least {rule.min_gain:g}",
            needs_noisy_score=True,
        ),
    )
}


@dataclass(frozen=True)
class LabelRule:
    """How a file's scores become a label: the metric, the All_Failed policy and its settings.

    absolute (the thesis rule): All_Failed when every model scores <= `threshold`.
    relative: All_Failed when no model beats the noisy input by at least `min_gain`.
    "Best", "beats" and "scores <=" follow the metric's `higher_is_better` (quality.METRICS):
    for a lower-is-better metric the best model has the lowest value, and fails when it is
    >= `threshold`. Ties go to the model listed first, so labels do not depend on dict or
    file order.
    """

    metric: str = "dnsmos_ovr"
    policy: str = "absolute"
    threshold: float = 2.0
    min_gain: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in LABEL_POLICIES:
            raise ValueError(f"unknown All_Failed policy {self.policy!r}: choose from "
                             f"{', '.join(LABEL_POLICIES)}")  # fmt: skip
        if self.metric not in METRICS:
            raise ValueError(f"unknown label metric {self.metric!r}: choose from {', '.join(METRIC_NAMES)}")

    @property
    def sign(self) -> int:
        """+1 when a higher value of the label metric is better, -1 when lower is."""
        return 1 if METRICS[self.metric].higher_is_better else -1

    def describe(self) -> str:
        """The rule in words, as tables.md prints it."""
        return LABEL_POLICIES[self.policy].describe(self)

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "policy": self.policy, "threshold": self.threshold,
                "min_gain": self.min_gain}


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
    sign = rule.sign
    for model in models:
        score = model_scores.get(model)
        if _finite(score) and (not _finite(best_score) or sign * score > sign * best_score):
            best_model, best_score = model, float(score)
    if not best_model:
        return ALL_FAILED, "", math.nan
    policy = LABEL_POLICIES[rule.policy]
    if policy.needs_noisy_score and not _finite(noisy_score):
        raise ValueError(f"the {policy.name} All_Failed policy needs the noisy input's score")
    noisy = sign * float(noisy_score) if _finite(noisy_score) else None
    failed = policy.failed(sign * best_score, noisy, rule)
    return (ALL_FAILED if failed else best_model), best_model, best_score


def label_files(
    scores: Iterable[Mapping[str, object]],
    models: Sequence[str],
    rule: LabelRule,
) -> list[dict[str, object]]:
    """Turn scores.csv rows into labels.csv rows.

    `scores` rows have `file`, `system`, `status` and the metric column. Files whose noisy
    input failed (status error) get no label: they are reported in scores.csv instead.
    Output columns: schema.label_columns (file, label, best_model, best_ovr, then
    `<MODEL>_ovr` per model: the label metric's value, named `_ovr` whatever the metric).
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
            row[label_score_column(model)] = math.nan if value is None else value
        labels.append(row)
    return labels


def _as_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
