"""Is adaptive selection worth it? The recommender's choice vs single models, the oracle, a random
choice and run-all-and-pick: mean scores, share of the oracle's gain captured, compute cost.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serec.audio import load_audio
from serec.fileio import write_json_atomic
from serec.labels import NOISY_SYSTEM
from serec.quality import METRIC_NAMES, METRICS
from serec.routing import KEEP_NOISY, rec_folder_name, routed_model_for
from serec.schema import (
    EVALUATION_CSV,
    HEADLINE_METRICS,
    RECOMMENDATIONS_CSV,
    RECOMMENDER_JSON,
    SCORES_CSV,
    SINGLE_COLUMN,
    read_evaluation,
    read_labels,
    read_recommendations,
    read_scores,
    write_strategies_csv,
)

# The measured DNSMOS seconds per file of run-all-and-pick, reused while its inputs are unchanged.
DNSMOS_TIMING_JSON = "dnsmos_timing.json"
SELECTION_METRIC = "dnsmos_ovr"
# Below this oracle headroom (mean OVR over the best single model) the captured fraction is
# flagged as unstable when printed.
SMALL_HEADROOM = 0.05


@dataclass
class EnhancementScores:
    """ENH/labels.csv + ENH/scores.csv: the compared models and per (file, system) scores."""

    models: list[str]
    labels: dict[str, str]
    values: dict[tuple[str, str], dict[str, float]]
    seconds: dict[tuple[str, str], float]
    labels_csv: Path
    scores_csv: Path

    def value(self, fid: str, system: str, metric: str) -> float:
        return self.values.get((fid, system), {}).get(metric, math.nan)


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_enhancement_scores(labels_csv: str | os.PathLike[str]) -> EnhancementScores:
    """Read labels.csv and the scores.csv beside it (enhancement_driver's output)."""
    labels_csv = Path(labels_csv)
    scores_csv = labels_csv.with_name(SCORES_CSV)
    for path in (labels_csv, scores_csv):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; --labels_csv must point at enhancement_driver's labels.csv")
    labels = read_labels(labels_csv)
    values: dict[tuple[str, str], dict[str, float]] = {}
    seconds: dict[tuple[str, str], float] = {}
    for row in read_scores(scores_csv):
        if row.get("status") != "ok":
            continue
        key = (row["file"], row["system"])
        values[key] = {m: _float(row.get(m)) for m in METRIC_NAMES}
        seconds[key] = 0.0 if row["system"] == NOISY_SYSTEM else _float(row.get("seconds"))
    return EnhancementScores(
        models=labels.models,
        labels={r["file"]: r["label"] for r in labels.rows},
        values=values,
        seconds=seconds,
        labels_csv=labels_csv,
        scores_csv=scores_csv,
    )


@dataclass
class StrategyRow:
    strategy: str
    description: str
    files: int
    means: dict[str, float]
    enhancer_seconds: float
    recommender_seconds: float = 0.0
    dnsmos_seconds: float = 0.0
    gain_over_best_single: float = math.nan
    oracle_gain_captured: float = math.nan

    @property
    def total_seconds(self) -> float:
        return self.enhancer_seconds + self.recommender_seconds + self.dnsmos_seconds

    def as_row(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "description": self.description,
            "files": self.files,
            **{m: _round(self.means.get(m, math.nan)) for m in METRIC_NAMES},
            "ovr_gain_over_best_single": _round(self.gain_over_best_single),
            "oracle_gain_captured": _round(self.oracle_gain_captured),
            "enhancer_seconds": _round(self.enhancer_seconds),
            "recommender_seconds": _round(self.recommender_seconds),
            "dnsmos_seconds": _round(self.dnsmos_seconds),
            "total_seconds": _round(self.total_seconds),
        }


def _round(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else math.nan


@dataclass
class StrategyComparison:
    rows: list[StrategyRow]
    files: list[str]
    best_single: str
    captured_fraction: float
    left_out: dict[str, str] = field(default_factory=dict)

    def row(self, strategy: str) -> StrategyRow:
        return next(r for r in self.rows if r.strategy == strategy)


def _choice_row(
    name: str,
    description: str,
    files: Sequence[str],
    choice: Mapping[str, str],
    scores: EnhancementScores,
) -> StrategyRow:
    """Mean scores and summed enhancer seconds when file f gets system choice[f]."""
    means = {m: _nanmean([scores.value(f, choice[f], m) for f in files]) for m in METRIC_NAMES}
    seconds = float(sum(scores.seconds.get((f, choice[f]), 0.0) for f in files))
    return StrategyRow(name, description, len(files), means, seconds)


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (a metric that failed on a file is left out); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _system_for(routed_model: str) -> str:
    # The passthrough's output is the noisy input: its scores are the `noisy` row's.
    return NOISY_SYSTEM if routed_model == KEEP_NOISY else routed_model


def _comparable_files(
    recommendations: Sequence[Mapping[str, str]], scores: EnhancementScores, fallback_model: str
) -> tuple[list[str], dict[str, str], dict[str, str], dict[str, str]]:
    """(files every strategy is scored on, the adaptive system per file, the single model's
    system per file, {file: reason} for the files left out)."""
    models = scores.models
    left_out: dict[str, str] = {}
    files: list[str] = []
    adaptive: dict[str, str] = {}
    single_rec: dict[str, str] = {}
    for row in recommendations:
        fid = row["file"]
        missing = [s for s in (NOISY_SYSTEM, *models) if not math.isfinite(scores.value(fid, s, SELECTION_METRIC))]
        routed = _system_for(row["routed_model"])
        if missing:
            left_out[fid] = f"no {SELECTION_METRIC} in {scores.scores_csv.name} for {', '.join(missing)}"
        elif routed not in (NOISY_SYSTEM, *models):
            left_out[fid] = f"routed model {row['routed_model']} is not among the scored models"
        else:
            files.append(fid)
            adaptive[fid] = routed
            if row.get(SINGLE_COLUMN):
                single_rec[fid] = _system_for(routed_model_for(row[SINGLE_COLUMN], fallback_model))
    if not files:
        raise ValueError(
            f"no file has both a recommendation and scores for every model in {scores.scores_csv} "
            f"({len(left_out)} left out, e.g. {next(iter(left_out.items()), ('', ''))}); "
            "was enhancement_driver run on the same noisy files?"
        )
    return files, adaptive, single_rec, left_out


def compare_strategies(
    recommendations: Sequence[Mapping[str, str]],
    scores: EnhancementScores,
    *,
    fallback_model: str,
    inference_seconds_per_file: float = math.nan,
    dnsmos_seconds_per_file: float = math.nan,
) -> StrategyComparison:
    """Every strategy on the files that have a recommendation and every model's score.

    All strategies are scored from ENH/scores.csv, so they use the same measurements; files
    where some model has no score are left out of every strategy (and counted). The oracle
    and run-all-and-pick choose the same model (highest DNSMOS OVR), so they score the
    same; they differ in cost: the oracle is a bound that knows the answer for free,
    run-all pays for every model plus DNSMOS on every output (DNSMOS needs no reference,
    so it is possible at inference).

    `recommendations` are recommendations.csv rows (`file`, `recommendation`,
    `routed_model`, optional `single_recommendation`, routed like the two-stage's with
    `fallback_model` for All_Failed). `dnsmos_seconds_per_file` is the time DNSMOS takes
    on one file's output (run-all pays it once per model and file); NaN when unknown.
    """
    models = scores.models
    if not models:
        raise ValueError(f"{scores.labels_csv}: no <MODEL>_ovr columns, so no models to compare")
    files, adaptive, single_rec, left_out = _comparable_files(recommendations, scores, fallback_model)

    rows: list[StrategyRow] = []
    adaptive_row = _choice_row("adaptive", "the recommender's routed model per file", files, adaptive, scores)
    adaptive_row.recommender_seconds = inference_seconds_per_file * len(files)
    rows.append(adaptive_row)
    if len(single_rec) == len(files):
        single_row = _choice_row("adaptive_single_model", "the single-model recommender's pick", files, single_rec, scores)
        # Its inference is timed together with the two-stage models', not on its own.
        single_row.recommender_seconds = math.nan
        rows.append(single_row)
    fixed = {m: _choice_row(f"always_{m}", f"always {m}", files, dict.fromkeys(files, m), scores) for m in models}
    rows.extend(fixed.values())
    rows.append(_choice_row("noisy", "no enhancement (the input)", files, dict.fromkeys(files, NOISY_SYSTEM), scores))
    sign = 1 if METRICS[SELECTION_METRIC].higher_is_better else -1
    best = {f: max(models, key=lambda m, f=f: (sign * scores.value(f, m, SELECTION_METRIC), -models.index(m)))
            for f in files}
    rows.append(_choice_row("oracle", "best model per file by DNSMOS OVR, known for free", files, best, scores))
    run_all = _choice_row("run_all_pick_best_ovr", "run every model, keep the best DNSMOS OVR", files, best, scores)
    run_all.enhancer_seconds = float(sum(scores.seconds.get((f, m), 0.0) for f in files for m in models))
    run_all.dnsmos_seconds = dnsmos_seconds_per_file * len(files) * len(models)
    rows.append(run_all)
    random_means = {
        m: _nanmean([_nanmean([scores.value(f, s, m) for s in models]) for f in files])
        for m in METRIC_NAMES
    }
    rows.append(StrategyRow(
        "random_expected", "a uniformly random model per file (expected value)", len(files), random_means,
        float(np.mean([fixed[m].enhancer_seconds for m in models])),
    ))

    best_single = max(models, key=lambda m: (sign * fixed[m].means[SELECTION_METRIC], -models.index(m)))
    base = fixed[best_single].means[SELECTION_METRIC]
    headroom = sign * (next(r for r in rows if r.strategy == "oracle").means[SELECTION_METRIC] - base)
    for row in rows:
        # Gains are improvements: positive when better, whichever way the metric points.
        row.gain_over_best_single = sign * (row.means[SELECTION_METRIC] - base)
        row.oracle_gain_captured = row.gain_over_best_single / headroom if headroom > 1e-9 else math.nan
    return StrategyComparison(rows, files, best_single, adaptive_row.oracle_gain_captured, left_out)


def write_strategies(out_dir: str | os.PathLike[str], comparison: StrategyComparison) -> Path:
    return write_strategies_csv(out_dir, (r.as_row() for r in comparison.rows))


def load_choices(
    out_dir: str | os.PathLike[str], fallback_model: str | None = None
) -> tuple[list[dict[str, str]], str]:
    """Each routed file's choice (`file`, `recommendation`, `routed_model`, maybe
    `single_recommendation`, and `noisy_copy` relative to OUT) and the All_Failed fallback.

    From recommendations.csv, with the fallback recorded in recommender.json unless
    `fallback_model` is given; folders routed by other means have only evaluation.csv,
    whose groups are the recommendations.
    """
    out_dir = Path(out_dir)
    recorded = out_dir / RECOMMENDER_JSON
    if fallback_model is None and recorded.is_file():
        fallback_model = json.loads(recorded.read_text(encoding="utf-8")).get("fallback_model")
    fallback = fallback_model or KEEP_NOISY
    rows = read_recommendations(out_dir)
    if not rows:
        rows = [
            {"file": r["file"], "recommendation": r["group"],
             "routed_model": r["routed_model"] or routed_model_for(r["group"], fallback)}
            for r in read_evaluation(out_dir)
        ]
    if not rows:
        raise FileNotFoundError(f"{out_dir}: neither {RECOMMENDATIONS_CSV} nor {EVALUATION_CSV} to compare")
    for row in rows:
        row["noisy_copy"] = f"{rec_folder_name(row['recommendation'])}/{row['file']}"
    return rows, fallback


def inference_seconds_per_file(out_dir: str | os.PathLike[str]) -> float:
    """Mean recommender inference seconds per file recorded in recommender.json (NaN if none)."""
    path = Path(out_dir) / RECOMMENDER_JSON
    if not path.is_file():
        return math.nan
    timing = json.loads(path.read_text(encoding="utf-8")).get("inference", {})
    files = int(timing.get("files", 0))
    return float(timing.get("seconds", 0.0)) / files if files else math.nan


def measure_dnsmos_seconds_per_file(
    paths: Sequence[str | os.PathLike[str]], max_files: int = 16, cache: Path | None = None
) -> float:
    """Mean seconds DNSMOS takes to score one of these files, one thread, one file per call
    (as a run-all deployment scores each output); timed on up to `max_files` of them.

    Model outputs have their input's length, so the inputs' timing is the outputs'. With
    `cache` (a JSON file), a timing measured before for the same timed files (path, size,
    modification time), machine and onnxruntime version is reused instead of re-measured.
    """
    import onnxruntime

    sample = list(paths)[:max_files]
    if not sample:
        return math.nan
    key = {
        "files": [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in sample],
        "host": platform.node(),
        "cores": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
    }
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return float(saved["seconds_per_file"])
    seconds = _time_dnsmos(sample)
    if cache is not None:
        write_json_atomic(cache, {"key": key, "seconds_per_file": seconds})
    return seconds


def _time_dnsmos(sample: Sequence[str | os.PathLike[str]]) -> float:
    from dnsmos import DNSMOS

    scorer = DNSMOS(num_threads=1)
    audios = [load_audio(p, validate=False) for p in sample]
    scorer.score(audios[0], 16000)  # builds the ONNX sessions outside the timing
    started = time.perf_counter()
    for audio in audios:
        scorer.score(audio, 16000)
    return (time.perf_counter() - started) / len(audios)


def format_strategies(comparison: StrategyComparison) -> str:
    """The headline numbers and the strategy table, for the terminal."""
    metrics = [m for m in HEADLINE_METRICS if any(math.isfinite(r.means.get(m, math.nan)) for r in comparison.rows)]
    adaptive = comparison.row("adaptive")
    best = comparison.row(f"always_{comparison.best_single}")
    oracle = comparison.row("oracle")
    run_all = comparison.row("run_all_pick_best_ovr")
    headroom = oracle.means[SELECTION_METRIC] - best.means[SELECTION_METRIC]
    width = max(len("strategy"), *(len(r.strategy) for r in comparison.rows)) + 2
    lines = [
        f"strategies on {len(comparison.files)} files"
        + (f" ({len(comparison.left_out)} left out: no complete scores)" if comparison.left_out else ""),
        f"  adaptive mean OVR:          {adaptive.means[SELECTION_METRIC]:.3f}",
        f"  best single model OVR:      {best.means[SELECTION_METRIC]:.3f} ({comparison.best_single})",
        f"  oracle OVR:                 {oracle.means[SELECTION_METRIC]:.3f}",
        f"  run-all-and-pick OVR:       {run_all.means[SELECTION_METRIC]:.3f}",
        f"  oracle gain captured:       {_pct(comparison.captured_fraction)}"
        "  ((adaptive - best single) / (oracle - best single))",
        *([f"  note: the oracle beats the best single model by only {headroom:.3f} OVR, so the "
           "captured fraction is a ratio of small differences"] if headroom < SMALL_HEADROOM else []),
        "",
        f"  {'strategy':<{width}}" + "".join(f"{m:>12}" for m in metrics)
        + f"{'captured':>10}{'enhancer_s':>12}{'recommend_s':>12}{'dnsmos_s':>10}{'total_s':>10}",
    ]
    for row in comparison.rows:
        lines.append(
            f"  {row.strategy:<{width}}" + "".join(f"{row.means[m]:>12.3f}" for m in metrics)
            + f"{_pct(row.oracle_gain_captured):>10}{row.enhancer_seconds:>12.2f}"
            + f"{_num(row.recommender_seconds):>12}{_num(row.dnsmos_seconds):>10}{_num(row.total_seconds):>10}"
        )
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def _num(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


__all__ = [
    "EnhancementScores",
    "StrategyComparison",
    "StrategyRow",
    "compare_strategies",
    "format_strategies",
    "inference_seconds_per_file",
    "DNSMOS_TIMING_JSON",
    "measure_dnsmos_seconds_per_file",
    "read_enhancement_scores",
    "load_choices",
    "write_strategies",
]
