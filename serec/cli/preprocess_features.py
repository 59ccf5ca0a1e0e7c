"""Compute per-file feature vectors (CE/KL, or cekl_plus) for a folder of noisy recordings.

Writes OUTPUT/<file>.npy (relative paths mirrored), OUTPUT/features.json (names in vector
order, feature set, parameters), OUTPUT/errors.csv (files that could not be used, and why)
and OUTPUT/run.json. A re-run skips files that already have a valid vector.

Exit status: 0 when every file has a vector, 3 when any file failed (see errors.csv),
2 for bad arguments, a missing dnsmos package (cekl_plus) or an output folder made
with other feature settings or locked by another run; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys

from serec.exitcodes import ExitStatus
from serec.feature_files import FeatureConfigError, run_feature_extraction
from serec.features import DEFAULT_MAX_SECONDS, FEATURE_SETS
from serec.lock import output_lock
from serec.ray_backend import add_backend_arguments, backend_from_args
from serec.runinfo import write_run_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--base_data_dir", help="folder of recordings, read recursively (subfolders mirrored)"
    )
    source.add_argument("--input_dir", help="folder of recordings, top level only")
    parser.add_argument("--output_base_dir", required=True, help="where the .npy files go")
    parser.add_argument("--feature_set", choices=sorted(FEATURE_SETS), default="cekl")
    parser.add_argument(
        "--max_seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help="use only the first MAX_SECONDS of longer files (default %(default)s)",
    )
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes")
    add_backend_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every file, even in a folder made with other feature settings",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    recursive = args.base_data_dir is not None
    try:
        # run.json too is written under the folder's lock (run_feature_extraction re-enters it).
        with output_lock(args.output_base_dir, "features"):
            summary = run_feature_extraction(
                args.base_data_dir if recursive else args.input_dir,
                args.output_base_dir,
                feature_set=args.feature_set,
                max_seconds=args.max_seconds,
                num_workers=args.num_workers,
                overwrite=args.overwrite,
                recursive=recursive,
                backend=backend_from_args(args, args.num_workers),
            )
            write_run_json(args.output_base_dir, args, summary=vars(summary))
    except (FeatureConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        # RuntimeError includes OutputLocked (another run writes into this folder) and
        # RayUnavailable (--backend ray cannot run here).
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: finished vectors are kept; run the same command to resume", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    print(
        f"{summary.feature_set} features in {summary.output_root}: "
        f"{summary.done} computed, {summary.skipped} already done, {summary.errors} failed "
        f"of {summary.total} files ({summary.files_per_s:.2f} files/s)"
    )
    if summary.errors:
        print(f"failed files and reasons: {summary.errors_csv}")
    return ExitStatus.PARTIAL if summary.errors else ExitStatus.OK
