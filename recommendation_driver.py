"""Step 5: route new noisy files to their recommended SE model, enhance, evaluate, compare, report.

Full mode: recommendations.csv (gatekeeper + expert, or a single model); each noisy file
copied into exactly one ENHANCED_DIR/rec_<LABEL>/; the routed enhancer run on each folder
into rec_<LABEL>/enhanced/ (All_Failed files go to --fallback_model); then the evaluation.
--eval_only: only evaluate what the rec_* folders hold: evaluation.csv and summary.csv.
Both modes: with --labels_csv (enhancement_driver's labels.csv for the same files; its
scores.csv is read from the same folder) strategies.csv compares adaptive selection with
each single model, the oracle, a random choice and run-all-and-pick; report.html last.

Every step resumes: re-running the same command redoes only what is missing.
Exit status: 0 all files done; 3 finished, but some files are recorded as errors
(errors.csv, routing.csv, evaluation.csv); 2 usage or configuration error; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serec.assessment import evaluate_rec_folders, format_summary
from serec.enhancers import EnhancerUnavailable, ModelsConfigError, load_models_config
from serec.lock import OutputLocked, output_lock
from serec.report import DEFAULT_LISTENING_ROWS, write_report
from serec.routing import KEEP_NOISY, Route, copy_routed_files, enhance_routed_files
from serec.runinfo import write_run_json
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

EXIT_OK, EXIT_USAGE, EXIT_SOME_ERRORS, EXIT_INTERRUPTED = 0, 2, 3, 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noisy_speech_dir", type=Path, help="new noisy WAV/FLAC files (recursive); full mode")
    p.add_argument("--enhanced_dir", type=Path, required=True,
                   help="output folder: rec_<LABEL>/ folders, CSVs and report.html")
    p.add_argument("--gatekeeper_model_path", type=Path, help="gatekeeper checkpoint (.pth) of one fold")
    p.add_argument("--expert_model_path", type=Path, help="expert checkpoint of the same fold")
    p.add_argument("--single_model_path", type=Path,
                   help="single-model checkpoint: routes alone, or is compared beside the two-stage pair")
    p.add_argument("--use_hybrid_features", "--use_hybrid_expert", action="store_true",
                   help="require hybrid (AST + CE/KL) checkpoints; they always get features when they use them")
    p.add_argument("--cekl_features_base_dir", type=Path,
                   help="precomputed feature vectors of the noisy files (preprocess_features.py); "
                   "default: compute them here")
    p.add_argument("--clean_speech_dir", type=Path,
                   help="clean references with the noisy files' names: adds PESQ, STOI, ESTOI, SI-SDR")
    p.add_argument("--eval_only", action="store_true", help="only evaluate the existing rec_* folders")
    p.add_argument("--models_config", type=Path, help="TOML file configuring external models")
    p.add_argument("--fallback_model",
                   help=f"model for All_Failed files (default: the gatekeeper class, or '{KEEP_NOISY}' "
                   f"when that is All_Failed; '{KEEP_NOISY}' keeps the noisy input)")
    p.add_argument("--gatekeeper_threshold", type=float, default=0.5,
                   help="route to the gatekeeper class when its probability reaches this")
    p.add_argument("--labels_csv", type=Path,
                   help="enhancement_driver's labels.csv for these files: compare strategies")
    p.add_argument("--num_workers", type=int, default=1, help="worker processes for enhancement and scoring")
    p.add_argument("--device", default="auto", help="torch / external model device: auto, cpu, cuda")
    p.add_argument("--batch_size", type=int, default=16, help="files per recommender batch")
    p.add_argument("--retry_errors", action="store_true", help="re-run files whose enhancement failed")
    p.add_argument("--report_rows", type=int, default=DEFAULT_LISTENING_ROWS,
                   help="files in the report's listening table")
    p.add_argument("--seed", type=int, default=0, help="seed for enhancers that sample")
    args = p.parse_args(argv)
    if not args.eval_only:
        if args.noisy_speech_dir is None:
            p.error("--noisy_speech_dir is required (unless --eval_only)")
        if args.gatekeeper_model_path is None and args.single_model_path is None:
            p.error("give --gatekeeper_model_path and --expert_model_path, or --single_model_path")
    return args


def _check_folders(args: argparse.Namespace) -> None:
    noisy, out = args.noisy_speech_dir.resolve(), args.enhanced_dir.resolve()
    if not noisy.is_dir():
        raise FileNotFoundError(f"--noisy_speech_dir {args.noisy_speech_dir}: not a directory")
    if out == noisy or noisy in out.parents:
        raise ValueError("--enhanced_dir must not be inside --noisy_speech_dir (its copies would be read as input)")


def _route_and_enhance(args: argparse.Namespace) -> int:
    """Recommend, copy, enhance; returns the number of files recorded as errors."""
    # Imported here: torch and transformers take seconds to load, and --eval_only needs neither.
    from serec.recommender.errors import CheckpointError
    from serec.recommender.inference import Recommender, recommend_folder
    from serec.recommender.kinds import resolve_device

    _check_folders(args)
    device = str(resolve_device(args.device))
    recommender = Recommender.from_checkpoints(
        args.gatekeeper_model_path, args.expert_model_path, args.single_model_path,
        threshold=args.gatekeeper_threshold, device=device,
    )
    if args.use_hybrid_features and not recommender.feature_names:
        raise CheckpointError("--use_hybrid_features, but no checkpoint uses features (not hybrid models)")
    fallback = args.fallback_model or recommender.default_fallback
    model_configs = load_models_config(args.models_config) if args.models_config else {}
    recs = recommend_folder(recommender, args.noisy_speech_dir, args.enhanced_dir, fallback,
                            features_dir=args.cekl_features_base_dir, batch_size=args.batch_size)
    print(f"recommendations: {recs.recommendations_csv} ({recs.predicted_now} predicted, "
          f"{recs.reused} reused, {len(recs.errors)} unusable; "
          f"{recs.inference_seconds_per_file:.3f} s per file)")
    for label, count in recs.counts.items():
        print(f"  {label:<20} {count:>6}")
    for fid, reason in list(recs.errors.items())[:5]:
        print(f"  unusable: {fid}: {reason}", file=sys.stderr)
    routes = [Route(r["file"], r["recommendation"], r["routed_model"]) for r in recs.rows]
    if not routes:
        raise ValueError(f"no usable noisy file in {args.noisy_speech_dir}: see {args.enhanced_dir / 'errors.csv'}")
    copies = copy_routed_files(args.noisy_speech_dir, args.enhanced_dir, routes)
    print(f"routed: {copies.copied} copied, {copies.unchanged} already in place, "
          f"{copies.removed_stale} stale copies removed")
    enhanced = enhance_routed_files(
        args.enhanced_dir, routes, model_configs, device=device, seed=args.seed,
        num_workers=args.num_workers, retry_errors=args.retry_errors,
    )
    print(f"enhanced: {enhanced.done_now} now, {enhanced.skipped} already done, {enhanced.errors} errors "
          f"({enhanced.routing_csv}); enhancer seconds: "
          + ", ".join(f"{m} {s:.1f}" for m, s in enhanced.seconds_by_model.items()))
    return len(recs.errors) + enhanced.errors


def _compare(args: argparse.Namespace) -> None:
    scores = read_enhancement_scores(args.labels_csv)
    choices, fallback = load_choices(args.enhanced_dir, args.fallback_model)
    timed = [args.enhanced_dir / c["noisy_copy"] for c in choices]
    comparison = compare_strategies(
        choices, scores, fallback_model=fallback,
        inference_seconds_per_file=inference_seconds_per_file(args.enhanced_dir),
        dnsmos_seconds_per_file=measure_dnsmos_seconds_per_file(timed, cache=args.enhanced_dir / DNSMOS_TIMING_JSON),
    )
    path = write_strategies(args.enhanced_dir, comparison)
    print("\n" + format_strategies(comparison) + f"\n\nstrategies: {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    errors = 0
    try:
        # Every CSV of OUT is rewritten by this run: one run per OUT at a time.
        with output_lock(args.enhanced_dir, "recommendation"):
            if not args.eval_only:
                errors += _route_and_enhance(args)
            evaluation = evaluate_rec_folders(args.enhanced_dir, args.clean_speech_dir, num_workers=args.num_workers)
            errors += evaluation.errors
            for message in evaluation.messages:
                print(f"warning: {message}", file=sys.stderr)
            print(f"\nevaluation: {evaluation.evaluation_csv} ({evaluation.scored_now} scored, "
                  f"{evaluation.reused} unchanged, {evaluation.errors} errors)\n"
                  f"summary: {evaluation.summary_csv}\n" + format_summary(evaluation.summary_rows))
            if args.labels_csv is not None:
                _compare(args)
            report = write_report(args.enhanced_dir, args.labels_csv, max_listening_rows=args.report_rows)
            write_run_json(args.enhanced_dir, args, mode="eval_only" if args.eval_only else "full")
            print(f"report: {report}")
    except (EnhancerUnavailable, ModelsConfigError, OutputLocked, FileNotFoundError, ValueError) as exc:
        # RecommenderError and CheckpointError are ValueErrors.
        print(f"recommendation_driver: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_SOME_ERRORS if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
