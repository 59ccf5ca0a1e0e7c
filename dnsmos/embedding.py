"""A pretrained embedding of a clip: the DNSMOS P.835 network's internal activations.

The primary DNSMOS model is a CNN over the log-power spectrogram of each 9.01 s window,
global max pooling (64 values), then dense layers (128, 64) and a 3-unit output (raw SIG,
BAK, OVR). Its pooled and last hidden activations describe what the network hears about
speech and noise, and it ships offline in the speechmos wheel, so they make a cheap
pretrained input for predicting how each enhancer will do on a recording.

A clip's embedding is the mean of each activation over the windows DNSMOS scores
(dnsmos.windows: the reference's tiling and hops), so it is defined for any length.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from dnsmos.models import (
    PRIMARY_IO,
    default_providers,
    find_model_files,
    load_checked,
    make_session,
)
from dnsmos.scorer import prepare_audio
from dnsmos.windows import SAMPLE_RATE, WINDOW_SAMPLES, plan_windows, tile

# Graph tensors exposed as embeddings, by the name their values get in a feature vector.
EMBEDDING_TENSORS: dict[str, str] = {
    "dnsmos_pool": "mos_estimator_logpow/global_max_pooling2d/Max:0",
    "dnsmos_dense": "mos_estimator_logpow/dense_1/Relu:0",
}
EMBEDDING_SIZES: dict[str, int] = {"dnsmos_pool": 64, "dnsmos_dense": 64}
# Windows per ONNX call: bounds memory (each window is 144160 samples in, ~1 MB of maps).
BATCH_WINDOWS = 4


def embedding_names() -> tuple[str, ...]:
    """The embedding's value names in vector order (dnsmos_pool_00 ... dnsmos_dense_63)."""
    return tuple(
        f"{prefix}_{i:02d}" for prefix, size in EMBEDDING_SIZES.items() for i in range(size)
    )


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named intermediate tensors."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    produced = {out for node in exposed.graph.node for out in node.output}
    for name in tensors:
        if name not in produced:
            raise ValueError(f"DNSMOS model has no tensor {name!r}; is it the P.835 sig_bak_ovr model?")
        exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed


class DnsmosEmbedder:
    """Mean DNSMOS activations per clip; the ONNX session is built on first use.

    Args:
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
        model_dir: a folder with the DNSMOS ONNX files (None: those in speechmos).
    """

    def __init__(self, num_threads: int | None = None, model_dir: str | os.PathLike[str] | None = None) -> None:
        self.num_threads = num_threads
        self.files = find_model_files(False, model_dir)
        self._session: ort.InferenceSession | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not pickle; a worker builds its own
        return state

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            model = _with_outputs(load_checked(self.files.primary, *PRIMARY_IO), list(EMBEDDING_TENSORS.values()))
            self._session = make_session(model.SerializeToString(), self.num_threads, default_providers())
        return self._session

    def embed(self, audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
        """float32 vector in embedding_names() order; ValueError for empty or non-finite audio."""
        samples = prepare_audio(audio, sr)
        plan = plan_windows(samples.size)
        tiled = tile(samples, plan.tiled_samples)
        windows = [tiled[start : start + WINDOW_SAMPLES] for start in plan.starts]
        input_name = self.session.get_inputs()[0].name
        wanted = list(EMBEDDING_TENSORS.values())
        sums = [np.zeros(size, dtype=np.float64) for size in EMBEDDING_SIZES.values()]
        for i in range(0, len(windows), BATCH_WINDOWS):
            batch = np.stack(windows[i : i + BATCH_WINDOWS])
            outputs = self.session.run(wanted, {input_name: batch})
            for total, values in zip(sums, outputs, strict=True):
                total += values.reshape(batch.shape[0], -1).sum(axis=0)
        return (np.concatenate(sums) / len(windows)).astype(np.float32)
