"""Step 2: run every SE model on every noisy file, score the outputs, label each file's best model.

Exit status: 0 when every (file, system) pair is scored; 3 when the run finished but some
pairs are recorded with status=error in scores.csv (bad input files, a model failing on a
file); 2 for a usage or configuration error (nothing was run); 130 on Ctrl-C (work done so
far is kept and a re-run resumes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serec.enhancement import EnhancementConfig, format_failures, format_summary, run_enhancement
from serec.enhancers import DEFAULT_MODELS, EnhancerUnavailable, available_enhancers
from serec.exitcodes import ExitStatus
from serec.labels import LABEL_POLICIES, LabelRule
from serec.lock import OutputLocked
from serec.quality import METRIC_NAMES
from serec.ray_backend import RayUnavailable, add_backend_arguments, backend_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noisy_dir", type=Path, required=True, help="folder of noisy WAV/FLAC (recursive)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--clean_dir", type=Path, help="clean references (same relative names) for PESQ/STOI/SI-SDR")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help=f"enhancers to run (default: {' '.join(DEFAULT_MODELS)}; built-in: "
                        f"{' '.join(available_enhancers())}; more from --models_config)")
    parser.add_argument("--models_config", type=Path, help="TOML file configuring external models (SGMSE, StoRM, CDiffuSE)")
    parser.add_argument("--all_failed_threshold", type=float, default=2.0,
                        help="absolute policy: All_Failed when every model's label metric <= this")
    parser.add_argument("--all_failed_policy", choices=LABEL_POLICIES, default="absolute")
    parser.add_argument("--min_gain", type=float, default=0.0,
                        help="relative policy: All_Failed when no model beats the noisy input by this much")
    parser.add_argument("--label_metric", default="dnsmos_ovr", choices=METRIC_NAMES,
                        help="the metric that picks each file's best model (its labels.csv columns "
                        "are still named <MODEL>_ovr and best_ovr)")
    parser.add_argument("--num_workers", type=int, default=1, help="single-threaded worker processes")
    add_backend_arguments(parser)
    parser.add_argument("--device", default="cpu", help="device for external models (cpu, cuda, cuda:1)")
    parser.add_argument("--limit", type=int, help="only the first N files (sorted by name)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results of these models")
    parser.add_argument("--retry_errors", action="store_true", help="re-run pairs recorded with status=error")
    parser.add_argument("--chunk_size", type=int, default=8, help="files per work unit of a built-in model")
    parser.add_argument("--dnsmos_level_db", type=float, default=None, metavar="DBFS",
                        help="score DNSMOS on every system (and the noisy input) scaled to this "
                        "active-speech level, e.g. -26, so quieter output is not rewarded; default: "
                        "as it is (the reference DNSMOS behaviour)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = EnhancementConfig(
        noisy_dir=args.noisy_dir,
        output_dir=args.output_dir,
        models=args.models,
        clean_dir=args.clean_dir,
        models_config=args.models_config,
        rule=LabelRule(args.label_metric, args.all_failed_policy, args.all_failed_threshold, args.min_gain),
        num_workers=args.num_workers,
        device=args.device,
        limit=args.limit,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        seed=args.seed,
        chunk_size=args.chunk_size,
        dnsmos_level_db=args.dnsmos_level_db,
    )
    try:
        backend = backend_from_args(args, args.num_workers, isolate=True)
        summary = run_enhancement(config, backend=backend)
    except (EnhancerUnavailable, OutputLocked, RayUnavailable, FileNotFoundError, ValueError) as exc:
        print(f"enhancement_driver: error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: completed pairs are kept; run the same command to resume", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    print(format_summary(summary))
    if summary.failures:
        print(format_failures(summary), file=sys.stderr)
    print(f"\nscores: {summary.scores_csv}\nlabels: {summary.labels_csv}\n"
          f"enhanced audio: {args.output_dir / 'enhanced'}")
    return summary.exit_status
