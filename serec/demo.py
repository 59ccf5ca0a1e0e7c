"""The workflow end to end on a small generated corpus (`make demo`); steps run in order."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serec.audio import write_wav
from serec.mixing import MixingConfig, run_mixing
from serec.synth import NOISE_KINDS, speech_like

SPEAKERS = ("spk0001", "spk0002", "spk0003", "spk0004")
UTTERANCES_PER_SPEAKER = 3
NOISE_KINDS_USED = ("pink", "babble", "hum", "modulated")

Step = Callable[[Path, int], None]


def build_corpus(output_dir: Path, seed: int) -> None:
    """Synthetic speech-like clean files (corpus-style names) and a few kinds of noise."""
    rng = np.random.default_rng(seed)
    clean_dir, noise_dir = output_dir / "corpus" / "clean", output_dir / "corpus" / "noise"
    for speaker in SPEAKERS:
        f0 = float(rng.uniform(100, 250))  # one voice per speaker
        for utterance in range(UTTERANCES_PER_SPEAKER):
            audio = speech_like(rng, float(rng.uniform(2.0, 3.5)), f0=f0)
            write_wav(clean_dir / f"demo_{speaker}_{utterance:04d}.wav", audio)
    for kind in NOISE_KINDS_USED:
        write_wav(noise_dir / f"synth_{kind}.wav", NOISE_KINDS[kind](rng, 3.0))
    n_clean = len(SPEAKERS) * UTTERANCES_PER_SPEAKER
    print(f"corpus: {n_clean} clean files in {clean_dir}, {len(NOISE_KINDS_USED)} noises in {noise_dir}")


def mix(output_dir: Path, seed: int) -> None:
    """Step 1: preprocessing/speech_noise_mixing.py, two mixtures per clean file."""
    corpus, mixtures = output_dir / "corpus", output_dir / "mixtures"
    config = MixingConfig(
        clean_dir=(corpus / "clean",),
        noise_dir=(corpus / "noise",),
        output_dir=mixtures,
        num_mixtures=2 * len(SPEAKERS) * UTTERANCES_PER_SPEAKER,
        seed=seed,
        test_fraction=0.25,
        save_noise=True,
    )
    command = [
        "python", "preprocessing/speech_noise_mixing.py",
        "--clean_dir", str(corpus / "clean"), "--noise_dir", str(corpus / "noise"),
        "--output_dir", str(mixtures), "--num_mixtures", str(config.num_mixtures),
        "--seed", str(seed), "--test_fraction", str(config.test_fraction), "--save_noise",
    ]
    print(f"mixing (same as: {shlex.join(command)})")
    summary = run_mixing(config)
    if summary.made == 0:
        raise RuntimeError(f"mixing made nothing; see {mixtures / 'skipped.csv'}")
    worst = max(abs(r["measured_snr_db"] - r["snr_db"]) for r in summary.rows)
    print(f"mixing: {summary.made} noisy/clean/noise triples in {mixtures}, "
          f"metadata {mixtures / 'metadata.csv'} (worst SNR error {worst:.3f} dB)")


STEPS: list[tuple[str, Step]] = [
    ("corpus", build_corpus),
    ("mixing", mix),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    for number, (name, step) in enumerate(STEPS, start=1):
        print(f"[{number}/{len(STEPS)}] {name}")
        step(args.output_dir, args.seed)
    print(f"demo finished: everything is under {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
