"""Which 9.01 s windows DNSMOS scores in a clip, reproducing the reference script exactly.

The reference (Microsoft `dnsmos_local.py`, and `speechmos` which copies it) doubles a short
clip until it is at least one window long, takes `int(floor(len / sr) - 9.01) + 1` hops of
one second, and cuts window `i` as `audio[int(i * sr) : int((i + 9.01) * sr)]`. Because
`(i + 9.01) * 16000` is not exact in floating point, that slice is one sample short for
some `i` (7-23, 119-122, ...) and the reference silently drops those windows. Scores are
the mean over the windows that remain, so we must drop the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 9.01
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)  # 144160
HOP_SAMPLES = SAMPLE_RATE


@dataclass(frozen=True)
class WindowPlan:
    """Where the scored windows of one clip start, in the tiled signal."""

    n_samples: int
    tiled_samples: int
    num_hops: int
    starts: tuple[int, ...]


def plan_windows(n_samples: int) -> WindowPlan:
    """The reference's tiling, hop count and window starts for a clip of `n_samples` at 16 kHz."""
    if n_samples <= 0:
        raise ValueError("cannot score an empty signal")
    tiled = n_samples
    while tiled < WINDOW_SAMPLES:
        tiled *= 2
    num_hops = int(np.floor(tiled / SAMPLE_RATE) - WINDOW_SECONDS) + 1
    starts = []
    for idx in range(num_hops):
        start = int(idx * HOP_SAMPLES)
        end = min(int((idx + WINDOW_SECONDS) * HOP_SAMPLES), tiled)
        if end - start >= WINDOW_SAMPLES:
            starts.append(start)
    return WindowPlan(n_samples, tiled, num_hops, tuple(starts))


def tile(audio: np.ndarray, tiled_samples: int) -> np.ndarray:
    """Repeat a clip whole until it is `tiled_samples` long (the reference's repeated doubling)."""
    repeats = tiled_samples // audio.shape[0]
    return np.tile(audio, repeats) if repeats > 1 else audio


def consecutive_runs(starts: tuple[int, ...], max_windows: int) -> list[list[int]]:
    """Split window starts into runs one hop apart, each at most `max_windows` long."""
    runs: list[list[int]] = []
    for start in starts:
        if runs and start - runs[-1][-1] == HOP_SAMPLES and len(runs[-1]) < max_windows:
            runs[-1].append(start)
        else:
            runs.append([start])
    return runs
