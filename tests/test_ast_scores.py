"""The AST regression head (`ast_scores`) and the quality selector's `ast` learner (its fold
ensemble) on generated data: a planted rule it must recover, weights_only round trips, and a
selector trained, reloaded and queried with the ast learner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_selection import MODELS, _write_run

from serec.audio import write_wav
from serec.predictor import GainInputs, PredictorError
from serec.recommender.ast_gain import ASTGainEnsemble
from serec.recommender.ast_model import ASTNetwork, ASTScorePredictor, load_ast_backbone
from serec.recommender.checkpoint import TrainingRecord, load_checkpoint, save_checkpoint
from serec.recommender.config import RecommenderConfig
from serec.recommender.errors import CheckpointError, RecommenderError
from serec.recommender.kinds import FitSettings, ModelInputs
from serec.recommender.training import train_stage
from serec.selection import load_selector, main, predict_files, time_recommender, train_selector

SECONDS = 0.5  # tiny preset: 64 mel bins x 50 frames, 4 x 3 patches


def _predictor(n_features: int = 0, seed: int = 0) -> ASTScorePredictor:
    torch.manual_seed(seed)
    backbone = load_ast_backbone("none", "tiny", max_audio_seconds=SECONDS)
    names = [f"f{i}" for i in range(n_features)]
    return ASTScorePredictor(ASTNetwork(backbone, 2, n_features), ["A", "B"], names)


def _planted(rng: np.random.Generator, n: int, spec) -> tuple[ModelInputs, np.ndarray, np.ndarray]:
    """Fbank inputs, half with loud low mel bands; A gains there, B elsewhere (some NaN)."""
    loud = rng.random(n) < 0.5
    fbank = rng.normal(0.0, 0.5, size=(n, spec.max_length, spec.num_mel_bins)).astype(np.float32)
    fbank[loud, :, :16] += 2.0
    gains = np.column_stack([np.where(loud, 0.8, 0.1), np.where(loud, 0.1, 0.8)])
    gains = gains + rng.normal(0, 0.05, size=gains.shape)
    gains[rng.random(gains.shape) < 0.1] = np.nan  # a model failed on that file
    return ModelInputs(fbank=fbank), gains, np.where(loud, 0, 1)


def test_ast_scores_recovers_a_planted_rule_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = _predictor()
    x, gains, winner = _planted(rng, 160, model.inputs.fbank)
    part = {"fit": slice(0, 96), "val": slice(96, 120), "test": slice(120, 160)}
    rows = {k: ModelInputs(fbank=x.fbank[s]) for k, s in part.items()}
    settings = FitSettings(learning_rate=2e-3, batch_size=16, num_epochs=12, patience=4, seed=0)
    report = model.fit(rows["fit"], gains[part["fit"]], rows["val"], gains[part["val"]], settings)
    assert report.best_epoch is not None and "val_mae" in report.history[0]
    predicted = model.predict(rows["test"])
    assert predicted.scores.shape == (40, 2) and np.isnan(predicted.uncertainty).all()
    assert np.mean(predicted.scores.argmax(axis=1) == winner[part["test"]]) >= 0.85
    assert set(model.recommend(rows["test"])) <= {"A", "B"}
    with pytest.raises(TypeError, match="predicts scores"):
        model.predict_proba(rows["test"])

    # (b) the checkpoint loads with weights_only and predicts exactly the same
    path = tmp_path / "scores.pth"
    save_checkpoint(path, model, TrainingRecord(stage="predictor", fold=1))
    assert torch.load(path, weights_only=True)["metadata"]["kind"] == "ast_scores"
    restored, meta = load_checkpoint(path)
    assert isinstance(restored, ASTScorePredictor) and meta.class_names == ["A", "B"]
    np.testing.assert_array_equal(restored.predict(rows["test"]).scores, predicted.scores)
    # the shape checks shared with the classifier refuse weights of another head
    config, state = model.to_checkpoint()
    with pytest.raises(CheckpointError, match="do not fit"):
        ASTScorePredictor.from_checkpoint(config, state, ["A", "B", "C"], model.inputs)


def test_score_kind_is_refused_by_the_classifier_stages(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nx.wav,A\n")
    cfg = RecommenderConfig(labels, tmp_path, model_kind="ast_scores")
    with pytest.raises(RecommenderError, match="predictor_learner ast"):
        train_stage(cfg, "single")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/test_selection.py's planted enhancement run, plus its noisy files (quieter at low SNR)."""
    root = tmp_path_factory.mktemp("ast_selector")
    _write_run(root, 90, seed=0)
    rng = np.random.default_rng(1)
    for feature in sorted((root / "feat").glob("*.npy")):
        snr = float(np.load(feature)[0])
        noise = rng.normal(0, 0.02 + 0.01 * max(snr, 0.0), size=int(16000 * SECONDS * 1.2))
        write_wav(root / "noisy" / feature.with_suffix(".wav").name, noise.astype(np.float32))
    return root


def _config(root: Path, out: Path) -> RecommenderConfig:
    return RecommenderConfig(root / "enh" / "labels.csv", out, audio_dir=root / "noisy", pretrained_models="none",
                             ast_size="tiny", max_audio_seconds=SECONDS, learning_rate=1e-3, batch_size=32,
                             num_epochs=2, patience=2, device="cpu")


def test_selector_with_the_ast_learner_loads_and_predicts(run: Path, tmp_path: Path, monkeypatch) -> None:
    ckpt = tmp_path / "sel" / "selector.pth"
    selector = train_selector(run / "enh" / "labels.csv", run / "feat", run / "metadata.csv", ckpt, n_folds=3,
                              seed=0, learner="ast", audio_dir=run / "noisy", config=_config(run, ckpt.parent))
    assert selector["learner"] == "ast" and selector["training"]["learner"] == "ast"
    assert selector["training"]["seconds"] > 0 and np.isfinite(selector["training"]["oof_mae"]).all()
    assert torch.load(ckpt, weights_only=True)["predictor"]["kind"] == "ast_gain_ensemble"
    assert any((ckpt.parent / "cache").glob("fbank_*/*.npy"))  # fbank cached beside the checkpoint

    loaded, predictor = load_selector(ckpt)
    assert isinstance(predictor, ASTGainEnsemble) and len(predictor.networks) == 3
    files = [f"f{i:04d}.wav" for i in range(10)]
    features = np.stack([np.load(run / "feat" / f.replace(".wav", ".npy")) for f in files])
    mean, spread = predictor.predict(GainInputs(features, files, run / "noisy"))
    assert mean.shape == spread.shape == (10, len(MODELS))
    assert np.isfinite(mean).all() and (spread >= 0).all() and spread.max() > 0
    np.testing.assert_allclose(predict_files(loaded, predictor, run / "feat", files, run / "noisy"), mean, atol=1e-6)
    with pytest.raises(PredictorError, match="noisy audio"):
        predict_files(loaded, predictor, run / "feat", files)

    # time_recommender counts the features (stubbed here: a toy feature set) and the fbank + prediction
    calls = []
    monkeypatch.setattr("serec.features.file_features",
                        lambda path, _: calls.append(path) or np.load(run / "feat" / Path(path).with_suffix(".npy").name))
    seconds = time_recommender(loaded, predictor, [run / "noisy" / f for f in files[:2]])
    assert seconds > 0 and len(calls) == 3  # one warm-up, two timed


def test_ast_learner_needs_the_noisy_files(run: Path, tmp_path: Path) -> None:
    args = ["train", "--labels_csv", str(run / "enh" / "labels.csv"), "--features_dir", str(run / "feat"),
            "--metadata_csv", str(run / "metadata.csv"), "--output", str(tmp_path / "selector.pth"),
            "--n_folds", "3", "--learner", "ast", "--pretrained_models", "none", "--ast_size", "tiny"]
    assert main(args) == 2
    assert not (tmp_path / "selector.pth").exists()


def test_predictor_stage_keeps_each_learner_s_checkpoint_and_record_apart(run: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    from serec.cli.model_recommender_w_scaler import main as recommender_main
    from serec.pipeline import run_command

    common = ["--training_stage", "predictor", "--labels_csv", str(run / "enh" / "labels.csv"),
              "--metadata_csv", str(run / "metadata.csv"), "--cekl_features_base_dir", str(run / "feat"),
              "--output_dir", str(tmp_path), "--n_folds", "3", "--num_threads", "1"]
    assert recommender_main(common) == 0
    assert recommender_main([*common, "--predictor_learner", "ast", "--audio_dir", str(run / "noisy"),
                             "--pretrained_models", "none", "--ast_size", "tiny", "--max_audio_seconds", str(SECONDS),
                             "--num_epochs", "1", "--patience", "1", "--device", "cpu"]) == 0
    for learner, checkpoint, record in (("lightgbm", "selector.pth", "predictor"),
                                        ("ast", "selector_ast.pth", "predictor_ast")):
        assert load_selector(tmp_path / checkpoint)[0]["learner"] == learner
        saved = json.loads((tmp_path / record / "run.json").read_text())
        assert saved["selector_training"]["learner"] == learner  # the other learner's record is untouched
    assert (tmp_path / "folds.csv").is_file() and len(list(tmp_path.glob("folds*.csv"))) == 1  # shared

    # step 5's evaluation of the other learner (timing stubbed: a toy feature set, no DNSMOS run)
    monkeypatch.setattr("serec.features.file_features",
                        lambda path, _: np.load(run / "feat" / Path(path).with_suffix(".npy").name))
    monkeypatch.setattr("serec.strategies.measure_dnsmos_seconds_per_file", lambda *_, **__: 0.01)
    run_command("selection", ["evaluate", "--selector", tmp_path / "selector_ast.pth", "--labels_csv",
                              run / "enh" / "labels.csv", "--features_dir", run / "feat", "--noisy_dir", run / "noisy",
                              "--output_dir", tmp_path / "eval"])
    strategies = {r["strategy"]: r for r in csv.DictReader((tmp_path / "eval" / "strategies.csv").open())}
    assert {"predict_best", "predict_best_safe", "verify_top2", "oracle"} <= set(strategies)
    assert float(strategies["predict_best"]["recommender_seconds"]) > 0
    assert json.loads((tmp_path / "eval" / "run.json").read_text())["timing"]["recommender_s"] > 0
