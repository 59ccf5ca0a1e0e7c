"""Does scoring at a common loudness change the labels? DNSMOS OVR as is vs at one active level.

DNSMOS OVR rewards quieter output, so an enhancer that turns the level down can win a
file it did not improve. This runs serec.level_check (the experiment's `level_check`
step) on an enhancement run: it re-scores every (file, system) of the first files the
other way (at --level_db if the run scored as is; as is if its run.json says it scored
at a level) and compares: each system's mean OVR and mean output level, the label
distribution, how many labels change, and the oracle's headroom over the best single
model. The re-scored rows go to OUTPUT_DIR/rescored.csv (a re-run resumes), the
comparison to OUTPUT_DIR/summary.json.

    python benchmarks/bench_level.py --enhancement_dir runs/zoo/enh100 --noisy_dir runs/zoo/mix100/noisy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serec.experiment import level_check_tables
from serec.level_check import DEFAULT_LEVEL_DB, run_level_check, summary_sentence
from serec.parallel import LocalBackend


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enhancement_dir", type=Path, required=True, help="enhancement_driver.py's --output_dir")
    parser.add_argument("--noisy_dir", type=Path, required=True, help="its --noisy_dir")
    parser.add_argument("--output_dir", type=Path,
                        help="rescored.csv and summary.json (default ENHANCEMENT_DIR/level_check)")
    parser.add_argument("--level_db", type=float, default=DEFAULT_LEVEL_DB,
                        help="common active-speech level, dBFS, when the run scored as is")
    parser.add_argument("--max_files", type=int, help="only the first N files (sorted)")
    parser.add_argument("--num_workers", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    summary = run_level_check(args.enhancement_dir, args.noisy_dir, args.output_dir or args.enhancement_dir / "level_check",
                              max_files=args.max_files, level_db=args.level_db,
                              backend=LocalBackend(args.num_workers, isolate=True))
    print(f"{summary['files']} files, common level {summary['common_level_db']:g} dBFS (active speech); "
          f"the run scored {'as is' if summary['run_level_db'] is None else 'at that level'}, re-scored "
          f"{summary['rescored_as']}; labels by {summary['labels_by']}\n")
    print(level_check_tables(summary))
    print(f"\n{summary_sentence(summary)}")
    print(json.dumps({"files": summary["files"], "labels_changed": summary["labels_changed"],
                      "headroom_as_is": (summary["settings"]["as_is"] or {}).get("headroom"),
                      "headroom_at_level": (summary["settings"]["at_level"] or {}).get("headroom")}))


if __name__ == "__main__":
    main()
