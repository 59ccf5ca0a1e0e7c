"""recommendation_driver.py with the quality selector: its policies' rows in strategies.csv, and
routing new files by a policy (verify_top2 runs both candidates, scores them with DNSMOS and
keeps the better output), end to end in a subprocess on generated audio."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serec.audio import write_wav
from serec.feature_files import run_feature_extraction
from serec.fileio import write_csv_atomic
from serec.recommendation import RecommendationConfig
from serec.synth import NOISE_KINDS, speech_like

REPO = Path(__file__).resolve().parents[1]
MODELS = ["speex", "spectral_gating"]
# The planted rule: speex gains on hum, spectral gating on pink noise.
GAIN = {"hum": {"speex": 0.9, "spectral_gating": 0.2}, "pink": {"speex": 0.1, "spectral_gating": 0.8}}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _corpus(root: Path, n: int, seed: int) -> dict[str, str]:
    """n noisy/clean pairs (hum or pink noise) and an enhancement run whose gains follow GAIN."""
    rng = np.random.default_rng(seed)
    kinds = {}
    score_rows, label_rows, meta_rows = [], [], []
    for i in range(n):
        kind = ("hum", "pink")[i % 2]
        speaker = f"spk{(i // 2) % 4}"  # every speaker with both noises, so folds see both
        fid = f"{speaker}_{i:03d}.wav"
        clean = speech_like(rng, 1.2)
        write_wav(root / "clean" / fid, clean)
        write_wav(root / "noisy" / fid, clean + 0.3 * NOISE_KINDS[kind](rng, 1.2))
        kinds[fid] = kind
        noisy = 1.5 + 0.05 * rng.standard_normal()
        ovr = {m: noisy + GAIN[kind][m] + 0.05 * rng.standard_normal() for m in MODELS}
        for system, value in [("noisy", noisy), *ovr.items()]:
            score_rows.append({"file": fid, "system": system, "status": "ok", "error": "", "dnsmos_ovr": value,
                               "seconds": 0.0 if system == "noisy" else 0.02, "duration_s": 1.2})
        best = max(MODELS, key=lambda m, ovr=ovr: ovr[m])
        label_rows.append({"file": fid, "label": best, "best_model": best, "best_ovr": ovr[best],
                           **{f"{m}_ovr": ovr[m] for m in MODELS}})
        # Eight recordings of each noise, so both folds train on both kinds.
        meta_rows.append({"file": fid, "speaker": speaker, "noise_source": f"{kind}/{i % 16}.wav"})
    write_csv_atomic(root / "enh" / "scores.csv", list(score_rows[0]), score_rows)
    write_csv_atomic(root / "enh" / "labels.csv", list(label_rows[0]), label_rows)
    write_csv_atomic(root / "metadata.csv", list(meta_rows[0]), meta_rows)
    return kinds


@pytest.fixture(scope="module")
def selector_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("selector_routing")
    _corpus(root / "train", 48, seed=0)
    run_feature_extraction(root / "train" / "noisy", root / "train" / "feat", "cekl", progress=False)
    # The predictor stage of the training command (python -m serec.selection train is the same).
    trained = subprocess.run(
        [sys.executable, str(REPO / "model_recommender_w_scaler.py"), "--training_stage", "predictor",
         "--labels_csv", root / "train" / "enh" / "labels.csv", "--cekl_features_base_dir", root / "train" / "feat",
         "--metadata_csv", root / "train" / "metadata.csv", "--output_dir", root, "--n_folds", "2"],
        capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "selector:" in trained.stdout and (root / "selector.pth").is_file()
    _corpus(root / "test", 3, seed=1)
    return root


def _driver(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "recommendation_driver.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)


def test_verify_policy_routes_runs_both_candidates_and_keeps_the_dnsmos_best(selector_run: Path) -> None:
    test, out = selector_run / "test", selector_run / "out"
    args = ["--noisy_speech_dir", test / "noisy", "--enhanced_dir", out, "--selector", selector_run / "selector.pth",
            "--policy", "verify_top2", "--labels_csv", test / "enh" / "labels.csv", "--num_workers", "1"]
    result = _driver(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "policy verify_top2" in result.stdout and "verdict:" in result.stdout

    recs = {r["file"]: r for r in _read(out / "recommendations.csv")}
    assert len(recs) == 3 and all(f"pred_{m}" in r for r in recs.values() for m in MODELS)
    # Each candidate ran on every file into its own folder and was scored there.
    scored = {}
    for rank in (1, 2):
        rows = _read(out / "verify" / f"candidate_{rank}" / "evaluation.csv")
        assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
        scored.update({(r["file"], r["routed_model"]): float(r["enhanced_dnsmos_ovr"]) for r in rows})
    routing = {r["file"]: r for r in _read(out / "routing.csv")}
    for fid, rec in recs.items():
        kept = max(MODELS, key=lambda m, fid=fid: scored[(fid, m)])
        assert rec["routed_model"] == kept == routing[fid]["routed_model"]
        candidate = next(r for r in (1, 2) if (out / "verify" / f"candidate_{r}" / f"rec_{kept}" / fid).is_file())
        kept_audio = out / "verify" / f"candidate_{candidate}" / f"rec_{kept}" / "enhanced" / fid
        placed = out / f"rec_{kept}" / "enhanced" / fid
        assert hashlib.sha256(placed.read_bytes()).digest() == hashlib.sha256(kept_audio.read_bytes()).digest()

    strategies = {r["strategy"]: r for r in _read(out / "strategies.csv")}
    for name in ("adaptive", "predict_best", "predict_best_safe", "cost_aware", "verify_top2", "verify_fixed_top2",
                 "oracle", "always_speex", "always_spectral_gating"):
        assert name in strategies, name
    # The planted rule is learnt: predict_best keeps the oracle's model on every test file.
    assert float(strategies["predict_best"]["oracle_gain_captured"]) == pytest.approx(1.0)
    assert float(strategies["verify_top2"]["dnsmos_seconds"]) > 0
    report = (out / "report.html").read_text()
    assert report.index("Verdict") < report.index("Strategies") and "data:image/png" in report

    # A re-run resumes: both candidates and the routed files are complete, nothing runs again.
    again = _driver(*args[:-2], "--num_workers", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "enhanced: 0 now" in again.stdout


def test_policy_needs_a_selector_and_a_known_name(selector_run: Path) -> None:
    test, out = selector_run / "test", selector_run / "out_bad"
    with pytest.raises(ValueError, match="--selector"):
        RecommendationConfig(out, test / "noisy", policy="predict_best")
    with pytest.raises(ValueError, match="not both"):
        RecommendationConfig(out, test / "noisy", single_model_path=test / "x.pth",
                             selector=selector_run / "selector.pth", policy="predict_best")
    unknown = _driver("--noisy_speech_dir", test / "noisy", "--enhanced_dir", out,
                      "--selector", selector_run / "selector.pth", "--policy", "best_guess")
    assert unknown.returncode == 2 and "best_guess" in unknown.stderr and "predict_best_safe" in unknown.stderr
    assert not out.exists() or not list(out.glob("rec_*"))
