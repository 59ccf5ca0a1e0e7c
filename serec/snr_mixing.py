"""Speech plus noise at a target active-speech SNR, one mixture at a time (the signal side of
step 1; serec/mixing.py runs it over a corpus).

SNR is measured on active speech only, the way DNS-Challenge's segmental mixer does it:
the clean signal is cut into 20 ms frames, a frame is active when its energy is within
`ACTIVITY_RANGE_DB` of the loud frames (the 95th-percentile frame energy), and the SNR is
the ratio of clean to noise energy summed over those frames. Pauses therefore do not
dilute the SNR, and the same activity rule is used to set the level and to measure it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from serec.audio import PCM16_SCALE, SAMPLE_RATE, SILENCE_PEAK, active_mask, to_pcm16

Decibels = float

CROSSFADE_SECONDS = 0.05
CLIP_PEAK = 0.99
# Noise under the speech must be audible (above the silence floor) and not far quieter
# than the rest of the segment; otherwise scaling it to the SNR would blow up the loud
# parts and the clip guard would crush the speech. Such an offset is redrawn.
NOISE_UNDER_SPEECH_MIN_DB = -40.0
DEFAULT_TARGET_LEVEL_DB = -25.0


def active_snr_db(clean: np.ndarray, noise: np.ndarray, sr: int = SAMPLE_RATE) -> Decibels:
    """SNR over the active-speech samples of `clean` (inf for a silent noise there)."""
    mask = active_mask(clean, sr)
    clean_energy = float(np.sum(np.asarray(clean, dtype=np.float64)[mask] ** 2))
    noise_energy = float(np.sum(np.asarray(noise, dtype=np.float64)[mask] ** 2))
    if noise_energy == 0.0:
        return math.inf
    return 10.0 * math.log10(clean_energy / noise_energy)


def loop_noise(noise: np.ndarray, length: int, offset: int, crossfade: int) -> np.ndarray:
    """Repeat `noise` to `length` samples starting at `offset`, with an equal-power crossfade.

    The loop period is `len(noise) - crossfade`: the noise's last `crossfade` samples fade
    out while its first ones fade in, so every seam is continuous. Equal-power (sin/cos)
    gains keep the level of uncorrelated noise constant through the fade.
    """
    if not 0 < crossfade < len(noise):
        raise ValueError(f"crossfade {crossfade} must be in (0, {len(noise)})")
    noise = np.asarray(noise, dtype=np.float64)
    period = len(noise) - crossfade
    ramp = (np.arange(crossfade) + 0.5) / crossfade * (np.pi / 2)
    cycle = noise[:period].copy()
    cycle[:crossfade] = noise[:crossfade] * np.sin(ramp) + noise[period:] * np.cos(ramp)
    return cycle[(offset + np.arange(length)) % period]


def crossfade_length(noise_length: int, sr: int = SAMPLE_RATE) -> int:
    """50 ms, or half the noise if it is shorter than 100 ms."""
    return max(1, min(int(round(CROSSFADE_SECONDS * sr)), noise_length // 2))


def noise_segment(
    noise: np.ndarray, length: int, rng: np.random.Generator, sr: int = SAMPLE_RATE
) -> tuple[np.ndarray, int]:
    """`length` samples of noise from a random offset: cropped if long enough, else looped.

    Returns the segment (float64) and the offset in samples into the noise file.
    """
    noise = np.asarray(noise, dtype=np.float64)
    if len(noise) >= length:
        offset = int(rng.integers(0, len(noise) - length + 1))
        return noise[offset : offset + length].copy(), offset
    crossfade = crossfade_length(len(noise), sr)
    offset = int(rng.integers(0, len(noise) - crossfade))
    return loop_noise(noise, length, offset, crossfade), offset


def noise_usable_under_speech(segment: np.ndarray, mask: np.ndarray) -> bool:
    """True if the noise under the active speech is audible and not far below its own level."""
    under = float(np.mean(segment[mask] ** 2))
    overall = float(np.mean(segment**2))
    return under > SILENCE_PEAK**2 and 10.0 * math.log10(under / overall) >= NOISE_UNDER_SPEECH_MIN_DB


@dataclass(frozen=True)
class Mixture:
    """One mixture as written: float32 samples on the 16-bit grid, noisy = clean + noise."""

    clean: np.ndarray
    noise: np.ndarray
    noisy: np.ndarray
    clipped: bool
    measured_snr_db: Decibels


def mix_at_snr(
    clean: np.ndarray,
    noise: np.ndarray,
    snr_db: Decibels,
    target_level_db: Decibels = DEFAULT_TARGET_LEVEL_DB,
    sr: int = SAMPLE_RATE,
) -> Mixture:
    """Scale clean to `target_level_db` (active-speech RMS, dBFS) and noise to `snr_db`.

    `noise` must already have the clean's length. If any written signal would peak above
    `CLIP_PEAK`, clean and noise are scaled together (SNR unchanged, level lower) and
    `clipped` is set. Clean and noise are quantised to 16 bits separately and noisy is
    their integer sum, so noisy - clean is exactly the written noise; the measured SNR is
    taken on those quantised signals with the same activity rule.
    """
    if len(noise) != len(clean):
        raise ValueError(f"noise has {len(noise)} samples, clean has {len(clean)}")
    clean = np.asarray(clean, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    mask = active_mask(clean, sr)
    clean_rms = math.sqrt(float(np.mean(clean[mask] ** 2)))
    clean = clean * (10.0 ** (target_level_db / 20.0) / clean_rms)
    noise_energy = float(np.mean(noise[mask] ** 2))
    if noise_energy == 0.0:
        raise ValueError("noise is digital silence under the active speech")
    clean_energy = float(np.mean(clean[mask] ** 2))
    noise = noise * math.sqrt(clean_energy / (noise_energy * 10.0 ** (snr_db / 10.0)))

    peak = max(np.max(np.abs(clean)), np.max(np.abs(noise)), np.max(np.abs(clean + noise)))
    clipped = bool(peak > CLIP_PEAK)
    if clipped:
        clean = clean * (CLIP_PEAK / peak)
        noise = noise * (CLIP_PEAK / peak)

    clean_pcm = to_pcm16(clean).astype(np.int32)
    noise_pcm = to_pcm16(noise).astype(np.int32)
    # |clean + noise| <= 0.99 so the integer sum stays inside int16 (off by at most 1 LSB).
    noisy_pcm = clean_pcm + noise_pcm
    clean_q = (clean_pcm / PCM16_SCALE).astype(np.float32)
    noise_q = (noise_pcm / PCM16_SCALE).astype(np.float32)
    return Mixture(
        clean=clean_q,
        noise=noise_q,
        noisy=(noisy_pcm / PCM16_SCALE).astype(np.float32),
        clipped=clipped,
        measured_snr_db=active_snr_db(clean_q, noise_q, sr),
    )
