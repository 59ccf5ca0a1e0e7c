"""Real-time factor, alignment and (optionally) DNSMOS OVR of each built-in enhancer on real mixtures.

Mixes N random clean utterances with random noise segments at random SNRs (plain numpy,
seeded), runs every enhancer on each mixture in this one process, and prints a Markdown
table: RTF = processing seconds / audio seconds, from wall time and from this process's
CPU time (steadier when other jobs share the cores; the first call of each enhancer,
which imports its library, is run once beforehand and not counted), the median and
largest lag of the output against the clean speech (0 = aligned), and with --dnsmos
the mean DNSMOS OVR (speechmos) and on how many mixtures each enhancer scores best,
overall and per SNR band.

    python benchmarks/bench_enhancers.py --clean_dir CORPUS/clean --noise_dir CORPUS/noise
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serec.audio import SAMPLE_RATE, list_audio_files, load_audio
from serec.enhancers import DEFAULT_MODELS, create_enhancer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean_dir", type=Path, required=True)
    parser.add_argument("--noise_dir", type=Path, required=True)
    parser.add_argument("--num_files", type=int, default=20)
    parser.add_argument("--snr_range", type=float, nargs=2, default=(0.0, 15.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--models", nargs="+", default=[*DEFAULT_MODELS, "none"])
    parser.add_argument("--dnsmos", action="store_true", help="also score with speechmos DNSMOS OVR")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_mixtures(
    clean_dir: Path, noise_dir: Path, count: int, snr_range: tuple[float, float], seed: int
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(clean, noisy, snr_db) triples: a random noise segment (looped if short) at a random SNR."""
    rng = np.random.default_rng(seed)
    cleans, noises = list_audio_files(clean_dir), list_audio_files(noise_dir)
    mixtures = []
    for _ in range(count):
        clean = load_audio(cleans[rng.integers(len(cleans))])
        noise = load_audio(noises[rng.integers(len(noises))])
        if noise.size < clean.size:
            noise = np.tile(noise, -(-clean.size // noise.size))
        start = int(rng.integers(0, noise.size - clean.size + 1))
        noise = noise[start : start + clean.size]
        snr_db = float(rng.uniform(*snr_range))
        gain = np.sqrt(np.sum(clean**2) / max(np.sum(noise**2), 1e-12) / 10 ** (snr_db / 10))
        noisy = clean + gain * noise
        # Keep the peak inside [-1, 1] the way a recording chain would: scale both.
        scale = min(1.0, 0.99 / float(np.max(np.abs(noisy))))
        mixtures.append(((clean * scale).astype(np.float32), (noisy * scale).astype(np.float32), snr_db))
    return mixtures


def xcorr_lag(reference: np.ndarray, signal: np.ndarray, max_lag: int = 1600) -> int:
    n = 2 * reference.size
    cc = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(reference, n)), n)
    return int(np.argmax(np.concatenate([cc[-max_lag:], cc[: max_lag + 1]]))) - max_lag


def main() -> None:
    args = parse_args()
    mixtures = make_mixtures(args.clean_dir, args.noise_dir, args.num_files, tuple(args.snr_range), args.seed)
    audio_s = sum(noisy.size for _, noisy, _ in mixtures) / SAMPLE_RATE
    if args.dnsmos:
        from speechmos import dnsmos

    rows = {}
    ovr: dict[str, list[float]] = {}
    for name in args.models:
        enhancer = create_enhancer(name, seed=args.seed)
        enhancer.check()
        enhancer.enhance_one(mixtures[0][1])  # library import and first-call setup, not timed
        seconds, cpu_seconds, lags = 0.0, 0.0, []
        for clean, noisy, _ in tqdm(mixtures, desc=name):
            started, cpu_started = time.perf_counter(), time.process_time()
            out = enhancer.enhance_one(noisy)
            seconds += time.perf_counter() - started
            cpu_seconds += time.process_time() - cpu_started
            lags.append(xcorr_lag(clean, out))
            if args.dnsmos:
                ovr.setdefault(name, []).append(dnsmos.run(np.clip(out, -1, 1), SAMPLE_RATE)["ovrl_mos"])
        rows[name] = (seconds, cpu_seconds, float(np.median(lags)), max(abs(v) for v in lags))

    print(f"\n{len(mixtures)} mixtures, {audio_s:.1f} s of audio, SNR {args.snr_range[0]:g}-{args.snr_range[1]:g} dB, "
          f"seed {args.seed}\n")
    header = "| model | wall s | RTF (wall) | CPU s | RTF (CPU) | median lag | max abs lag |"
    best: list[str] = []
    if args.dnsmos:
        header += " mean DNSMOS OVR | best on |"
        contenders = [m for m in args.models if m != "none"]
        best = [max(contenders, key=lambda m, i=i: ovr[m][i]) for i in range(len(mixtures))]
    wins = Counter(best)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, (seconds, cpu_seconds, lag, max_lag) in rows.items():
        line = (f"| {name} | {seconds:.2f} | {seconds / audio_s:.4f} | {cpu_seconds:.2f} | "
                f"{cpu_seconds / audio_s:.4f} | {lag:g} | {max_lag} |")
        if args.dnsmos:
            line += f" {np.mean(ovr[name]):.2f} | {wins.get(name, 0) if name != 'none' else '-'} |"
        print(line)
    if best:
        print_wins_by_snr(best, [snr for _, _, snr in mixtures], contenders)


def print_wins_by_snr(best: list[str], snrs: list[float], models: list[str]) -> None:
    """Which model scores best, counted per 5 dB SNR band."""
    bands = sorted({5 * int(np.floor(s / 5)) for s in snrs})
    print("\n| SNR band | files | " + " | ".join(models) + " |")
    print("|" + "---|" * (len(models) + 2))
    for low in bands:
        in_band = [b for b, s in zip(best, snrs, strict=True) if low <= s < low + 5]
        counts = Counter(in_band)
        print(f"| {low:g} to {low + 5:g} dB | {len(in_band)} | " + " | ".join(str(counts.get(m, 0)) for m in models) + " |")

if __name__ == "__main__":
    main()
