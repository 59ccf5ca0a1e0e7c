"""enhancement_driver.py end to end: scores, labels, resume after SIGKILL, bad inputs, no-op re-run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dnsmos.models import MODEL_DIR_ENV
from serec.audio import write_wav
from serec.schema import SCORE_COLUMNS
from serec.synth import NOISE_KINDS, speech_like

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "enhancement_driver.py"
MODELS = ["webrtc", "speex", "spectral_gating_stationary"]


def make_pairs(root: Path, n: int, seed: int = 3) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    noisy, clean = root / "noisy", root / "clean"
    kinds = ["white", "babble", "hum", "pink", "modulated", "impulsive"]
    for i in range(n):
        speech = speech_like(rng, 1.5)
        noise = NOISE_KINDS[kinds[i % len(kinds)]](rng, 1.5)
        name = f"sub/f{i}.wav" if i == 0 else f"f{i}.wav"  # ids keep subfolders
        write_wav(clean / name, speech)
        write_wav(noisy / name, speech + 0.4 * noise)
    return noisy, clean


def run_driver(*args: str | Path, check: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_scores(got: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    """Same rows and text fields; metrics equal up to float noise (ONNX batch packing differs)."""
    assert [(r["file"], r["system"], r["status"]) for r in got] == [
        (r["file"], r["system"], r["status"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        for column in SCORE_COLUMNS[4:-2]:
            assert float(g[column] or "nan") == pytest.approx(float(w[column] or "nan"), abs=1e-4, nan_ok=True)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("enh")
    noisy, clean = make_pairs(root, 4)
    out = root / "out"
    run_driver("--noisy_dir", noisy, "--clean_dir", clean, "--output_dir", out,
               "--models", *MODELS, check=True)
    return noisy, clean, out


def test_outputs_follow_the_contract(baseline: tuple[Path, Path, Path]) -> None:
    noisy, _, out = baseline
    scores = read_csv(out / "scores.csv")
    assert list(scores[0]) == list(SCORE_COLUMNS)
    assert len(scores) == 4 * (len(MODELS) + 1)
    assert {r["system"] for r in scores} == {"noisy", *MODELS}
    assert all(r["status"] == "ok" for r in scores)
    for row in scores:  # intrusive metrics are there because a clean reference was given
        assert 1.0 <= float(row["dnsmos_ovr"]) <= 5.0 and row["pesq_wb"] and row["si_sdr"]
    for model in MODELS:
        for i in range(4):
            name = "sub/f0.wav" if i == 0 else f"f{i}.wav"
            enhanced, sr = sf.read(out / "enhanced" / model / name)
            assert sr == 16000 and enhanced.shape == sf.read(noisy / name)[0].shape
    labels = read_csv(out / "labels.csv")
    assert list(labels[0]) == ["file", "label", "best_model", "best_ovr", *(f"{m}_ovr" for m in MODELS)]
    assert sorted(r["file"] for r in labels) == ["f1.wav", "f2.wav", "f3.wav", "sub/f0.wav"]
    for row in labels:
        per_model = {m: float(row[f"{m}_ovr"]) for m in MODELS}
        assert row["best_model"] == max(per_model, key=per_model.get)
        assert row["label"] in (row["best_model"], "All_Failed")
        assert (row["label"] == "All_Failed") == (max(per_model.values()) <= 2.0)
    run = (out / "run.json").read_text()
    assert '"models"' in run and "speexdsp-ns" in run


def test_second_run_changes_nothing(baseline: tuple[Path, Path, Path]) -> None:
    noisy, clean, out = baseline
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    proc = run_driver("--noisy_dir", noisy, "--clean_dir", clean, "--output_dir", out,
                      "--models", *MODELS, check=True)
    assert "pairs run now: 0" in proc.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_resume_after_sigkill_matches_uninterrupted_run(
    baseline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    noisy, clean, reference_out = baseline
    out = tmp_path / "killed"
    cmd = [sys.executable, str(DRIVER), "--noisy_dir", str(noisy), "--clean_dir", str(clean),
           "--output_dir", str(out), "--models", *MODELS, "--chunk_size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scores = out / "scores.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if scores.exists() and scores.read_text().count("\n") >= 4:  # header + 3 rows
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the driver finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    partial = read_csv(scores)
    assert 3 <= len(partial) < 4 * (len(MODELS) + 1)
    assert all(r["status"] in ("ok", "error") for r in partial)  # no broken row
    for wav in (out / "enhanced").rglob("*.wav"):
        if not wav.name.startswith("."):
            assert sf.info(wav).frames > 0  # complete files only (temp files aside)

    run_driver("--noisy_dir", noisy, "--clean_dir", clean, "--output_dir", out,
               "--models", *MODELS, check=True)
    assert not list((out / "enhanced").rglob(".*.tmp*"))
    assert_same_scores(read_csv(scores), read_csv(reference_out / "scores.csv"))
    labels = read_csv(out / "labels.csv")
    want = read_csv(reference_out / "labels.csv")
    assert [(r["file"], r["label"]) for r in labels] == [(r["file"], r["label"]) for r in want]


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    noisy, _ = make_pairs(tmp_path, 2)
    (noisy / "corrupt.wav").write_bytes(b"RIFF....not a wav")
    sf.write(noisy / "empty.wav", np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    write_wav(noisy / "silent.wav", np.zeros(16000, dtype=np.float32))
    write_wav(noisy / "short.wav", 0.1 * np.ones(1000, dtype=np.float32))
    out = tmp_path / "out"
    proc = run_driver("--noisy_dir", noisy, "--output_dir", out, "--models", "webrtc", "speex")
    assert proc.returncode == 3, proc.stderr[-2000:]
    rows = {(r["file"], r["system"]): r for r in read_csv(out / "scores.csv")}
    assert len(rows) == 6 * 3
    reasons = {"corrupt.wav": "unreadable", "empty.wav": "zero length",
               "silent.wav": "silent", "short.wav": "too short"}
    for name, reason in reasons.items():
        for system in ("noisy", "webrtc", "speex"):
            row = rows[(name, system)]
            assert row["status"] == "error" and reason in row["error"], row
    assert rows[("f1.wav", "speex")]["status"] == "ok"
    assert rows[("f1.wav", "noisy")]["pesq_wb"] == ""  # no clean reference given
    assert {r["file"] for r in read_csv(out / "labels.csv")} == {"f1.wav", "sub/f0.wav"}


def test_unavailable_model_fails_before_any_work(tmp_path: Path) -> None:
    noisy, _ = make_pairs(tmp_path, 1)
    config = tmp_path / "models.toml"
    config.write_text(f'[SGMSE]\nrepo = "{tmp_path / "no_such_repo"}"\nckpt = "x.ckpt"\n')
    proc = run_driver("--noisy_dir", noisy, "--output_dir", tmp_path / "out",
                      "--models", "webrtc", "SGMSE", "--models_config", config)
    assert proc.returncode == 2
    assert "SGMSE" in proc.stderr and "no_such_repo" in proc.stderr
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_dnsmos_level_is_recorded_applied_and_never_mixed(tmp_path: Path) -> None:
    noisy, _ = make_pairs(tmp_path, 2)
    out = tmp_path / "out"
    run_driver("--noisy_dir", noisy, "--output_dir", out, "--models", "spectral_gating",
               "--dnsmos_level_db", "-26", check=True)
    assert json.loads((out / "run.json").read_text())["scoring"]["dnsmos_level_db"] == -26.0
    levelled = {(r["file"], r["system"]): float(r["dnsmos_ovr"]) for r in read_csv(out / "scores.csv")}
    as_is_out = tmp_path / "as_is"
    run_driver("--noisy_dir", noisy, "--output_dir", as_is_out, "--models", "spectral_gating", check=True)
    as_is = {(r["file"], r["system"]): float(r["dnsmos_ovr"]) for r in read_csv(as_is_out / "scores.csv")}
    assert levelled.keys() == as_is.keys()
    assert max(abs(levelled[k] - as_is[k]) for k in as_is) > 0.01  # the level was applied
    # A re-run at another level (or the reference behaviour) must not append to these scores.
    again = run_driver("--noisy_dir", noisy, "--output_dir", out, "--models", "spectral_gating")
    assert again.returncode == 2 and "dnsmos_level_db: -26.0 -> None" in again.stderr
    run_driver("--noisy_dir", noisy, "--output_dir", out, "--models", "spectral_gating",
               "--dnsmos_level_db", "-26", check=True)
    resumed = {(r["file"], r["system"]): float(r["dnsmos_ovr"]) for r in read_csv(out / "scores.csv")}
    assert resumed == levelled  # the same level resumes: nothing redone, nothing added


def test_a_folder_from_before_the_renovation_resumes_without_overwrite(
    baseline: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    # Folders written before issue 14/15 have the same CSVs and WAVs, but a run.json without
    # model_settings and scoring (and no lock): a re-run must take them as they are.
    noisy, clean, done = baseline
    old = tmp_path / "old"
    shutil.copytree(done, old)
    run = json.loads((old / "run.json").read_text())
    for key in ("model_settings", "scoring"):
        run.pop(key, None)
    (old / "run.json").write_text(json.dumps(run))
    (old / ".serec.lock").unlink(missing_ok=True)
    before = {p.name: p.read_bytes() for p in (old / "scores.csv", old / "labels.csv")}
    # Such a folder was scored with speechmos's models: the re-run must not name others.
    env = {k: v for k, v in os.environ.items() if k != MODEL_DIR_ENV}
    proc = run_driver("--noisy_dir", noisy, "--clean_dir", clean, "--output_dir", old,
                      "--models", *MODELS, check=True, env=env)
    assert "pairs run now: 0" in proc.stdout
    assert {p.name: p.read_bytes() for p in (old / "scores.csv", old / "labels.csv")} == before
    assert "model_settings" in json.loads((old / "run.json").read_text())
