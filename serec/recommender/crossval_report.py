"""Cross-validation reports of the recommender: classification metrics per fold, mean ± std
over folds, metrics.json / metrics.csv, confusion-matrix plots and the printed F1 table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from serec.fileio import atomic_path, write_csv_atomic, write_json_atomic
from serec.recommender.training import StageResult

SYSTEM_TITLES = {
    "two_stage": "two-stage (threshold 0.5)",
    "two_stage_tuned": "two-stage (tuned threshold)",
    "single": "single model",
    "tabular": "tabular baseline",
    "majority": "majority class",
    "random": "random (stratified)",
}
SYSTEMS = tuple(SYSTEM_TITLES)


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    Macro F1 averages over the classes that occur in the truth or the predictions (a
    class absent from a fold and never predicted does not count as F1 0). The confusion
    matrix has true classes as rows, predictions as columns, both in `class_names` order.
    """
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    names = list(class_names)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=names, zero_division=0
    )
    return {
        "n_files": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=names).tolist(),
    }


def summarise(per_fold: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation (ddof 1; 0 for one fold) of accuracy and macro F1."""
    systems = dict.fromkeys(s for fold in per_fold.values() for s in fold)
    summary = {}
    for system in systems:
        folds = [fold[system] for fold in per_fold.values() if system in fold]
        entry: dict[str, Any] = {"n_folds": len(folds)}
        for key in ("macro_f1", "accuracy"):
            values = np.array([m[key] for m in folds], dtype=float)
            entry[f"{key}_mean"] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[system] = entry
    return summary


def metrics_rows(
    per_fold: Mapping[int, Mapping[str, Mapping[str, Any]]],
    summary: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
) -> tuple[list[str], list[dict[str, Any]]]:
    """metrics.csv: one row per (system, fold), then mean and std rows per system."""
    per_class_cols = [f"{m}_{c}" for c in class_names for m in ("precision", "recall", "f1")]
    columns = ["system", "fold", "n_files", "accuracy", "macro_f1", *per_class_cols]
    rows: list[dict[str, Any]] = []
    for system in summary:
        for fold, systems in per_fold.items():
            if system not in systems:
                continue
            m = systems[system]
            row = {"system": system, "fold": fold, "n_files": m["n_files"]}
            row.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"])
            for c in class_names:
                for key in ("precision", "recall", "f1"):
                    row[f"{key}_{c}"] = m["per_class"][c][key]
            rows.append(row)
        for stat in ("mean", "std"):
            stat_row: dict[str, Any] = {"system": system, "fold": stat}
            stat_row["accuracy"] = summary[system][f"accuracy_{stat}"]
            stat_row["macro_f1"] = summary[system][f"macro_f1_{stat}"]
            fold_rows = [
                r for r in rows if r["system"] == system and r["fold"] not in ("mean", "std")
            ]
            for col in per_class_cols:
                values = np.array([r[col] for r in fold_rows], dtype=float)
                if stat == "mean":
                    stat_row[col] = float(values.mean())
                else:
                    stat_row[col] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            rows.append(stat_row)
    return columns, rows


def plot_confusion(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str, path: Path
) -> Path:
    """A confusion-matrix heat map with counts (rows: truth, columns: prediction)."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    size = 1.6 + 0.9 * len(class_names)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), count in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if count > threshold else "black",
        )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def format_table(summary: Mapping[str, Mapping[str, Any]], title: str) -> str:
    """The printed table: macro F1 and accuracy, mean ± std over folds, one row per system."""
    lines = [title, f"{'system':<30} {'macro F1':>15}  {'accuracy':>15}  folds"]
    for system, entry in summary.items():
        name = SYSTEM_TITLES.get(system, system)
        f1 = f"{entry['macro_f1_mean']:.3f} ± {entry['macro_f1_std']:.3f}"
        acc = f"{entry['accuracy_mean']:.3f} ± {entry['accuracy_std']:.3f}"
        lines.append(f"{name:<30} {f1:>15}  {acc:>15}  {entry['n_folds']}")
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    report: dict[str, Any],
    per_fold: dict[int, dict[str, dict[str, Any]]],
    class_names: Sequence[str],
) -> None:
    columns, rows = metrics_rows(per_fold, report["summary"], class_names)
    write_csv_atomic(out_dir / "metrics.csv", columns, rows)
    report["folds"] = {str(k): v for k, v in per_fold.items()}
    write_json_atomic(out_dir / "metrics.json", report)


def write_stage_report(result: StageResult) -> dict[str, Any]:
    """metrics.json/.csv, predictions.csv and confusion PNGs of one stage's held-out folds."""
    out_dir = result.stage_dir
    names = result.class_names
    per_fold: dict[int, dict[str, dict[str, Any]]] = {}
    prediction_rows = []
    for fp in result.folds:
        y_true = [names[t] for t in fp.targets]
        y_pred = [names[i] for i in fp.proba.argmax(axis=1)]
        metrics = classification_metrics(y_true, y_pred, names)
        metrics["best_epoch"] = fp.best_epoch
        metrics["checkpoint"] = str(fp.checkpoint)
        per_fold[fp.fold] = {result.stage: metrics}
        plot_confusion(
            metrics["confusion_matrix"],
            names,
            f"{result.stage}, held-out fold {fp.fold}",
            out_dir / f"confusion_fold{fp.fold}.png",
        )
        for i, f in enumerate(fp.files):
            row = {"file": f, "fold": fp.fold, "label": y_true[i], "prediction": y_pred[i]}
            row.update({f"p_{c}": float(fp.proba[i, j]) for j, c in enumerate(names)})
            prediction_rows.append(row)
    write_csv_atomic(
        out_dir / "predictions.csv",
        ["file", "fold", "label", "prediction", *[f"p_{c}" for c in names]],
        prediction_rows,
    )
    report: dict[str, Any] = {
        "stage": result.stage,
        "class_names": names,
        "gatekeeper_class": result.gatekeeper_class,
        "skipped_files": len(result.skipped),
        "summary": summarise(per_fold),
        "notes": "metrics on each held-out fold; std is the sample std over folds (ddof 1)",
    }
    write_report(out_dir, report, per_fold, names)
    return report
