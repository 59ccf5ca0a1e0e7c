"""Shared fixtures: tiny generated recordings in temp dirs, and a seeded RNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serec.audio import write_wav
from serec.synth import NOISE_KINDS, speech_like


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def speech_noise_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A clean folder (3 speakers x 2 utterances, corpus-style names) and a noise folder."""
    rng = np.random.default_rng(7)
    clean, noise = tmp_path / "clean", tmp_path / "noise"
    for spk in ("spk0001", "spk0002", "spk0003"):
        for utt in range(2):
            write_wav(clean / f"tiny_{spk}_{utt:04d}.wav", speech_like(rng, rng.uniform(1.2, 2.0)))
    for kind in ("pink", "babble", "hum"):
        write_wav(noise / f"{kind}.wav", NOISE_KINDS[kind](rng, 1.0))
    return clean, noise
