"""AST / hybrid / logistic recommender models: inputs, head shapes, scaler, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

from serec.models import (
    AST_CONFIG_KEYS,
    ASTRecommender,
    FbankSpec,
    PretrainedUnavailable,
    ast_config_for,
    build_model,
    compute_fbank,
    fbank_batch,
    fit_logistic_recommender,
    hybrid_hidden_size,
    load_ast_backbone,
    load_checkpoint,
    predict_proba,
    save_checkpoint,
)
from serec.synth import speech_like

FEATURES = [f"f{i}" for i in range(9)]


def tiny_model(n_classes: int = 3, n_features: int = 9, seconds: float = 1.0) -> ASTRecommender:
    torch.manual_seed(0)
    backbone = load_ast_backbone("none", "tiny", max_audio_seconds=seconds)
    return ASTRecommender(backbone, n_classes, n_features).eval()


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
    model = fit_logistic_recommender(features, targets, n_classes=4, seed=0)
    meta = {
        "model_kind": "logistic_regression",
        "class_names": list("abcd"),
        "feature_names": list("vwxyz"),
    }
    proba = predict_proba(model, meta, features=features)
    scaler = StandardScaler().fit(features)
    reference = LogisticRegression(max_iter=2000, random_state=0).fit(
        scaler.transform(features), targets
    )
    expected = reference.predict_proba(scaler.transform(features))
    np.testing.assert_allclose(proba[:, :n_present], expected, atol=1e-5)
    assert np.all(proba[:, n_present:] < 1e-6)  # never-seen classes are never predicted


def test_checkpoint_reloads_with_weights_only_and_predicts_the_same(tmp_path, rng):
    model = tiny_model(n_classes=3, n_features=9)
    model.set_scaler(rng.normal(size=9), rng.uniform(0.5, 2, size=9))
    path = save_checkpoint(
        tmp_path / "ckpt.pth",
        model,
        stage="expert",
        fold=2,
        class_names=["A", "B", "All_Failed"],
        feature_names=FEATURES,
        training={"learning_rate": 1e-3, "audio_dir": tmp_path},
        inner_val_files=["x.wav"],
    )
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "state_dict", "metadata"}
    meta = payload["metadata"]
    assert meta["training"]["audio_dir"] == str(tmp_path)
    assert meta["ast_config"]["hidden_size"] == 64 and meta["fbank"]["num_mel_bins"] == 64
    torch.testing.assert_close(meta["scaler_mean"], model.feature_mean)

    audios = [speech_like(rng, 1.2) for _ in range(3)]
    features = rng.normal(size=(3, 9)).astype(np.float32)
    spec = FbankSpec(**meta["fbank"])
    before = predict_proba(model, meta, fbank_batch(audios, spec), features)
    loaded, loaded_meta = load_checkpoint(path)
    after = predict_proba(loaded, loaded_meta, fbank_batch(audios, spec), features)
    np.testing.assert_allclose(after, before, atol=1e-6)
    from_audio = predict_proba(loaded, loaded_meta, audios, features)
    np.testing.assert_allclose(from_audio, before, atol=1e-6)
    assert np.allclose(after.sum(axis=1), 1.0)

    logistic = fit_logistic_recommender(rng.normal(size=(30, 9)), np.arange(30) % 3, 3)
    lpath = save_checkpoint(
        tmp_path / "lr.pth",
        logistic,
        stage="single",
        fold=1,
        class_names=list("abc"),
        feature_names=FEATURES,
        training={},
    )
    relog, relog_meta = load_checkpoint(lpath)
    np.testing.assert_allclose(
        predict_proba(relog, relog_meta, features=features),
        predict_proba(logistic, relog_meta, features=features),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="feature names"):
        save_checkpoint(tmp_path / "bad.pth", model, class_names=["A"], feature_names=["one"])


def test_build_model_refuses_unknown_kind():
    with pytest.raises(ValueError, match="model kind"):
        build_model({"model_kind": "svm", "class_names": ["a"], "feature_names": []})


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
