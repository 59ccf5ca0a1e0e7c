"""Recommender evaluation on the shared folds: metrics, the two-stage pipeline with its
bottleneck analysis and threshold sweep, the single model and baselines, and reports."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from serec.fileio import atomic_path, write_csv_atomic, write_json_atomic
from serec.models import FbankSpec, fit_logistic_recommender, load_checkpoint, predict_proba
from serec.training import (
    ExperimentData,
    RecommenderConfig,
    RecommenderError,
    StageResult,
    prepare_experiment,
    resolve_device,
    write_skipped,
)

SYSTEMS = ("two_stage", "two_stage_tuned", "single", "tabular", "majority", "random")
SYSTEM_TITLES = {
    "two_stage": "two-stage (threshold 0.5)",
    "two_stage_tuned": "two-stage (tuned threshold)",
    "single": "single model",
    "tabular": "tabular baseline",
    "majority": "majority class",
    "random": "random (stratified)",
}
# Gatekeeper thresholds tried on the inner validation split; the one with the best
# pipeline macro F1 there is applied to the held-out fold (ties: closest to 0.5).
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.951, 0.05), 2))
DEFAULT_THRESHOLD = 0.5
PIPELINE_DIR = "evaluate_pipeline"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Metrics


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


def _write_report(
    out_dir: Path,
    report: dict[str, Any],
    per_fold: dict[int, dict[str, dict[str, Any]]],
    class_names: Sequence[str],
) -> None:
    columns, rows = metrics_rows(per_fold, report["summary"], class_names)
    write_csv_atomic(out_dir / "metrics.csv", columns, rows)
    report["folds"] = {str(k): v for k, v in per_fold.items()}
    write_json_atomic(out_dir / "metrics.json", report)


# ---------------------------------------------------------------------------------------
# Stage report


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
    _write_report(out_dir, report, per_fold, names)
    return report


# ---------------------------------------------------------------------------------------
# Two-stage pipeline


def route_two_stage(
    p_gatekeeper: np.ndarray,
    expert_proba: np.ndarray,
    gatekeeper_class: str,
    expert_classes: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """The pipeline's label: the gatekeeper class when p >= threshold, else the expert's pick."""
    expert_pick = np.asarray(expert_classes, dtype=object)[expert_proba.argmax(axis=1)]
    return np.where(p_gatekeeper >= threshold, gatekeeper_class, expert_pick)


def bottleneck_analysis(
    y_true: Sequence[str],
    p_gatekeeper: np.ndarray,
    expert_proba: np.ndarray,
    gatekeeper_class: str,
    expert_classes: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Where the pipeline's errors come from.

    gatekeeper false positives: other-class files the gatekeeper kept (always wrong);
    gatekeeper false negatives: gatekeeper-class files passed on (the expert cannot output
    that class, so always wrong); expert mistakes: correctly passed files the expert got
    wrong. The three add up to all errors.
    """
    y_true = np.asarray(y_true, dtype=object)
    is_gk = y_true == gatekeeper_class
    kept = p_gatekeeper >= threshold
    expert_pick = np.asarray(expert_classes, dtype=object)[expert_proba.argmax(axis=1)]
    counts = {
        "gatekeeper_false_positive": int(np.sum(~is_gk & kept)),
        "gatekeeper_false_negative": int(np.sum(is_gk & ~kept)),
        "expert_mistake": int(np.sum(~is_gk & ~kept & (expert_pick != y_true))),
    }
    errors = sum(counts.values())
    return {
        "threshold": threshold,
        "n_files": int(len(y_true)),
        "errors": errors,
        **counts,
        **{f"{k}_share": (v / errors if errors else 0.0) for k, v in counts.items()},
    }


def choose_threshold(
    y_val: Sequence[str],
    p_gatekeeper: np.ndarray,
    expert_proba: np.ndarray,
    gatekeeper_class: str,
    expert_classes: Sequence[str],
) -> tuple[float, dict[float, float]]:
    """The threshold with the best pipeline macro F1 on inner validation, and the sweep."""
    sweep = {
        t: float(
            f1_score(
                y_val,
                route_two_stage(p_gatekeeper, expert_proba, gatekeeper_class, expert_classes, t),
                average="macro",
                zero_division=0,
            )
        )
        for t in THRESHOLDS
    }
    best = max(sweep.values())
    chosen = min(
        (t for t, v in sweep.items() if v == best), key=lambda t: abs(t - DEFAULT_THRESHOLD)
    )
    return chosen, sweep


def majority_label(labels: Sequence[str]) -> str:
    values, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    return str(values[counts == counts.max()][0])


def _plot_sweep(sweep_rows: list[dict[str, Any]], chosen: Mapping[int, float], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for fold in sorted({r["fold"] for r in sweep_rows}):
        rows = [r for r in sweep_rows if r["fold"] == fold]
        line = ax.plot(
            [r["threshold"] for r in rows],
            [r["inner_val_macro_f1"] for r in rows],
            label=f"fold {fold}",
        )[0]
        ax.axvline(chosen[fold], color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_xlabel("gatekeeper threshold")
    ax.set_ylabel("pipeline macro F1 (inner validation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


@dataclass
class PipelineReport:
    summary: dict[str, dict[str, Any]]
    table: str
    out_dir: Path
    skipped: dict[str, str]


def _load_fold_checkpoints(
    cfg: RecommenderConfig, fold: int, device: Any
) -> dict[str, tuple[Any, dict[str, Any]]]:
    loaded = {}
    for stage in ("gatekeeper", "expert", "single"):
        path = cfg.checkpoint_path(stage, fold)
        if not path.is_file():
            if stage == "single":
                log.warning(
                    "fold %d: no single-model checkpoint %s; single row skipped", fold, path
                )
                continue
            raise RecommenderError(
                f"fold {fold}: no {stage} checkpoint at {path}; train it first with "
                f"--training_stage {stage} (same --output_dir, --labels_csv and --seed)"
            )
        try:
            model, meta = load_checkpoint(path, device)
        except ValueError as exc:
            raise RecommenderError(str(exc)) from exc
        if meta.get("stage") != stage or meta.get("fold") != fold:
            raise RecommenderError(
                f"{path}: holds stage {meta.get('stage')!r} fold {meta.get('fold')}, "
                f"expected {stage} fold {fold}"
            )
        loaded[stage] = (model, meta)
    return loaded


def _check_consistency(
    loaded: Mapping[str, tuple[Any, dict[str, Any]]], data: ExperimentData, cfg: RecommenderConfig
) -> None:
    for stage, (_, meta) in loaded.items():
        where = cfg.checkpoint_path(stage, meta["fold"])
        if meta["folds_sha256"] != data.folds_sha256:
            raise RecommenderError(
                f"{where}: trained on other folds than {cfg.output_dir / 'folds.csv'}; retrain it"
            )
        if meta["gatekeeper_class"] != data.gatekeeper_class and stage != "single":
            raise RecommenderError(
                f"{where}: gatekeeper class {meta['gatekeeper_class']!r}, but this run's is "
                f"{data.gatekeeper_class!r} (pass the same --gatekeeper_class as in training)"
            )
    gk_val = set(loaded["gatekeeper"][1]["inner_val_files"])
    ex_val = set(loaded["expert"][1]["inner_val_files"])
    if gk_val != ex_val:
        raise RecommenderError(
            "the gatekeeper and expert checkpoints of a fold used different inner validation "
            "splits (different --seed?); retrain them with the same settings"
        )


def evaluate_pipeline(cfg: RecommenderConfig) -> PipelineReport:
    """Route each held-out fold through its gatekeeper and expert; compare every system.

    Writes OUTPUT_DIR/evaluate_pipeline/: metrics.json (per fold, per system: metrics,
    confusion matrix; bottleneck analysis; chosen thresholds; mean ± std), metrics.csv,
    predictions.csv, threshold_sweep.csv/.png, confusion_<system>.png (pooled over folds).
    """
    device = resolve_device(cfg.device)
    checkpoints = {fold: _load_fold_checkpoints(cfg, fold, device) for fold in cfg.fold_numbers}
    metas = [meta for fold in checkpoints.values() for _, meta in fold.values()]
    specs = [FbankSpec(**m["fbank"]) for m in metas if m["model_kind"] == "ast"]
    need_features = any(m["feature_names"] for m in metas) or cfg.cekl_features_base_dir is not None
    data = prepare_experiment(cfg, specs, need_features)
    out_dir = cfg.output_dir / PIPELINE_DIR
    write_skipped(out_dir, data.skipped)
    classes = data.classes
    gk_class = data.gatekeeper_class

    per_fold: dict[int, dict[str, dict[str, Any]]] = {}
    bottleneck: dict[str, dict[str, Any]] = {}
    thresholds: dict[int, float] = {}
    sweep_rows: list[dict[str, Any]] = []
    prediction_rows: list[dict[str, Any]] = []
    pooled: dict[str, tuple[list[str], list[str]]] = {}

    def predict(stage: str, loaded: Mapping[str, Any], rows: np.ndarray) -> np.ndarray:
        model, meta = loaded[stage]
        inputs, features = data.inputs_for(meta, rows)
        return predict_proba(
            model, meta, inputs, features, batch_size=cfg.batch_size, device=device
        )

    for fold, loaded in checkpoints.items():
        _check_consistency(loaded, data, cfg)
        expert_classes = list(loaded["expert"][1]["class_names"])
        held_out = data.folds == fold
        test_rows = np.flatnonzero(held_out)
        val_set = set(loaded["gatekeeper"][1]["inner_val_files"])
        val_rows = np.flatnonzero([f in val_set for f in data.files])
        train_rows = np.flatnonzero(~held_out)
        y_test, y_val = data.labels[test_rows], data.labels[val_rows]

        p_gk_test = predict("gatekeeper", loaded, test_rows)[:, 0]
        ex_test = predict("expert", loaded, test_rows)
        p_gk_val = predict("gatekeeper", loaded, val_rows)[:, 0]
        ex_val = predict("expert", loaded, val_rows)
        chosen, sweep = choose_threshold(y_val, p_gk_val, ex_val, gk_class, expert_classes)
        thresholds[fold] = chosen
        for t, val_f1 in sweep.items():
            test_pred = route_two_stage(p_gk_test, ex_test, gk_class, expert_classes, t)
            sweep_rows.append(
                {
                    "fold": fold,
                    "threshold": t,
                    "inner_val_macro_f1": val_f1,
                    "test_macro_f1": float(
                        f1_score(y_test, test_pred, average="macro", zero_division=0)
                    ),
                    "chosen": t == chosen,
                }
            )

        predictions: dict[str, np.ndarray] = {
            "two_stage": route_two_stage(p_gk_test, ex_test, gk_class, expert_classes),
            "two_stage_tuned": route_two_stage(
                p_gk_test, ex_test, gk_class, expert_classes, chosen
            ),
        }
        bottleneck[str(fold)] = {
            "two_stage": bottleneck_analysis(y_test, p_gk_test, ex_test, gk_class, expert_classes),
            "two_stage_tuned": bottleneck_analysis(
                y_test, p_gk_test, ex_test, gk_class, expert_classes, chosen
            ),
        }
        if "single" in loaded:
            single_classes = np.asarray(loaded["single"][1]["class_names"], dtype=object)
            predictions["single"] = single_classes[predict("single", loaded, test_rows).argmax(1)]
        if data.features is not None:
            targets = np.array([classes.index(lab) for lab in data.labels[train_rows]])
            tabular = fit_logistic_recommender(
                data.features[train_rows],
                targets,
                len(classes),
                balanced=cfg.use_weighted_sampler,
                seed=cfg.seed + fold,
            )
            proba = predict_proba(
                tabular,
                {
                    "model_kind": "logistic_regression",
                    "class_names": classes,
                    "feature_names": data.feature_names,
                },
                features=data.features[test_rows],
            )
            predictions["tabular"] = np.asarray(classes, dtype=object)[proba.argmax(1)]
        predictions["majority"] = np.full(
            len(test_rows), majority_label(data.labels[train_rows]), dtype=object
        )
        dummy = DummyClassifier(strategy="stratified", random_state=cfg.seed + fold)
        dummy.fit(np.zeros((len(train_rows), 1)), data.labels[train_rows].astype(str))
        predictions["random"] = dummy.predict(np.zeros((len(test_rows), 1))).astype(object)

        per_fold[fold] = {}
        for system in SYSTEMS:
            if system in predictions:
                per_fold[fold][system] = classification_metrics(
                    y_test, predictions[system], classes
                )
                truth, pred = pooled.setdefault(system, ([], []))
                truth.extend(y_test)
                pred.extend(predictions[system])
        for i, row in enumerate(test_rows):
            prediction_rows.append(
                {
                    "file": data.files[row],
                    "fold": fold,
                    "label": y_test[i],
                    "p_gatekeeper": float(p_gk_test[i]),
                    **{
                        system: predictions.get(system, [""] * len(test_rows))[i]
                        for system in SYSTEMS
                    },
                }
            )

    write_csv_atomic(
        out_dir / "predictions.csv",
        ["file", "fold", "label", "p_gatekeeper", *SYSTEMS],
        prediction_rows,
    )
    write_csv_atomic(
        out_dir / "threshold_sweep.csv",
        ["fold", "threshold", "inner_val_macro_f1", "test_macro_f1", "chosen"],
        sweep_rows,
    )
    _plot_sweep(sweep_rows, thresholds, out_dir / "threshold_sweep.png")
    for system, (truth, pred) in pooled.items():
        matrix = confusion_matrix(truth, pred, labels=classes).tolist()
        plot_confusion(
            matrix,
            classes,
            f"{SYSTEM_TITLES[system]}, all held-out folds",
            out_dir / f"confusion_{system}.png",
        )
    summary = summarise(per_fold)
    totals = {
        system: {
            key: sum(b[system][key] for b in bottleneck.values())
            for key in (
                "n_files",
                "errors",
                "gatekeeper_false_positive",
                "gatekeeper_false_negative",
                "expert_mistake",
            )
        }
        for system in ("two_stage", "two_stage_tuned")
    }
    bottleneck["total"] = totals
    tabular_note = (
        f"logistic regression on {', '.join(data.feature_names)}"
        if data.features is not None
        else "not run: pass --cekl_features_base_dir"
    )
    report = {
        "stage": "evaluate_pipeline",
        "class_names": classes,
        "gatekeeper_class": gk_class,
        "expert_classes": [c for c in classes if c != gk_class],
        "folds_evaluated": list(checkpoints),
        "skipped_files": len(data.skipped),
        "summary": summary,
        "bottleneck": bottleneck,
        "gatekeeper_thresholds": {str(k): v for k, v in thresholds.items()},
        "notes": {
            "protocol": "each fold's held-out files are predicted by models trained without "
            "them; thresholds are chosen on each gatekeeper's inner validation split",
            "std": "sample standard deviation over folds (ddof 1)",
            "tabular": tabular_note,
            "random": "scikit-learn DummyClassifier(strategy='stratified'), seeded per fold",
            "test_macro_f1 in threshold_sweep.csv": "for reference only, never used to choose",
        },
    }
    _write_report(out_dir, report, per_fold, classes)
    table = format_table(
        summary,
        f"macro F1 over {len(checkpoints)} held-out folds (mean ± std), {len(data.files)} files",
    )
    return PipelineReport(summary=summary, table=table, out_dir=out_dir, skipped=data.skipped)
