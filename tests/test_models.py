"""Recommender kinds (AST / hybrid / logistic): inputs, head shapes, scaler, checkpoints (current
and format 1), and checkpoints that must be refused before anything large is built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

from serec.recommender.ast_model import (
    AST_CONFIG_KEYS,
    ASTClassifier,
    ASTNetwork,
    PretrainedUnavailable,
    ast_config_for,
    hybrid_hidden_size,
    load_ast_backbone,
)
from serec.recommender.checkpoint import (
    FORMAT_V1,
    TrainingRecord,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from serec.recommender.errors import CheckpointError
from serec.recommender.fbank import FbankSpec, compute_fbank, fbank_batch
from serec.recommender.kinds import ModelInputs
from serec.recommender.logistic import LogisticClassifier
from serec.synth import speech_like

FEATURES = [f"f{i}" for i in range(9)]


def tiny_model(n_classes: int = 3, n_features: int = 9, seconds: float = 1.0) -> ASTNetwork:
    torch.manual_seed(0)
    backbone = load_ast_backbone("none", "tiny", max_audio_seconds=seconds)
    return ASTNetwork(backbone, n_classes, n_features).eval()


def fit_logistic(features: np.ndarray, targets: np.ndarray, classes: list[str]) -> LogisticClassifier:
    names = [f"f{i}" for i in range(features.shape[1])]
    return LogisticClassifier(classes, names).fit_features(features, targets, seed=0)


def test_fbank_is_the_ast_extractor_output_and_needs_only_the_cropped_audio(rng):
    spec = FbankSpec(num_mel_bins=64, max_length=100)
    audio = speech_like(rng, 1.5)
    reference = ASTFeatureExtractor(num_mel_bins=64, max_length=100)(
        audio, sampling_rate=16000, return_tensors="np"
    )["input_values"][0]
    values = compute_fbank(audio, spec)
    assert values.shape == (100, 64) and values.dtype == np.float32
    np.testing.assert_array_equal(values, reference)
    # The cache reads only spec.audio_seconds of each file: that must not change the input.
    cropped = audio[: int(round(spec.audio_seconds * 16000))]
    np.testing.assert_array_equal(compute_fbank(cropped, spec), values)
    assert not np.array_equal(compute_fbank(cropped[:-200], spec), values)


def test_size_presets():
    tiny = ast_config_for("tiny", 6.0)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.max_length) == (64, 2, 600)
    assert tiny.hidden_size % tiny.num_attention_heads == 0
    base = ast_config_for("base")
    defaults = ASTConfig()
    assert all(
        getattr(base, k) == getattr(defaults, k) for k in AST_CONFIG_KEYS if k != "max_length"
    )
    assert base.max_length == 1024
    with pytest.raises(ValueError, match="ast_size"):
        ast_config_for("huge")


def test_hybrid_head_shapes_and_feature_scaling():
    assert hybrid_hidden_size(768, 9) == 194  # the thesis' Linear(777 -> 194)
    model = tiny_model(n_classes=3, n_features=9)
    first, second = model.head[1], model.head[4]
    assert (first.in_features, first.out_features) == (64 + 9, (64 + 9) // 4)
    assert second.out_features == 3
    x = torch.randn(4, model.backbone.config.max_length, model.backbone.config.num_mel_bins)
    raw = torch.randn(4, 9) * 50 + 10
    mean, scale = torch.full((9,), 10.0), torch.full((9,), 50.0)
    model.set_scaler(mean, scale)
    with torch.no_grad():
        scaled_inside = model(x, raw)
        model.set_scaler(torch.zeros(9), torch.ones(9))
        scaled_outside = model(x, (raw - mean) / scale)
    assert scaled_inside.shape == (4, 3)
    torch.testing.assert_close(scaled_inside, scaled_outside)
    with pytest.raises(ValueError, match="width 9"):
        model(x, None)
    plain = tiny_model(n_classes=2, n_features=0)
    assert plain(x).shape == (4, 2)
    assert plain.head[1].in_features == 64


@pytest.mark.parametrize("n_present", [2, 3])
def test_logistic_recommender_matches_scikit_learn(rng, n_present):
    features = rng.normal(size=(60, 5)) * [1, 10, 100, 0.1, 3] + [0, 5, -50, 1, 0]
    targets = rng.integers(0, n_present, size=60)
    model = fit_logistic(features, targets, list("abcd"))
    proba = model.predict_proba(ModelInputs(features=features))
    scaler = StandardScaler().fit(features)
    reference = LogisticRegression(max_iter=2000, random_state=0).fit(
        scaler.transform(features), targets
    )
    expected = reference.predict_proba(scaler.transform(features))
    np.testing.assert_allclose(proba[:, :n_present], expected, atol=1e-5)
    assert np.all(proba[:, n_present:] < 1e-6)  # never-seen classes are never predicted


def test_checkpoint_reloads_with_weights_only_and_predicts_the_same(tmp_path, rng):
    network = tiny_model(n_classes=3, n_features=9)
    network.set_scaler(rng.normal(size=9), rng.uniform(0.5, 2, size=9))
    model = ASTClassifier(network, ["A", "B", "All_Failed"], FEATURES)
    record = TrainingRecord(stage="expert", fold=2, training={"learning_rate": 1e-3,
                            "audio_dir": str(tmp_path)}, inner_val_files=["x.wav"])  # fmt: skip
    path = tmp_path / "ckpt.pth"
    saved = save_checkpoint(path, model, record)
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "state_dict", "metadata"}
    meta = payload["metadata"]
    assert meta["kind"] == "ast" and meta["record"]["training"]["audio_dir"] == str(tmp_path)
    assert meta["model_config"]["ast_config"]["hidden_size"] == 64
    assert meta["fbank"]["num_mel_bins"] == 64
    torch.testing.assert_close(payload["state_dict"]["feature_mean"], network.feature_mean)

    audios = [speech_like(rng, 1.2) for _ in range(3)]
    features = rng.normal(size=(3, 9)).astype(np.float32)
    inputs = ModelInputs(fbank_batch(audios, saved.fbank), features)
    before = model.predict_proba(inputs)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == saved and isinstance(loaded, ASTClassifier)
    np.testing.assert_allclose(loaded.predict_proba(inputs), before, atol=1e-6)
    assert np.allclose(before.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="9 features"):
        loaded.predict_proba(ModelInputs(inputs.fbank, None))

    logistic = fit_logistic(rng.normal(size=(30, 9)), np.arange(30) % 3, list("abc"))
    lpath = tmp_path / "lr.pth"
    save_checkpoint(lpath, logistic, TrainingRecord(stage="single", fold=1))
    relog, relog_meta = load_checkpoint(lpath)
    assert relog_meta.kind == "logistic_regression" and relog_meta.fbank is None
    np.testing.assert_allclose(
        relog.predict_proba(ModelInputs(features=features)),
        logistic.predict_proba(ModelInputs(features=features)),
        atol=1e-6,
    )


def _as_format_1(path, out):
    """Rewrite a checkpoint the way format 1 stored it: flat metadata with model_kind,
    ast_config / fbank / head_dropout, and the scaler beside the state dict."""
    payload = torch.load(path, weights_only=True)
    meta, state = payload["metadata"], payload["state_dict"]
    flat = {"model_kind": meta["kind"], "class_names": meta["class_names"],
            "feature_names": meta["feature_names"], **meta["record"], **meta["model_config"],
            "scaler_mean": state.pop("feature_mean"), "scaler_scale": state.pop("feature_scale")}
    if meta["fbank"] is not None:
        flat["fbank"] = meta["fbank"]
    torch.save({"format": FORMAT_V1, "state_dict": state, "metadata": flat}, out)
    return out


def test_format_1_checkpoints_still_load_and_predict_the_same(tmp_path, rng):
    network = tiny_model(n_classes=2, n_features=9)
    network.set_scaler(rng.normal(size=9), rng.uniform(0.5, 2, size=9))
    ast = ASTClassifier(network, ["A", "not_A"], FEATURES)
    logistic = fit_logistic(rng.normal(size=(30, 9)), np.arange(30) % 3, list("abc"))
    features = rng.normal(size=(3, 9)).astype(np.float32)
    for name, model in (("ast", ast), ("lr", logistic)):
        saved = save_checkpoint(tmp_path / f"{name}.pth", model, TrainingRecord("gatekeeper", 1))
        old = _as_format_1(tmp_path / f"{name}.pth", tmp_path / f"{name}_v1.pth")
        loaded, meta = load_checkpoint(old)
        assert meta == saved
        fbank = None if meta.fbank is None else fbank_batch([speech_like(rng, 1.0)] * 3, meta.fbank)
        inputs = ModelInputs(fbank, features)
        np.testing.assert_allclose(loaded.predict_proba(inputs), model.predict_proba(inputs),
                                   atol=1e-6)  # fmt: skip


def test_broken_foreign_or_enormous_checkpoints_are_refused_with_how_to_retrain(tmp_path, rng):
    network = tiny_model(n_classes=2, n_features=0)
    path = tmp_path / "ok.pth"
    save_checkpoint(path, ASTClassifier(network, ["A", "not_A"], []), TrainingRecord("gatekeeper", 1))
    payload = torch.load(path, weights_only=True)

    def variant(name, change):
        copy = {**payload, "metadata": {**payload["metadata"]}}
        change(copy)
        torch.save(copy, tmp_path / name)
        return tmp_path / name

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    cases = {
        tmp_path / "garbage.pth": "not a loadable checkpoint",
        tmp_path / "missing.pth": "not found",
        variant("foreign.pth", lambda p: p.update(format="other/9")): "not a serec",
        variant("kind.pth", lambda p: p["metadata"].update(kind="svm")): "kind 'svm'",
        variant("nometa.pth", lambda p: p["metadata"].pop("record")): "malformed metadata",
        variant("shapes.pth", lambda p: p["metadata"].update(class_names=list("abc"))):
            "do not fit",
    }
    huge = {**payload["metadata"]["model_config"]["ast_config"], "hidden_size": 1 << 20,
            "num_hidden_layers": 10_000, "num_attention_heads": 1}  # petabytes if built
    cases[variant("huge.pth", lambda p: p["metadata"].update(
        model_config={**p["metadata"]["model_config"], "ast_config": huge}))] = "refused before"
    for broken, reason in cases.items():
        with pytest.raises(CheckpointError, match=reason) as info:
            load_checkpoint(broken)
        assert str(broken) in str(info.value)
        if reason != "not found":
            assert "retrain it with model_recommender_w_scaler.py" in str(info.value)
    assert read_checkpoint(path)[0].kind == "ast"


def test_pretrained_ast_loads_from_a_local_copy(tmp_path):
    config = ASTConfig(**{**ast_config_for("tiny", 1.0).to_dict(), "num_labels": 5})
    torch.manual_seed(3)
    ASTForAudioClassification(config).save_pretrained(tmp_path / "ast")
    saved = ASTForAudioClassification.from_pretrained(tmp_path / "ast")
    backbone = load_ast_backbone("ast_finetuned_audioset", ast_model_dir=tmp_path / "ast")
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, saved.audio_spectrogram_transformer.state_dict()[name])
    with pytest.raises(ValueError, match="position embeddings"):
        load_ast_backbone(
            "ast_finetuned_audioset", max_audio_seconds=6.0, ast_model_dir=tmp_path / "ast"
        )


def test_missing_pretrained_ast_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(PretrainedUnavailable) as info:
        load_ast_backbone("ast_finetuned_audioset", ast_model_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "huggingface-cli download MIT/ast-finetuned-audioset-10-10-0.4593" in message
    assert "--ast_model_dir" in message and "--pretrained_models none" in message


def test_inference_does_not_import_training_or_cross_validation() -> None:
    import subprocess
    import sys

    code = ("import sys, serec.recommender.inference; print(' '.join(m for m in sys.modules "
            "if m.startswith('serec.recommender')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300).stdout.split()  # fmt: skip
    assert "serec.recommender.stages" in loaded
    for module in ("training", "crossval", "crossval_report", "folds", "inputs", "config"):
        assert f"serec.recommender.{module}" not in loaded
