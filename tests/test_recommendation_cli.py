"""The recommender at inference (tiny AST and logistic checkpoints built through the kinds)
and recommendation_driver.py end to end in a subprocess."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from transformers import ASTModel

from serec.audio import load_audio, to_pcm16, write_wav
from serec.enhancers import create_enhancer
from serec.feature_files import feature_path, run_feature_extraction
from serec.features import feature_names, file_features
from serec.fileio import write_csv_atomic, write_json_atomic
from serec.recommender.ast_model import ASTClassifier, ASTNetwork, ast_config_for
from serec.recommender.checkpoint import TrainingRecord, save_checkpoint
from serec.recommender.errors import CheckpointError
from serec.recommender.fbank import fbank_batch
from serec.recommender.inference import FeatureSource, Recommender, recommend_folder
from serec.recommender.kinds import ModelInputs, RecommenderModel
from serec.recommender.logistic import LogisticClassifier
from serec.recommender.stages import route_two_stage
from serec.synth import NOISE_KINDS, speech_like

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "recommendation_driver.py"
CEKL = feature_names("cekl")


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(stage: str, gk: str, **extra: object) -> TrainingRecord:
    fields = {"fold": 1, "gatekeeper_class": gk, "folds_sha256": "folds", "labels_sha256": "labels"}
    return TrainingRecord(stage, **{**fields, **extra})


def _ast_checkpoint(path: Path, stage: str, classes: list[str], gk: str = "rnnoise",
                    features: list[str] | None = None, seed: int = 0, **extra: object) -> Path:
    import torch

    torch.manual_seed(seed)
    features = features or []
    network = ASTNetwork(ASTModel(ast_config_for("tiny", 1.0)), len(classes), len(features))
    if features:
        network.set_scaler(np.zeros(len(features)), np.full(len(features), 10.0))
    save_checkpoint(path, ASTClassifier(network, classes, features), _record(stage, gk, **extra))
    return path


def _proba(model: RecommenderModel, audios: list[np.ndarray], features: np.ndarray) -> np.ndarray:
    fbank = fbank_batch(audios, model.inputs.fbank)
    return model.predict_proba(ModelInputs(fbank, features if model.inputs.feature_names else None))


@pytest.fixture
def three_files(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    for i, kind in enumerate(("pink", "babble", "hum")):
        write_wav(tmp_path / "noisy" / f"x{i}.wav", speech_like(rng, 1.2) + 0.3 * NOISE_KINDS[kind](rng, 1.2))
    return tmp_path / "noisy"


def test_two_stage_probabilities_and_routing(tmp_path: Path, three_files: Path) -> None:
    gk = _ast_checkpoint(tmp_path / "gk.pth", "gatekeeper", ["rnnoise", "not_rnnoise"])
    ex = _ast_checkpoint(tmp_path / "ex.pth", "expert", ["All_Failed", "speex", "webrtc"], features=CEKL, seed=1)
    recommender = Recommender.from_checkpoints(gk, ex, threshold=0.5)
    assert recommender.class_names == ["rnnoise", "All_Failed", "speex", "webrtc"]
    assert recommender.feature_names == CEKL
    assert recommender.default_fallback == "rnnoise"

    audios = [load_audio(p) for p in sorted(three_files.iterdir())]
    features = np.stack([file_features(p) for p in sorted(three_files.iterdir())])
    batch = recommender.predict(audios, features)
    gate, expert = recommender.gatekeeper, recommender.expert
    p_gk = _proba(gate.model, audios, features)[:, 0]
    p_ex = _proba(expert.model, audios, features)
    np.testing.assert_allclose(batch.proba[:, 0], p_gk, atol=1e-6)
    np.testing.assert_allclose(batch.proba[:, 1:], (1 - p_gk)[:, None] * p_ex, atol=1e-6)
    np.testing.assert_allclose(batch.proba.sum(axis=1), 1.0, atol=1e-5)
    assert batch.recommendations == list(route_two_stage(p_gk, p_ex, "rnnoise", ["All_Failed", "speex", "webrtc"]))
    always_gk = Recommender.from_checkpoints(gk, ex, threshold=min(p_gk) - 1e-6 if min(p_gk) > 1e-6 else 1e-6)
    assert always_gk.predict(audios, features).recommendations == ["rnnoise"] * 3

    out = tmp_path / "out"
    summary = recommend_folder(recommender, three_files, out, "rnnoise")
    rows = _read(out / "recommendations.csv")
    assert list(rows[0]) == ["file", "recommendation", "p_rnnoise", "p_All_Failed", "p_speex", "p_webrtc",
                             "routed_model"]
    assert [r["recommendation"] for r in rows] == batch.recommendations
    for row in rows:
        assert row["routed_model"] == ("rnnoise" if row["recommendation"] == "All_Failed" else row["recommendation"])
        assert sum(float(row[f"p_{c}"]) for c in recommender.class_names) == pytest.approx(1.0, abs=1e-4)
    assert summary.predicted_now == 3 and summary.inference_seconds_per_file > 0
    again = recommend_folder(recommender, three_files, out, "speex")
    assert (again.predicted_now, again.reused) == (0, 3)
    assert all(r["routed_model"] == "speex" for r in _read(out / "recommendations.csv")
               if r["recommendation"] == "All_Failed")


def test_features_read_from_a_features_folder(tmp_path: Path, three_files: Path) -> None:
    gk = _ast_checkpoint(tmp_path / "gk.pth", "gatekeeper", ["rnnoise", "not_rnnoise"])
    ex = _ast_checkpoint(tmp_path / "ex.pth", "expert", ["All_Failed", "speex"], features=CEKL, seed=3)
    recommender = Recommender.from_checkpoints(gk, ex)
    computed = recommend_folder(recommender, three_files, tmp_path / "out1", "rnnoise")
    feat_dir = tmp_path / "feat"
    run_feature_extraction(three_files, feat_dir)
    read = recommend_folder(recommender, three_files, tmp_path / "out2", "rnnoise", features_dir=feat_dir)
    assert [r["p_speex"] for r in read.rows] == [r["p_speex"] for r in computed.rows]
    # The vectors really come from the folder: a changed vector changes that file's output.
    np.save(feature_path(feat_dir, "x1.wav"), np.full(len(CEKL), 50.0, dtype=np.float32))
    changed = recommend_folder(recommender, three_files, tmp_path / "out3", "rnnoise", features_dir=feat_dir)
    differs = [a["p_speex"] != b["p_speex"] for a, b in zip(changed.rows, read.rows, strict=True)]
    assert differs == [False, True, False]


def test_mismatched_checkpoints_are_refused(tmp_path: Path, three_files: Path) -> None:
    gk = _ast_checkpoint(tmp_path / "gk.pth", "gatekeeper", ["rnnoise", "not_rnnoise"])
    ex = _ast_checkpoint(tmp_path / "ex.pth", "expert", ["All_Failed", "speex"], features=CEKL)
    cases = {
        "fold": _ast_checkpoint(tmp_path / "ex2.pth", "expert", ["All_Failed", "speex"], fold=2),
        "partition": _ast_checkpoint(tmp_path / "ex3.pth", "expert", ["rnnoise", "speex"]),
        "labels_sha256": _ast_checkpoint(tmp_path / "ex4.pth", "expert", ["All_Failed", "speex"],
                                         labels_sha256="other"),
        "feature names": _ast_checkpoint(tmp_path / "ex5.pth", "expert", ["All_Failed", "speex"],
                                         features=CEKL[::-1]),
    }
    gk_feat = _ast_checkpoint(tmp_path / "gkf.pth", "gatekeeper", ["rnnoise", "not_rnnoise"], features=CEKL)
    for what, expert in cases.items():
        gate = gk_feat if what == "feature names" else gk
        with pytest.raises(CheckpointError, match=what):
            Recommender.from_checkpoints(gate, expert)
    with pytest.raises(CheckpointError, match="holds a 'expert' model"):
        Recommender.from_checkpoints(ex, gk)
    with pytest.raises(ValueError, match="both"):
        Recommender.from_checkpoints(gk, None)

    feat_dir = tmp_path / "feat"
    write_json_atomic(feat_dir / "features.json", {"names": CEKL[:3], "feature_set": "x", "params": {}})
    with pytest.raises(CheckpointError, match="trained on"):
        FeatureSource.for_recommender(Recommender.from_checkpoints(gk, ex), feat_dir)


# ---------------------------------------------------------------------------------------
# recommendation_driver.py end to end

LABEL_BY_NOISE = {"pink": "speex", "babble": "All_Failed", "hum": "none"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six noisy/clean pairs, logistic gatekeeper + expert fitted on them (labels by noise
    kind, so all three routes occur), and an enhancement step's labels.csv/scores.csv."""
    root = tmp_path_factory.mktemp("rec")
    rng = np.random.default_rng(12)
    labels = {}
    for i, kind in enumerate(list(LABEL_BY_NOISE) * 2):
        fid = f"tiny_spk{i % 3:04d}_{i:04d}.wav"
        clean = speech_like(rng, 1.5)
        write_wav(root / "clean" / fid, clean)
        write_wav(root / "noisy" / fid, clean + 0.3 * NOISE_KINDS[kind](rng, 1.5))
        labels[fid] = LABEL_BY_NOISE[kind]
    fids = sorted(labels)
    x = np.stack([file_features(root / "noisy" / f) for f in fids])
    y = np.array([labels[f] for f in fids])
    gk = LogisticClassifier(["speex", "not_speex"], CEKL).fit_features(x, (y != "speex").astype(int))
    save_checkpoint(root / "gk.pth", gk, _record("gatekeeper", "speex"))
    expert_classes = ["All_Failed", "none"]
    keep = y != "speex"
    ex = LogisticClassifier(expert_classes, CEKL).fit_features(
        x[keep], np.array([expert_classes.index(v) for v in y[keep]]))
    save_checkpoint(root / "ex.pth", ex, _record("expert", "speex"))
    save_checkpoint(root / "ex_fold2.pth", ex, _record("expert", "speex", fold=2))
    (root / "broken.pth").write_bytes(b"PK\x03\x04 not a whole checkpoint")

    # The enhancement step's output for these files: models speex and spectral_gating.
    enh = root / "enh"
    score_rows, label_rows = [], []
    for i, fid in enumerate(fids):
        ovr = {"noisy": 1.2 + 0.1 * i, "speex": 2.0 + 0.1 * (i % 2), "spectral_gating": 1.9 + 0.15 * (i % 3)}
        for system, value in ovr.items():
            score_rows.append({"file": fid, "system": system, "status": "ok", "error": "", "dnsmos_ovr": value,
                               "seconds": 0.0 if system == "noisy" else 0.01 * (i + 1)})
        best = max(("speex", "spectral_gating"), key=lambda m, ovr=ovr: ovr[m])
        label_rows.append({"file": fid, "label": best, "best_model": best, "best_ovr": ovr[best],
                           "speex_ovr": ovr["speex"], "spectral_gating_ovr": ovr["spectral_gating"]})
        # One model's audio, so the report's listening table links the enhancement output.
        (enh / "enhanced" / "speex").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "noisy" / fid, enh / "enhanced" / "speex" / fid)
    write_csv_atomic(enh / "scores.csv", ["file", "system", "status", "error", "dnsmos_ovr", "seconds"], score_rows)
    write_csv_atomic(enh / "labels.csv", ["file", "label", "best_model", "best_ovr", "speex_ovr",
                                          "spectral_gating_ovr"], label_rows)
    (root / "expected_labels.csv").write_text("\n".join(f"{f},{labels[f]}" for f in fids) + "\n")
    return root


def _driver(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_full_run_routes_enhances_evaluates_compares_and_reports(run_dir: Path) -> None:
    out = run_dir / "out"
    args = ["--noisy_speech_dir", run_dir / "noisy", "--enhanced_dir", out,
            "--gatekeeper_model_path", run_dir / "gk.pth", "--expert_model_path", run_dir / "ex.pth",
            "--clean_speech_dir", run_dir / "clean", "--use_hybrid_features"]
    result = _driver(*args, "--labels_csv", run_dir / "enh" / "labels.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("recommendations.csv", "routing.csv", "evaluation.csv", "summary.csv", "strategies.csv",
                 "report.html", "run.json", "recommender.json", "errors.csv"):
        assert (out / name).is_file(), name
    for line in ("verdict: adaptive is", "(the best single model) on 6 files", "captured", "report:"):
        assert line in result.stdout

    expected = dict(line.split(",") for line in (run_dir / "expected_labels.csv").read_text().split())
    recs = {r["file"]: r for r in _read(out / "recommendations.csv")}
    assert {f: r["recommendation"] for f, r in recs.items()} == expected  # fitted on these files
    speex = create_enhancer("speex")
    for fid, label in expected.items():
        folders = sorted(p.name for p in out.glob("rec_*") if (p / fid).is_file())
        assert folders == [f"rec_{label}"]
        assert _sha(out / f"rec_{label}" / fid) == _sha(run_dir / "noisy" / fid)
        # All_Failed goes to the default fallback, the gatekeeper class (speex).
        routed = "speex" if label in ("speex", "All_Failed") else "none"
        assert recs[fid]["routed_model"] == routed
        noisy = load_audio(out / f"rec_{label}" / fid)
        expected_out = speex.enhance_one(noisy) if routed == "speex" else noisy
        written, _ = sf.read(out / f"rec_{label}" / "enhanced" / fid, dtype="int16")
        np.testing.assert_array_equal(written, to_pcm16(expected_out))

    evaluation = _read(out / "evaluation.csv")
    assert len(evaluation) == 6 and all(r["status"] == "ok" for r in evaluation)
    # Intrusive metrics with --clean_speech_dir: a value, or the reason it failed on that file.
    assert all(r["noisy_pesq_wb"] or "pesq_wb" in r["error"] for r in evaluation)
    assert sum(bool(r["enhanced_pesq_wb"]) for r in evaluation) >= 4
    groups = {r["group"] for r in _read(out / "summary.csv")}
    assert groups == {"speex", "All_Failed", "none", "all"}
    strategies = {r["strategy"]: r for r in _read(out / "strategies.csv")}
    assert {"adaptive", "always_speex", "always_spectral_gating", "oracle", "random_expected",
            "run_all_pick_best_ovr", "noisy"} <= set(strategies)
    assert float(strategies["run_all_pick_best_ovr"]["dnsmos_seconds"]) > 0
    assert float(strategies["adaptive"]["recommender_seconds"]) > 0

    # A re-run resumes: nothing predicted, copied, enhanced or scored again (the strategy
    # comparison, which times DNSMOS, is left out to keep the test short).
    again = _driver(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 predicted, 6 reused" in again.stdout
    assert "0 copied, 6 already in place" in again.stdout
    assert "enhanced: 0 now" in again.stdout and "(0 scored, 6 unchanged" in again.stdout

    # --eval_only rebuilds the same evaluation.csv from the rec folders alone.
    kept = (out / "evaluation.csv").read_bytes()
    (out / "evaluation.csv").unlink()
    evaluated = _driver("--enhanced_dir", out, "--eval_only", "--clean_speech_dir", run_dir / "clean")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (out / "evaluation.csv").read_bytes() == kept


def test_cli_refuses_a_mismatched_pair_before_any_work(run_dir: Path) -> None:
    out = run_dir / "out_bad"
    result = _driver("--noisy_speech_dir", run_dir / "noisy", "--enhanced_dir", out,
                     "--gatekeeper_model_path", run_dir / "gk.pth", "--expert_model_path", run_dir / "ex_fold2.pth")
    assert result.returncode == 2
    assert "not a gatekeeper/expert pair" in result.stderr and "different fold" in result.stderr
    assert not list(out.glob("rec_*"))
    broken = _driver("--noisy_speech_dir", run_dir / "noisy", "--enhanced_dir", out,
                     "--single_model_path", run_dir / "broken.pth")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "not a loadable checkpoint" in broken.stderr and "retrain it" in broken.stderr
    usage = _driver("--enhanced_dir", out)
    assert usage.returncode == 2 and "--noisy_speech_dir is required" in usage.stderr
