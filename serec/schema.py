"""The CSV files the steps exchange: their names, their columns, and one reader per file.

The formats are the project's API (docs/architecture.md, "File contracts"): every writer
takes its columns from here and every reader checks a file's header against them, so a
column is added in one place. Metric columns come from `serec.quality.METRICS`, the one
metric list. Readers return rows as `{column: text}` dicts, exactly as written (empty
cells for NaN), and raise `SchemaError` (or fileio's `UnsafeFileId`) naming the file and what is wrong.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serec.fileio import check_file_ids, write_csv_atomic
from serec.quality import METRIC_NAMES

Row = dict[str, str]

# Step 2: enhancement_driver.py's output folder.
SCORES_CSV = "scores.csv"
LABELS_CSV = "labels.csv"
SCORE_COLUMNS = ("file", "system", "status", "error", *METRIC_NAMES, "seconds", "duration_s")
LABEL_FIXED_COLUMNS = ("file", "label", "best_model", "best_ovr")
# labels.csv's per-model columns are `<MODEL>_ovr`, and `best_ovr` the winner's value, whatever
# the label metric is (--label_metric; run.json and the README say which): the names are
# kept so every labels.csv reads the same way.
LABEL_SCORE_SUFFIX = "_ovr"

# Step 4: the recommender's output folder.
FOLDS_CSV = "folds.csv"
# fold: the fold that holds the file out (0: none); speaker_fold, noise_fold: the folds of its
# speaker and noise recording (a fold trains on files with neither there).
FOLD_COLUMNS = ("file", "fold", "speaker_fold", "noise_fold")

# Step 5: recommendation_driver.py's output folder.
RECOMMENDATIONS_CSV = "recommendations.csv"
RECOMMENDER_JSON = "recommender.json"
ROUTING_CSV = "routing.csv"
EVALUATION_CSV = "evaluation.csv"
SUMMARY_CSV = "summary.csv"
STRATEGIES_CSV = "strategies.csv"
ERRORS_CSV = "errors.csv"
ERROR_COLUMNS = ("file", "reason")
SINGLE_COLUMN = "single_recommendation"
ROUTING_COLUMNS = ("file", "recommendation", "routed_model", "status", "error", "seconds",
                   "duration_s")  # fmt: skip
EVALUATION_SIDES = ("noisy", "enhanced", "delta")
EVALUATION_COLUMNS = (
    "file", "group", "routed_model", "status", "error",
    *(f"{side}_{m}" for side in EVALUATION_SIDES for m in METRIC_NAMES),
    "duration_s", "inputs_sha1",
)  # fmt: skip
SUMMARY_COLUMNS = (
    "group", "metric", "n",
    *(f"{side}_{stat}" for side in EVALUATION_SIDES for stat in ("mean", "ci95_low", "ci95_high")),
)  # fmt: skip
# strategies.csv (step 5 and `python -m serec.selection evaluate`): DNSMOS OVR first, then
# the other metrics; the gain and its paired-bootstrap interval are in the label metric.
STRATEGY_COLUMNS = (
    "strategy", "description", "files", "dnsmos_ovr",
    *(m for m in METRIC_NAMES if m != "dnsmos_ovr"), "label_metric",
    "gain_over_best_single", "gain_ci_low", "gain_ci_high",
    "oracle_gain_captured", "captured_ci_low", "captured_ci_high", "regret",
    "enhancer_seconds", "recommender_seconds", "dnsmos_seconds", "total_seconds",
    "compute_vs_best_single", "pesq_best_agreement",
)  # fmt: skip


# The metrics every printed summary table shows (the CSVs have them all).
HEADLINE_METRICS = ("dnsmos_ovr", "pesq_wb", "stoi")


class SchemaError(ValueError):
    """A file that is not what its name says (missing, or without its columns)."""


def label_score_column(model: str) -> str:
    """labels.csv's column holding `model`'s label-metric value."""
    return f"{model}{LABEL_SCORE_SUFFIX}"


def label_columns(models: Sequence[str]) -> list[str]:
    return [*LABEL_FIXED_COLUMNS, *(label_score_column(m) for m in models)]


def recommendation_columns(class_names: Sequence[str], with_single: bool) -> list[str]:
    return ["file", "recommendation", *(f"p_{c}" for c in class_names), "routed_model",
            *([SINGLE_COLUMN] if with_single else [])]  # fmt: skip


def read_rows(
    path: str | os.PathLike[str], required: Iterable[str], *, missing_ok: bool = False
) -> tuple[list[str], list[Row]]:
    """(header, rows) of a CSV that must have the `required` columns; ([], []) for a missing
    file when `missing_ok`. File ids in a `file` column are checked (relative, no `..`)."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return [], []
        raise SchemaError(f"{path}: not found")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    absent = [c for c in required if c not in header]
    if absent:
        raise SchemaError(f"{path}: no column(s) {', '.join(absent)}; not a {path.name} of serec "
                          f"(its columns: {', '.join(header) or 'none'})")  # fmt: skip
    if "file" in header:
        check_file_ids((r["file"] for r in rows), path)  # UnsafeFileId names the file and id
    return header, rows


@dataclass
class LabelsTable:
    """labels.csv: the models compared (from the `<MODEL>_ovr` columns) and one row per file."""

    path: Path
    models: list[str]
    rows: list[Row]


def read_labels(path: str | os.PathLike[str]) -> LabelsTable:
    header, rows = read_rows(path, LABEL_FIXED_COLUMNS)
    suffix = LABEL_SCORE_SUFFIX
    models = [c[: -len(suffix)] for c in header
              if c.endswith(suffix) and c not in LABEL_FIXED_COLUMNS]  # fmt: skip
    return LabelsTable(Path(path), models, rows)


def read_scores(path: str | os.PathLike[str]) -> list[Row]:
    """scores.csv rows; the metric columns a run did not compute may be absent."""
    return read_rows(path, ("file", "system", "status"))[1]


def read_folds(path: str | os.PathLike[str]) -> dict[str, tuple[int, int, int]]:
    """folds.csv as {file: (fold, speaker_fold, noise_fold)}; a folds.csv of speaker folds
    only (file, fold: older runs) reads as speaker_fold = noise_fold = fold."""
    rows = read_rows(path, FOLD_COLUMNS[:2])[1]
    return {r["file"]: (int(r["fold"]), int(r.get("speaker_fold") or r["fold"]),
                        int(r.get("noise_fold") or r["fold"])) for r in rows}  # fmt: skip


def write_folds(path: str | os.PathLike[str], folds: Mapping[str, tuple[int, int, int]]) -> Path:
    return write_csv_atomic(path, FOLD_COLUMNS, (dict(zip(FOLD_COLUMNS, (f, *k), strict=True))
                                                 for f, k in folds.items()))  # fmt: skip


def read_recommendations(out_dir: str | os.PathLike[str]) -> list[Row]:
    """OUT/recommendations.csv rows ([] when the folder has none)."""
    path = Path(out_dir) / RECOMMENDATIONS_CSV
    return read_rows(path, ("file", "recommendation", "routed_model"), missing_ok=True)[1]


def read_routing(out_dir: str | os.PathLike[str]) -> list[Row]:
    return read_rows(Path(out_dir) / ROUTING_CSV, ("file", "routed_model"), missing_ok=True)[1]


def read_evaluation(out_dir: str | os.PathLike[str]) -> list[Row]:
    return read_rows(Path(out_dir) / EVALUATION_CSV, ("file", "group", "routed_model"),
                     missing_ok=True)[1]  # fmt: skip


def read_summary(out_dir: str | os.PathLike[str]) -> list[Row]:
    return read_rows(Path(out_dir) / SUMMARY_CSV, ("group", "metric", "n"), missing_ok=True)[1]


def read_strategies(out_dir: str | os.PathLike[str]) -> list[Row]:
    return read_rows(Path(out_dir) / STRATEGIES_CSV, ("strategy", "files"), missing_ok=True)[1]


def write_strategies_csv(out_dir: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    return write_csv_atomic(Path(out_dir) / STRATEGIES_CSV, STRATEGY_COLUMNS, rows)
