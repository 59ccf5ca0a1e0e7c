"""Step 5 with the quality selector: predict every model's gain on new files, route them by a
policy, and add every policy's row to the strategy comparison.

Routing by `--policy` writes the same files as the two-stage recommender (recommendations.csv
with each model's predicted gain, recommender.json, rec_<MODEL>/ copies), so routing,
evaluation, strategies and the report work unchanged. A verify policy runs its k candidates
into OUT/verify/candidate_<i>/ (each an ordinary routed folder, so it resumes), scores their
outputs with DNSMOS at the level the selector's labels were scored at, and keeps the best:
that output is copied into its rec folder with a routing.csv row whose seconds are the k runs'.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from serec.assessment import evaluate_rec_folders
from serec.audio import AudioError, file_id, list_audio_files
from serec.fileio import RowLog, atomic_path, write_csv_atomic, write_json_atomic
from serec.parallel import Backend
from serec.predictor import GainLearner
from serec.routing import Route, copy_routed_files, enhance_routed_files, enhanced_path
from serec.schema import (
    ERROR_COLUMNS,
    ERRORS_CSV,
    RECOMMENDATIONS_CSV,
    RECOMMENDER_JSON,
    ROUTING_COLUMNS,
    ROUTING_CSV,
    read_evaluation,
    read_routing,
)
from serec.selection import (
    DEFAULT_COST_LAMBDA,
    DEFAULT_VERIFY_K,
    PolicyChoice,
    SelectionError,
    choose,
    kept_by_verification,
    load_selector,
    policy_names,
    predict_files,
    predict_one,
    selector_strategies,
    time_recommender,
)
from serec.strategies import VERIFY_METRIC, EnhancementScores, Strategy, cached_timing, timing_key

VERIFY_DIR = "verify"
# The selector's measured seconds per file (features + prediction), reused while its inputs
# are unchanged, like dnsmos_timing.json.
SELECTOR_TIMING_JSON = "selector_timing.json"
TIMED_FILES = 8
PREDICTION_PREFIX = "pred_"  # recommendations.csv: each model's predicted gain


@dataclass
class SelectorRun:
    """A loaded selector, the policy settings of this run, and where its checkpoint came from."""

    path: Path
    settings: dict[str, Any]
    predictor: GainLearner
    policy: str | None = None
    cost_lambda: float = DEFAULT_COST_LAMBDA
    verify_k: int = DEFAULT_VERIFY_K

    @classmethod
    def load(cls, path: str | os.PathLike[str], policy: str | None = None,
             cost_lambda: float = DEFAULT_COST_LAMBDA, verify_k: int = DEFAULT_VERIFY_K) -> SelectorRun:
        settings, predictor = load_selector(path)
        known = policy_names(min(verify_k, len(settings["models"])))
        if policy is not None and policy not in known:
            raise SelectionError(f"--policy {policy}: not a policy of this selector; choose from {', '.join(known)}")
        return cls(Path(path), settings, predictor, policy, cost_lambda, verify_k)

    @property
    def models(self) -> list[str]:
        return list(self.settings["models"])

    def describe(self) -> dict[str, Any]:
        """recommender.json's record: what routed the files (a re-run with other settings predicts again)."""
        return {
            "routing": f"quality selector, policy {self.policy}",
            "selector": {"path": str(self.path), "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
                         "label_metric": self.settings["label_metric"], "feature_set": self.settings["feature_set"],
                         "best_single": self.settings["best_single"], "margin": self.settings["margin"]},
            "policy": self.policy, "cost_lambda": self.cost_lambda, "verify_k": self.verify_k,
        }

    def choice(self, predicted: np.ndarray, name: str) -> PolicyChoice:
        return next(c for c in choose(self.settings, predicted, cost_lambda=self.cost_lambda, verify_k=self.verify_k)
                    if c.name == name)


@dataclass
class Predictions:
    """Predicted gains of the files that have features, and the files that could not be predicted."""

    files: list[str]
    gains: np.ndarray  # (files, models)
    errors: dict[str, str]
    seconds_per_file: float  # features + prediction, one process; NaN when the features were given

    def of(self, files: Sequence[str]) -> np.ndarray:
        index = {f: i for i, f in enumerate(self.files)}
        return self.gains[[index[f] for f in files]]


def predict_folder(run: SelectorRun, noisy_dir: Path, files: Sequence[str],
                   features_dir: Path | None = None) -> Predictions:
    """Each file's predicted gains: from `features_dir` (the selector's feature set, as
    preprocess_features.py writes it; a learner that reads the audio also reads `noisy_dir`)
    or computed here, one file at a time, timed."""
    from serec.parallel import use_single_thread

    if features_dir is not None:
        predicted = predict_files(run.settings, run.predictor, features_dir, files, noisy_dir)
        return Predictions(list(files), predicted, {}, math.nan)
    use_single_thread()
    done, rows, errors, seconds = [], [], {}, 0.0
    for fid in tqdm(files, desc="predict", unit="file"):
        started = time.perf_counter()
        try:
            rows.append(predict_one(run.settings, run.predictor, noisy_dir / fid))
        except AudioError as exc:
            errors[fid] = exc.reason
            continue
        seconds += time.perf_counter() - started
        done.append(fid)
    gains = np.array(rows) if rows else np.zeros((0, len(run.models)))
    return Predictions(done, gains, errors, seconds / len(done) if done else math.nan)


def route_by_policy(
    run: SelectorRun,
    noisy_dir: Path,
    out_dir: Path,
    *,
    features_dir: Path | None,
    enhance: Callable[[Path, Sequence[Route]], Any],
    evaluate: Callable[[Path], Any],
) -> tuple[list[Route], dict[str, str]]:
    """Predict, choose by the run's policy (verifying candidates when it says so), and write
    recommendations.csv, recommender.json and errors.csv. Returns the routes and the files
    that could not be predicted. `enhance(folder, routes)` and `evaluate(folder)` run the
    routed enhancers and the scoring of a verify candidate folder."""
    assert run.policy is not None
    fids = [file_id(p, noisy_dir) for p in list_audio_files(noisy_dir)]
    if not fids:
        raise FileNotFoundError(f"{noisy_dir}: no .wav or .flac files")
    predictions = predict_folder(run, noisy_dir, fids, features_dir)
    choice = run.choice(predictions.gains, run.policy) if predictions.files else None
    kept = [] if choice is None else (
        verify_candidates(choice, predictions.files, noisy_dir, out_dir, enhance, evaluate)
        if choice.verifies else list(choice.kept or []))
    routes = [Route(f, m, m) for f, m in zip(predictions.files, kept, strict=True)]
    rows = [{"file": f, "recommendation": m,
             **{f"{PREDICTION_PREFIX}{model}": round(float(g), 6) for model, g in zip(run.models, gains, strict=True)},
             "routed_model": m}
            for f, m, gains in zip(predictions.files, kept, predictions.gains, strict=True)]
    columns = ["file", "recommendation", *(f"{PREDICTION_PREFIX}{m}" for m in run.models), "routed_model"]
    write_csv_atomic(out_dir / RECOMMENDATIONS_CSV, columns, rows)
    write_csv_atomic(out_dir / ERRORS_CSV, ERROR_COLUMNS,
                     ({"file": f, "reason": r} for f, r in sorted(predictions.errors.items())))
    files = len(predictions.files)
    write_json_atomic(out_dir / RECOMMENDER_JSON, {
        **run.describe(), "fallback_model": run.settings["best_single"],
        "inference": {"seconds": round(predictions.seconds_per_file * files, 4) if files else 0.0, "files": files},
    })
    if choice is not None and choice.verifies:
        _place_verified(out_dir, routes, run.verify_k)
    return routes, predictions.errors


def candidate_dir(out_dir: Path, rank: int) -> Path:
    return out_dir / VERIFY_DIR / f"candidate_{rank}"


def verify_candidates(
    choice: PolicyChoice,
    files: Sequence[str],
    noisy_dir: Path,
    out_dir: Path,
    enhance: Callable[[Path, Sequence[Route]], Any],
    evaluate: Callable[[Path], Any],
) -> list[str]:
    """Run each file's candidates (rank i into candidate_<i>/), score them, keep the DNSMOS-best."""
    k = len(choice.ran[0])
    models = sorted({m for ran in choice.ran for m in ran})
    scores = np.full((len(files), len(models)), math.nan)
    row_of = {f: i for i, f in enumerate(files)}
    for rank in range(k):
        folder = candidate_dir(out_dir, rank + 1)
        routes = [Route(f, ran[rank], ran[rank]) for f, ran in zip(files, choice.ran, strict=True)]
        copy_routed_files(noisy_dir, folder, routes)
        enhance(folder, routes)
        evaluate(folder)
        for row in read_evaluation(folder):
            if row["status"] == "ok" and row["file"] in row_of:
                value = row.get(f"enhanced_{VERIFY_METRIC}", "")
                scores[row_of[row["file"]], models.index(row["routed_model"])] = float(value) if value else math.nan
    return kept_by_verification(choice, scores, models)


def _place_verified(out_dir: Path, routes: Sequence[Route], k: int) -> None:
    """Each kept candidate's output copied into its rec folder with a routing.csv row (seconds:
    all k candidates' runs), so the routed enhancement finds it done and runs nothing again."""
    import shutil

    runs: dict[str, list[Mapping[str, str]]] = {}
    for rank in range(1, k + 1):
        for row in read_routing(candidate_dir(out_dir, rank)):
            runs.setdefault(row["file"], []).append(row)
    log = RowLog(out_dir / ROUTING_CSV, ROUTING_COLUMNS)
    placed = {r["file"]: r for r in log.read()}
    new_rows = []
    for route in routes:
        rows = runs.get(route.file, [])
        kept = next((r for r in rows if r["routed_model"] == route.routed_model and r["status"] == "ok"), None)
        previous = placed.get(route.file)
        if kept is None or (previous is not None and previous["routed_model"] == route.routed_model
                            and enhanced_path(out_dir, route).is_file()):
            continue  # nothing to place (enhancement runs it), or placed by an earlier run
        rank = next(i for i, r in enumerate(rows, start=1) if r is kept)
        source = enhanced_path(candidate_dir(out_dir, rank), route)
        target = enhanced_path(out_dir, route)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        seconds = sum(float(r["seconds"]) for r in rows if r["status"] == "ok" and r["seconds"])
        new_rows.append({**kept, "recommendation": route.recommendation, "seconds": round(seconds, 4)})
    if new_rows:
        log.append(new_rows)


def recorded_predictions(out_dir: Path, models: Sequence[str]) -> Predictions | None:
    """The predicted gains a policy run wrote to recommendations.csv (None when it has none)."""
    from serec.schema import read_recommendations

    rows = read_recommendations(out_dir)
    columns = [f"{PREDICTION_PREFIX}{m}" for m in models]
    if not rows or any(c not in rows[0] for c in columns):
        return None
    gains = np.array([[float(r[c]) for c in columns] for r in rows])
    return Predictions([r["file"] for r in rows], gains, {}, math.nan)


def policy_rows(run: SelectorRun, out_dir: Path, noisy_dir: Path | None, features_dir: Path | None,
                recommender_seconds_per_file: float) -> Callable[[list[str], EnhancementScores], list[Strategy]]:
    """compare_strategies' `extra`: every policy of the selector on the compared files, with
    the verify policies keeping the candidate whose DNSMOS in ENH's scores is best.

    Predictions come from this run's recommendations.csv (routed by a policy), the
    selector's features folder, or are computed here; the recommender's seconds per file
    are the ones measured while predicting, else timed on a sample of the noisy files.
    """

    def rows(files: list[str], scores: EnhancementScores) -> list[Strategy]:
        predictions = recorded_predictions(out_dir, run.models)
        if predictions is None or not set(files) <= set(predictions.files):
            if noisy_dir is None and features_dir is None:
                raise SelectionError("the selector's rows need the files' features: give --noisy_speech_dir "
                                     "or --selector_features_dir")
            if noisy_dir is None and run.predictor.reads_audio:
                raise SelectionError(f"{run.path}: its {run.predictor.learner} learner reads the noisy audio as "
                                     "well as the features: give --noisy_speech_dir")
            predictions = predict_folder(run, noisy_dir or Path(), files, features_dir)
        seconds = recommender_seconds_per_file
        if not math.isfinite(seconds):
            seconds = predictions.seconds_per_file
        if not math.isfinite(seconds) and noisy_dir is not None:
            sample = [noisy_dir / f for f in files][:TIMED_FILES]
            key = timing_key(sample, selector_sha256=run.describe()["selector"]["sha256"])
            seconds = cached_timing(out_dir / SELECTOR_TIMING_JSON, key,
                                    lambda: time_recommender(run.settings, run.predictor, sample))
        usable = [f for f in files if f in set(predictions.files)]
        return selector_strategies(run.settings, predictions.of(usable), usable, scores,
                                   recommender_seconds_per_file=seconds, cost_lambda=run.cost_lambda,
                                   verify_k=run.verify_k)

    return rows


def enhance_and_evaluate(model_configs: Mapping[str, Mapping[str, Any]], device: str, seed: int, num_workers: int,
                         retry_errors: bool, backend: Backend | None, dnsmos_level_db: float | None
                         ) -> tuple[Callable[[Path, Sequence[Route]], Any], Callable[[Path], Any]]:
    """The two callbacks route_by_policy runs verify candidates with."""

    def enhance(folder: Path, routes: Sequence[Route]) -> Any:
        return enhance_routed_files(folder, routes, model_configs, device=device, seed=seed,
                                    num_workers=num_workers, retry_errors=retry_errors, backend=backend)

    def evaluate(folder: Path) -> Any:
        return evaluate_rec_folders(folder, None, num_workers=num_workers, backend=backend,
                                    dnsmos_level_db=dnsmos_level_db)

    return enhance, evaluate


__all__ = ["PREDICTION_PREFIX", "VERIFY_DIR", "Predictions", "SelectorRun", "enhance_and_evaluate",
           "policy_rows", "predict_folder", "route_by_policy"]
