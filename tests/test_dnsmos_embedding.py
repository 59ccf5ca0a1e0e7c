"""The DNSMOS embedding: the network's own activations, consistent with its scores."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dnsmos import DNSMOS
from dnsmos.embedding import EMBEDDING_SIZES, DnsmosEmbedder, embedding_names
from serec.synth import coloured_noise, speech_like

# These check the real models against speechmos and their own properties.
pytestmark = pytest.mark.real_dnsmos


@pytest.fixture(scope="module")
def embedder() -> DnsmosEmbedder:
    return DnsmosEmbedder(num_threads=1)


def _output_layer(embedder: DnsmosEmbedder) -> tuple[np.ndarray, np.ndarray]:
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(embedder.files.primary)).graph.initializer}
    prefix = "mos_estimator_logpow/dense_3/"
    return weights[prefix + "MatMul/ReadVariableOp/resource:0"], weights[prefix + "BiasAdd/ReadVariableOp/resource:0"]


def test_dense_embedding_reproduces_the_raw_dnsmos_scores(embedder: DnsmosEmbedder) -> None:
    rng = np.random.default_rng(0)
    clip = speech_like(rng, 11.0) + 0.05 * coloured_noise(rng, 11.0, 1.0)  # two windows
    vector = embedder.embed(clip)
    assert vector.shape == (len(embedding_names()),) == (sum(EMBEDDING_SIZES.values()),)
    assert vector.dtype == np.float32
    # The output layer is linear, so it maps the mean hidden activation to the mean raw score.
    w, b = _output_layer(embedder)
    dense = vector[EMBEDDING_SIZES["dnsmos_pool"]:].astype(np.float64)
    clip_scores = DNSMOS(num_threads=1).score_clips([clip])[0]
    np.testing.assert_allclose(
        dense @ w + b, [clip_scores.sig_raw, clip_scores.bak_raw, clip_scores.ovr_raw], atol=1e-4
    )


def test_shared_window_embedding_and_scores_match_whole_windows(embedder: DnsmosEmbedder) -> None:
    # Shared-trunk windows (the fast path) against every window through the whole model, and
    # the scores of the same pass against a plain DNSMOS scorer's.
    clip = speech_like(np.random.default_rng(3), 12.5)  # three overlapping windows
    fast = embedder.score_and_embed(clip)
    whole = DnsmosEmbedder(num_threads=1, share_windows=False).score_and_embed(clip)
    np.testing.assert_allclose(fast.embedding, whole.embedding, rtol=1e-4, atol=1e-4)
    plain = DNSMOS(num_threads=1).score_clips([clip])[0]
    assert fast.num_hops == plain.num_hops == 3
    np.testing.assert_allclose([fast.sig, fast.bak, fast.ovr, fast.p808],
                               [plain.sig, plain.bak, plain.ovr, plain.p808], atol=1e-5)


def test_embedding_is_deterministic_defined_for_short_clips_and_tells_inputs_apart(
    embedder: DnsmosEmbedder,
) -> None:
    rng = np.random.default_rng(1)
    speech = speech_like(rng, 3.0)
    noise = 0.3 * coloured_noise(rng, 3.0, 0.0)
    np.testing.assert_array_equal(embedder.embed(speech), embedder.embed(speech.copy()))
    assert np.isfinite(embedder.embed(speech[:200])).all()
    assert np.abs(embedder.embed(speech) - embedder.embed(noise)).max() > 0.1
    with pytest.raises(ValueError, match="NaN"):
        embedder.embed(np.full(1000, np.nan, dtype=np.float32))
    assert embedding_names()[0] == "dnsmos_pool_00" and embedding_names()[-1] == "dnsmos_dense_63"


def test_dnsmos_embed_feature_set_is_cekl_plus_then_the_embedding(embedder: DnsmosEmbedder) -> None:
    from serec.features import extract_features, feature_names

    clip = speech_like(np.random.default_rng(2), 2.5)
    vector = extract_features(clip, 16_000, "dnsmos_embed")
    plus = extract_features(clip, 16_000, "cekl_plus")
    assert feature_names("dnsmos_embed") == feature_names("cekl_plus") + list(embedding_names())
    np.testing.assert_allclose(vector[: plus.size], plus)
    np.testing.assert_allclose(vector[plus.size :], embedder.embed(clip), rtol=1e-6)
