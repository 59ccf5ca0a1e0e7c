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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serec.feature_files import load_feature_matrix, read_features_meta
from serec.fileio import atomic_path
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
from serec.predictor import (
    DEFAULT_LEARNER,
    LEARNERS,
    GainInputs,
    GainLearner,
    LearnerSettings,
    learner_class,
)
from serec.quality import METRICS
from serec.strategies import (
    VERIFY_METRIC,
    EnhancementScores,
    Strategy,
    StrategyComparison,
    comparable_files,
    format_strategies,
    read_enhancement_scores,
    recorded_label_metric,
    reference_strategies,
    score_strategies,
    write_strategies,
)

SELECTOR_FORMAT = 1
SELECTOR_CHECKPOINT = "selector.pth"  # where --training_stage predictor writes it (the default learner's)
SELECTOR_RECORD_DIR = "predictor"  # and its run.json (REC/predictor/run.json)
DEFAULT_FOLDS = 5
DEFAULT_COST_LAMBDA = 0.1
DEFAULT_VERIFY_K = 2
# cost_aware's quality-vs-compute curve (lambda in label-metric units per second of compute
# per second of audio).
COST_LAMBDA_SWEEP: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class SelectionError(ValueError):
    """Inputs the quality-predictor routing cannot use; the message names the file and reason."""


def _learner_suffix(learner: str) -> str:
    """'' for the default learner (its files keep their names), else '_<learner>'."""
    if learner not in LEARNERS:
        raise SelectionError(f"unknown learner {learner!r}; choose from {', '.join(LEARNERS)}")
    return "" if learner == DEFAULT_LEARNER else f"_{learner}"


def selector_checkpoint(learner: str = DEFAULT_LEARNER) -> str:
    """The file name --training_stage predictor writes in REC for this learner: selector.pth for
    the default, selector_<learner>.pth for another, so every learner shares REC/folds.csv."""
    return f"{Path(SELECTOR_CHECKPOINT).stem}{_learner_suffix(learner)}{Path(SELECTOR_CHECKPOINT).suffix}"


def selector_record_dir(learner: str = DEFAULT_LEARNER) -> str:
    """The folder of REC the learner's training record (run.json) goes to: predictor for the
    default, predictor_<learner> for another."""
    return f"{SELECTOR_RECORD_DIR}{_learner_suffix(learner)}"


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


def scoring_level(labels_csv: str | os.PathLike[str]) -> float | None:
    """The DNSMOS level (dBFS) the enhancement run beside labels.csv scored at (None: as is)."""
    from serec.runinfo import recorded_dnsmos_level

    return recorded_dnsmos_level(Path(labels_csv).parent)


def _selector_folds(
    labels_csv: str | os.PathLike[str],
    metadata_csv: str | os.PathLike[str],
    files: Sequence[str],
    output_dir: Path,
    n_folds: int,
    seed: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], Callable[[np.ndarray, int], np.ndarray]]:
    """(train, held-out) masks over `files`: the folds of the thesis' stages in the same
    output folder (REC/folds.csv, made here if none), so both are validated on the same
    folds, disjoint in speakers and noise recordings; and the stages' inner validation rule
    (a fold's training mask and number -> the files that pick its epoch) for learners with
    epochs."""
    # Imported here: the recommender package loads the AST's libraries, which routing never needs.
    from serec.recommender.errors import RecommenderError
    from serec.recommender.folds import inner_validation_mask, read_labels, run_folds

    header = pd.read_csv(metadata_csv, nrows=0).columns
    missing_columns = {"file", "speaker", "noise_source"} - set(header)
    if missing_columns:
        raise SelectionError(f"{metadata_csv}: no column {', '.join(sorted(missing_columns))} (mixing's metadata.csv)")
    try:
        labels = read_labels(labels_csv)
        groups, run = run_folds(output_dir, labels, metadata_csv, n_folds, seed)
    except RecommenderError as exc:
        raise SelectionError(str(exc)) from exc
    rows = dict(zip(labels.file, range(len(labels)), strict=True))
    idx = np.array([rows[f] for f in files])
    strata, file_groups = labels.label.to_numpy(dtype=object)[idx], groups[idx]

    def inner_validation(train: np.ndarray, fold: int) -> np.ndarray:
        try:
            return inner_validation_mask(strata, file_groups, train, seed + fold)
        except RecommenderError as exc:
            raise SelectionError(f"fold {fold}: {exc}") from exc

    folds = [(run.training_part(k)[idx], run.held_out[idx] == k) for k in range(1, n_folds + 1)]
    return folds, inner_validation


def train_selector(
    labels_csv: str | os.PathLike[str],
    feat_dir: str | os.PathLike[str],
    metadata_csv: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    *,
    label_metric: str | None = None,
    n_folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    num_rounds: int | None = None,
    learner: str = DEFAULT_LEARNER,
    audio_dir: str | os.PathLike[str] | None = None,
    config: Any = None,
) -> dict[str, Any]:
    """Fit the predictor and the policies' settings on a training run; write the checkpoint.

    The label metric defaults to the one the training run's labels were made with.
    `learner` names the gain learner (serec.predictor.LEARNERS); `ast` reads the noisy files
    in `audio_dir` too (their fbank is cached in the checkpoint's folder, cache/) and is sized
    and trained by `config` (a RecommenderConfig); `num_rounds` is LightGBM's.
    """
    import time

    import torch

    label_metric = label_metric or recorded_label_metric(labels_csv)
    learner_cls = learner_class(learner)
    data = load_gain_data(labels_csv, feat_dir, label_metric)
    checkpoint_path = Path(checkpoint_path)
    folds, inner_validation = _selector_folds(labels_csv, metadata_csv, data.files, checkpoint_path.parent,
                                              n_folds, seed)
    inputs = GainInputs(data.features, data.files, None if audio_dir is None else Path(audio_dir),
                        checkpoint_path.parent / "cache")
    settings = LearnerSettings(seed=seed, inner_validation=inner_validation, config=config,
                               **({} if num_rounds is None else {"num_rounds": num_rounds}))
    started = time.perf_counter()
    predictor, oof = learner_cls.fit_gains(inputs, data.gains, folds, data.models, data.feature_names, settings)
    training_seconds = time.perf_counter() - started
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
        # The level the labels' DNSMOS was scored at: run-time verification scores at it too.
        "dnsmos_level_db": scoring_level(labels_csv),
        "feature_set": str(read_features_meta(feat_dir)["feature_set"]),
        "learner": learner,
        "predictor": predictor.to_metadata(),
        "models": data.models,
        "ranking": [data.models[i] for i in ranking],
        "best_single": data.models[best_single],
        "margin": margin,
        "seconds_per_audio_s": seconds_per_audio_s(data.scores, data.files, durations),
        "training": {
            "learner": learner,
            "seconds": training_seconds,
            "files": len(data.files),
            "folds": n_folds,
            "held_out_files": int(validated.sum()),
            "fold_train_files": [int(train.sum()) for train, _ in folds],
            "seed": seed,
            "oof_mae": [float(np.nanmean(np.abs(oof[validated, j] - data.gains[validated, j])))
                        for j in range(len(data.models))],
        },
    }
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(checkpoint_path) as tmp:
        torch.save(selector, tmp)
    return selector


def load_selector(checkpoint_path: str | os.PathLike[str]) -> tuple[dict[str, Any], GainLearner]:
    """The checkpoint's settings and its predictor (of the learner it records; selectors made
    before learners were recorded are LightGBM's); SelectionError with the reason when unusable."""
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
    learner = selector.get("learner", DEFAULT_LEARNER)
    if learner not in LEARNERS:
        raise SelectionError(f"{checkpoint_path}: made by learner {learner!r}, which this serec does not know "
                             f"({', '.join(LEARNERS)}); retrain with --training_stage predictor")
    return selector, learner_class(learner).from_metadata(selector["predictor"])


@dataclass
class PolicyChoice:
    """A policy's models per file: the ones it runs and, unless it verifies, the one it keeps."""

    name: str
    description: str
    ran: list[list[str]]
    kept: list[str] | None  # None: the DNSMOS-best of `ran`, known only once they have run

    @property
    def verifies(self) -> bool:
        return self.kept is None


def verify_k_of(selector: Mapping[str, Any], verify_k: int) -> int:
    """The number of candidates a verify policy runs (at most the number of models)."""
    if verify_k < 1:
        raise SelectionError(f"--verify_k must be at least 1, got {verify_k}")
    return min(verify_k, len(selector["models"]))


def policy_names(verify_k: int = DEFAULT_VERIFY_K) -> list[str]:
    """The routing policies' names, as recommendation_driver.py --policy takes them."""
    return ["predict_best", "predict_best_safe", "cost_aware", f"verify_top{verify_k}", f"verify_fixed_top{verify_k}"]


def choose(
    selector: Mapping[str, Any],
    predicted: np.ndarray,
    *,
    cost_lambda: float = DEFAULT_COST_LAMBDA,
    verify_k: int = DEFAULT_VERIFY_K,
) -> list[PolicyChoice]:
    """Every predictor policy's choices for files with these predicted gains (files, models)."""
    models = list(selector["models"])
    best = models.index(selector["best_single"])
    k = verify_k_of(selector, verify_k)
    fixed = selector["ranking"][:k]

    def named(indices: np.ndarray) -> list[str]:
        return [models[i] for i in indices]

    def alone(kept: list[str]) -> tuple[list[list[str]], list[str]]:
        return [[m] for m in kept], kept

    return [
        PolicyChoice("predict_best", "the model with the highest predicted gain",
                     *alone(named(predict_best(predicted)))),
        PolicyChoice("predict_best_safe", f"{selector['best_single']} unless another's predicted gain beats it by "
                     f"> {selector['margin']:g} (margin chosen on training folds)",
                     *alone(named(predict_best_safe(predicted, best, selector["margin"])))),
        PolicyChoice("cost_aware", f"highest predicted gain - {cost_lambda:g} x seconds per audio second",
                     *alone(named(cost_aware(predicted, selector["seconds_per_audio_s"], cost_lambda)))),
        PolicyChoice(f"verify_top{k}", f"run the top {k} predicted models, keep the best DNSMOS OVR",
                     [named(row) for row in top_k(predicted, k)], None),
        PolicyChoice(f"verify_fixed_top{k}", f"always run {', '.join(fixed)} (best on training), keep the best "
                     "DNSMOS OVR", [list(fixed)] * predicted.shape[0], None),
    ]


def cost_curve(selector: Mapping[str, Any], predicted: np.ndarray) -> list[PolicyChoice]:
    """cost_aware at each lambda of COST_LAMBDA_SWEEP: a quality-vs-compute curve."""
    models = list(selector["models"])
    curve = []
    for lam in COST_LAMBDA_SWEEP:
        kept = [models[i] for i in cost_aware(predicted, selector["seconds_per_audio_s"], lam)]
        curve.append(PolicyChoice(f"cost_aware@{lam:g}", f"cost_aware at lambda {lam:g}", [[m] for m in kept], kept))
    return curve


def kept_by_verification(choice: PolicyChoice, verified_scores: np.ndarray, models: Sequence[str]) -> list[str]:
    """Of each file's candidates, the one whose output scored best (`verified_scores`: files x models)."""
    candidates = np.array([[list(models).index(m) for m in ran] for ran in choice.ran])
    return [models[i] for i in verify(candidates, verified_scores)]


def selector_strategies(
    selector: Mapping[str, Any],
    predicted: np.ndarray,
    files: Sequence[str],
    scores: EnhancementScores,
    *,
    recommender_seconds_per_file: float = math.nan,
    cost_lambda: float = DEFAULT_COST_LAMBDA,
    verify_k: int = DEFAULT_VERIFY_K,
) -> list[Strategy]:
    """Every policy (and the cost_aware sweep) as strategies on evaluated files.

    The verify policies keep the candidate with the best DNSMOS OVR in scores.csv: the
    score they would measure at run time. Every policy pays the recommender's seconds; the
    fixed verify baseline needs no prediction and pays none.
    """
    models = list(selector["models"])
    if models != scores.models:
        raise SelectionError(f"{scores.labels_csv}: models {scores.models} differ from the selector's {models}")
    verified = np.array([[scores.value(f, m, VERIFY_METRIC) for m in models] for f in files])
    strategies = []
    for choice in [*choose(selector, predicted, cost_lambda=cost_lambda, verify_k=verify_k),
                   *cost_curve(selector, predicted)]:
        kept = kept_by_verification(choice, verified, models) if choice.verifies else choice.kept
        assert kept is not None
        needs_prediction = not choice.name.startswith("verify_fixed")
        strategies.append(Strategy(
            choice.name, choice.description, dict(zip(files, kept, strict=True)),
            dict(zip(files, choice.ran, strict=True)),
            recommender_seconds_per_file=recommender_seconds_per_file if needs_prediction else 0.0,
            dnsmos_scorings_per_file=len(choice.ran[0]) if choice.verifies else 0,
        ))
    return strategies


@dataclass
class PolicyTiming:
    """Measured seconds per file: features + prediction, and one DNSMOS scoring of an output."""

    recommender_s: float = math.nan
    dnsmos_s: float = math.nan


def predict_files(selector: Mapping[str, Any], predictor: GainLearner, feat_dir: str | os.PathLike[str],
                  files: Sequence[str], audio_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Predicted gains (files, models) from precomputed feature vectors of the selector's set
    (and, for learners that read the audio, the noisy files in `audio_dir`)."""
    features, names = load_feature_matrix(feat_dir, list(files))
    if names != predictor.feature_names:
        raise SelectionError(f"{feat_dir}: feature names differ from those the predictor was trained on "
                             f"(feature set {selector['feature_set']}); recompute them with that feature set")
    return predictor.predict(GainInputs(features, list(files), None if audio_dir is None else Path(audio_dir)))[0]


def predict_one(selector: Mapping[str, Any], predictor: GainLearner, path: Path) -> np.ndarray:
    """One noisy file's predicted gains (models,), all computed from its audio here: the
    feature vector, the learner's own audio input (an AST's fbank), the prediction."""
    from serec.features import file_features

    vector = file_features(path, selector["feature_set"])
    return predictor.predict(GainInputs(vector[None, :], [path.name], path.parent))[0][0]


def evaluate_selector(
    selector: Mapping[str, Any],
    predictor: GainLearner,
    labels_csv: str | os.PathLike[str],
    feat_dir: str | os.PathLike[str],
    *,
    audio_dir: str | os.PathLike[str] | None = None,
    timing: PolicyTiming | None = None,
    cost_lambda: float = DEFAULT_COST_LAMBDA,
    verify_k: int = DEFAULT_VERIFY_K,
    seed: int = 0,
) -> StrategyComparison:
    """Every policy, every fixed model and the oracle on an evaluated split (score_strategies)."""
    label_metric = selector["label_metric"]
    scores = read_enhancement_scores(labels_csv)
    files, left_out = comparable_files(sorted(scores.labels), scores, label_metric)
    if not files:
        raise SelectionError(f"{labels_csv}: no file has every system's {label_metric} in scores.csv")
    timing = timing or PolicyTiming()
    predicted = predict_files(selector, predictor, feat_dir, files, audio_dir)
    strategies = [
        *selector_strategies(selector, predicted, files, scores, recommender_seconds_per_file=timing.recommender_s,
                             cost_lambda=cost_lambda, verify_k=verify_k),
        *reference_strategies(files, scores, label_metric),
    ]
    rows, best_single = score_strategies(strategies, scores, files, label_metric=label_metric,
                                         dnsmos_seconds_per_file=timing.dnsmos_s, seed=seed)
    return StrategyComparison(rows, files, best_single, label_metric, left_out)


def time_recommender(selector: Mapping[str, Any], predictor: GainLearner, noisy_paths: Sequence[Path],
                     max_files: int = 8) -> float:
    """Seconds per file on this machine, one thread: features (+ an AST's fbank) + prediction
    (predict_one; NaN without files)."""
    import time

    from serec.parallel import use_single_thread

    use_single_thread()
    sample = [Path(p) for p in noisy_paths][:max_files]
    if not sample:
        return math.nan
    predict_one(selector, predictor, sample[0])  # loads ONNX sessions and parses models outside the timing
    started = time.perf_counter()
    for path in sample:
        predict_one(selector, predictor, path)
    return (time.perf_counter() - started) / len(sample)


def measure_timing(selector: Mapping[str, Any], predictor: GainLearner, noisy_paths: Sequence[Path],
                   max_files: int = 8) -> PolicyTiming:
    """Seconds per file on this machine, one thread: the recommender, and DNSMOS on one output."""
    from serec.strategies import measure_dnsmos_seconds_per_file

    return PolicyTiming(time_recommender(selector, predictor, noisy_paths, max_files),
                        measure_dnsmos_seconds_per_file(list(noisy_paths)[:max_files], max_files))


# `serec.selection train`'s flags for --learner ast: RecommenderConfig fields (its defaults when absent).
AST_FLAGS: dict[str, type] = {
    "pretrained_models": str, "ast_size": str, "ast_model_dir": Path, "max_audio_seconds": float,
    "learning_rate": float, "weight_decay": float, "batch_size": int, "num_epochs": int, "patience": int,
    "device": str,
}  # fmt: skip


def _recommender_config(args: Any) -> Any:
    """A RecommenderConfig from `serec.selection train`'s flags (those given; defaults else)."""
    from serec.recommender.config import RecommenderConfig

    given = {flag: getattr(args, flag) for flag in AST_FLAGS if getattr(args, flag) is not None}
    return RecommenderConfig(labels_csv=args.labels_csv, output_dir=args.output.parent, audio_dir=args.noisy_dir,
                             metadata_csv=args.metadata_csv, seed=args.seed, **given)


def main(argv: list[str] | None = None) -> int:
    """python -m serec.selection train|evaluate: the quality selector from the shell."""
    import argparse
    import sys

    from serec.audio import list_audio_files
    from serec.exitcodes import ExitStatus
    from serec.runinfo import write_run_json

    parser = argparse.ArgumentParser(prog="python -m serec.selection", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fit the predictor and the policies' settings on a training split")
    train.add_argument("--labels_csv", type=Path, required=True, help="enhancement_driver's labels.csv (training split)")
    train.add_argument("--features_dir", type=Path, required=True,
                       help="preprocess_features.py output for the same noisy files (e.g. --feature_set dnsmos_embed)")
    train.add_argument("--metadata_csv", type=Path, required=True, help="mixing metadata.csv (speaker, noise_source)")
    train.add_argument("--output", type=Path, required=True, help="the selector checkpoint (.pth) to write")
    train.add_argument("--label_metric", choices=list(METRICS),
                       help="the score whose gain is predicted (default: the one the labels were made with)")
    train.add_argument("--n_folds", type=int, default=DEFAULT_FOLDS)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--learner", choices=list(LEARNERS), default=DEFAULT_LEARNER,
                       help="lightgbm: boosted trees on the features; ast: the AST joined with the features "
                       "(hybrid), a regression head, one network per fold")
    train.add_argument("--noisy_dir", type=Path, help="the training split's noisy files (read by --learner ast)")
    for flag, kind in AST_FLAGS.items():  # default: RecommenderConfig's (model_recommender_w_scaler.py's)
        train.add_argument(f"--{flag}", type=kind, help="for --learner ast, as in model_recommender_w_scaler.py")
    evaluate = sub.add_parser("evaluate", help="score every policy on an evaluated test split")
    evaluate.add_argument("--selector", type=Path, required=True, help="checkpoint written by train")
    evaluate.add_argument("--labels_csv", type=Path, required=True, help="enhancement_driver's labels.csv (test split)")
    evaluate.add_argument("--features_dir", type=Path, required=True, help="features of the test split's noisy files")
    evaluate.add_argument("--noisy_dir", type=Path, help="the test split's noisy files, to time the recommender and DNSMOS")
    evaluate.add_argument("--output_dir", type=Path, required=True, help="where strategies.csv goes")
    evaluate.add_argument("--cost_lambda", type=float, default=DEFAULT_COST_LAMBDA)
    evaluate.add_argument("--verify_k", type=int, default=DEFAULT_VERIFY_K)
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            # Only learners that read the audio are networks, sized and trained by a RecommenderConfig.
            config = _recommender_config(args) if learner_class(args.learner).reads_audio else None
            selector = train_selector(args.labels_csv, args.features_dir, args.metadata_csv, args.output,
                                      label_metric=args.label_metric, n_folds=args.n_folds, seed=args.seed,
                                      learner=args.learner, audio_dir=args.noisy_dir, config=config)
            write_run_json(args.output.parent, args, selector_training=selector["training"])
            print(f"selector: {args.output} (best single {selector['best_single']}, safe margin "
                  f"{selector['margin']:g}, {selector['training']['files']} files)")
            return ExitStatus.OK
        selector, predictor = load_selector(args.selector)
        timing = (measure_timing(selector, predictor, list_audio_files(args.noisy_dir))
                  if args.noisy_dir else PolicyTiming())
        comparison = evaluate_selector(selector, predictor, args.labels_csv, args.features_dir,
                                       audio_dir=args.noisy_dir, timing=timing,
                                       cost_lambda=args.cost_lambda, verify_k=args.verify_k, seed=args.seed)
        path = write_strategies(args.output_dir, comparison)
        write_run_json(args.output_dir, args, timing=vars(timing))
    except (SelectionError, FileNotFoundError, ValueError) as exc:
        print(f"serec.selection: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    print(format_strategies(comparison))
    print(f"policies: {path}")
    return ExitStatus.OK


if __name__ == "__main__":
    raise SystemExit(main())
