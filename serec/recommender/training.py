"""Train one stage (gatekeeper, expert or single) of any model kind on every requested fold,
with a reusable checkpoint per fold and the held-out predictions for the stage report."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serec.fileio import write_csv_atomic
from serec.recommender.checkpoint import (
    REFIT_FOLD,
    CheckpointMetadata,
    TrainingRecord,
    load_checkpoint,
    save_checkpoint,
)
from serec.recommender.config import RecommenderConfig
from serec.recommender.errors import CheckpointError, RecommenderError
from serec.recommender.folds import inner_validation_mask
from serec.recommender.inputs import ExperimentData, prepare_experiment
from serec.recommender.kinds import (
    ModelBuilder,
    RecommenderModel,
    kind_class,
    resolve_device,
)
from serec.recommender.neural import seed_everything, write_training_curves
from serec.recommender.stages import StageTask, stage_task

SKIPPED_CSV = "skipped_files.csv"
SKIPPED_COLUMNS = ("file", "reason")
# The flags recorded in each checkpoint beside the fit settings: a checkpoint is reused
# only when all of them are the same.
RECORDED_FLAGS = (
    "model_kind",
    "pretrained_models",
    "ast_size",
    "ast_model_dir",
    "max_audio_seconds",
    "use_hybrid_features",
    "labels_csv",
    "audio_dir",
    "metadata_csv",
    "cekl_features_base_dir",
    "n_folds",
)

log = logging.getLogger(__name__)


@dataclass
class FoldPredictions:
    """A stage model's output on its held-out fold."""

    fold: int
    files: list[str]
    targets: np.ndarray
    proba: np.ndarray
    checkpoint: Path
    best_epoch: int | None


@dataclass
class StageResult:
    stage: str
    class_names: list[str]
    gatekeeper_class: str
    folds: list[FoldPredictions]
    skipped: dict[str, str]
    stage_dir: Path
    refit: Path | None = None  # the checkpoint trained on every file (--refit)


def training_flags(cfg: RecommenderConfig) -> dict[str, Any]:
    """What a checkpoint records of the run's flags (the fit settings and RECORDED_FLAGS)."""
    plain = cfg.plain()
    settings = asdict(cfg.fit_settings(cfg.seed, "cpu", ""))
    for per_model in ("seed", "device", "desc"):
        settings.pop(per_model)
    return {**settings, "seed": cfg.seed, **{k: plain[k] for k in RECORDED_FLAGS}}


def write_skipped(stage_dir: Path, skipped: dict[str, str]) -> Path:
    return write_csv_atomic(
        stage_dir / SKIPPED_CSV,
        SKIPPED_COLUMNS,
        ({"file": f, "reason": r} for f, r in sorted(skipped.items())),
    )


def _reusable(
    path: Path, wanted: tuple[Any, ...], record: TrainingRecord, device: torch.device
) -> tuple[RecommenderModel, CheckpointMetadata] | None:
    """The checkpoint at `path` when it was trained with exactly these settings, else None.
    `wanted` is (kind, class names, feature names, fbank) of the model this run would train."""
    if not path.is_file():
        return None
    try:
        model, saved = load_checkpoint(path, device)
    except CheckpointError as exc:
        log.warning("%s: unusable (%s); training this fold again", path, exc)
        return None
    held = (saved.kind, saved.class_names, saved.feature_names, saved.fbank)
    if held != wanted or not saved.record.same_training(record):
        log.warning("%s: trained with other settings; training this fold again", path)
        return None
    return model, saved


@dataclass
class _Fold:
    """One fold's split of the stage's files (row indices into ExperimentData)."""

    number: int
    fit: np.ndarray
    val: np.ndarray
    test: np.ndarray
    inner_val_files: list[str]


def _split_fold(data: ExperimentData, targets: np.ndarray, fold: int, seed: int) -> _Fold:
    if fold == REFIT_FOLD:  # every file trains (but the inner validation split); none is held out
        held_out, training = np.zeros(len(data.files), bool), np.ones(len(data.files), bool)
    else:
        held_out, training = data.folds.held_out == fold, data.folds.training_part(fold)
    inner_val = inner_validation_mask(data.labels, data.groups, training, seed)
    used = targets >= 0
    return _Fold(
        number=fold,
        fit=np.flatnonzero(training & ~inner_val & used),
        val=np.flatnonzero(inner_val & used),
        test=np.flatnonzero(held_out & used),
        inner_val_files=[str(f) for f in data.files[inner_val]],
    )


def _train_fold(
    cfg: RecommenderConfig,
    data: ExperimentData,
    builder: ModelBuilder,
    task: StageTask,
    split: _Fold,
    device: torch.device,
) -> tuple[RecommenderModel, CheckpointMetadata, Path]:
    """The fold's model: reused from its checkpoint when trained the same way, else trained
    on the fit rows (the inner validation rows choose its epoch) and saved."""
    stage, fold = task.stage, split.number
    targets = task.targets(data.labels)
    if len(set(targets[split.fit])) < 2:
        raise RecommenderError(
            f"{stage} fold {fold}: its training part has only one class; fewer folds?"
        )
    feature_names = data.feature_names if builder.uses_features else []
    record = TrainingRecord(
        stage=stage, fold=fold, gatekeeper_class=task.gatekeeper_class,
        training=training_flags(cfg), inner_val_files=split.inner_val_files,
        n_train_files=len(split.fit), folds_sha256=data.folds_sha256,
        labels_sha256=data.labels_sha256,
    )  # fmt: skip
    path = cfg.checkpoint_path(stage, fold)
    wanted = (cfg.model_kind, task.class_names, feature_names, builder.fbank)
    reused = _reusable(path, wanted, record, device)
    if reused is not None:
        log.info("%s fold %d: reusing %s (same settings)", stage, fold, path)
        return (*reused, path)
    model = builder.make(task.class_names, feature_names)
    desc = f"{stage} fold {fold}"
    settings = cfg.fit_settings(cfg.seed + fold, str(device), desc)
    report = model.fit(
        data.inputs(model.inputs, split.fit), targets[split.fit],
        data.inputs(model.inputs, split.val), targets[split.val], settings,
    )  # fmt: skip
    if report.history:
        write_training_curves(
            report.history,
            cfg.output_dir / stage / "curves" / f"fold{fold}.csv",
            f"{desc} (best epoch {report.best_epoch})",
        )
    record.best_epoch = report.best_epoch
    return model, save_checkpoint(path, model, record), path


def train_stage(cfg: RecommenderConfig, stage: str) -> StageResult:
    """Train one stage's model on every requested fold; save a checkpoint per fold.

    Per fold k: the training part is every file whose speaker and noise recording are
    outside fold k (recommender.folds); its inner validation split picks
    the best epoch (neural kinds) and is recorded in the checkpoint for the gatekeeper
    threshold sweep; the feature scaler is fitted on the rest of the training part; the
    held-out fold k is only predicted, and those predictions are returned for the stage
    report. A fold whose checkpoint already exists with the same settings, folds and
    labels is reused, so an interrupted run resumes (delete a checkpoint to retrain it).
    With cfg.refit, a last model is trained the same way on every file (fold "all"): the
    one to deploy, since the fold models each saw only part of the data.
    """
    if kind_class(cfg.model_kind).output != "proba":
        raise RecommenderError(
            f"--model_kind {cfg.model_kind} predicts scores, not a class: it is the quality "
            "selector's learner (--training_stage predictor --predictor_learner ast)"
        )
    builder = kind_class(cfg.model_kind).builder(cfg)
    cfg.check_inputs(builder.fbank is not None, builder.uses_features)
    device = resolve_device(cfg.device)
    data = prepare_experiment(cfg, [builder.fbank] if builder.fbank else [], builder.uses_features)
    task = stage_task(stage, data.classes, data.gatekeeper_class)
    stage_dir = cfg.output_dir / stage
    write_skipped(stage_dir, data.skipped)
    targets = task.targets(data.labels)
    results: list[FoldPredictions] = []
    refit = None
    for fold in cfg.training_folds:
        seed_everything(cfg.seed + fold)
        split = _split_fold(data, targets, fold, cfg.seed + fold)
        model, saved, path = _train_fold(cfg, data, builder, task, split, device)
        if fold == REFIT_FOLD:
            refit = path
            continue
        proba = model.predict_proba(data.inputs(model.inputs, split.test), cfg.batch_size)
        results.append(FoldPredictions(
            fold, [str(f) for f in data.files[split.test]], targets[split.test], proba, path,
            saved.record.best_epoch,
        ))  # fmt: skip
    return StageResult(
        stage, task.class_names, task.gatekeeper_class, results, data.skipped, stage_dir, refit
    )
