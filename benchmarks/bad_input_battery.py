"""Bad-input battery: 14 kinds of bad or unusual input files through every top-level script.

Builds, in a temp folder, a few good files and one file of each kind (empty, 0-byte,
truncated header, silent, 0.1 s, NaN samples, stereo, 8 kHz, 24-bit, float WAV, clipped,
MP3 bytes named .wav, a broken symbolic link, a text file named .wav), then runs mixing,
enhancement_driver, preprocess_features, model_recommender_w_scaler, recommendation_driver
and `python -m dnsmos` on them, each once, in a subprocess, and prints one table:
input x script -> what the script did with that file, read from its own outputs:

- `reported: REASON`  the file is listed with its reason (error CSV or stderr);
- `accepted`          the file was processed like a good one (`+ warning` if a warning
                      naming it was printed);
- `crashed`           the script died (traceback, signal, unexpected exit status);
- `not run`           the script stopped before any file (exit 2) with the reason given;
- `silently skipped`  the file appears nowhere.

Not a timed benchmark: it takes a few minutes on 2 cores (the recommender trains a tiny
AST for one epoch). Usage: python benchmarks/bad_input_battery.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from serec.audio import write_wav
from serec.synth import NOISE_KINDS, speech_like

REPO = Path(__file__).resolve().parents[1]
SR = 16_000
# Exit statuses a script may end with when it handled everything (see README, Exit statuses).
HANDLED = {0, 1, 2, 3}
VALID_KINDS = ("stereo", "rate_8k", "pcm24", "float", "clipped", "mp3_bytes")
Outcome = tuple[str, str]  # (status, reason)


def speech(rng: np.random.Generator, seconds: float = 2.0) -> np.ndarray:
    clean = speech_like(rng, seconds)
    return (clean + 0.05 * NOISE_KINDS["pink"](rng, seconds)).astype(np.float32)


def make_bad_files(folder: Path, rng: np.random.Generator) -> dict[str, Path]:
    """One file per kind, named <set>_<speaker>_<kind>.wav so the mixer's speaker regex reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = {kind: folder / f"bad_spk9_{kind}.wav" for kind in (
        "empty", "zero_bytes", "truncated_header", "silent", "short_0.1s", "nan", "stereo", "rate_8k",
        "pcm24", "float", "clipped", "mp3_bytes", "broken_link", "text")}
    x = speech(rng)
    sf.write(path["empty"], np.zeros(0, np.float32), SR, subtype="PCM_16")
    path["zero_bytes"].write_bytes(b"")
    good = folder / "header_source.wav"
    write_wav(good, x)
    path["truncated_header"].write_bytes(good.read_bytes()[:20])
    good.unlink()
    sf.write(path["silent"], np.zeros(2 * SR, np.float32), SR, subtype="PCM_16")
    write_wav(path["short_0.1s"], x[: SR // 10])
    with_nan = x.copy()
    with_nan[SR // 2 : SR // 2 + 100] = np.nan
    sf.write(path["nan"], with_nan, SR, subtype="FLOAT")
    sf.write(path["stereo"], np.stack([x, 0.5 * x], axis=1), SR, subtype="PCM_16")
    sf.write(path["rate_8k"], x[::2], 8000, subtype="PCM_16")
    sf.write(path["pcm24"], x, SR, subtype="PCM_24")
    sf.write(path["float"], x, SR, subtype="FLOAT")
    sf.write(path["clipped"], np.clip(6 * x, -1, 1), SR, subtype="PCM_16")
    mp3 = folder / "coded.mp3"
    sf.write(mp3, x, SR, format="MP3")
    os.replace(mp3, path["mp3_bytes"])
    path["broken_link"].symlink_to(folder / "deleted_target.wav")
    path["text"].write_text("this is a text file, not audio\n" * 20)
    return path


def make_inputs(root: Path) -> tuple[Path, Path, dict[str, Path], list[str]]:
    """(audio folder with good + bad files, noise folder, bad files by kind, good file ids)."""
    rng = np.random.default_rng(0)
    audio = root / "audio"
    good = []
    for speaker in range(6):
        for utt in range(2):
            name = f"good_spk{speaker}_{utt}.wav"
            write_wav(audio / name, speech(rng))
            good.append(name)
    bad = make_bad_files(audio, rng)
    noise = root / "noise"
    for kind in ("pink", "babble"):
        write_wav(noise / f"{kind}.wav", NOISE_KINDS[kind](rng, 4.0))
    return audio, noise, bad, good


def run(argv: list[str | Path], log: Path) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                          timeout=1800)
    log.write_text(f"$ {' '.join(map(str, argv))}\n# exit {done.returncode}, "
                   f"{time.perf_counter() - started:.0f} s\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    return done


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def stderr_line(stderr: str, name: str) -> str | None:
    for line in stderr.splitlines():
        if name in line:
            return line.split(name, 1)[1].lstrip(" :]'\"").strip()
    return None


def classify(
    done: subprocess.CompletedProcess, bad: dict[str, Path], errors: dict[str, str], accepted: set[str]
) -> dict[str, Outcome]:
    """Per kind: reported (reason from `errors`, by file name, or stderr), accepted, crashed, silent."""
    crashed = done.returncode not in HANDLED or "Traceback (most recent call last)" in done.stderr
    if done.returncode == 2 and not crashed:  # stopped before any file: a usage or data error
        last = done.stderr.strip().splitlines()[-1:] or [""]
        return {kind: ("not run", f"exit 2: {last[0]}") for kind in bad}
    outcomes = {}
    for kind, path in bad.items():
        name = path.name
        reason = errors.get(name)
        warning = re.search(rf"{re.escape(name)}: ((clipped input|\w+ data in a).*)", done.stderr)
        if crashed:
            outcomes[kind] = ("crashed", f"exit {done.returncode}")
        elif reason is not None:
            outcomes[kind] = ("reported", reason)
        elif name in accepted:
            outcomes[kind] = ("accepted", f"warning: {warning.group(1)}" if warning else "")
        elif (line := stderr_line(done.stderr, name)) is not None:
            outcomes[kind] = ("reported", line)
        else:
            outcomes[kind] = ("silently skipped", "")
    return outcomes


def by_name(rows: list[dict[str, str]], column: str = "file") -> dict[str, dict[str, str]]:
    return {Path(r[column]).name: r for r in rows}


def mixing(root: Path, audio: Path, noise: Path, bad: dict[str, Path], good: list[str]) -> dict[str, Outcome]:
    out = root / "mix"
    done = run(["preprocessing/speech_noise_mixing.py", "--clean_dir", audio, "--noise_dir", noise,
                "--output_dir", out, "--num_mixtures", len(good) + len(bad), "--test_fraction", "0"],
               root / "mixing.log")
    errors = {Path(r["file"]).name: r["reason"] for r in read_rows(out / "skipped.csv")}
    used = {Path(r["clean_source"]).name for r in read_rows(out / "metadata.csv")}
    return classify(done, bad, errors, used)


def enhancement(root: Path, audio: Path, noise: Path, bad: dict[str, Path], good: list[str]) -> dict[str, Outcome]:
    out = root / "enh"
    done = run(["enhancement_driver.py", "--noisy_dir", audio, "--clean_dir", audio, "--output_dir", out,
                "--models", "webrtc"], root / "enhancement.log")
    rows = [r for r in read_rows(out / "scores.csv") if r["system"] == "webrtc"]
    errors = {Path(r["file"]).name: r["error"] for r in rows if r["status"] == "error"}
    return classify(done, bad, errors, {Path(r["file"]).name for r in rows if r["status"] == "ok"})


def features(root: Path, audio: Path, noise: Path, bad: dict[str, Path], good: list[str]) -> dict[str, Outcome]:
    out = root / "feat"
    done = run(["preprocess_features.py", "--base_data_dir", audio, "--output_base_dir", out],
               root / "features.log")
    errors = {Path(r["file"]).name: r["reason"] for r in read_rows(out / "errors.csv")}
    made = {p.with_suffix(".wav").name for p in out.rglob("*.npy")}
    return classify(done, bad, errors, made)


def recommender(root: Path, audio: Path, noise: Path, bad: dict[str, Path], good: list[str]) -> dict[str, Outcome]:
    out = root / "rec"
    labels = root / "labels.csv"
    names = good + [p.name for p in bad.values()]
    with open(labels, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label"])
        writer.writerows([name, ("webrtc", "speex")[i % 2]] for i, name in enumerate(names))
    done = run(["model_recommender_w_scaler.py", "--training_stage", "single", "--labels_csv", labels,
                "--audio_dir", audio, "--output_dir", out, "--pretrained_models", "none", "--ast_size", "tiny",
                "--n_folds", "2", "--num_epochs", "1", "--device", "cpu"], root / "recommender.log")
    skipped = read_rows(out / "single" / "skipped_files.csv")
    errors = {Path(r["file"]).name: r["reason"] for r in skipped}
    trained = {name for name in names if name not in errors} if done.returncode in (0, 1, 3) else set()
    return classify(done, bad, errors, trained)


def recommendation(root: Path, audio: Path, noise: Path, bad: dict[str, Path], good: list[str]) -> dict[str, Outcome]:
    checkpoints = sorted((root / "rec").rglob("single_model_fold_1*.pth"))
    if not checkpoints:
        return {kind: ("not run", "no checkpoint from the recommender") for kind in bad}
    out = root / "recommendation"
    done = run(["recommendation_driver.py", "--noisy_speech_dir", audio, "--clean_speech_dir", audio,
                "--single_model_path", checkpoints[0], "--enhanced_dir", out, "--device", "cpu"],
               root / "recommendation.log")
    errors = {Path(r["file"]).name: r["reason"] for r in read_rows(out / "errors.csv")}
    evaluation = read_rows(out / "evaluation.csv")
    errors.update({Path(r["file"]).name: r["error"] for r in evaluation
                   if r.get("status") == "error" and Path(r["file"]).name not in errors})
    routed = {Path(r["file"]).name for r in read_rows(out / "recommendations.csv")}
    return classify(done, bad, errors, routed)


def dnsmos(root: Path, audio: Path, noise: Path, bad: dict[str, Path], good: list[str]) -> dict[str, Outcome]:
    out = root / "dnsmos.csv"
    done = run(["-m", "dnsmos", audio, "--csv", out], root / "dnsmos.log")
    errors = {}
    for line in done.stderr.splitlines():
        if line.startswith("skipped "):
            path, _, reason = line.removeprefix("skipped ").partition(": ")
            errors[Path(path).name] = reason
    return classify(done, bad, errors, {Path(r["filename"]).name for r in read_rows(out)})


SCRIPTS: dict[str, Callable[..., dict[str, Outcome]]] = {
    "mixing": mixing,
    "enhancement_driver": enhancement,
    "preprocess_features": features,
    "model_recommender": recommender,
    "recommendation_driver": recommendation,
    "python -m dnsmos": dnsmos,
}


def short(outcome: Outcome, width: int) -> str:
    status, reason = outcome
    if status == "accepted":
        text = "accepted + warning" if reason else "accepted"
    else:
        text = f"{status}: {reason}" if reason else status
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="build and run in this folder and keep it (logs: *.log)")
    parser.add_argument("--width", type=int, default=44, help="characters per table cell")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="serec_battery_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        audio, noise, bad, good = make_inputs(root)
        results = {}
        for script, check in SCRIPTS.items():
            started = time.perf_counter()
            results[script] = check(root, audio, noise, bad, good)
            print(f"{script}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        kinds = list(bad)
        first = max(len(k) for k in kinds) + 2
        print("| input | " + " | ".join(SCRIPTS) + " |")
        print("|---" * (len(SCRIPTS) + 1) + "|")
        for kind in kinds:
            cells = [short(results[s][kind], args.width) for s in SCRIPTS]
            print(f"| {kind:<{first}}| " + " | ".join(cells) + " |")
        bad_outcomes = [(s, k, o) for s, r in results.items() for k, o in r.items()
                        if o[0] in ("crashed", "silently skipped", "not run")
                        or (o[0] == "accepted" and k not in VALID_KINDS)
                        or (o[0] == "reported" and k in VALID_KINDS)]
        print(f"\nunexpected: {len(bad_outcomes)}" + "".join(f"\n  {s} / {k}: {o}" for s, k, o in bad_outcomes))
        if args.keep:
            print(f"logs and outputs: {root}")
        return 1 if bad_outcomes else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
