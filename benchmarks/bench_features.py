"""Feature extraction throughput (files/s) of preprocess_features.py on real speech + noise mixtures.

Makes N simple mixtures from a corpus (clean/ and noise/ folders of 16 kHz WAVs) with
numpy: a clean utterance (or, with --min_seconds, consecutive utterances of one speaker
joined up to that length), a random noise excerpt (looped if short) at a random SNR in
[0, 20] dB, peak-limited to 0.99. Then runs the real CLI per (feature set, workers) into
a fresh output folder and reports wall-clock files/s (process start included) and the
compute-only files/s the run itself reports, best of --repeats. Also reports how the
cekl_plus SNR estimate tracks the mixing SNR (Pearson r, median absolute error).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from serec.audio import list_audio_files, load_audio, write_wav
from serec.features import snr_estimate_db, spectrogram_power

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"(\d+) computed, (\d+) already done, (\d+) failed of (\d+) files \(([\d.]+) files/s\)"
)


def _speaker(path: Path) -> str:
    # Corpus names are <dataset>_spk<NNNN>_<utt>.wav; fall back to the whole stem.
    parts = path.stem.split("_")
    return "_".join(parts[:2]) if len(parts) >= 3 else path.stem


def make_mixtures(
    corpus: Path, out_dir: Path, n_files: int, min_seconds: float, seed: int
) -> list[float]:
    """Write n_files noisy mixtures to out_dir; returns their mixing SNRs (dB)."""
    rng = np.random.default_rng(seed)
    clean_files = list_audio_files(corpus / "clean")
    noise_files = list_audio_files(corpus / "noise")
    by_speaker: dict[str, list[Path]] = {}
    for path in clean_files:
        by_speaker.setdefault(_speaker(path), []).append(path)
    snrs: list[float] = []
    for index in range(n_files):
        first = clean_files[int(rng.integers(len(clean_files)))]
        group = by_speaker[_speaker(first)]
        start = group.index(first)
        pieces = [load_audio(first)]
        while sum(p.size for p in pieces) < min_seconds * 16000:
            pieces.append(load_audio(group[(start + len(pieces)) % len(group)]))
        speech = np.concatenate(pieces)
        noise = load_audio(noise_files[int(rng.integers(len(noise_files)))])
        offset = int(rng.integers(max(1, noise.size - speech.size)))
        noise = np.resize(np.roll(noise, -offset), speech.size)
        snr_db = float(rng.uniform(0.0, 20.0))
        gain = np.sqrt(np.mean(speech**2) / (np.mean(noise**2) * 10 ** (snr_db / 10)))
        noisy = speech + gain * noise
        noisy *= min(1.0, 0.99 / np.max(np.abs(noisy)))
        write_wav(out_dir / f"mix_{index:04d}_snr{snr_db:.1f}.wav", noisy)
        snrs.append(snr_db)
    return snrs


def run_cli(noisy: Path, out: Path, feature_set: str, workers: int) -> tuple[float, float, int]:
    """One preprocess_features.py run: (wall-clock files/s, compute files/s, files done)."""
    command = [
        sys.executable, str(REPO / "preprocess_features.py"), "--base_data_dir", str(noisy),
        "--output_base_dir", str(out), "--feature_set", feature_set,
        "--num_workers", str(workers),
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    done = int(match.group(1))
    return done / wall, float(match.group(5)), done


def snr_tracking(noisy: Path, snrs: list[float]) -> tuple[float, float]:
    estimates = [
        snr_estimate_db(spectrogram_power(load_audio(path, crop_seconds=20.0)))
        for path in list_audio_files(noisy)
    ]
    r = float(np.corrcoef(snrs, estimates)[0, 1])
    return r, float(np.median(np.abs(np.subtract(estimates, snrs))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus_dir", required=True, help="folder with clean/ and noise/")
    parser.add_argument("--work_dir", help="where mixtures and features go (default: a temp dir)")
    parser.add_argument("--n_files", type=int, default=100)
    parser.add_argument("--min_seconds", type=float, default=0.0, help="join utterances up to this")
    parser.add_argument("--feature_sets", nargs="+", default=["cekl", "cekl_plus"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; best is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        noisy = work / "noisy"
        snrs = make_mixtures(
            Path(args.corpus_dir), noisy, args.n_files, args.min_seconds, args.seed
        )
        seconds = sum(load_audio(p).size for p in list_audio_files(noisy)) / 16000 / len(snrs)
        print(f"{len(snrs)} mixtures, mean {seconds:.1f} s, in {noisy}")
        best: dict[tuple[str, int], tuple[float, float, int]] = {}
        # Settings interleave within each repeat, so load from other jobs hits them alike.
        for repeat in range(args.repeats):
            for feature_set in args.feature_sets:
                for workers in args.workers:
                    out = work / f"feat_{feature_set}_w{workers}_r{repeat}"
                    result = run_cli(noisy, out, feature_set, workers)
                    print(json.dumps({"feature_set": feature_set, "num_workers": workers,
                                      "wall_files_per_s": round(result[0], 2),
                                      "compute_files_per_s": round(result[1], 2)}))  # fmt: skip
                    key = (feature_set, workers)
                    best[key] = max(best.get(key, result), result)
        r, median_error = snr_tracking(noisy, snrs)
        print(f"snr_est_db vs mixing SNR: Pearson r {r:.3f}, median |error| {median_error:.1f} dB")
        print(
            "\n| feature set | workers | files | files/s (wall, incl. start) | files/s (compute) |"
        )
        print("|---|---|---|---|---|")
        for (feature_set, workers), (wall_fps, compute_fps, done) in best.items():
            print(f"| {feature_set} | {workers} | {done} | {wall_fps:.1f} | {compute_fps:.1f} |")


if __name__ == "__main__":
    main()
