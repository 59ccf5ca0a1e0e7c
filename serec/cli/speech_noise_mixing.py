"""Step 1: mix clean speech with noise at target active-speech SNRs (noisy/clean pairs + metadata)."""

from __future__ import annotations

import argparse
import logging
import sys

from serec.exitcodes import ExitStatus
from serec.lock import OutputLocked
from serec.mixing import (
    DEFAULT_SNR_LEVELS,
    DEFAULT_SPEAKER_REGEX,
    DEFAULT_TARGET_LEVEL_DB,
    DEFAULT_TEST_FRACTION,
    MixingConfig,
    run_mixing,
)

EPILOG = """\
outputs (in --output_dir):
  noisy/<file>  clean/<file>  [noise/<file>]   16 kHz 16-bit WAV, noisy = clean + noise
  metadata.csv  one row per mixture (file, clean_source, noise_source, speaker, snr_db,
                measured_snr_db, noise_offset_s, target_level_db, clipped, split, seed)
  skipped.csv   sources or mixtures left out (file, role, reason)
  run.json      flags and package versions

exit status: 0 all mixtures made and nothing skipped; 3 mixtures written but some source
or mixture skipped (see skipped.csv); 2 nothing could be made or bad flags; 130 Ctrl-C.
A re-run with the same flags rewrites byte-identical files.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clean_dir", nargs="+", required=True, metavar="DIR",
                        help="folders of clean speech (searched recursively for .wav/.flac)")
    parser.add_argument("--noise_dir", nargs="+", required=True, metavar="DIR",
                        help="folders of noise (searched recursively for .wav/.flac)")
    parser.add_argument("--output_dir", required=True, metavar="DIR")
    parser.add_argument("--num_mixtures", type=int, default=None, metavar="N",
                        help="mixtures to make (default: one per usable clean file); clean "
                             "files are used in sorted order, cycling")
    snr = parser.add_mutually_exclusive_group()
    snr.add_argument("--snr_levels", type=float, nargs="+", default=list(DEFAULT_SNR_LEVELS),
                     metavar="DB", help="SNRs (dB) to pick from, one per mixture "
                                        "(default: %(default)s)")
    snr.add_argument("--snr_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="draw the SNR uniformly from [LO, HI] dB (rounded to 0.01 dB)")
    parser.add_argument("--target_level_db", type=float, default=DEFAULT_TARGET_LEVEL_DB,
                        help="clean active-speech RMS level in dBFS (default: %(default)s)")
    parser.add_argument("--target_level_jitter", type=float, default=0.0, metavar="DB",
                        help="add a uniform offset in [-DB, +DB] to the level per mixture")
    parser.add_argument("--seed", type=int, default=0,
                        help="mixture i depends only on (seed, i) (default: %(default)s)")
    parser.add_argument("--test_fraction", type=float, default=DEFAULT_TEST_FRACTION,
                        help="fraction of speakers in split 'test', the rest 'train'; no "
                             "speaker is in both (default: %(default)s)")
    parser.add_argument("--noise_test_fraction", type=float, default=None,
                        help="fraction of noise recordings used only by split 'test', the rest "
                             "only by 'train', so no test noise is heard in training (default: "
                             "every recording in both splits)")
    parser.add_argument("--speaker_regex", default=DEFAULT_SPEAKER_REGEX,
                        help="regex with one group capturing the speaker id from the clean "
                             "file name; the default fits <dataset>_<speaker>_<utterance>.wav "
                             "(default: %(default)s)")
    parser.add_argument("--save_noise", action="store_true",
                        help="also write the scaled noise to noise/<file>")
    parser.add_argument("--num_workers", type=int, default=1,
                        help="worker processes; the output does not depend on it")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        config = MixingConfig(
            clean_dir=args.clean_dir,
            noise_dir=args.noise_dir,
            output_dir=args.output_dir,
            num_mixtures=args.num_mixtures,
            snr_levels=args.snr_levels,
            snr_range=tuple(args.snr_range) if args.snr_range else None,
            target_level_db=args.target_level_db,
            target_level_jitter=args.target_level_jitter,
            seed=args.seed,
            test_fraction=args.test_fraction,
            noise_test_fraction=args.noise_test_fraction,
            speaker_regex=args.speaker_regex,
            save_noise=args.save_noise,
            num_workers=args.num_workers,
        )
        summary = run_mixing(config)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    except OutputLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except KeyboardInterrupt:
        print("interrupted: finished WAVs are complete, metadata.csv was not written; "
              "re-run the same command to redo", file=sys.stderr)
        return ExitStatus.INTERRUPTED

    out = summary.output_dir
    print(f"made {summary.made} of {summary.requested} mixtures in {out}/noisy and {out}/clean"
          + (f" (+ {out}/noise)" if config.save_noise else ""))
    print(f"metadata: {out / 'metadata.csv'}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} sources or mixtures: {out / 'skipped.csv'}")
    print(f"run record: {out / 'run.json'}")
    return summary.exit_status
