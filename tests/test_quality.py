"""Quality metrics: SI-SDR against its formula, PESQ/STOI against their libraries, error capture."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pesq import pesq
from pystoi import stoi

from serec import quality
from serec.audio import resample
from serec.quality import METRIC_NAMES, METRICS, QualityScorer, pesq_segments, si_sdr
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


def test_pesq_segments_cover_the_signal_in_near_equal_parts() -> None:
    assert pesq_segments(16000 * 18, 16000, 18.0) == [slice(0, 16000 * 18)]
    parts = pesq_segments(16000 * 200 + 7, 16000, 18.0)
    assert len(parts) == 12 and parts[0].start == 0 and parts[-1].stop == 16000 * 200 + 7
    assert all(a.stop == b.start for a, b in zip(parts[:-1], parts[1:], strict=True))
    lengths = [p.stop - p.start for p in parts]
    assert max(lengths) <= 16000 * 18 and max(lengths) - min(lengths) <= 1


def test_segmented_pesq_is_the_duration_weighted_mean(
    pair: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    noisy, clean = pair
    monkeypatch.setattr(quality, "PESQ_MAX_SEGMENT_S", 3.0)
    scorer = QualityScorer(metrics=["pesq_wb"])
    whole = pesq(16000, clean, noisy, "wb")
    # Two identical 3 s halves: each segment is the short file, so the mean equals its PESQ.
    twice = scorer.score(np.tile(noisy, 2), np.tile(clean, 2))
    assert twice.errors == {} and twice.values["pesq_wb"] == pytest.approx(whole, abs=1e-6)
    # Halves of different quality: the mean of the two, between them.
    worse = (clean + 3 * (noisy - clean)).astype(np.float32)
    mixed = scorer.score(np.concatenate([noisy, worse]), np.tile(clean, 2)).values["pesq_wb"]
    low = pesq(16000, clean, worse, "wb")
    assert low < mixed < whole and mixed == pytest.approx((whole + low) / 2, abs=1e-6)
    # A segment whose reference holds no speech is left out, not averaged in as a failure.
    quiet = 1e-3 * NOISE_KINDS["impulsive"](np.random.default_rng(2), 3.0)
    gap = scorer.score(np.concatenate([noisy, quiet]), np.concatenate([clean, quiet]))
    assert gap.errors == {} and gap.values["pesq_wb"] == pytest.approx(whole, abs=1e-6)


@pytest.mark.slow
def test_pesq_on_a_200_s_file_does_not_crash() -> None:
    # Whole-signal PESQ segfaults on long speech: run in a subprocess so a crash fails
    # this test instead of killing the test run.
    script = textwrap.dedent("""
        import numpy as np
        from serec.quality import QualityScorer
        from serec.synth import NOISE_KINDS, speech_like
        rng = np.random.default_rng(3)
        clean = np.tile(speech_like(rng, 20.0), 10)
        noisy = (clean + 0.05 * np.tile(NOISE_KINDS["pink"](rng, 20.0), 10)).astype(np.float32)
        result = QualityScorer(metrics=["pesq_wb"]).score(noisy, clean)
        print(result.values["pesq_wb"], result.error_text() or "no errors")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    value, errors = done.stdout.split(maxsplit=1)
    assert 1.04 <= float(value) <= 4.64 and errors.strip() == "no errors"


def test_dnsmos_at_a_common_level_ignores_the_output_level() -> None:
    from serec.audio import active_mask, scale_to_active_level
    from serec.synth import coloured_noise, speech_like

    rng = np.random.default_rng(3)
    clip = (0.1 * speech_like(rng, 3.0) + 0.01 * coloured_noise(rng, 3.0, 1.0)).astype(np.float32)
    scaled = scale_to_active_level(clip, -26.0)
    active = scaled[active_mask(scaled)].astype(np.float64)
    assert 10 * np.log10(np.mean(active**2)) == pytest.approx(-26.0, abs=1e-3)
    levelled = QualityScorer(metrics=["dnsmos_ovr"], num_threads=1, dnsmos_level_db=-26.0)
    as_is = QualityScorer(metrics=["dnsmos_ovr"], num_threads=1)
    quiet, loud = levelled.score_batch([clip * 0.25, clip])
    assert quiet.values["dnsmos_ovr"] == pytest.approx(loud.values["dnsmos_ovr"], abs=1e-3)
    # The reference behaviour scores the signal as it is, so the level moves the score.
    raw_quiet, raw_loud = as_is.score_batch([clip * 0.25, clip])
    assert abs(raw_quiet.values["dnsmos_ovr"] - raw_loud.values["dnsmos_ovr"]) > 0.01
