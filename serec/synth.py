"""Synthetic test signals: speech-like voiced syllables and several kinds of noise.

Used by the tests (which must not depend on any corpus) and by the embedded demo corpus.
Every generator takes an explicit numpy Generator, so output is a function of the seed.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from serec.audio import SAMPLE_RATE


def speech_like(
    rng: np.random.Generator, seconds: float = 2.0, sr: int = SAMPLE_RATE, f0: float | None = None
) -> np.ndarray:
    """Voiced 'syllables' (harmonics of a gliding f0 through two formant resonances) with pauses."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = f0 if f0 is not None else float(rng.uniform(100, 250))
    glide = f0 * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t))
    phase = 2 * np.pi * np.cumsum(glide) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 25))
    # Syllable envelope: 4-6 syllables per second with silent gaps between words.
    rate = rng.uniform(4, 6)
    envelope = np.clip(np.sin(2 * np.pi * rate * t / 2), 0, None) ** 2
    words = (np.sin(2 * np.pi * rng.uniform(0.6, 1.0) * t + rng.uniform(0, np.pi)) > -0.3).astype(float)
    envelope = envelope * signal.lfilter([0.02], [1, -0.98], words)
    out = np.zeros(n)
    for formant, bw in ((rng.uniform(500, 800), 120), (rng.uniform(1200, 2200), 200)):
        b, a = signal.iirpeak(formant, formant / bw, fs=sr)
        out += signal.lfilter(b, a, voiced)
    out *= envelope
    out /= np.max(np.abs(out)) + 1e-9
    return (0.5 * out).astype(np.float32)


def coloured_noise(
    rng: np.random.Generator, seconds: float, exponent: float = 1.0, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown)."""
    n = int(seconds * sr)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    freqs[0] = freqs[1]
    spectrum /= freqs ** (exponent / 2)
    out = np.fft.irfft(spectrum, n)
    return (0.3 * out / (np.max(np.abs(out)) + 1e-12)).astype(np.float32)


def babble(
    rng: np.random.Generator, seconds: float, voices: int = 6, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Several overlapping speech-like voices."""
    out = sum(np.roll(speech_like(rng, seconds, sr), int(rng.integers(0, sr))) for _ in range(voices))
    return (0.3 * out / (np.max(np.abs(out)) + 1e-12)).astype(np.float32)


def hum(rng: np.random.Generator, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Mains-like tonal hum: a 50 or 60 Hz fundamental and odd harmonics, plus a little hiss."""
    t = np.arange(int(seconds * sr)) / sr
    base = float(rng.choice([50.0, 60.0]))
    out = sum(np.sin(2 * np.pi * base * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 3, 5, 7, 9))
    out = out + 0.02 * rng.standard_normal(t.size)
    return (0.3 * out / np.max(np.abs(out))).astype(np.float32)


def impulsive(rng: np.random.Generator, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Sparse decaying bursts (knocks, clicks) over a quiet floor."""
    n = int(seconds * sr)
    out = 0.003 * rng.standard_normal(n)
    for start in rng.integers(0, n, size=max(1, int(seconds * 3))):
        length = int(rng.uniform(0.01, 0.08) * sr)
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 5))
        out[start : start + length] += burst[: n - start]
    return (0.3 * out / np.max(np.abs(out))).astype(np.float32)


def modulated(rng: np.random.Generator, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Pink noise with a slow amplitude modulation (passing traffic, fans)."""
    t = np.arange(int(seconds * sr)) / sr
    depth = rng.uniform(0.5, 0.9)
    envelope = 1 - depth * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 3.0) * t))
    out = coloured_noise(rng, seconds, 1.0, sr) * envelope
    return (0.3 * out / np.max(np.abs(out))).astype(np.float32)


NOISE_KINDS = {
    "white": lambda rng, s: coloured_noise(rng, s, 0.0),
    "pink": lambda rng, s: coloured_noise(rng, s, 1.0),
    "brown": lambda rng, s: coloured_noise(rng, s, 2.0),
    "babble": babble,
    "hum": hum,
    "impulsive": impulsive,
    "modulated": modulated,
}
