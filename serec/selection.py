"""Quality-predictor routing: train on one enhancement run, choose models for new files.

Training reads an enhancement folder (labels.csv + scores.csv), the noisy files' feature
vectors and the mixing metadata (speaker and noise recording of each file). It fits the
quality predictor on folds disjoint in speakers and noise recordings, ranks the single
models, chooses the safe policy's margin on the out-of-fold predictions, and measures
each model's seconds per audio second: all from the training files only. The result is
one checkpoint (plain data, `torch.load(weights_only=True)`).

Choosing applies every routing policy to new files' predicted gains. `verify_*` policies
name k candidates; which one is kept depends on the DNSMOS score of their outputs, so
the caller supplies those scores (measured at run time, or read from scores.csv when
the policies are scored on an evaluated test split).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serec.features import load_feature_matrix, read_features_meta
from serec.fileio import atomic_path, check_file_ids
from serec.labels import NOISY_SYSTEM
from serec.policies import (
    choose_margin,
    cost_aware,
    predict_best,
    predict_best_safe,
    rank_single_models,
    top_k,
    verify,
)
from serec.predictor import QualityPredictor, crossed_folds
from serec.quality import METRICS
from serec.strategies import EnhancementScores, read_enhancement_scores

SELECTOR_FORMAT = 1
DEFAULT_FOLDS = 5
DEFAULT_COST_LAMBDA = 0.1
DEFAULT_VERIFY_K = 2
# The score a verify policy compares candidates by: the only one available without a reference.
VERIFY_METRIC = "dnsmos_ovr"
# cost_aware's quality-vs-compute curve (lambda in label-metric units per second of compute
# per second of audio).
COST_LAMBDA_SWEEP: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class SelectionError(ValueError):
    """Inputs the quality-predictor routing cannot use; the message names the file and reason."""


@dataclass
class GainData:
    """One enhancement run's files with features and every model's gain over the noisy input."""

    files: list[str]
    models: list[str]
    features: np.ndarray
    feature_names: list[str]
    gains: np.ndarray  # (files, models); the label metric's gain, oriented so higher is better
    scores: EnhancementScores


def load_gain_data(
    labels_csv: str | os.PathLike[str], feat_dir: str | os.PathLike[str], label_metric: str
) -> GainData:
    """Files of an enhancement run that have a feature vector and the noisy input's score."""
    if label_metric not in METRICS:
        raise SelectionError(f"unknown label metric {label_metric!r}; known: {', '.join(METRICS)}")
    scores = read_enhancement_scores(labels_csv)
    if not scores.models:
        raise SelectionError(f"{labels_csv}: no <MODEL>_ovr columns, so no models to predict")
    sign = 1.0 if METRICS[label_metric].higher_is_better else -1.0
    files = sorted(f for f in scores.labels if math.isfinite(scores.value(f, NOISY_SYSTEM, label_metric)))
    if not files:
        raise SelectionError(f"{labels_csv}: no file has the noisy input's {label_metric} in scores.csv")
    features, names = load_feature_matrix(feat_dir, files)
    gains = np.array([
        [sign * (scores.value(f, m, label_metric) - scores.value(f, NOISY_SYSTEM, label_metric)) for m in scores.models]
        for f in files
    ])
    return GainData(files, list(scores.models), features, names, gains, scores)


def seconds_per_audio_s(scores: EnhancementScores, files: Sequence[str], durations: Mapping[str, float]) -> list[float]:
    """Each model's enhancement seconds per second of audio, over the files it ran on."""
    costs = []
    for model in scores.models:
        timed = [f for f in files if math.isfinite(scores.seconds.get((f, model), math.nan))]
        audio_s = sum(durations[f] for f in timed)
        spent = sum(scores.seconds[(f, model)] for f in timed)
        costs.append(spent / audio_s if audio_s > 0 else math.nan)
    return costs


def read_durations(scores_csv: str | os.PathLike[str]) -> dict[str, float]:
    """Each file's duration in seconds, from the `noisy` rows of scores.csv."""
    table = pd.read_csv(scores_csv, dtype={"file": str, "system": str})
    noisy = table[table.system == NOISY_SYSTEM]
    return dict(zip(noisy.file, noisy.duration_s.astype(float), strict=True))


def train_selector(
    labels_csv: str | os.PathLike[str],
    feat_dir: str | os.PathLike[str],
    metadata_csv: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    *,
    label_metric: str = "dnsmos_ovr",
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    num_rounds: int | None = None,
) -> dict[str, Any]:
    """Fit the predictor and the policies' settings on a training run; write the checkpoint."""
    import torch

    data = load_gain_data(labels_csv, feat_dir, label_metric)
    metadata = pd.read_csv(metadata_csv, dtype={"file": str, "speaker": str, "noise_source": str})
    missing_columns = {"file", "speaker", "noise_source"} - set(metadata.columns)
    if missing_columns:
        raise SelectionError(f"{metadata_csv}: no column {', '.join(sorted(missing_columns))} (mixing's metadata.csv)")
    check_file_ids(metadata.file, metadata_csv)
    meta = metadata.set_index("file")
    unknown = [f for f in data.files if f not in meta.index]
    if unknown:
        raise SelectionError(f"{metadata_csv}: {len(unknown)} files of {labels_csv} are not listed, e.g. {unknown[0]}")
    folds = crossed_folds(
        [meta.at[f, "speaker"] for f in data.files], [meta.at[f, "noise_source"] for f in data.files], n_folds, seed
    )
    fit_kwargs = {} if num_rounds is None else {"num_rounds": num_rounds}
    predictor, oof = QualityPredictor.fit(
        data.features, data.gains, folds, data.models, data.feature_names, seed=seed, **fit_kwargs
    )
    ranking = rank_single_models(data.gains)
    best_single = int(ranking[0])
    validated = np.all(np.isfinite(oof), axis=1)
    if not validated.any():
        raise SelectionError("no training file was held out by a fold; use fewer folds or more mixtures")
    margin = choose_margin(oof[validated], data.gains[validated], best_single)
    durations = read_durations(Path(labels_csv).with_name("scores.csv"))
    selector = {
        "format": SELECTOR_FORMAT,
        "kind": "quality_selector",
        "label_metric": label_metric,
        "feature_set": str(read_features_meta(feat_dir)["feature_set"]),
        "predictor": predictor.to_metadata(),
        "models": data.models,
        "ranking": [data.models[i] for i in ranking],
        "best_single": data.models[best_single],
        "margin": margin,
        "seconds_per_audio_s": seconds_per_audio_s(data.scores, data.files, durations),
        "training": {
            "files": len(data.files),
            "folds": n_folds,
            "held_out_files": int(validated.sum()),
            "fold_train_files": [int(train.sum()) for train, _ in folds],
            "seed": seed,
            "oof_mae": [float(np.nanmean(np.abs(oof[validated, j] - data.gains[validated, j])))
                        for j in range(len(data.models))],
        },
    }
    checkpoint_path = Path(checkpoint_path)
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(checkpoint_path) as tmp:
        torch.save(selector, tmp)
    return selector


def load_selector(checkpoint_path: str | os.PathLike[str]) -> tuple[dict[str, Any], QualityPredictor]:
    """The checkpoint's settings and its predictor; SelectionError with the reason when unusable."""
    import torch

    try:
        selector = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, pickled or foreign file: one clear line
        raise SelectionError(f"{checkpoint_path}: not a readable selector checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(selector, dict) or selector.get("kind") != "quality_selector":
        raise SelectionError(f"{checkpoint_path}: not a quality-selector checkpoint; train one with --training_stage predictor")
    if selector.get("format") != SELECTOR_FORMAT:
        raise SelectionError(f"{checkpoint_path}: selector format {selector.get('format')}, this serec reads "
                             f"{SELECTOR_FORMAT}; retrain with --training_stage predictor")
    return selector, QualityPredictor.from_metadata(selector["predictor"])


@dataclass
class PolicyChoice:
    """A policy's choice per file: the model run and kept, and every model it ran."""

    name: str
    description: str
    chosen: list[str]
    ran: list[list[str]]
    verified: int = 0  # DNSMOS scorings per file


def choose(
    selector: Mapping[str, Any],
    predicted: np.ndarray,
    verified_scores: np.ndarray,
    *,
    cost_lambda: float = DEFAULT_COST_LAMBDA,
    verify_k: int = DEFAULT_VERIFY_K,
) -> list[PolicyChoice]:
    """Every predictor policy's choices for files with these predicted gains.

    `verified_scores` is (files, models): each model's output scored with VERIFY_METRIC,
    used only by the verify policies and only at the candidates they run.
    """
    models = list(selector["models"])
    best = models.index(selector["best_single"])
    k = min(verify_k, len(models))
    fixed = np.array([[models.index(m) for m in selector["ranking"][:k]]] * predicted.shape[0])
    tops = top_k(predicted, k)

    def named(indices: np.ndarray) -> list[str]:
        return [models[i] for i in indices]

    one = [[m] for m in named(predict_best(predicted))]
    safe = named(predict_best_safe(predicted, best, selector["margin"]))
    cheap = named(cost_aware(predicted, selector["seconds_per_audio_s"], cost_lambda))
    return [
        PolicyChoice("predict_best", "the model with the highest predicted gain", [r[0] for r in one], one),
        PolicyChoice("predict_best_safe", f"{selector['best_single']} unless another's predicted gain beats it by "
                     f"> {selector['margin']:g} (margin chosen on training folds)", safe, [[m] for m in safe]),
        PolicyChoice("cost_aware", f"highest predicted gain - {cost_lambda:g} x seconds per audio second", cheap,
                     [[m] for m in cheap]),
        PolicyChoice(f"verify_top{k}", f"run the top {k} predicted models, keep the best {VERIFY_METRIC}",
                     named(verify(tops, verified_scores)), [named(row) for row in tops], verified=k),
        PolicyChoice(f"verify_fixed_top{k}", f"always run {', '.join(selector['ranking'][:k])}, keep the best "
                     f"{VERIFY_METRIC}", named(verify(fixed, verified_scores)), [named(row) for row in fixed],
                     verified=k),
    ]


def cost_curve(selector: Mapping[str, Any], predicted: np.ndarray) -> list[tuple[float, list[str]]]:
    """cost_aware's choices at each lambda of COST_LAMBDA_SWEEP (a quality-vs-compute curve)."""
    models = list(selector["models"])
    return [
        (lam, [models[i] for i in cost_aware(predicted, selector["seconds_per_audio_s"], lam)])
        for lam in COST_LAMBDA_SWEEP
    ]
