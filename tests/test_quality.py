"""Quality metrics: SI-SDR against its formula, PESQ/STOI against their libraries, error capture."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from pesq import pesq
from pystoi import stoi

from serec.audio import resample
from serec.quality import METRIC_NAMES, METRICS, QualityScorer, si_sdr
from serec.synth import NOISE_KINDS, speech_like

INTRUSIVE = ["pesq_wb", "stoi", "estoi", "si_sdr"]


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean): 3 s of speech-like signal with pink noise at about 5 dB SNR."""
    rng = np.random.default_rng(21)
    clean = speech_like(rng, 3.0)
    noise = NOISE_KINDS["pink"](rng, 3.0)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (5 / 10))
    return (clean + noise).astype(np.float32), clean


def test_registry_names_and_facts() -> None:
    assert METRIC_NAMES == (
        "dnsmos_sig", "dnsmos_bak", "dnsmos_ovr", "dnsmos_p808", "pesq_wb", "stoi", "estoi", "si_sdr",
    )
    assert [n for n, s in METRICS.items() if s.needs_reference] == INTRUSIVE
    assert all((s.dnsmos_key is None) != (s.function is None) for s in METRICS.values())


def test_si_sdr_matches_formula(rng: np.random.Generator) -> None:
    reference = rng.standard_normal(8000) + 0.3
    estimate = 0.7 * reference + 0.2 * rng.standard_normal(8000) - 0.1
    s = reference - reference.mean()
    e = estimate - estimate.mean()
    target = (e @ s) / (s @ s) * s
    expected = 10 * np.log10(np.sum(target**2) / np.sum((e - target) ** 2))
    assert si_sdr(estimate, reference) == pytest.approx(expected, rel=1e-12)
    # Scale- and offset-invariant.
    assert si_sdr(3.0 * estimate + 1.0, reference) == pytest.approx(expected, rel=1e-9)


def test_si_sdr_known_value_and_edge_cases(rng: np.random.Generator) -> None:
    s = rng.standard_normal(4000)
    s -= s.mean()
    n = rng.standard_normal(4000)
    n -= n.mean()
    n -= (n @ s) / (s @ s) * s  # orthogonal to s: SI-SDR = 10 log10(|2 s|^2 / |n|^2)
    assert si_sdr(2 * s + n, s) == pytest.approx(10 * np.log10(4 * (s @ s) / (n @ n)))
    assert si_sdr(s, s) == math.inf
    with pytest.raises(ValueError, match="reference is silent"):
        si_sdr(s, np.zeros_like(s))
    with pytest.raises(ValueError, match="equal length"):
        si_sdr(s, s[:-1])


def test_intrusive_metrics_match_libraries(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, clean = pair
    result = QualityScorer(metrics=INTRUSIVE).score(noisy, clean)
    assert result.errors == {}
    assert result.values["pesq_wb"] == pytest.approx(pesq(16000, clean, noisy, "wb"))
    assert result.values["stoi"] == pytest.approx(stoi(clean, noisy, 16000))
    assert result.values["estoi"] == pytest.approx(stoi(clean, noisy, 16000, extended=True))
    assert result.values["si_sdr"] == pytest.approx(si_sdr(noisy, clean))
    assert 3 < result.values["si_sdr"] < 7
    assert all(math.isnan(result.values[n]) for n in METRIC_NAMES if n not in INTRUSIVE)


def test_pesq_failure_is_captured(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, clean = pair
    silent = np.zeros_like(clean)
    # Sparse knocks, no speech: PESQ's voice activity detector finds no utterance.
    knocks = 0.01 * NOISE_KINDS["impulsive"](np.random.default_rng(2), 3.0)
    results = QualityScorer(metrics=INTRUSIVE).score_batch([noisy, silent, noisy], [clean, clean, knocks])
    assert results[0].errors == {}
    assert math.isnan(results[1].values["pesq_wb"]) and "pesq_wb" in results[1].errors
    assert "estimate is silent" in results[1].errors["si_sdr"]
    assert results[1].values["stoi"] == pytest.approx(0.0, abs=1e-6)
    assert "NoUtterancesError" in results[2].errors["pesq_wb"]
    assert math.isfinite(results[2].values["si_sdr"])
    assert "pesq_wb: " in results[2].error_text()


def test_silent_or_broken_reference(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, clean = pair
    silent, broken = QualityScorer(metrics=["stoi", "si_sdr"]).score_batch(
        [noisy, noisy], [np.zeros_like(clean), np.full_like(clean, np.nan)]
    )
    assert set(silent.errors) == {"stoi", "si_sdr"} and "silent" in silent.errors["stoi"]
    assert "NaN" in broken.errors["si_sdr"]


def test_lengths_aligned_and_rates_resampled(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, clean = pair
    scorer = QualityScorer(metrics=INTRUSIVE)
    trimmed = scorer.score(noisy[:40000], clean)
    assert trimmed.values == pytest.approx(scorer.score(noisy[:40000], clean[:40000]).values, nan_ok=True)
    at_8k = scorer.score(resample(noisy, 16000, 8000), resample(clean, 16000, 8000), sr=8000)
    direct = scorer.score(
        resample(resample(noisy, 16000, 8000), 8000, 16000), resample(resample(clean, 16000, 8000), 8000, 16000)
    )
    assert at_8k.values == pytest.approx(direct.values, nan_ok=True)


def test_dnsmos_batched_with_per_file_errors(pair: tuple[np.ndarray, np.ndarray]) -> None:
    noisy, clean = pair
    scorer = QualityScorer(metrics=["dnsmos_ovr", "dnsmos_p808", "si_sdr"])
    scorer = pickle.loads(pickle.dumps(scorer))  # as a worker process would receive it
    good, no_ref, bad = scorer.score_batch(
        [noisy, clean, np.full(16000, np.inf, np.float32)], [clean, None, clean]
    )
    single = scorer.dnsmos.score(noisy, 16000)
    assert good.values["dnsmos_ovr"] == pytest.approx(single["ovr"], abs=1e-6)
    assert good.values["dnsmos_p808"] == pytest.approx(single["p808"], abs=1e-6)
    assert math.isnan(good.values["dnsmos_sig"]) and good.errors == {}
    assert math.isnan(no_ref.values["si_sdr"]) and no_ref.errors == {}
    assert 1.0 < no_ref.values["dnsmos_ovr"] < 5.0
    assert set(bad.errors) == {"dnsmos_ovr", "dnsmos_p808", "si_sdr"}
    assert all(math.isnan(v) for v in bad.values.values())


def test_unknown_metric_rejected() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        QualityScorer(metrics=["pesq_nb"])
