"""Step 5: route new noisy files to their recommended model, enhance, evaluate, compare, report.

Full mode: recommendations.csv (gatekeeper + expert, or a single model); each noisy file
copied into exactly one OUT/rec_<LABEL>/; the routed enhancer run on each folder into
rec_<LABEL>/enhanced/ (All_Failed files go to the fallback model); then the evaluation.
eval_only: only evaluate what the rec_* folders hold (evaluation.csv, summary.csv).
Both modes: with labels_csv (step 2's labels.csv for the same files; its scores.csv is read
from the same folder) strategies.csv compares adaptive selection with each single model,
the oracle, a random choice and run-all-and-pick; report.html last. Every part resumes.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from serec.assessment import evaluate_rec_folders, format_summary
from serec.enhancers import load_models_config
from serec.lock import output_lock
from serec.parallel import Backend
from serec.report import DEFAULT_LISTENING_ROWS, write_report
from serec.routing import Route, copy_routed_files, enhance_routed_files
from serec.runinfo import write_run_json
from serec.schema import ERRORS_CSV, RECOMMENDATIONS_CSV
from serec.selection import DEFAULT_COST_LAMBDA, DEFAULT_VERIFY_K
from serec.selector_routing import SelectorRun, enhance_and_evaluate, policy_rows, route_by_policy
from serec.strategies import (
    DNSMOS_TIMING_JSON,
    compare_strategies,
    format_strategies,
    inference_seconds_per_file,
    load_choices,
    measure_dnsmos_seconds_per_file,
    read_enhancement_scores,
    write_strategies,
)

Say = Callable[[str], None]


@dataclass
class RecommendationConfig:
    """Everything one step-5 run needs; field names are recommendation_driver.py's flags."""

    enhanced_dir: Path
    noisy_speech_dir: Path | None = None
    gatekeeper_model_path: Path | None = None
    expert_model_path: Path | None = None
    single_model_path: Path | None = None
    use_hybrid_features: bool = False
    cekl_features_base_dir: Path | None = None
    clean_speech_dir: Path | None = None
    eval_only: bool = False
    models_config: Path | None = None
    fallback_model: str | None = None
    gatekeeper_threshold: float = 0.5
    labels_csv: Path | None = None
    num_workers: int = 1
    device: str = "auto"
    batch_size: int = 16
    retry_errors: bool = False
    report_rows: int = DEFAULT_LISTENING_ROWS
    seed: int = 0
    # The quality selector (python -m serec.selection train): its policies' rows in
    # strategies.csv, and with `policy` it routes the files instead of the classifiers.
    selector: Path | None = None
    policy: str | None = None
    cost_lambda: float = DEFAULT_COST_LAMBDA
    verify_k: int = DEFAULT_VERIFY_K
    selector_features_dir: Path | None = None

    def __post_init__(self) -> None:
        self.enhanced_dir = Path(self.enhanced_dir)
        if self.policy is not None and self.selector is None:
            raise ValueError("--policy routes by the quality selector: give --selector too")
        if self.policy is not None and (self.gatekeeper_model_path or self.single_model_path):
            raise ValueError("route by --policy or by the classifiers' checkpoints, not both")
        if self.eval_only:
            return
        if self.noisy_speech_dir is None:
            raise ValueError("--noisy_speech_dir is required (unless --eval_only)")
        if self.gatekeeper_model_path is None and self.single_model_path is None and self.policy is None:
            raise ValueError("give --gatekeeper_model_path and --expert_model_path, --single_model_path, "
                             "or --selector with --policy")
        noisy, out = Path(self.noisy_speech_dir).resolve(), self.enhanced_dir.resolve()
        if not noisy.is_dir():
            raise FileNotFoundError(f"--noisy_speech_dir {self.noisy_speech_dir}: not a directory")
        if out == noisy or noisy in out.parents:
            raise ValueError("--enhanced_dir must not be inside --noisy_speech_dir (its copies would be read as input)")


@dataclass
class RecommendationResult:
    errors: int  # files recorded as errors (errors.csv, routing.csv, evaluation.csv)
    report: Path


def _route_by_policy(config: RecommendationConfig, selector: SelectorRun, say: Say,
                     backend: Backend | None) -> int:
    """Route by the selector's policy, copy, enhance; returns the number of files recorded as errors."""
    # The enhancers' device: auto is CUDA when there is one, as on the classifiers' path.
    from serec.recommender.kinds import resolve_device

    assert config.noisy_speech_dir is not None
    model_configs = load_models_config(config.models_config) if config.models_config else {}
    enhance, evaluate = enhance_and_evaluate(model_configs, str(resolve_device(config.device)), config.seed,
                                             config.num_workers, config.retry_errors, backend,
                                             selector.settings.get("dnsmos_level_db"))
    routes, errors = route_by_policy(selector, config.noisy_speech_dir, config.enhanced_dir,
                                     features_dir=config.selector_features_dir, enhance=enhance, evaluate=evaluate)
    say(f"recommendations: {config.enhanced_dir / RECOMMENDATIONS_CSV} (policy {selector.policy}: "
        + ", ".join(f"{m} {n}" for m, n in Counter(r.routed_model for r in routes).most_common())
        + f"; {len(errors)} unusable)")
    if not routes:
        raise ValueError(f"no usable noisy file in {config.noisy_speech_dir}: see {config.enhanced_dir / ERRORS_CSV}")
    copy_routed_files(config.noisy_speech_dir, config.enhanced_dir, routes)
    enhanced = enhance(config.enhanced_dir, routes)
    say(f"enhanced: {enhanced.done_now} now, {enhanced.skipped} already done, {enhanced.errors} errors "
        f"({enhanced.routing_csv})")
    return len(errors) + enhanced.errors


def _route_and_enhance(config: RecommendationConfig, say: Say, backend: Backend | None) -> int:
    """Recommend, copy, enhance; returns the number of files recorded as errors."""
    # Imported here: torch and transformers take seconds to load, and eval_only needs neither.
    from serec.recommender.errors import CheckpointError
    from serec.recommender.inference import Recommender, recommend_folder
    from serec.recommender.kinds import resolve_device

    assert config.noisy_speech_dir is not None
    device = str(resolve_device(config.device))
    recommender = Recommender.from_checkpoints(
        config.gatekeeper_model_path, config.expert_model_path, config.single_model_path,
        threshold=config.gatekeeper_threshold, device=device,
    )
    if config.use_hybrid_features and not recommender.feature_names:
        raise CheckpointError("--use_hybrid_features, but no checkpoint uses features (not hybrid models)")
    fallback = config.fallback_model or recommender.default_fallback
    model_configs = load_models_config(config.models_config) if config.models_config else {}
    recs = recommend_folder(recommender, config.noisy_speech_dir, config.enhanced_dir, fallback,
                            features_dir=config.cekl_features_base_dir, batch_size=config.batch_size)
    say(f"recommendations: {recs.recommendations_csv} ({recs.predicted_now} predicted, "
        f"{recs.reused} reused, {len(recs.errors)} unusable; "
        f"{recs.inference_seconds_per_file:.3f} s per file)")
    for label, count in recs.counts.items():
        say(f"  {label:<20} {count:>6}")
    for fid, reason in list(recs.errors.items())[:5]:
        print(f"  unusable: {fid}: {reason}", file=sys.stderr)
    routes = [Route(r["file"], r["recommendation"], r["routed_model"]) for r in recs.rows]
    if not routes:
        raise ValueError(f"no usable noisy file in {config.noisy_speech_dir}: see "
                         f"{config.enhanced_dir / ERRORS_CSV}")
    copies = copy_routed_files(config.noisy_speech_dir, config.enhanced_dir, routes)
    say(f"routed: {copies.copied} copied, {copies.unchanged} already in place, "
        f"{copies.removed_stale} stale copies removed")
    enhanced = enhance_routed_files(
        config.enhanced_dir, routes, model_configs, device=device, seed=config.seed,
        num_workers=config.num_workers, retry_errors=config.retry_errors, backend=backend,
    )
    say(f"enhanced: {enhanced.done_now} now, {enhanced.skipped} already done, {enhanced.errors} errors "
        f"({enhanced.routing_csv}); enhancer seconds: "
        + ", ".join(f"{m} {s:.1f}" for m, s in enhanced.seconds_by_model.items()))
    return len(recs.errors) + enhanced.errors


def _compare(config: RecommendationConfig, selector: SelectorRun | None, say: Say) -> None:
    assert config.labels_csv is not None
    scores = read_enhancement_scores(config.labels_csv)
    choices, fallback = load_choices(config.enhanced_dir, config.fallback_model)
    timed = [config.enhanced_dir / c["noisy_copy"] for c in choices]
    routed_seconds = inference_seconds_per_file(config.enhanced_dir)
    comparison = compare_strategies(
        choices, scores, fallback_model=fallback,
        inference_seconds_per_file=routed_seconds,
        dnsmos_seconds_per_file=measure_dnsmos_seconds_per_file(
            timed, cache=config.enhanced_dir / DNSMOS_TIMING_JSON),
        label_metric=selector.settings["label_metric"] if selector else None,
        extra=None if selector is None else policy_rows(
            selector, config.enhanced_dir, config.noisy_speech_dir, config.selector_features_dir,
            routed_seconds if config.policy else math.nan),
        seed=config.seed,
    )
    path = write_strategies(config.enhanced_dir, comparison)
    say("\n" + format_strategies(comparison) + f"\n\nstrategies: {path}")


def run_recommendation(
    config: RecommendationConfig, say: Say = print, backend: Backend | None = None
) -> RecommendationResult:
    """Run step 5 (see the module docstring) under OUT's lock; `say` prints the progress lines.

    `backend` runs the enhancement and scoring units (default: `num_workers` local processes).

    Raises ValueError (RecommenderError, CheckpointError), FileNotFoundError, OutputLocked
    or the enhancers' errors for problems that stop the run; files that fail are counted
    in the result and listed in the CSVs.
    """
    errors = 0
    selector = (None if config.selector is None else
                SelectorRun.load(config.selector, config.policy, config.cost_lambda, config.verify_k))
    # Every CSV of OUT is rewritten by this run: one run per OUT at a time.
    with output_lock(config.enhanced_dir, "recommendation"):
        if not config.eval_only:
            errors += (_route_by_policy(config, selector, say, backend) if config.policy and selector
                       else _route_and_enhance(config, say, backend))
        evaluation = evaluate_rec_folders(config.enhanced_dir, config.clean_speech_dir,
                                          num_workers=config.num_workers, backend=backend)  # fmt: skip
        errors += evaluation.errors
        for message in evaluation.messages:
            print(f"warning: {message}", file=sys.stderr)
        say(f"\nevaluation: {evaluation.evaluation_csv} ({evaluation.scored_now} scored, "
            f"{evaluation.reused} unchanged, {evaluation.errors} errors)\n"
            f"summary: {evaluation.summary_csv}\n" + format_summary(evaluation.summary_rows))
        if config.labels_csv is not None:
            _compare(config, selector, say)
        report = write_report(config.enhanced_dir, config.labels_csv,
                              max_listening_rows=config.report_rows)  # fmt: skip
        write_run_json(config.enhanced_dir, asdict(config),
                       mode="eval_only" if config.eval_only else "full")  # fmt: skip
    return RecommendationResult(errors, report)
