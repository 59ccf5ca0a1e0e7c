"""Shared fixtures: tiny generated recordings in temp dirs, and a seeded RNG."""

from __future__ import annotations

from collections.abc import Iterator
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow first: on xdist's workers (pyproject addopts) a long test then runs
    beside the others instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_dnsmos: score with the real DNSMOS models (speechmos's), not the tiny ones")


@pytest.fixture(scope="session")
def tiny_dnsmos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_dnsmos import write_tiny_dnsmos

    return write_tiny_dnsmos(tmp_path_factory.mktemp("tiny_dnsmos"))


def _uses_real_dnsmos(node: pytest.Item | pytest.Module) -> bool:
    return node.get_closest_marker("real_dnsmos") is not None


@pytest.fixture(scope="module", autouse=True)
def dnsmos_models_of_module(request: pytest.FixtureRequest, tiny_dnsmos_dir: Path) -> Iterator[None]:
    """Plumbing tests score with the tiny DNSMOS (tiny_dnsmos.py), in this process and in the
    CLIs they start; modules marked real_dnsmos (and their module fixtures) with the real models."""
    from dnsmos.models import MODEL_DIR_ENV

    with pytest.MonkeyPatch.context() as patch:
        if _uses_real_dnsmos(request.node):
            patch.delenv(MODEL_DIR_ENV, raising=False)
        else:
            patch.setenv(MODEL_DIR_ENV, str(tiny_dnsmos_dir))
        yield


@pytest.fixture(autouse=True)
def dnsmos_models_of_test(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single test marked real_dnsmos in a plumbing module scores with the real models."""
    from dnsmos.models import MODEL_DIR_ENV

    if _uses_real_dnsmos(request.node):
        monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
