"""Model inputs computed in numpy: the P.808 log-mel features and the primary model's frames.

The P.808 input is what the reference computes per window with
`librosa.feature.melspectrogram(y=window[:-160], sr=16000, n_fft=321, hop_length=160,
n_mels=120)` (librosa >= 0.10 defaults: periodic Hann window, centred frames, zero padding,
power 2, Slaney mel scale and area normalisation, 0-8 kHz), then
`(power_to_db(S, ref=np.max) + 40) / 40` (amin 1e-10, top_db 80), transposed to
[900 frames, 120 mels]. Here the filterbank is built once and the power spectrum of a run
of overlapping windows is computed once: windows one second apart share every frame but
their first (the only one that reaches into the centring pad).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy import sparse

from dnsmos.windows import HOP_SAMPLES, SAMPLE_RATE, WINDOW_SAMPLES

MEL_N_FFT = 321
MEL_HOP = 160
N_MELS = 120
MEL_FRAMES = 900
MEL_AMIN = 1e-10
MEL_TOP_DB = 80.0
FRAMES_PER_HOP = HOP_SAMPLES // MEL_HOP  # 100

# The primary model cuts a window into 900 frames of 320 samples with a 160-sample hop.
PRIMARY_FRAME = 320
PRIMARY_HOP = 160
PRIMARY_FRAMES = 900


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney's auditory-toolbox scale: linear below 1 kHz, logarithmic above.
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(
        hz >= min_log_hz,
        min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep,
        hz / f_sp,
    )


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@cache
def mel_filterbank(
    sr: int = SAMPLE_RATE, n_fft: int = MEL_N_FFT, n_mels: int = N_MELS
) -> np.ndarray:
    """Slaney-normalised triangular mel filters, [n_mels, n_fft // 2 + 1], as librosa builds them."""
    fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sr)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2))
    widths = np.diff(edges_hz)
    ramps = edges_hz[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@cache
def _mel_basis() -> sparse.csr_matrix:
    # 316 of the 19320 weights are non-zero; a sparse product also keeps BLAS threads out.
    return sparse.csr_matrix(mel_filterbank())


@cache
def _hann_periodic(n: int) -> np.ndarray:
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    window.setflags(write=False)
    return window


def _mel_power(frames: np.ndarray) -> np.ndarray:
    """Mel power [n, 120] of frames [n, 321]: Hann window, |rfft|^2, mel filters."""
    spectrum = np.fft.rfft(frames * _hann_periodic(MEL_N_FFT), axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    return np.asarray((_mel_basis() @ power.T).T)


def _normalised_db(mel: np.ndarray) -> np.ndarray:
    """(power_to_db(mel, ref=max, amin=1e-10, top_db=80) + 40) / 40 for one window."""
    db = 10.0 * np.log10(np.maximum(MEL_AMIN, mel))
    db -= 10.0 * np.log10(max(MEL_AMIN, float(mel.max())))
    np.maximum(db, db.max() - MEL_TOP_DB, out=db)
    return (db + 40.0) / 40.0


def p808_features(run: np.ndarray, n_windows: int) -> np.ndarray:
    """P.808 inputs [n_windows, 900, 120] float32 for windows starting every second of `run`.

    `run` holds the windows' samples back to back: (n_windows - 1) seconds plus one window.
    """
    run = np.asarray(run, dtype=np.float64)
    pad = MEL_N_FFT // 2
    padded = np.concatenate([np.zeros(pad), run])
    frames = np.lib.stride_tricks.as_strided(
        padded,
        shape=(FRAMES_PER_HOP * (n_windows - 1) + MEL_FRAMES, MEL_N_FFT),
        strides=(padded.strides[0] * MEL_HOP, padded.strides[0]),
        writeable=False,
    )
    mel = _mel_power(frames)
    # Frame 0 of a later window is centred on its first sample and sees the zero pad.
    firsts = np.zeros((n_windows, MEL_N_FFT))
    for w in range(1, n_windows):
        firsts[w, pad:] = run[w * HOP_SAMPLES : w * HOP_SAMPLES + pad + 1]
    first_mel = _mel_power(firsts[1:])
    out = np.empty((n_windows, MEL_FRAMES, N_MELS), dtype=np.float32)
    for w in range(n_windows):
        window_mel = mel[w * FRAMES_PER_HOP : w * FRAMES_PER_HOP + MEL_FRAMES]
        if w > 0:
            window_mel = window_mel.copy()
            window_mel[0] = first_mel[w - 1]
        out[w] = _normalised_db(window_mel)
    return out


def primary_frames(run: np.ndarray, n_windows: int) -> np.ndarray:
    """The primary model's frames [n_frames, 320] float32 for windows starting every second.

    Window w covers frames 100 w ... 100 w + 899 of the run, exactly the frames the model
    cuts from that window on its own.
    """
    n_frames = FRAMES_PER_HOP * (n_windows - 1) + PRIMARY_FRAMES
    run = np.ascontiguousarray(run, dtype=np.float32)
    frames = np.lib.stride_tricks.as_strided(
        run,
        shape=(n_frames, PRIMARY_FRAME),
        strides=(run.strides[0] * PRIMARY_HOP, run.strides[0]),
        writeable=False,
    )
    return np.ascontiguousarray(frames)


def run_samples(n_windows: int) -> int:
    """Samples spanned by `n_windows` windows one second apart."""
    return HOP_SAMPLES * (n_windows - 1) + WINDOW_SAMPLES
