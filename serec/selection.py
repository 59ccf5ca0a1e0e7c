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

from serec.feature_files import load_feature_matrix, read_features_meta
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
from serec.schema import SELECTION_METRICS, write_selection_csv
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


# ---------------------------------------------------------------------------------------
# Scoring the policies on an evaluated test split

@dataclass
class PolicyTiming:
    """Measured seconds per file: features + prediction, and one DNSMOS scoring of an output."""

    recommender_s: float = math.nan
    dnsmos_s: float = math.nan


def _row(
    name: str,
    description: str,
    chosen: Sequence[str],
    ran: Sequence[Sequence[str]],
    data: GainData,
    label_metric: str,
    baseline: Sequence[str],
    oracle: Sequence[str],
    recommender_s: float,
    dnsmos_s: float,
    seed: int,
) -> dict[str, Any]:
    from serec.bootstrap import captured_share, mean_difference

    files, scores = data.files, data.scores

    def per_file(choice: Sequence[str], metric: str) -> np.ndarray:
        return np.array([scores.value(f, m, metric) for f, m in zip(files, choice, strict=True)])

    values = per_file(chosen, label_metric)
    base, best = per_file(baseline, label_metric), per_file(oracle, label_metric)
    gain = mean_difference(values, base, seed=seed)
    share = captured_share(values, base, best, seed=seed)
    pesq = np.array([[scores.value(f, m, "pesq_wb") for m in data.models] for f in files])
    has_pesq = np.isfinite(pesq).all(axis=1)
    pesq_best = [data.models[j] for j in np.argmax(np.where(np.isfinite(pesq), pesq, -np.inf), axis=1)]
    agreement = (float(np.mean([c == p for c, p, ok in zip(chosen, pesq_best, has_pesq, strict=True) if ok]))
                 if has_pesq.any() else math.nan)
    enhancer_s = float(sum(scores.seconds.get((f, m), math.nan) for f, models in zip(files, ran, strict=True)
                           for m in models))
    verified = sum(len(models) for models in ran) if name.startswith("verify") else 0
    total = enhancer_s + len(files) * (recommender_s if math.isfinite(recommender_s) else 0.0) + verified * (
        dnsmos_s if math.isfinite(dnsmos_s) else 0.0)
    return {
        "strategy": name, "description": description, "files": len(files),
        **{m: float(np.nanmean(per_file(chosen, m))) for m in SELECTION_METRICS},
        "gain_vs_best_single": gain.estimate, "gain_ci_low": gain.low, "gain_ci_high": gain.high,
        "oracle_gain_captured": share.estimate, "captured_ci_low": share.low, "captured_ci_high": share.high,
        "regret": float(np.nanmean(best - values)),
        "enhancer_seconds": enhancer_s, "recommender_seconds": recommender_s * len(files),
        "dnsmos_seconds": verified * dnsmos_s, "total_seconds": total,
        "pesq_best_agreement": agreement,
    }


def evaluate_selector(
    selector: Mapping[str, Any],
    predictor: QualityPredictor,
    labels_csv: str | os.PathLike[str],
    feat_dir: str | os.PathLike[str],
    *,
    timing: PolicyTiming | None = None,
    cost_lambda: float = DEFAULT_COST_LAMBDA,
    verify_k: int = DEFAULT_VERIFY_K,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every policy, every fixed model and the oracle on an evaluated split, with bootstrap CIs.

    The baseline of the gain, its interval and the captured share is the best single model
    on these files (the strictest fixed baseline); the oracle is the best model per file by
    the label metric. Compute is summed over the files: the enhancers each strategy runs
    (their measured seconds in scores.csv), the recommender (features + prediction) and,
    for verify policies, one DNSMOS scoring per candidate.
    """
    label_metric = selector["label_metric"]
    data = load_gain_data(labels_csv, feat_dir, label_metric)
    if data.models != list(selector["models"]):
        raise SelectionError(f"{labels_csv}: models {data.models} differ from the selector's {selector['models']}")
    if data.feature_names != predictor.feature_names:
        raise SelectionError(f"{feat_dir}: feature names differ from those the predictor was trained on "
                             f"(feature set {selector['feature_set']}); recompute them with that feature set")
    timing = timing or PolicyTiming()
    complete = np.all(np.isfinite(data.gains), axis=1)
    if not complete.all():
        keep = np.flatnonzero(complete)
        data = GainData([data.files[i] for i in keep], data.models, data.features[keep], data.feature_names,
                        data.gains[keep], data.scores)
    predicted, _ = predictor.predict(data.features)
    verified = np.array([[data.scores.value(f, m, VERIFY_METRIC) for m in data.models] for f in data.files])
    means = np.nanmean(data.gains, axis=0)
    best_single = data.models[int(np.argmax(means))]
    oracle = [data.models[j] for j in np.argmax(data.gains, axis=1)]
    baseline = [best_single] * len(data.files)

    def row(name: str, description: str, chosen: Sequence[str], ran: Sequence[Sequence[str]],
            recommender_s: float = 0.0) -> dict[str, Any]:
        return _row(name, description, chosen, ran, data, label_metric, baseline, oracle, recommender_s,
                    timing.dnsmos_s, seed)

    rows = [row(c.name, c.description, c.chosen, c.ran, timing.recommender_s)
            for c in choose(selector, predicted, verified, cost_lambda=cost_lambda, verify_k=verify_k)]
    rows += [row(f"always_{m}", f"always {m}" + (" (best single model on these files)" if m == best_single else ""),
                 [m] * len(data.files), [[m]] * len(data.files)) for m in data.models]
    rows.append(row("oracle", f"best model per file by {label_metric}, known for free", oracle,
                    [[m] for m in oracle]))
    rows += [row(f"cost_aware@{lam:g}", f"cost_aware at lambda {lam:g}", chosen, [[m] for m in chosen],
                 timing.recommender_s) for lam, chosen in cost_curve(selector, predicted)]
    base_seconds = next(r["total_seconds"] for r in rows if r["strategy"] == f"always_{best_single}")
    for r in rows:
        r["compute_vs_best_single"] = r["total_seconds"] / base_seconds if base_seconds > 0 else math.nan
    return rows


def measure_timing(selector: Mapping[str, Any], predictor: QualityPredictor, noisy_paths: Sequence[Path],
                   max_files: int = 8) -> PolicyTiming:
    """Seconds per file on this machine, one process: features + prediction, and DNSMOS on one output."""
    import time

    from serec.features import file_features
    from serec.parallel import use_single_thread
    from serec.strategies import measure_dnsmos_seconds_per_file

    use_single_thread()
    sample = list(noisy_paths)[:max_files]
    if not sample:
        return PolicyTiming()
    file_features(sample[0], selector["feature_set"])  # loads the ONNX sessions outside the timing
    started = time.perf_counter()
    for path in sample:
        predictor.predict(file_features(path, selector["feature_set"])[None, :])
    recommender_s = (time.perf_counter() - started) / len(sample)
    return PolicyTiming(recommender_s, measure_dnsmos_seconds_per_file(sample, max_files))


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
    train.add_argument("--label_metric", default="dnsmos_ovr", choices=list(METRICS))
    train.add_argument("--n_folds", type=int, default=DEFAULT_FOLDS)
    train.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("evaluate", help="score every policy on an evaluated test split")
    evaluate.add_argument("--selector", type=Path, required=True, help="checkpoint written by train")
    evaluate.add_argument("--labels_csv", type=Path, required=True, help="enhancement_driver's labels.csv (test split)")
    evaluate.add_argument("--features_dir", type=Path, required=True, help="features of the test split's noisy files")
    evaluate.add_argument("--noisy_dir", type=Path, help="the test split's noisy files, to time the recommender and DNSMOS")
    evaluate.add_argument("--output_dir", type=Path, required=True, help=f"where {Path('selection.csv')} goes")
    evaluate.add_argument("--cost_lambda", type=float, default=DEFAULT_COST_LAMBDA)
    evaluate.add_argument("--verify_k", type=int, default=DEFAULT_VERIFY_K)
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap resampling seed")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            selector = train_selector(args.labels_csv, args.features_dir, args.metadata_csv, args.output,
                                      label_metric=args.label_metric, n_folds=args.n_folds, seed=args.seed)
            write_run_json(args.output.parent, args, selector_training=selector["training"])
            print(f"selector: {args.output} (best single {selector['best_single']}, safe margin "
                  f"{selector['margin']:g}, {selector['training']['files']} files)")
            return ExitStatus.OK
        selector, predictor = load_selector(args.selector)
        timing = (measure_timing(selector, predictor, list_audio_files(args.noisy_dir))
                  if args.noisy_dir else PolicyTiming())
        rows = evaluate_selector(selector, predictor, args.labels_csv, args.features_dir, timing=timing,
                                 cost_lambda=args.cost_lambda, verify_k=args.verify_k, seed=args.seed)
        path = write_selection_csv(args.output_dir, rows)
        write_run_json(args.output_dir, args, timing=vars(timing))
    except (SelectionError, FileNotFoundError, ValueError) as exc:
        print(f"serec.selection: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    for r in rows:
        print(f"{r['strategy']:<24} {r['dnsmos_ovr']:.3f}  gain {r['gain_vs_best_single']:+.3f} "
              f"[{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}]  captured {100 * r['oracle_gain_captured']:.0f}%  "
              f"compute x{r['compute_vs_best_single']:.2f}")
    print(f"policies: {path}")
    return ExitStatus.OK


if __name__ == "__main__":
    raise SystemExit(main())
