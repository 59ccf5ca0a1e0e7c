"""Is adaptive selection worth it? The recommender's choice vs single models, the oracle, a random
choice and run-all-and-pick: mean scores, share of the oracle's gain captured, compute cost.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serec.audio import load_audio
from serec.bootstrap import Interval, captured_share, mean_difference
from serec.fileio import write_json_atomic
from serec.labels import NOISY_SYSTEM
from serec.quality import METRIC_NAMES, METRICS
from serec.routing import KEEP_NOISY, rec_folder_name, routed_model_for
from serec.runinfo import RUN_JSON
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
DEFAULT_LABEL_METRIC = "dnsmos_ovr"
# What run-time choices (run-all, verify policies) compare outputs by: the only score
# available without a clean reference.
VERIFY_METRIC = "dnsmos_ovr"
# The row of the choice the recommendation step actually routed by.
ROUTED_STRATEGY = "adaptive"
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
    label_metric: str = "dnsmos_ovr"  # what the labels were chosen by (run.json beside them)

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
        label_metric=recorded_label_metric(labels_csv),
    )


def recorded_label_metric(labels_csv: str | os.PathLike[str]) -> str:
    """The metric the labels beside this run.json were chosen by (DNSMOS OVR when not recorded)."""
    labels_csv = Path(labels_csv)
    record = labels_csv.with_name(RUN_JSON)
    if not record.is_file():
        return DEFAULT_LABEL_METRIC
    flags = json.loads(record.read_text(encoding="utf-8")).get("flags") or {}
    return str(flags.get("label_metric") or DEFAULT_LABEL_METRIC)


@dataclass
class Strategy:
    """How a strategy picks each file's output, and what it runs and scores to get there."""

    name: str
    description: str
    kept: Mapping[str, str]  # file -> the system whose output (and scores) it keeps
    ran: Mapping[str, Sequence[str]] | None = None  # file -> the models it runs (default: the kept one)
    recommender_seconds_per_file: float = 0.0  # NaN: not timed on its own
    dnsmos_scorings_per_file: int = 0  # outputs it scores with DNSMOS at run time to choose
    pool: Sequence[str] = ()  # random_expected: the expected value of a uniform pick from these

    def models_run(self, fid: str) -> Sequence[str]:
        if self.pool:
            return self.pool
        return self.ran[fid] if self.ran is not None else [self.kept[fid]]


@dataclass
class StrategyRow:
    """One strategy scored on the compared files: means, gain with its interval, compute."""

    strategy: str
    description: str
    files: int
    means: dict[str, float]
    enhancer_seconds: float
    recommender_seconds: float
    dnsmos_seconds: float
    gain: Interval
    captured: Interval
    regret: float
    pesq_best_agreement: float
    compute_vs_best_single: float = math.nan

    @property
    def total_seconds(self) -> float:
        return self.enhancer_seconds + self.recommender_seconds + self.dnsmos_seconds

    @property
    def oracle_gain_captured(self) -> float:
        return self.captured.estimate

    def as_row(self, label_metric: str) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "description": self.description,
            "files": self.files,
            **{m: _round(self.means.get(m, math.nan)) for m in METRIC_NAMES},
            "label_metric": label_metric,
            "gain_over_best_single": _round(self.gain.estimate),
            "gain_ci_low": _round(self.gain.low),
            "gain_ci_high": _round(self.gain.high),
            "oracle_gain_captured": _round(self.captured.estimate),
            "captured_ci_low": _round(self.captured.low),
            "captured_ci_high": _round(self.captured.high),
            "regret": _round(self.regret),
            "enhancer_seconds": _round(self.enhancer_seconds),
            "recommender_seconds": _round(self.recommender_seconds),
            "dnsmos_seconds": _round(self.dnsmos_seconds),
            "total_seconds": _round(self.total_seconds),
            "compute_vs_best_single": _round(self.compute_vs_best_single),
            "pesq_best_agreement": _round(self.pesq_best_agreement),
        }


def _round(value: float) -> float:
    return round(value, 4) if math.isfinite(value) else math.nan


@dataclass
class StrategyComparison:
    rows: list[StrategyRow]
    files: list[str]
    best_single: str
    label_metric: str
    left_out: dict[str, str] = field(default_factory=dict)

    def row(self, strategy: str) -> StrategyRow:
        return next(r for r in self.rows if r.strategy == strategy)

    def has(self, strategy: str) -> bool:
        return any(r.strategy == strategy for r in self.rows)

    @property
    def captured_fraction(self) -> float:
        """The routed (adaptive) strategy's captured share of the oracle's gain."""
        return self.row(ROUTED_STRATEGY).oracle_gain_captured if self.has(ROUTED_STRATEGY) else math.nan

    def as_rows(self) -> list[dict[str, Any]]:
        return [r.as_row(self.label_metric) for r in self.rows]


def _system_for(routed_model: str) -> str:
    # The passthrough's output is the noisy input: its scores are the `noisy` row's.
    return NOISY_SYSTEM if routed_model == KEEP_NOISY else routed_model


def comparable_files(
    candidates: Sequence[str], scores: EnhancementScores, label_metric: str = DEFAULT_LABEL_METRIC
) -> tuple[list[str], dict[str, str]]:
    """(files where the noisy input and every model have the label metric and DNSMOS OVR,
    {file: reason} for the others): every strategy is scored on the same files."""
    files, left_out = [], {}
    for fid in candidates:
        missing = sorted({s for s in (NOISY_SYSTEM, *scores.models) for m in {label_metric, VERIFY_METRIC}
                          if not math.isfinite(scores.value(fid, s, m))})
        if missing:
            left_out[fid] = f"no {label_metric} or {VERIFY_METRIC} in {scores.scores_csv.name} for {', '.join(missing)}"
        else:
            files.append(fid)
    return files, left_out


def reference_strategies(files: Sequence[str], scores: EnhancementScores,
                         label_metric: str = DEFAULT_LABEL_METRIC) -> list[Strategy]:
    """Every fixed model, no enhancement, the oracle, run-all-and-pick and a random pick.

    The oracle keeps the best model per file by the label metric and knows it for free;
    run-all runs every model and keeps the best DNSMOS OVR (the only score available
    without a reference), paying every model and a DNSMOS scoring of every output.
    """
    models = scores.models
    sign = 1 if METRICS[label_metric].higher_is_better else -1

    def best_by(metric: str, how: int) -> dict[str, str]:
        return {f: max(models, key=lambda m, f=f: (how * scores.value(f, m, metric), -models.index(m))) for f in files}

    every = dict.fromkeys(files, list(models))
    return [
        *(Strategy(f"always_{m}", f"always {m}", dict.fromkeys(files, m)) for m in models),
        Strategy("noisy", "no enhancement (the input)", dict.fromkeys(files, NOISY_SYSTEM)),
        Strategy("oracle", f"best model per file by {METRICS[label_metric].heading}, known for free",
                 best_by(label_metric, sign)),
        Strategy("run_all_pick_best_ovr", "run every model, keep the best DNSMOS OVR",
                 best_by(VERIFY_METRIC, 1), every, dnsmos_scorings_per_file=len(models)),
        Strategy("random_expected", "a uniformly random model per file (expected value)", {}, pool=list(models)),
    ]


def score_strategies(
    strategies: Sequence[Strategy],
    scores: EnhancementScores,
    files: Sequence[str],
    *,
    label_metric: str = DEFAULT_LABEL_METRIC,
    dnsmos_seconds_per_file: float = math.nan,
    seed: int = 0,
) -> tuple[list[StrategyRow], str]:
    """Every strategy on the same files from ENH's scores, against the best single model.

    The baseline is the model with the best mean label metric on these files (the
    strictest fixed baseline; it needs `always_<MODEL>` rows for every model, as
    reference_strategies gives). Gains are oriented so positive is better; their 95 %
    intervals and the captured share's come from a paired bootstrap over files.
    Compute sums the models each strategy runs (their measured seconds in scores.csv),
    its recommender seconds and its DNSMOS scorings.
    """
    sign = 1.0 if METRICS[label_metric].higher_is_better else -1.0
    by_name = {s.name: s for s in strategies}

    def values(strategy: Strategy, metric: str) -> np.ndarray:
        if strategy.pool:
            return np.array([_nanmean([scores.value(f, m, metric) for m in strategy.pool]) for f in files])
        return np.array([scores.value(f, strategy.kept[f], metric) for f in files])

    fixed = [s for s in strategies if s.name.startswith("always_")]
    best_single = max(fixed, key=lambda s: (sign * _nanmean(list(values(s, label_metric))), -fixed.index(s)))
    base = sign * values(best_single, label_metric)
    oracle = sign * values(by_name["oracle"], label_metric)
    pesq = np.array([[scores.value(f, m, "pesq_wb") for m in scores.models] for f in files])
    with_pesq = np.isfinite(pesq).all(axis=1) if pesq.size else np.zeros(len(files), bool)
    pesq_best = [scores.models[j] for j in np.argmax(np.where(np.isfinite(pesq), pesq, -np.inf), axis=1)] if pesq.size else []

    rows = []
    for s in strategies:
        label = sign * values(s, label_metric)
        enhancer_s = float(sum(
            (np.mean if s.pool else np.sum)([_seconds(scores, f, m) for m in s.models_run(f)]) for f in files))
        agreement = (float(np.mean([s.kept[f] == pesq_best[i] for i, f in enumerate(files) if with_pesq[i]]))
                     if with_pesq.any() and not s.pool else math.nan)
        rows.append(StrategyRow(
            s.name, s.description, len(files),
            {m: _nanmean(list(values(s, m))) for m in METRIC_NAMES},
            enhancer_s, s.recommender_seconds_per_file * len(files),
            (dnsmos_seconds_per_file * len(files) * s.dnsmos_scorings_per_file if s.dnsmos_scorings_per_file else 0.0),
            mean_difference(label, base, seed=seed), captured_share(label, base, oracle, seed=seed),
            float(np.nanmean(oracle - label)), agreement,
        ))
    base_total = next(r for r in rows if r.strategy == best_single.name).total_seconds
    for row in rows:
        row.compute_vs_best_single = row.total_seconds / base_total if base_total > 0 else math.nan
    return rows, best_single.name.removeprefix("always_")


def _seconds(scores: EnhancementScores, fid: str, system: str) -> float:
    # The passthrough and the noisy input cost nothing; a model without a time counts 0.
    seconds = scores.seconds.get((fid, system), 0.0)
    return seconds if math.isfinite(seconds) else 0.0


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (a metric that failed on a file is left out); NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def compare_strategies(
    recommendations: Sequence[Mapping[str, str]],
    scores: EnhancementScores,
    *,
    fallback_model: str,
    inference_seconds_per_file: float = math.nan,
    dnsmos_seconds_per_file: float = math.nan,
    label_metric: str | None = None,
    extra: Callable[[list[str], EnhancementScores], Sequence[Strategy]] | None = None,
    seed: int = 0,
) -> StrategyComparison:
    """The routed choice (`adaptive`), `extra(files, scores)` and the reference strategies, scored on
    the files that have a recommendation and every model's score (see score_strategies).

    `recommendations` are recommendations.csv rows (`file`, `recommendation`,
    `routed_model`, optional `single_recommendation`, routed like the two-stage's with
    `fallback_model` for All_Failed). `dnsmos_seconds_per_file` is the time DNSMOS takes
    on one file's output; NaN when unknown. The label metric defaults to the one the
    labels were made with.
    """
    if not scores.models:
        raise ValueError(f"{scores.labels_csv}: no <MODEL>_ovr columns, so no models to compare")
    label_metric = label_metric or scores.label_metric
    known = (NOISY_SYSTEM, *scores.models)
    by_file = {r["file"]: r for r in recommendations}
    files, left_out = comparable_files(list(by_file), scores, label_metric)
    for fid in list(files):
        if _system_for(by_file[fid]["routed_model"]) not in known:
            left_out[fid] = f"routed model {by_file[fid]['routed_model']} is not among the scored models"
            files.remove(fid)
    if not files:
        raise ValueError(
            f"no file has both a recommendation and scores for every model in {scores.scores_csv} "
            f"({len(left_out)} left out, e.g. {next(iter(left_out.items()), ('', ''))}); "
            "was enhancement_driver run on the same noisy files?"
        )
    routed = Strategy(ROUTED_STRATEGY, "the recommender's routed model per file",
                      {f: _system_for(by_file[f]["routed_model"]) for f in files},
                      recommender_seconds_per_file=inference_seconds_per_file)
    strategies = [routed]
    single = {f: by_file[f].get(SINGLE_COLUMN) for f in files}
    if all(single.values()):
        # Its inference is timed together with the two-stage models', not on its own.
        strategies.append(Strategy("adaptive_single_model", "the single-model recommender's pick",
                                   {f: _system_for(routed_model_for(str(single[f]), fallback_model)) for f in files},
                                   recommender_seconds_per_file=math.nan))
    if extra is not None:
        strategies += list(extra(files, scores))
    strategies += reference_strategies(files, scores, label_metric)
    rows, best_single = score_strategies(strategies, scores, files, label_metric=label_metric,
                                         dnsmos_seconds_per_file=dnsmos_seconds_per_file, seed=seed)
    return StrategyComparison(rows, files, best_single, label_metric, left_out)


def write_strategies(out_dir: str | os.PathLike[str], comparison: StrategyComparison) -> Path:
    return write_strategies_csv(out_dir, comparison.as_rows())


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


def timing_key(paths: Sequence[str | os.PathLike[str]], **extra: Any) -> dict[str, Any]:
    """What a timing on this machine depends on: the timed files (path, size, modification
    time), host, cores and onnxruntime version, plus `extra` (e.g. a checkpoint's sha256)."""
    import onnxruntime

    return {
        "files": [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths],
        "host": platform.node(),
        "cores": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        **extra,
    }


def cached_timing(cache: Path | None, key: Mapping[str, Any], measure: Callable[[], float]) -> float:
    """measure(), or the seconds `cache` (a JSON file) kept for the same key."""
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return float(saved["seconds_per_file"])
    seconds = measure()
    if cache is not None:
        write_json_atomic(cache, {"key": dict(key), "seconds_per_file": seconds})
    return seconds


def measure_dnsmos_seconds_per_file(
    paths: Sequence[str | os.PathLike[str]], max_files: int = 16, cache: Path | None = None
) -> float:
    """Mean seconds DNSMOS takes to score one of these files, one thread, one file per call
    (as a run-all deployment scores each output); timed on up to `max_files` of them.

    Model outputs have their input's length, so the inputs' timing is the outputs'. With
    `cache` (a JSON file), a timing measured before for the same timed files (path, size,
    modification time), machine and onnxruntime version is reused instead of re-measured.
    """
    sample = list(paths)[:max_files]
    if not sample:
        return math.nan
    return cached_timing(cache, timing_key(sample), lambda: _time_dnsmos(sample))


def _time_dnsmos(sample: Sequence[str | os.PathLike[str]]) -> float:
    from dnsmos import DNSMOS

    scorer = DNSMOS(num_threads=1)
    audios = [load_audio(p, validate=False) for p in sample]
    scorer.score(audios[0], 16000)  # builds the ONNX sessions outside the timing
    started = time.perf_counter()
    for audio in audios:
        scorer.score(audio, 16000)
    return (time.perf_counter() - started) / len(audios)


def _is_recommender(strategy: str) -> bool:
    # A strategy that chooses per file from the noisy audio: not the oracle (it knows the
    # answer), run-all (the oracle's DNSMOS twin at every model's cost), a baseline (fixed
    # model, random pick, the input) or a point of the cost_aware sweep (lambda not chosen).
    return (strategy not in ("oracle", "run_all_pick_best_ovr", "noisy", "random_expected")
            and not strategy.startswith("always_") and "@" not in strategy)


def verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line from strategies.csv rows: the recommender (routing policy or classifier) with
    the best mean label metric against the best single model, with its interval, captured
    share and compute."""
    label = str(rows[0]["label_metric"])
    sign = 1 if METRICS[label].higher_is_better else -1
    fixed = [r for r in rows if str(r["strategy"]).startswith("always_")]
    single = max(fixed, key=lambda r: (sign * _float(r[label]), -fixed.index(r)))
    deployable = [r for r in rows if _is_recommender(str(r["strategy"]))]
    if not deployable:
        return f"no adaptive strategy was scored; the best single model is {single['strategy']}"
    best = max(deployable, key=lambda r: (sign * _float(r[label]), -deployable.index(r)))
    gain, low, high = (_float(best[c]) for c in ("gain_over_best_single", "gain_ci_low", "gain_ci_high"))
    if gain == low == high == 0:  # it routed every file to the best single model
        relation = "identical to"
    else:
        significant = "" if low > 0 or high < 0 else "not significantly "
        relation = significant + ("better than" if gain > 0 else "worse than" if gain < 0 else "different from")
    return (f"{best['strategy']} is {relation} {single['strategy']} (the best single model) on "
            f"{best['files']} files: {METRICS[label].heading} {gain:+.3f} [95% CI {low:+.3f}, {high:+.3f}], "
            f"{_pct(_float(best['oracle_gain_captured']))} of the oracle's gain captured, "
            f"x{_num(_float(best['compute_vs_best_single']))} its compute")


def format_strategies(comparison: StrategyComparison) -> str:
    """The verdict and the strategy table, for the terminal."""
    label = comparison.label_metric
    metrics = list(dict.fromkeys([label, *(m for m in HEADLINE_METRICS
                                           if any(math.isfinite(r.means.get(m, math.nan)) for r in comparison.rows))]))
    best = comparison.row(f"always_{comparison.best_single}")
    headroom = abs(comparison.row("oracle").means[label] - best.means[label])
    width = max(len("strategy"), *(len(r.strategy) for r in comparison.rows)) + 2
    lines = [
        f"strategies on {len(comparison.files)} files"
        + (f" ({len(comparison.left_out)} left out: no complete scores)" if comparison.left_out else ""),
        f"  verdict: {verdict(comparison.as_rows())}",
        *([f"  note: the oracle beats the best single model by only {headroom:.3f}, so captured shares are "
           "ratios of small differences"] if headroom < SMALL_HEADROOM else []),
        "",
        f"  {'strategy':<{width}}" + "".join(f"{m:>12}" for m in metrics)
        + f"{'gain [95% CI]':>26}{'captured':>10}{'total_s':>10}{'x compute':>10}",
    ]
    for row in comparison.rows:
        interval = f"{row.gain.estimate:+.3f} [{row.gain.low:+.3f}, {row.gain.high:+.3f}]"
        lines.append(
            f"  {row.strategy:<{width}}" + "".join(f"{row.means[m]:>12.3f}" for m in metrics)
            + f"{interval:>26}{_pct(row.oracle_gain_captured):>10}{_num(row.total_seconds):>10}"
            + f"{_num(row.compute_vs_best_single):>10}"
        )
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def _num(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


__all__ = [
    "EnhancementScores",
    "Strategy",
    "StrategyComparison",
    "StrategyRow",
    "comparable_files",
    "reference_strategies",
    "score_strategies",
    "verdict",
    "compare_strategies",
    "format_strategies",
    "inference_seconds_per_file",
    "DNSMOS_TIMING_JSON",
    "measure_dnsmos_seconds_per_file",
    "read_enhancement_scores",
    "recorded_label_metric",
    "load_choices",
    "write_strategies",
]
