"""A pretrained embedding of a clip: the DNSMOS P.835 network's internal activations.

The primary DNSMOS model is a CNN over the log-power spectrogram of each 9.01 s window,
global max pooling (64 values), then dense layers (128, 64) and a 3-unit output (raw SIG,
BAK, OVR). Its pooled and last hidden activations describe what the network hears about
speech and noise, and it ships offline in the speechmos wheel, so they make a cheap
pretrained input for predicting how each enhancer will do on a recording.

A clip's embedding is the mean of each activation over the windows DNSMOS scores
(dnsmos.windows: the reference's tiling and hops), so it is defined for any length. It is
computed in the same pass as the clip's DNSMOS scores (the tail of the primary model
returns the activations too), so a feature vector with both costs one DNSMOS scoring.
"""

from __future__ import annotations

import os

import numpy as np

from dnsmos.models import ModelFiles
from dnsmos.scorer import DNSMOS, ClipScores
from dnsmos.windows import SAMPLE_RATE

# Graph tensors exposed as embeddings, by the name their values get in a feature vector.
EMBEDDING_TENSORS: dict[str, str] = {
    "dnsmos_pool": "mos_estimator_logpow/global_max_pooling2d/Max:0",
    "dnsmos_dense": "mos_estimator_logpow/dense_1/Relu:0",
}
EMBEDDING_SIZES: dict[str, int] = {"dnsmos_pool": 64, "dnsmos_dense": 64}


def embedding_names() -> tuple[str, ...]:
    """The embedding's value names in vector order (dnsmos_pool_00 ... dnsmos_dense_63)."""
    return tuple(
        f"{prefix}_{i:02d}" for prefix, size in EMBEDDING_SIZES.items() for i in range(size)
    )


class DnsmosEmbedder:
    """Mean DNSMOS activations per clip, with the clip's DNSMOS scores from the same pass.

    A DNSMOS scorer whose primary model also returns the pooled and dense activations, so
    the shared-window speed-up (dnsmos.scorer) applies and the scores cost nothing extra.

    Args:
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
        model_dir: a folder with the DNSMOS ONNX files (None: those in speechmos).
        share_windows: as DNSMOS's (False: whole windows, the reference's computation).
    """

    def __init__(
        self,
        num_threads: int | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        share_windows: bool = True,
    ) -> None:
        self.scorer = DNSMOS(num_threads=num_threads, model_dir=model_dir, share_windows=share_windows,
                             embedding_outputs=tuple(EMBEDDING_TENSORS.values()))

    @property
    def files(self) -> ModelFiles:
        return self.scorer.files

    def score_and_embed(self, audio: np.ndarray, sr: int = SAMPLE_RATE) -> ClipScores:
        """The clip's DNSMOS scores, with `embedding` (float32, embedding_names() order);
        ValueError for empty or non-finite audio."""
        try:
            return self.scorer.score_clips([audio], sr)[0]
        except ValueError as exc:  # score_clips names the clip's index; there is one
            raise ValueError(str(exc).removeprefix("clip 0: ")) from exc

    def embed(self, audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
        """float32 vector in embedding_names() order; ValueError for empty or non-finite audio."""
        embedding = self.score_and_embed(audio, sr).embedding
        assert embedding is not None  # the scorer was built with embedding outputs
        return embedding
