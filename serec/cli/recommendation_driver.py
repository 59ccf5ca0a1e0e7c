"""Step 5: route new noisy files to their recommended SE model, enhance, evaluate, compare, report.

Full mode: recommendations.csv (gatekeeper + expert, or a single model); each noisy file
copied into exactly one ENHANCED_DIR/rec_<LABEL>/; the routed enhancer run on each folder
into rec_<LABEL>/enhanced/ (All_Failed files go to --fallback_model); then the evaluation.
--eval_only: only evaluate what the rec_* folders hold: evaluation.csv and summary.csv.
--selector --policy P: route by the quality selector's policy P instead (verify policies run
their candidates into ENHANCED_DIR/verify/ and keep the DNSMOS-best output).
Both modes: with --labels_csv (enhancement_driver's labels.csv for the same files; its
scores.csv is read from the same folder) strategies.csv compares adaptive selection with
each single model, the oracle, a random choice and run-all-and-pick (with --selector, every
policy too, with 95% paired-bootstrap intervals); report.html last, its verdict first.

Every step resumes: re-running the same command redoes only what is missing.
Exit status: 0 all files done; 3 finished, but some files are recorded as errors
(errors.csv, routing.csv, evaluation.csv); 2 usage or configuration error; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from serec.enhancers import EnhancerUnavailable, ModelsConfigError
from serec.exitcodes import ExitStatus
from serec.lock import OutputLocked
from serec.ray_backend import RayUnavailable, add_backend_arguments, backend_from_args
from serec.recommendation import RecommendationConfig, run_recommendation
from serec.report import DEFAULT_LISTENING_ROWS
from serec.routing import KEEP_NOISY
from serec.selection import DEFAULT_COST_LAMBDA, DEFAULT_VERIFY_K, policy_names


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
    selector = p.add_argument_group("quality selector (python -m serec.selection train)")
    selector.add_argument("--selector", type=Path,
                          help="selector checkpoint: adds every routing policy's row to strategies.csv")
    selector.add_argument("--policy", help="route by this policy of --selector instead of the classifiers: "
                          + ", ".join(policy_names()) + " (the k of verify_topK / verify_fixed_topK is --verify_k)")
    selector.add_argument("--cost_lambda", type=float, default=DEFAULT_COST_LAMBDA,
                          help="cost_aware: predicted gain minus this x the model's seconds per audio second")
    selector.add_argument("--verify_k", type=int, default=DEFAULT_VERIFY_K,
                          help="candidates a verify policy runs and scores with DNSMOS")
    selector.add_argument("--selector_features_dir", type=Path,
                          help="the noisy files' features in the selector's feature set (preprocess_features.py "
                          "--feature_set dnsmos_embed); default: compute them here")
    p.add_argument("--num_workers", type=int, default=1, help="worker processes for enhancement and scoring")
    add_backend_arguments(p)
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
        if args.gatekeeper_model_path is None and args.single_model_path is None and args.policy is None:
            p.error("give --gatekeeper_model_path and --expert_model_path, --single_model_path, "
                    "or --selector with --policy")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = RecommendationConfig(
            **{f.name: getattr(args, f.name) for f in fields(RecommendationConfig)}
        )
        result = run_recommendation(config, backend=backend_from_args(args, args.num_workers, isolate=True))
        print(f"report: {result.report}")
    except (EnhancerUnavailable, ModelsConfigError, OutputLocked, RayUnavailable, FileNotFoundError,
            ValueError) as exc:
        # RecommenderError and CheckpointError are ValueErrors.
        print(f"recommendation_driver: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command to resume", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    return ExitStatus.PARTIAL if result.errors else ExitStatus.OK
