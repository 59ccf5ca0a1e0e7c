"""preprocessing/speech_noise_mixing.py end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serec.audio import SAMPLE_RATE

SCRIPT = Path(__file__).resolve().parents[1] / "preprocessing" / "speech_noise_mixing.py"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_end_to_end(speech_noise_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    out = tmp_path / "mix"
    result = run_cli(
        "--clean_dir", clean_dir, "--noise_dir", noise_dir, "--output_dir", out,
        "--num_mixtures", 8, "--snr_levels", 0, 10, "--target_level_db", -30, "--seed", 2,
        "--test_fraction", 0.34, "--save_noise", "--num_workers", 2,
    )
    assert result.returncode == 0, result.stderr
    assert f"made 8 of 8 mixtures in {out}/noisy" in result.stdout
    assert str(out / "metadata.csv") in result.stdout
    rows = read_csv(out / "metadata.csv")
    assert len(rows) == 8
    assert {row["snr_db"] for row in rows} <= {"0.0", "10.0"}
    for row in rows:
        assert abs(float(row["measured_snr_db"]) - float(row["snr_db"])) <= 0.5
        for sub in ("noisy", "clean", "noise"):
            info = sf.info(str(out / sub / row["file"]))
            assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    train = {r["speaker"] for r in rows if r["split"] == "train"}
    test = {r["speaker"] for r in rows if r["split"] == "test"}
    assert train and test and not train & test
    record = json.loads((out / "run.json").read_text())
    assert record["flags"]["seed"] == 2 and record["flags"]["num_workers"] == 2
    assert record["mixtures_made"] == 8 and record["versions"]["numpy"]


def test_cli_reports_bad_sources_and_exits_3(speech_noise_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    (noise_dir / "broken.flac").write_bytes(b"fLaC not really")
    result = run_cli("--clean_dir", clean_dir, "--noise_dir", noise_dir, "--output_dir", tmp_path / "o")
    assert result.returncode == 3
    assert "broken.flac: unreadable or not audio" in result.stderr.replace("noise ", "")
    assert "made 6 of 6 mixtures" in result.stdout and "skipped.csv" in result.stdout
    assert [Path(r["file"]).name for r in read_csv(tmp_path / "o" / "skipped.csv")] == ["broken.flac"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--snr_levels", "0", "--snr_range", "0", "5"], "not allowed with argument"),
        (["--speaker_regex", "^nogroup"], "capture groups"),
        (["--test_fraction", "2"], "test_fraction"),
    ],
)
def test_cli_rejects_bad_flags(
    speech_noise_dirs: tuple[Path, Path], tmp_path: Path, flags: list[str], message: str
) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    result = run_cli("--clean_dir", clean_dir, "--noise_dir", noise_dir, "--output_dir", tmp_path, *flags)
    assert result.returncode == 2 and message in result.stderr


def test_cli_missing_folder_and_nothing_to_mix(tmp_path: Path) -> None:
    result = run_cli("--clean_dir", tmp_path / "nope", "--noise_dir", tmp_path, "--output_dir", tmp_path / "o")
    assert result.returncode == 2 and "nope: not a directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run_cli("--clean_dir", tmp_path / "empty", "--noise_dir", tmp_path / "empty",
                     "--output_dir", tmp_path / "o")
    assert result.returncode == 2 and "no usable clean files" in result.stderr
    assert "made 0 of 0" in result.stdout


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_leaves_no_half_written_file(
    speech_noise_dirs: tuple[Path, Path], tmp_path: Path, workers: int
) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    out = tmp_path / "mix"
    command = [sys.executable, str(SCRIPT), "--clean_dir", str(clean_dir), "--noise_dir",
               str(noise_dir), "--output_dir", str(out), "--num_mixtures", "5000",
               "--save_noise", "--num_workers", str(workers)]
    # A new session, so SIGINT goes to the script and its workers together, as from a terminal.
    # SIGINT's default disposition too: a shell starts background jobs (CI runners, `make
    # test &`) with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(list((out / "noisy").glob("*.wav"))) < 5 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not (out / "metadata.csv").exists()
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".wav"]
    assert leftovers == [] and not list(out.rglob(".*"))
    for noisy in (out / "noisy").glob("*.wav"):  # every noisy file has a complete clean/noise
        lengths = {sf.read(str(out / sub / noisy.name))[0].size for sub in ("noisy", "clean", "noise")}
        assert len(lengths) == 1
        assert np.isfinite(sf.read(str(noisy))[0]).all()
