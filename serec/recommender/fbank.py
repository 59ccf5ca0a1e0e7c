"""The audio input of spectrogram models: AST's Kaldi-style log-mel filterbank of 16 kHz audio."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from transformers import ASTFeatureExtractor

from serec.audio import SAMPLE_RATE

# AST's Kaldi-style fbank: 25 ms (400-sample) windows every 10 ms (160 samples), no centring.
FBANK_WINDOW = 400
FBANK_HOP = 160
# AudioSet log-mel statistics the pretrained AST was trained with (ASTFeatureExtractor's).
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974


def frames_for_seconds(seconds: float) -> int:
    """AST input length (fbank frames of 10 ms) that covers `seconds` of audio."""
    if seconds <= FBANK_WINDOW / SAMPLE_RATE:
        raise ValueError(
            f"max audio seconds must exceed {FBANK_WINDOW / SAMPLE_RATE} s, got {seconds}"
        )
    return int(round(seconds * SAMPLE_RATE / FBANK_HOP))


@dataclass(frozen=True)
class FbankSpec:
    """How audio becomes a model input: log-mel fbank, padded or cut to `max_length` frames."""

    num_mel_bins: int
    max_length: int
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD

    @property
    def audio_seconds(self) -> float:
        """The audio span the `max_length` frames cover; later samples are never used."""
        return (FBANK_WINDOW + FBANK_HOP * (self.max_length - 1)) / SAMPLE_RATE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=8)
def _extractor(spec: FbankSpec) -> ASTFeatureExtractor:
    # Building one computes the mel filter bank; reuse it for every file.
    return ASTFeatureExtractor(
        sampling_rate=SAMPLE_RATE,
        num_mel_bins=spec.num_mel_bins,
        max_length=spec.max_length,
        mean=spec.mean,
        std=spec.std,
        do_normalize=True,
    )


def compute_fbank(audio: np.ndarray, spec: FbankSpec) -> np.ndarray:
    """Normalised log-mel fbank (max_length, num_mel_bins) float32 of 16 kHz mono audio.

    ASTFeatureExtractor's own computation (its numpy path when torchaudio is absent), so
    inputs match what a pretrained AST expects.
    """
    values = _extractor(spec)(
        np.asarray(audio, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="np"
    )["input_values"]
    return np.ascontiguousarray(values[0], dtype=np.float32)


def fbank_batch(audios: Sequence[np.ndarray], spec: FbankSpec) -> np.ndarray:
    """Fbank inputs (n, max_length, num_mel_bins) for a list of 16 kHz mono signals."""
    if not len(audios):
        return np.zeros((0, spec.max_length, spec.num_mel_bins), dtype=np.float32)
    return np.stack([compute_fbank(a, spec) for a in audios])
