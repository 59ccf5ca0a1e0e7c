"""Per-file engineered features for the recommender: the thesis' 9 CE/KL statistics,
`cekl_plus` (those 9 plus cheap non-intrusive descriptors) and `dnsmos_embed`, by feature set
(serec/feature_files.py runs them over a folder).

CE/KL follows upstream.md section 1: power spectrogram with torchaudio `Spectrogram`
defaults (n_fft 1024, hop 512, periodic Hann, centred frames, reflect padding, power 2),
each frame normalised to a distribution over frequency, the cross-entropy matrix over all
frame pairs, KL = CE minus each row's own entropy (negatives to 0), then 9 statistics. All
of it runs in float64 and is stored as float32 (torchaudio works in float32; on a 20 s
clip the features from its float32 spectrogram agree with ours to about 1e-7 relative).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dnsmos.embedding import DnsmosEmbedder, embedding_names
from serec.audio import (
    SAMPLE_RATE,
    AudioError,
    Seconds,
    audio_info,
    load_audio,
    resample,
)

N_FFT = 1024
HOP_LENGTH = 512
EPS = 1e-10
DEFAULT_MAX_SECONDS: Seconds = 20.0
# Frame-power percentiles of the SNR estimate: the quietest frames stand for the noise
# floor (speech has pauses), the loudest for speech plus noise. P20 rather than P10: on
# 100 corpus mixtures with non-stationary noise it tracked the mixing SNR better
# (Pearson r 0.80 vs 0.72; see BENCHMARKS.md "Features").
SNR_NOISE_PERCENTILE = 20.0
SNR_SPEECH_PERCENTILE = 90.0
# Power floor of the SNR estimate (-100 dB re. the frame power unit): keeps digitally
# silent stretches from giving an infinite SNR.
SNR_POWER_FLOOR = 1e-10
# librosa's spectral_flatness `amin`: power floor so silent bins do not give log(0).
FLATNESS_AMIN = 1e-10

CEKL_FEATURE_NAMES: tuple[str, ...] = (
    "ce_diag_var",
    "ce_offdiag_mean",
    "ce_offdiag_var",
    "ce_adjacent_mean",
    "ce_adjacent_var",
    "kl_offdiag_mean",
    "kl_offdiag_var",
    "kl_adjacent_mean",
    "kl_adjacent_var",
)
DNSMOS_FEATURE_NAMES: tuple[str, ...] = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovr", "dnsmos_p808")
DESCRIPTOR_FEATURE_NAMES: tuple[str, ...] = (
    "snr_est_db",
    "spectral_flatness_mean",
    "spectral_flatness_std",
    "spectral_centroid_mean_hz",
    "spectral_centroid_std_hz",
    "duration_s",
)
EMBEDDING_NAMES: tuple[str, ...] = embedding_names()

log = logging.getLogger(__name__)


class DnsmosScorer(Protocol):
    """What cekl_plus needs from a DNSMOS scorer: `score(audio, sr)` -> sig/bak/ovr/p808."""

    def score(self, audio: np.ndarray, sr: int) -> Mapping[str, float]: ...


# ---------------------------------------------------------------------------------------
# Spectrogram and CE/KL


def periodic_hann(n: int) -> np.ndarray:
    """torch.hann_window(n) (periodic=True): the DFT-even Hann window."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def spectrogram_power(
    audio: np.ndarray, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH
) -> np.ndarray:
    """Power spectrogram (n_fft // 2 + 1 bins, frames), float64, as torchaudio's Spectrogram.

    Frames are centred (the signal is reflect-padded by n_fft // 2 on each side), windowed
    with a periodic Hann window of length n_fft, one-sided, unnormalised, power 2. There
    are 1 + len(audio) // hop_length frames.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {x.shape}")
    pad = n_fft // 2
    # torch's reflect padding needs more samples than the pad; numpy would silently repeat.
    if x.size <= pad:
        raise ValueError(f"audio too short for the spectrogram: {x.size} samples, need > {pad}")
    padded = np.pad(x, pad, mode="reflect")
    frames = sliding_window_view(padded, n_fft)[::hop_length] * periodic_hann(n_fft)
    spectrum = np.fft.rfft(frames, axis=1)
    return (spectrum.real**2 + spectrum.imag**2).T


def frame_distributions(power: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Each frame (column) of a power spectrogram as a distribution over bins: (frames, bins).

    Frame sums below eps are replaced by 1 (so a silent frame stays all-zero), then
    P = S / (sum + eps), as the thesis does.
    """
    sums = power.sum(axis=0)
    sums = np.where(sums < eps, 1.0, sums)
    return (power / (sums + eps)).T


def ce_kl_matrices(power: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy and KL matrices over all frame pairs of a power spectrogram.

    CE[i, j] = -sum_f P_i(f) log2(P_j(f) + eps); KL = CE - diag(CE)[:, None] with
    negatives set to 0. Both (frames, frames), float64.
    """
    p = frame_distributions(np.asarray(power, dtype=np.float64), eps)
    ce = -(p @ np.log2(p + eps).T)
    kl = np.maximum(ce - np.diagonal(ce)[:, None], 0.0)
    return ce, kl


def _offdiag_mean_var(m: np.ndarray) -> tuple[float, float]:
    # Whole-matrix sums minus the diagonal's share: no boolean mask, no copy of the
    # n*(n-1) entries. Variance from squared deviations (not E[x^2] - mean^2) for accuracy.
    n = m.shape[0]
    count = n * (n - 1)
    diag = np.diagonal(m)
    mean = (m.sum() - diag.sum()) / count
    dev = m - mean
    diag_dev = diag - mean
    var = (np.vdot(dev, dev) - np.dot(diag_dev, diag_dev)) / count
    return float(mean), float(var)


def _adjacent_mean_var(m: np.ndarray) -> tuple[float, float]:
    adjacent = np.concatenate((np.diagonal(m, 1), np.diagonal(m, -1)))
    return float(adjacent.mean()), float(adjacent.var())


def _cekl_from_power(power: np.ndarray) -> np.ndarray:
    ce, kl = ce_kl_matrices(power)
    ce_off = _offdiag_mean_var(ce)
    ce_adj = _adjacent_mean_var(ce)
    kl_off = _offdiag_mean_var(kl)
    kl_adj = _adjacent_mean_var(kl)
    return np.array(
        [float(np.var(np.diagonal(ce))), *ce_off, *ce_adj, *kl_off, *kl_adj], dtype=np.float64
    )


def _as_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("audio contains NaN or Inf samples")
    return resample(x, sr, SAMPLE_RATE)


def cekl_features(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The 9 CE/KL features (CEKL_FEATURE_NAMES order) of mono audio, float32, shape (9,).

    Other rates are resampled to 16 kHz first. The whole signal is used: crop long files
    before calling (the matrices are frames x frames, about 3 MB at 20 s).
    """
    return _cekl_from_power(spectrogram_power(_as_16k(audio, sr))).astype(np.float32)


# ---------------------------------------------------------------------------------------
# cekl_plus descriptors


def snr_estimate_db(power: np.ndarray) -> float:
    """Blind SNR estimate (dB) from frame powers: (P90 - P20) / P20 of the per-frame power.

    The 20th percentile of frame power (64 ms frames) stands for the noise floor (speech
    pauses), the 90th for speech plus noise. Coarse (it reads several dB high, and low for
    speech without pauses) but cheap and monotone in the true SNR. Powers are floored at
    SNR_POWER_FLOOR.
    """
    frame_power = power.sum(axis=0)
    noise = max(float(np.percentile(frame_power, SNR_NOISE_PERCENTILE)), SNR_POWER_FLOOR)
    loud = float(np.percentile(frame_power, SNR_SPEECH_PERCENTILE))
    return 10.0 * np.log10(max(loud - noise, SNR_POWER_FLOOR) / noise)


def spectral_flatness(power: np.ndarray) -> np.ndarray:
    """Per-frame spectral flatness (geometric / arithmetic mean of power), as librosa's."""
    floored = np.maximum(power, FLATNESS_AMIN)
    return np.exp(np.mean(np.log(floored), axis=0)) / np.mean(floored, axis=0)


def spectral_centroid_hz(power: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Per-frame magnitude-weighted mean frequency (Hz), as librosa's; 0 for silent frames."""
    magnitude = np.sqrt(power)
    n_fft = 2 * (power.shape[0] - 1)
    freqs = np.arange(power.shape[0]) * sr / n_fft
    sums = magnitude.sum(axis=0)
    safe = np.where(sums > 0, sums, 1.0)
    return np.where(sums > 0, (freqs @ magnitude) / safe, 0.0)


def _descriptors(power: np.ndarray, duration_s: float) -> np.ndarray:
    flatness = spectral_flatness(power)
    centroid = spectral_centroid_hz(power)
    return np.array(
        [
            snr_estimate_db(power),
            flatness.mean(),
            flatness.std(),
            centroid.mean(),
            centroid.std(),
            duration_s,
        ],
        dtype=np.float64,
    )


def build_dnsmos(num_threads: int | None = None) -> DnsmosScorer:
    """A `dnsmos.DNSMOS` scorer; RuntimeError (with the reason) when it cannot be had."""
    try:
        from dnsmos import DNSMOS
    except ImportError as exc:
        raise RuntimeError(
            f"feature set cekl_plus needs the project's dnsmos package ({exc})"
        ) from exc
    try:
        return DNSMOS(num_threads=num_threads)
    except Exception as exc:  # a missing or wrong model file: one clear line for the CLI
        raise RuntimeError(f"feature set cekl_plus: DNSMOS unavailable ({exc})") from exc


@cache
def default_dnsmos() -> DnsmosScorer:
    """One DNSMOS scorer per process (ONNX sessions are costly to build, cheap to reuse)."""
    return build_dnsmos()


@cache
def default_embedder() -> DnsmosEmbedder:
    """One DNSMOS embedder per process, on one onnxruntime thread (parallelism is per file)."""
    return DnsmosEmbedder(num_threads=1)


def _dnsmos_values(scores: Mapping[str, float]) -> np.ndarray:
    return np.array([scores[k] for k in ("sig", "bak", "ovr", "p808")], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Feature sets


@dataclass(frozen=True)
class FeatureSet:
    """A named feature vector: its names in order, whether it needs DNSMOS, its parameters."""

    name: str
    names: tuple[str, ...]
    needs_dnsmos: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    # Append the DNSMOS network's internal activations (dnsmos.embedding).
    needs_embedding: bool = False


_CEKL_PARAMS = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "hop_length": HOP_LENGTH,
    "window": "hann_periodic",
    "center": True,
    "pad_mode": "reflect",
    "power": 2.0,
    "eps": EPS,
}

FEATURE_SETS: dict[str, FeatureSet] = {
    "cekl": FeatureSet("cekl", CEKL_FEATURE_NAMES, needs_dnsmos=False, params=_CEKL_PARAMS),
    "cekl_plus": FeatureSet(
        "cekl_plus",
        CEKL_FEATURE_NAMES + DNSMOS_FEATURE_NAMES + DESCRIPTOR_FEATURE_NAMES,
        needs_dnsmos=True,
        params={
            **_CEKL_PARAMS,
            "dnsmos": "dnsmos.DNSMOS() defaults on the (cropped) noisy input",
            "snr_est": f"frame power percentiles P{SNR_SPEECH_PERCENTILE:g} / "
            f"P{SNR_NOISE_PERCENTILE:g}, floor {SNR_POWER_FLOOR:g}",
            "flatness_amin": FLATNESS_AMIN,
            "duration": "whole file, before cropping",
        },
    ),
}
FEATURE_SETS["dnsmos_embed"] = FeatureSet(
    "dnsmos_embed",
    FEATURE_SETS["cekl_plus"].names + EMBEDDING_NAMES,
    needs_dnsmos=True,
    params={
        **FEATURE_SETS["cekl_plus"].params,
        "embedding": "dnsmos.embedding.DnsmosEmbedder: mean over DNSMOS windows of the P.835 "
        "network's global max pooling (64) and last hidden layer (64)",
    },
    needs_embedding=True,
)


def get_feature_set(feature_set: str) -> FeatureSet:
    try:
        return FEATURE_SETS[feature_set]
    except KeyError:
        raise ValueError(
            f"unknown feature set {feature_set!r}; choose from {sorted(FEATURE_SETS)}"
        ) from None


def feature_names(feature_set: str) -> list[str]:
    """The names of a feature set's vector entries, in vector order."""
    return list(get_feature_set(feature_set).names)


def extract_features(
    audio: np.ndarray,
    sr: int = SAMPLE_RATE,
    feature_set: str = "cekl",
    dnsmos: DnsmosScorer | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """One feature vector (float32, feature_names(feature_set) order) for mono audio.

    `dnsmos` is the scorer cekl_plus uses (default: one `dnsmos.DNSMOS()` per process);
    dnsmos_embed takes its scores from the embedder's pass (default_embedder).
    `duration_s` is the file's duration when `audio` was cropped (default: len / sr).
    """
    spec = get_feature_set(feature_set)
    x = _as_16k(audio, sr)
    power = spectrogram_power(x)
    parts = [_cekl_from_power(power)]
    embedding = None
    if spec.needs_embedding:  # one DNSMOS pass gives the scores and the activations
        clip = default_embedder().score_and_embed(x, SAMPLE_RATE)
        scores, embedding = clip.mos(), clip.embedding
    elif spec.needs_dnsmos:
        scores = (dnsmos if dnsmos is not None else default_dnsmos()).score(x, SAMPLE_RATE)
    if spec.needs_dnsmos:
        parts.append(_dnsmos_values(scores))
        parts.append(
            _descriptors(power, x.size / SAMPLE_RATE if duration_s is None else duration_s)
        )
    if embedding is not None:
        parts.append(embedding)
    vector = np.concatenate(parts).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        bad = [n for n, v in zip(spec.names, vector, strict=True) if not np.isfinite(v)]
        raise ValueError(f"non-finite feature values: {', '.join(bad)}")
    return vector


def file_features(
    path: str | os.PathLike[str],
    feature_set: str = "cekl",
    max_seconds: Seconds | None = DEFAULT_MAX_SECONDS,
    dnsmos: DnsmosScorer | None = None,
) -> np.ndarray:
    """Feature vector of one audio file, reading only its first `max_seconds` (None: all).

    The same path the folder run takes, so inference computes exactly what training saw.
    Raises AudioError (file + reason) for unusable files.
    """
    duration_s = audio_info(path).duration
    audio = load_audio(path, crop_seconds=max_seconds)
    try:
        return extract_features(audio, SAMPLE_RATE, feature_set, dnsmos, duration_s=duration_s)
    except ValueError as exc:
        raise AudioError(path, str(exc)) from exc
