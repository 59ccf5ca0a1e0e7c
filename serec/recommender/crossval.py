"""Cross-validation of the recommender on the shared folds (`--training_stage evaluate_pipeline`):
the two-stage pipeline with its bottleneck analysis and threshold sweep, the single model and
the baselines, each fold predicted by models trained without it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.dummy import DummyClassifier
from sklearn.metrics import confusion_matrix, f1_score

from serec.fileio import atomic_path, write_csv_atomic
from serec.recommender.checkpoint import CheckpointMetadata, load_checkpoint
from serec.recommender.config import RecommenderConfig
from serec.recommender.crossval_report import (
    SYSTEM_TITLES,
    SYSTEMS,
    classification_metrics,
    format_table,
    plot_confusion,
    summarise,
    write_report,
)
from serec.recommender.errors import CheckpointError, RecommenderError
from serec.recommender.folds import FOLDS_JSON
from serec.recommender.inputs import ExperimentData, prepare_experiment
from serec.recommender.kinds import RecommenderModel, resolve_device
from serec.recommender.logistic import LogisticClassifier
from serec.recommender.stages import (
    DEFAULT_THRESHOLD,
    STAGES,
    most_frequent_label,
    pair_problems,
    route_two_stage,
)
from serec.recommender.training import write_skipped

# Gatekeeper thresholds tried on the inner validation split; the one with the best
# pipeline macro F1 there is applied to the held-out fold (ties: closest to 0.5).
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.951, 0.05), 2))
PIPELINE_DIR = "evaluate_pipeline"
BOTTLENECK_KEYS = ("n_files", "errors", "gatekeeper_false_positive", "gatekeeper_false_negative",
                   "expert_mistake")  # fmt: skip

log = logging.getLogger(__name__)


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


Loaded = dict[str, tuple[RecommenderModel, CheckpointMetadata]]


def _load_fold_checkpoints(cfg: RecommenderConfig, fold: int, device: torch.device) -> Loaded:
    loaded: Loaded = {}
    for stage in STAGES:
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
        model, meta = load_checkpoint(path, device)
        if (meta.stage, meta.fold) != (stage, fold):
            raise CheckpointError(
                f"{path}: holds stage {meta.stage!r} fold {meta.fold}, expected {stage} fold {fold}"
            )
        loaded[stage] = (model, meta)
    return loaded


def _check_consistency(loaded: Loaded, data: ExperimentData, cfg: RecommenderConfig) -> None:
    for stage, (_, meta) in loaded.items():
        where = cfg.checkpoint_path(stage, meta.fold)
        if meta.record.folds_sha256 != data.folds_sha256:
            raise CheckpointError(
                f"{where}: trained on other folds than {cfg.output_dir / 'folds.csv'}; retrain it"
            )
        if meta.record.gatekeeper_class != data.gatekeeper_class and stage != "single":
            raise CheckpointError(
                f"{where}: gatekeeper class {meta.record.gatekeeper_class!r}, but this run's is "
                f"{data.gatekeeper_class!r} (pass the same --gatekeeper_class as in training)"
            )
    gk, ex = loaded["gatekeeper"][1], loaded["expert"][1]
    problems = pair_problems(gk.class_names, ex.class_names, data.gatekeeper_class)
    if gk.record.inner_val_files != ex.record.inner_val_files:
        problems.append("they used different inner validation splits (different --seed?)")
    if problems:
        raise CheckpointError(
            f"fold {gk.fold}: the gatekeeper and expert checkpoints do not form one pipeline: "
            + "; ".join(problems) + "; retrain them with the same settings"
        )


@dataclass
class _Evaluation:
    """What evaluate_pipeline collects over the folds."""

    per_fold: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    bottleneck: dict[str, dict[str, Any]] = field(default_factory=dict)
    thresholds: dict[int, float] = field(default_factory=dict)
    sweep_rows: list[dict[str, Any]] = field(default_factory=list)
    prediction_rows: list[dict[str, Any]] = field(default_factory=list)
    pooled: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)


def _two_stage_fold(
    fold: int, loaded: Loaded, data: ExperimentData, cfg: RecommenderConfig, ev: _Evaluation
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The two-stage predictions of one held-out fold at 0.5 and at the threshold tuned on
    the inner validation split; records the sweep and the bottleneck analysis."""

    def proba(stage: str, rows: np.ndarray) -> np.ndarray:
        model, meta = loaded[stage]
        return model.predict_proba(data.inputs(meta.inputs, rows), cfg.batch_size)

    gk_class = data.gatekeeper_class
    expert_classes = loaded["expert"][1].class_names
    test_rows = np.flatnonzero(data.folds.held_out == fold)
    val_set = set(loaded["gatekeeper"][1].record.inner_val_files)
    val_rows = np.flatnonzero([f in val_set for f in data.files])
    y_test = data.labels[test_rows]
    p_gk_test, ex_test = proba("gatekeeper", test_rows)[:, 0], proba("expert", test_rows)
    chosen, sweep = choose_threshold(data.labels[val_rows], proba("gatekeeper", val_rows)[:, 0],
                                     proba("expert", val_rows), gk_class, expert_classes)  # fmt: skip
    ev.thresholds[fold] = chosen
    for t, val_f1 in sweep.items():
        test_pred = route_two_stage(p_gk_test, ex_test, gk_class, expert_classes, t)
        ev.sweep_rows.append({
            "fold": fold, "threshold": t, "inner_val_macro_f1": val_f1,
            "test_macro_f1": float(f1_score(y_test, test_pred, average="macro", zero_division=0)),
            "chosen": t == chosen,
        })  # fmt: skip
    predictions, analyses = {}, {}
    for system, threshold in (("two_stage", DEFAULT_THRESHOLD), ("two_stage_tuned", chosen)):
        predictions[system] = route_two_stage(p_gk_test, ex_test, gk_class, expert_classes,
                                              threshold)  # fmt: skip
        analyses[system] = bottleneck_analysis(y_test, p_gk_test, ex_test, gk_class,
                                               expert_classes, threshold)  # fmt: skip
    ev.bottleneck[str(fold)] = analyses
    return predictions, p_gk_test


def _baselines(
    fold: int, data: ExperimentData, cfg: RecommenderConfig
) -> dict[str, np.ndarray]:
    """Tabular (logistic regression on the features), majority and stratified random
    predictions of the held-out fold, each fitted on the other folds."""
    train_rows = np.flatnonzero(data.folds.training_part(fold))
    test_rows = np.flatnonzero(data.folds.held_out == fold)
    classes = np.asarray(data.classes, dtype=object)
    y_train = data.labels[train_rows]
    predictions: dict[str, np.ndarray] = {}
    if data.features is not None:
        tabular = LogisticClassifier(data.classes, data.feature_names).fit_features(
            data.features[train_rows], np.array([data.classes.index(y) for y in y_train]),
            balanced=cfg.use_weighted_sampler, seed=cfg.seed + fold,
        )  # fmt: skip
        inputs = data.inputs(tabular.inputs, test_rows)
        predictions["tabular"] = classes[tabular.predict_proba(inputs).argmax(1)]
    predictions["majority"] = np.full(len(test_rows), most_frequent_label(y_train), dtype=object)
    dummy = DummyClassifier(strategy="stratified", random_state=cfg.seed + fold)
    dummy.fit(np.zeros((len(train_rows), 1)), y_train.astype(str))
    predictions["random"] = dummy.predict(np.zeros((len(test_rows), 1))).astype(object)
    return predictions


def _evaluate_fold(
    fold: int, loaded: Loaded, data: ExperimentData, cfg: RecommenderConfig, ev: _Evaluation
) -> None:
    _check_consistency(loaded, data, cfg)
    test_rows = np.flatnonzero(data.folds.held_out == fold)
    y_test = data.labels[test_rows]
    predictions, p_gk_test = _two_stage_fold(fold, loaded, data, cfg, ev)
    if "single" in loaded:
        model, meta = loaded["single"]
        inputs = data.inputs(meta.inputs, test_rows)
        predictions["single"] = np.asarray(model.recommend(inputs, cfg.batch_size), dtype=object)
    predictions.update(_baselines(fold, data, cfg))
    ev.per_fold[fold] = {}
    for system in SYSTEMS:
        if system in predictions:
            ev.per_fold[fold][system] = classification_metrics(
                y_test, predictions[system], data.classes
            )
            truth, pred = ev.pooled.setdefault(system, ([], []))
            truth.extend(y_test)
            pred.extend(predictions[system])
    for i, row in enumerate(test_rows):
        ev.prediction_rows.append({
            "file": data.files[row], "fold": fold, "label": y_test[i],
            "p_gatekeeper": float(p_gk_test[i]),
            **{s: predictions.get(s, [""] * len(test_rows))[i] for s in SYSTEMS},
        })  # fmt: skip


def _write_pipeline_files(out_dir: Path, ev: _Evaluation, classes: list[str]) -> None:
    write_csv_atomic(out_dir / "predictions.csv",
                     ["file", "fold", "label", "p_gatekeeper", *SYSTEMS], ev.prediction_rows)
    write_csv_atomic(out_dir / "threshold_sweep.csv",
                     ["fold", "threshold", "inner_val_macro_f1", "test_macro_f1", "chosen"],
                     ev.sweep_rows)  # fmt: skip
    _plot_sweep(ev.sweep_rows, ev.thresholds, out_dir / "threshold_sweep.png")
    for system, (truth, pred) in ev.pooled.items():
        matrix = confusion_matrix(truth, pred, labels=classes).tolist()
        plot_confusion(matrix, classes, f"{SYSTEM_TITLES[system]}, all held-out folds",
                       out_dir / f"confusion_{system}.png")  # fmt: skip
    ev.bottleneck["total"] = {
        system: {k: sum(b[system][k] for b in ev.bottleneck.values()) for k in BOTTLENECK_KEYS}
        for system in ("two_stage", "two_stage_tuned")
    }


def evaluate_pipeline(cfg: RecommenderConfig) -> PipelineReport:
    """Route each held-out fold through its gatekeeper and expert; compare every system.

    Writes OUTPUT_DIR/evaluate_pipeline/: metrics.json (per fold, per system: metrics,
    confusion matrix; bottleneck analysis; chosen thresholds; mean ± std), metrics.csv,
    predictions.csv, threshold_sweep.csv/.png, confusion_<system>.png (pooled over folds).
    """
    device = resolve_device(cfg.device)
    checkpoints = {fold: _load_fold_checkpoints(cfg, fold, device) for fold in cfg.fold_numbers}
    metas = [meta for fold in checkpoints.values() for _, meta in fold.values()]
    specs = [m.fbank for m in metas if m.fbank is not None]
    need_features = any(m.feature_names for m in metas) or cfg.cekl_features_base_dir is not None
    data = prepare_experiment(cfg, specs, need_features)
    out_dir = cfg.output_dir / PIPELINE_DIR
    write_skipped(out_dir, data.skipped)
    ev = _Evaluation()
    for fold, loaded in checkpoints.items():
        _evaluate_fold(fold, loaded, data, cfg, ev)
    _write_pipeline_files(out_dir, ev, data.classes)
    summary = summarise(ev.per_fold)
    gk_class = data.gatekeeper_class
    held_out = int(np.isin(data.folds.held_out, list(checkpoints)).sum())
    report = {
        "stage": "evaluate_pipeline",
        "class_names": data.classes,
        "gatekeeper_class": gk_class,
        "expert_classes": [c for c in data.classes if c != gk_class],
        "folds_evaluated": list(checkpoints),
        "files": len(data.files),
        "held_out_files": held_out,
        "group_by": json.loads((cfg.output_dir / FOLDS_JSON).read_text())["group_by"],
        "skipped_files": len(data.skipped),
        "summary": summary,
        "bottleneck": ev.bottleneck,
        "gatekeeper_thresholds": {str(k): v for k, v in ev.thresholds.items()},
        "notes": {
            "protocol": "each fold's held-out files are predicted by models trained without "
            "their speakers (and, with the mixing metadata, their noise recordings); thresholds "
            "are chosen on each gatekeeper's inner validation split",
            "std": "sample standard deviation over folds (ddof 1)",
            "tabular": f"logistic regression on {', '.join(data.feature_names)}"
            if data.features is not None else "not run: pass --cekl_features_base_dir",
            "random": "scikit-learn DummyClassifier(strategy='stratified'), seeded per fold",
            "test_macro_f1 in threshold_sweep.csv": "for reference only, never used to choose",
        },
    }
    write_report(out_dir, report, ev.per_fold, data.classes)
    table = format_table(
        summary,
        f"macro F1 over {len(checkpoints)} held-out folds (mean ± std), {held_out} of "
        f"{len(data.files)} files held out",
    )
    return PipelineReport(summary=summary, table=table, out_dir=out_dir, skipped=data.skipped)
