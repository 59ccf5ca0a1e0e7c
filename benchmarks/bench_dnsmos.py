"""Benchmark: our batch DNSMOS scorer vs speechmos.dnsmos.run on the same files, same run.

Scores N files one by one with speechmos (the reference) and in batches with
`dnsmos.DNSMOS.score_clips`, for the regular and the personalized model, and prints files/s
for each, the speed ratio and the largest |ours - speechmos| per score. The two scorers
alternate block by block (and which goes first alternates too), so load from other
processes on a shared machine hits both alike. Both are warmed up first; their first-call
times are printed separately.

Input: --input_dir (already mixed files, recursive), else N mixtures made with
serec.mixing from --corpus_dir (default ../shared/data/corpus beside the repo) into a
temporary folder, else generated noisy speech (serec.synth) when there is no corpus.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
KEYS = {"sig": "sig_mos", "bak": "bak_mos", "ovr": "ovrl_mos", "p808": "p808_mos"}


def corpus_mixtures(corpus: Path, n: int, seed: int, out_dir: Path) -> list[Path]:
    from serec.mixing import MixingConfig, run_mixing

    run_mixing(
        MixingConfig(
            clean_dir=(corpus / "clean",),
            noise_dir=(corpus / "noise",),
            output_dir=out_dir,
            num_mixtures=n,
            seed=seed,
        )
    )
    from serec.audio import list_audio_files

    return list_audio_files(out_dir / "noisy")[:n]


def generated_clips(n: int, seed: int) -> list[np.ndarray]:
    from serec.synth import NOISE_KINDS, speech_like

    rng = np.random.default_rng(seed)
    kinds = sorted(NOISE_KINDS)
    clips = []
    for i in range(n):
        seconds = float(rng.uniform(2.0, 6.0))
        speech = speech_like(rng, seconds)
        noise = NOISE_KINDS[kinds[i % len(kinds)]](rng, seconds)[: speech.size]
        gain = 10 ** (-float(rng.uniform(0, 15)) / 20) * np.std(speech) / (np.std(noise) + 1e-9)
        clips.append(np.clip(speech + gain * noise, -1, 1).astype(np.float32))
    return clips


def load_inputs(args: argparse.Namespace, tmp: Path) -> tuple[list[np.ndarray], str]:
    from serec.audio import list_audio_files, load_audio

    if args.input_dir is not None:
        paths = list_audio_files(args.input_dir)[: args.num_files]
        source = f"{len(paths)} files from {args.input_dir}"
    elif (args.corpus_dir / "clean").is_dir() and (args.corpus_dir / "noise").is_dir():
        paths = corpus_mixtures(args.corpus_dir, args.num_files, args.seed, tmp)
        source = f"{len(paths)} mixtures made by serec.mixing (seed {args.seed}) from {args.corpus_dir}"
    else:
        return generated_clips(args.num_files, args.seed), f"{args.num_files} generated clips (seed {args.seed})"
    return [load_audio(p, validate=False) for p in paths], source


def bench_variant(
    clips: list[np.ndarray], personalized: bool, block: int, num_threads: int | None
) -> dict[str, float]:
    import speechmos.dnsmos

    from dnsmos import DNSMOS

    model_type = "dnsmos_personalized" if personalized else "dnsmos"
    ours = DNSMOS(personalized=personalized, num_threads=num_threads)
    warm = clips[0][: 16000 * 2]
    t0 = time.perf_counter()
    speechmos.dnsmos.run(warm, sr=16000, model_type=model_type)
    t1 = time.perf_counter()
    ours.score_clips([warm])
    t2 = time.perf_counter()

    ref_scores: list[dict[str, float]] = []
    our_scores: list[dict[str, float]] = []
    wall = {"speechmos": 0.0, "ours": 0.0}
    cpu = {"speechmos": 0.0, "ours": 0.0}
    for number, first in enumerate(range(0, len(clips), block)):
        chunk = clips[first : first + block]
        for side in ("speechmos", "ours") if number % 2 == 0 else ("ours", "speechmos"):
            start, start_cpu = time.perf_counter(), time.process_time()
            if side == "speechmos":
                for clip in chunk:
                    out = speechmos.dnsmos.run(clip, sr=16000, model_type=model_type)
                    ref_scores.append({k: float(out[v]) for k, v in KEYS.items()})
            else:
                our_scores.extend(c.mos() for c in ours.score_clips(chunk))
            wall[side] += time.perf_counter() - start
            cpu[side] += time.process_time() - start_cpu
    diffs = {k: max(abs(o[k] - r[k]) for o, r in zip(our_scores, ref_scores, strict=True)) for k in KEYS}
    return {
        "files": len(clips),
        "speechmos_files_per_s": len(clips) / wall["speechmos"],
        "ours_files_per_s": len(clips) / wall["ours"],
        "speed_ratio": wall["speechmos"] / wall["ours"],
        # CPU seconds (all threads) per side: steadier than wall time on a shared machine.
        "cpu_ratio": cpu["speechmos"] / cpu["ours"],
        "speechmos_first_call_s": t1 - t0,
        "ours_first_call_s": t2 - t1,
        **{f"max_abs_diff_{k}": v for k, v in diffs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", type=Path, default=None, help="already mixed files (recursive)")
    parser.add_argument("--corpus_dir", type=Path, default=DEFAULT_CORPUS, help="corpus with clean/ and noise/ (default: %(default)s)")
    parser.add_argument("--num_files", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block", type=int, default=20, help="files per alternation block (and per batch call)")
    parser.add_argument("--num_threads", type=int, default=None, help="onnxruntime threads for ours (default: onnxruntime's, as speechmos)")
    parser.add_argument("--variants", nargs="+", choices=["regular", "personalized"], default=["regular", "personalized"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_dnsmos_") as tmp:
        clips, source = load_inputs(args, Path(tmp))
    from dnsmos.windows import plan_windows

    seconds = np.array([c.size / 16000 for c in clips])
    windows = sum(len(plan_windows(c.size).starts) for c in clips)
    print(
        f"input: {source}; {seconds.min():.1f}-{seconds.max():.1f} s, mean {seconds.mean():.2f} s; "
        f"{windows} scored 9.01 s windows ({windows / len(clips):.2f} per file)"
    )
    results = {}
    for variant in args.variants:
        r = bench_variant(clips, variant == "personalized", args.block, args.num_threads)
        results[variant] = r
        print(
            f"{variant:>12}: speechmos {r['speechmos_files_per_s']:.2f} files/s, ours "
            f"{r['ours_files_per_s']:.2f} files/s, ratio {r['speed_ratio']:.2f}x "
            f"(CPU-time ratio {r['cpu_ratio']:.2f}x); max |diff| "
            + ", ".join(f"{k} {r[f'max_abs_diff_{k}']:.1e}" for k in KEYS)
            + f"; first call: speechmos {r['speechmos_first_call_s']:.2f} s, ours {r['ours_first_call_s']:.2f} s"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"input": source, "results": results}, indent=2) + "\n")
        print(f"results -> {args.json}")


if __name__ == "__main__":
    main()
