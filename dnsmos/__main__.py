"""DNSMOS files to CSV: python -m dnsmos PATH... --csv out.csv [--personalized] [--num_workers N].

Writes the reference script's columns (filename, len_in_sec, sr, num_hops, OVRL_raw, SIG_raw,
BAK_raw, OVRL, SIG, BAK, P808_MOS). Files that cannot be scored (unreadable, and, as in every
serec step, silent, shorter than 0.5 s or non-finite unless --score_anyway) are left out of the
CSV and listed on stderr; the exit status is 3 if any were (serec's "finished, some files
failed"), 2 for unusable arguments or models, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dnsmos.files import score_paths, write_reference_csv
from dnsmos.models import DnsmosModelError
from serec.exitcodes import ExitStatus
from serec.lock import OutputLocked, output_lock
from serec.ray_backend import RayUnavailable, add_backend_arguments, backend_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnsmos", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="audio files or folders (searched recursively for .wav/.flac)")
    parser.add_argument("--csv", required=True, type=Path, help="output CSV (written atomically)")
    parser.add_argument("--personalized", action="store_true", help="personalized DNSMOS (pDNSMOS) primary model")
    parser.add_argument("--num_workers", type=int, default=1, help="worker processes (default 1)")
    add_backend_arguments(parser)
    parser.add_argument("--num_threads", type=int, default=None, help="onnxruntime threads per process (default: cores / workers)")
    parser.add_argument("--score_anyway", action="store_true",
                        help="also score silent, too short (< 0.5 s) or non-finite files, which every "
                        "other step rejects (default: list them as not scored)")
    parser.add_argument("--dnsmos_model_dir", type=Path, default=None, help="folder with the ONNX models (default: the ones bundled with speechmos)")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num_workers must be >= 1")
    try:
        # One run per output CSV: a second one would only overwrite the first's.
        with output_lock(args.csv.parent, "dnsmos", name=f".{args.csv.name}.lock"):
            rows = score_paths(
                args.paths,
                personalized=args.personalized,
                model_dir=args.dnsmos_model_dir,
                num_workers=args.num_workers,
                num_threads=args.num_threads,
                validate=not args.score_anyway,
                backend=backend_from_args(args, args.num_workers),
            )
            out = write_reference_csv(args.csv, rows)
    except (DnsmosModelError, OutputLocked, RayUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written; run the same command again", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    failed = [row for row in rows if "error" in row]
    for row in failed:
        print(f"skipped {row['filename']}: {row['error']}", file=sys.stderr)
    note = f"; {len(failed)} file(s) could not be scored (listed above)" if failed else ""
    print(f"scored {len(rows) - len(failed)} file(s) -> {out}{note}")
    return ExitStatus.PARTIAL if failed else ExitStatus.OK


if __name__ == "__main__":
    sys.exit(main())
