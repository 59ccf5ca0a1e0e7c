"""The enhancer zoo on real mixtures: speed, mean scores, wins, and the oracle's headroom by SNR.

Scores are not recomputed: they are read from enhancement_driver.py's scores.csv, and the
SNR of each file from the mixing step's metadata.csv. Speed is measured here, in this one
process, on the first --timing_files noisy files: real-time factor = processing seconds /
audio seconds from wall time and from this process's CPU time (time.process_time, the
trustworthy figure when other jobs share the cores); each model's first call, which
loads its library and session, is not counted. The driver's own RTF (its `seconds`
column, wall time inside 2 busy workers) is shown beside them.

Prints Markdown tables: per model RTF, mean DNSMOS SIG/BAK/OVR, PESQ-WB, STOI, SI-SDR and
wins by OVR; per SNR band the oracle (best model per file) against the best single model
(the one with the highest mean over all files) in OVR and in PESQ-WB, and how often the
OVR-best and the PESQ-best model differ; wins per band; and with --zoo, the same headroom
for subsets of the models.

    python preprocessing/speech_noise_mixing.py --clean_dir CORPUS/clean --noise_dir CORPUS/noise \\
        --output_dir runs/zoo/mix100 --num_mixtures 100 --seed 0
    python enhancement_driver.py --noisy_dir runs/zoo/mix100/noisy --clean_dir runs/zoo/mix100/clean \\
        --output_dir runs/zoo/enh100 --models deepfilternet3 nsnet2 ... --num_workers 2
    python benchmarks/bench_zoo.py --enhancement_dir runs/zoo/enh100 --mix_dir runs/zoo/mix100
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from serec.audio import SAMPLE_RATE, load_audio
from serec.enhancers import create_enhancer
from serec.experiment import markdown_table
from serec.fileio import write_csv_atomic
from serec.labels import NOISY_SYSTEM
from serec.parallel import use_single_thread
from serec.quality import METRICS
from serec.schema import SCORES_CSV

# The metrics in the table, with their headings from quality.METRICS.
MEANS = {m: METRICS[m].heading for m in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovr", "pesq_wb", "stoi", "si_sdr")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enhancement_dir", type=Path, required=True, help="enhancement_driver.py's --output_dir")
    parser.add_argument("--mix_dir", type=Path, required=True, help="the mixing step's --output_dir")
    parser.add_argument("--models", nargs="+", help="models to report (default: every system in scores.csv)")
    parser.add_argument("--timing_files", type=int, default=20, help="files each model is timed on (0: no timing)")
    parser.add_argument("--timings", type=Path, help="CSV of the measured RTFs: written after timing, "
                        "read instead of timing again when it exists (to remake the tables)")
    parser.add_argument("--band_db", type=float, default=10.0, help="width of the SNR bands")
    parser.add_argument("--zoo", action="append", default=[], metavar="NAME=M1,M2,...",
                        help="a subset of the models to report the oracle headroom for (repeatable)")
    return parser.parse_args()


def load_scores(enhancement_dir: Path, mix_dir: Path, band_db: float) -> pd.DataFrame:
    scores = pd.read_csv(enhancement_dir / SCORES_CSV)
    meta = pd.read_csv(mix_dir / "metadata.csv", usecols=["file", "snr_db"])
    scores = scores.merge(meta, on="file", how="left", validate="many_to_one")
    if scores["snr_db"].isna().any():
        missing = scores.loc[scores["snr_db"].isna(), "file"].iloc[0]
        raise SystemExit(f"{missing} of {enhancement_dir / SCORES_CSV} is not in {mix_dir / 'metadata.csv'}")
    # Bands of band_db from the lowest SNR, named by the SNRs they hold ("-5 to 0 dB").
    index = np.floor((scores["snr_db"] - scores["snr_db"].min()) / band_db)
    ranges = scores.groupby(index)["snr_db"].agg(["min", "max"])
    scores["band"] = [f"{ranges.loc[i, 'min']:g} to {ranges.loc[i, 'max']:g} dB" for i in index]
    return scores


def time_models(models: Sequence[str], noisy_dir: Path, count: int) -> dict[str, tuple[float, float]]:
    """(wall RTF, CPU RTF) of each model on the first `count` files, one process, one thread."""
    use_single_thread()
    audios = [load_audio(p) for p in sorted(noisy_dir.glob("*.wav"))[:count]]
    audio_s = sum(a.size for a in audios) / SAMPLE_RATE
    rtf = {}
    for name in models:
        enhancer = create_enhancer(name)
        enhancer.check()
        enhancer.enhance_one(audios[0])  # library load and session creation, not timed
        wall = cpu = 0.0
        for audio in audios:
            started, cpu_started = time.perf_counter(), time.process_time()
            enhancer.enhance_one(audio)
            wall += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
        rtf[name] = (wall / audio_s, cpu / audio_s)
        print(f"timed {name}: wall RTF {wall / audio_s:.3f}, CPU RTF {cpu / audio_s:.3f}", flush=True)
    return rtf


def pivot(scores: pd.DataFrame, metric: str, models: Sequence[str]) -> pd.DataFrame:
    ok = scores[scores["status"] == "ok"]
    return ok.pivot(index="file", columns="system", values=metric).reindex(columns=list(models))


def model_table(scores: pd.DataFrame, models: Sequence[str], rtf: dict[str, tuple[float, float]]) -> str:
    ovr = pivot(scores, "dnsmos_ovr", models)
    wins = ovr.idxmax(axis=1).value_counts()
    files = ovr.shape[0]
    rows = []
    for name in [NOISY_SYSTEM, *models]:
        own = scores[scores["system"] == name]
        ok = own[own["status"] == "ok"]
        driver_rtf = ok["seconds"].sum() / ok["duration_s"].sum() if name != NOISY_SYSTEM else float("nan")
        wall, cpu = rtf.get(name, (float("nan"), float("nan")))
        won = "-" if name == NOISY_SYSTEM else f"{wins.get(name, 0)} ({100 * wins.get(name, 0) / files:.0f} %)"
        rows.append([name, _f(cpu), _f(wall), _f(driver_rtf), *(_f(ok[m].mean()) for m in MEANS), won,
                     int((own["status"] != "ok").sum())])
    columns = ["model", "RTF CPU", "RTF wall", "RTF wall (driver)", *MEANS.values(), "wins by OVR", "errors"]
    return markdown_table(columns, rows)


def headroom_table(scores: pd.DataFrame, models: Sequence[str]) -> str:
    ovr, pesq = pivot(scores, "dnsmos_ovr", models), pivot(scores, "pesq_wb", models)
    best_ovr, best_pesq = ovr.mean().idxmax(), pesq.mean().idxmax()
    bands = scores.drop_duplicates("file").set_index("file")["band"]
    order = scores.drop_duplicates("band").sort_values("snr_db")["band"].tolist()
    rows = []
    for band in [*order, "all"]:
        files = bands.index if band == "all" else bands.index[bands == band]
        o, p = ovr.loc[files], pesq.loc[files]
        differ = int((o.idxmax(axis=1) != p.idxmax(axis=1)).sum())
        rows.append([band, len(files), _f(o[best_ovr].mean()), _f(o.max(axis=1).mean()),
                     f"+{o.max(axis=1).mean() - o[best_ovr].mean():.3f}", _f(p[best_pesq].mean()),
                     _f(p.max(axis=1).mean()), f"+{p.max(axis=1).mean() - p[best_pesq].mean():.3f}",
                     f"{differ} ({100 * differ / len(files):.0f} %)"])
    columns = ["SNR band", "files", f"OVR {best_ovr}", "OVR oracle", "OVR headroom", f"PESQ {best_pesq}",
               "PESQ oracle", "PESQ headroom", "OVR-best != PESQ-best"]
    return markdown_table(columns, rows)


def wins_by_band(scores: pd.DataFrame, models: Sequence[str]) -> str:
    ovr = pivot(scores, "dnsmos_ovr", models)
    best = ovr.idxmax(axis=1)
    bands = scores.drop_duplicates("file").set_index("file")["band"].reindex(best.index)
    order = scores.drop_duplicates("band").sort_values("snr_db")["band"].tolist()
    rows = []
    for band in order:
        counts = best[bands == band].value_counts()
        rows.append([band, int((bands == band).sum()), *(int(counts.get(m, 0)) for m in models)])
    return markdown_table(["SNR band", "files", *models], rows)


def zoo_table(scores: pd.DataFrame, zoos: dict[str, list[str]]) -> str:
    rows = []
    for name, members in zoos.items():
        ovr, pesq = pivot(scores, "dnsmos_ovr", members), pivot(scores, "pesq_wb", members)
        best = ovr.mean().idxmax()
        wins = ovr.idxmax(axis=1).value_counts()
        share = ", ".join(f"{m} {wins.get(m, 0)}" for m in members)
        rows.append([name, best, _f(ovr[best].mean()), _f(ovr.max(axis=1).mean()),
                     f"+{ovr.max(axis=1).mean() - ovr[best].mean():.3f}",
                     f"+{pesq.max(axis=1).mean() - pesq[pesq.mean().idxmax()].mean():.3f}", share])
    return markdown_table(["zoo", "best single", "its OVR", "oracle OVR", "OVR headroom", "PESQ headroom",
                           "wins by OVR"], rows)


def _f(value: float) -> str:
    return "" if value != value else f"{value:.3f}"  # NaN: blank


def main() -> None:
    args = parse_args()
    scores = load_scores(args.enhancement_dir, args.mix_dir, args.band_db)
    models = args.models or [m for m in dict.fromkeys(scores["system"]) if m != NOISY_SYSTEM]
    zoos = {"all": models}
    for spec in args.zoo:
        name, _, members = spec.partition("=")
        zoos[name] = [m.strip() for m in members.split(",") if m.strip()]
        unknown = set(zoos[name]) - set(models)
        if unknown:
            raise SystemExit(f"--zoo {name}: not in scores.csv: {', '.join(sorted(unknown))}")
    if args.timings is not None and args.timings.exists():
        table = pd.read_csv(args.timings, index_col="model")
        rtf = {m: (table.loc[m, "rtf_wall"], table.loc[m, "rtf_cpu"]) for m in table.index}
    else:
        rtf = time_models(models, args.mix_dir / "noisy", args.timing_files) if args.timing_files else {}
        if args.timings is not None:
            rows = [{"model": m, "rtf_wall": wall, "rtf_cpu": cpu, "files": args.timing_files}
                    for m, (wall, cpu) in rtf.items()]
            write_csv_atomic(args.timings, ["model", "rtf_wall", "rtf_cpu", "files"], rows)
    files = scores["file"].nunique()
    audio_s = scores.drop_duplicates("file")["duration_s"].sum()
    timed = f"RTF timed here on the first {args.timing_files} files" if rtf else "not timed here"
    print(f"\n{files} mixtures, {audio_s:.1f} s of audio, SNR {scores['snr_db'].min():g} to "
          f"{scores['snr_db'].max():g} dB; {timed}\n")
    print(model_table(scores, models, rtf), "\n")
    print(headroom_table(scores, models), "\n")
    print(wins_by_band(scores, models), "\n")
    print(zoo_table(scores, zoos))


if __name__ == "__main__":
    main()
