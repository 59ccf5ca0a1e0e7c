"""Audio I/O: round trips, downmix, resampling, FLAC, and every AudioError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from serec.audio import (
    PCM16_SCALE,
    SAMPLE_RATE,
    AudioError,
    audio_info,
    file_id,
    list_audio_files,
    load_audio,
    quantise_pcm16,
    resample,
    to_pcm16,
    write_wav,
)

LSB = 1 / 32768


def sine(freq: float, seconds: float, sr: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(
        np.float32
    )


def test_wav_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    audio = rng.uniform(-0.9, 0.9, SAMPLE_RATE).astype(np.float32)
    path = write_wav(tmp_path / "sub" / "x.wav", audio)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    np.testing.assert_array_equal(sf.read(str(path), dtype="int16")[0], to_pcm16(audio))
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.shape == audio.shape
    # Half an LSB of rounding, and reading gives back exactly the quantised signal.
    assert np.max(np.abs(loaded - audio)) <= 0.5 * LSB
    np.testing.assert_array_equal(loaded, quantise_pcm16(audio))
    np.testing.assert_array_equal(load_audio(write_wav(tmp_path / "again.wav", loaded)), loaded)
    # k / PCM16_SCALE is written back as exactly k.
    pcm = np.array([-32768, -16385, -1, 0, 1, 16385, 32767], dtype=np.int16)
    write_wav(path, pcm / PCM16_SCALE)
    np.testing.assert_array_equal(sf.read(str(path), dtype="int16")[0], pcm)


def test_write_wav_is_atomic_and_refuses_bad_input(tmp_path: Path) -> None:
    target = tmp_path / "x.wav"
    write_wav(target, sine(300, 1.0, SAMPLE_RATE))
    write_wav(target, sine(600, 1.0, SAMPLE_RATE))  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["x.wav"]
    with pytest.raises(AudioError, match="NaN or Inf"):
        write_wav(tmp_path / "nan.wav", np.array([0.1, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        write_wav(tmp_path / "stereo.wav", np.zeros((100, 2), dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.wav"]


def test_to_pcm16_clips_and_rounds() -> None:
    pcm = to_pcm16(np.array([-2.0, -1.0, 0.49 * LSB, 0.51 * LSB, 1.0, 3.0]))
    np.testing.assert_array_equal(pcm, [-32768, -32768, 0, 1, 32767, 32767])


def test_stereo_is_downmixed_by_averaging(tmp_path: Path) -> None:
    left, right = sine(300, 1.0, SAMPLE_RATE, 0.6), sine(700, 1.0, SAMPLE_RATE, 0.2)
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "st.wav"), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 44100])
def test_other_rates_are_resampled_faithfully(tmp_path: Path, sr: int) -> None:
    path = tmp_path / f"s{sr}.wav"
    sf.write(str(path), sine(440, 1.0, sr), sr, subtype="FLOAT")
    loaded = load_audio(path)
    assert loaded.size == SAMPLE_RATE
    # Against the analytic signal and against scipy's polyphase resampler, away from the edges.
    inner = slice(800, -800)
    np.testing.assert_allclose(loaded[inner], sine(440, 1.0, SAMPLE_RATE)[inner], atol=2e-3)
    g = np.gcd(sr, SAMPLE_RATE)
    reference = signal.resample_poly(sine(440, 1.0, sr), SAMPLE_RATE // g, sr // g)
    np.testing.assert_allclose(loaded[inner], reference[inner], atol=2e-3)


def test_resample_is_identity_at_equal_rates() -> None:
    audio = sine(300, 0.1, SAMPLE_RATE)
    np.testing.assert_array_equal(resample(audio, SAMPLE_RATE, SAMPLE_RATE), audio)


def test_flac_reads_like_wav(tmp_path: Path) -> None:
    audio = sine(500, 1.0, SAMPLE_RATE)
    write_wav(tmp_path / "a.wav", audio)
    sf.write(str(tmp_path / "a.flac"), to_pcm16(audio), SAMPLE_RATE, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.flac"), load_audio(tmp_path / "a.wav"))


def test_crop_seconds_reads_only_the_start(tmp_path: Path) -> None:
    audio = sine(500, 3.0, SAMPLE_RATE)
    write_wav(tmp_path / "a.wav", audio)
    cropped = load_audio(tmp_path / "a.wav", crop_seconds=1.0, max_seconds=2.0)
    assert cropped.size == SAMPLE_RATE
    np.testing.assert_allclose(cropped, audio[:SAMPLE_RATE], atol=LSB)


def _assert_audio_error(path: Path, reason: str, **kwargs: object) -> None:
    with pytest.raises(AudioError, match=reason) as info:
        load_audio(path, **kwargs)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "text.wav").write_text("this is not audio")
    _assert_audio_error(tmp_path / "text.wav", "unreadable or not audio")
    with pytest.raises(AudioError, match="unreadable"):
        audio_info(tmp_path / "missing.wav")


def test_zero_length_file(tmp_path: Path) -> None:
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.int16), SAMPLE_RATE)
    _assert_audio_error(tmp_path / "empty.wav", "zero length")


def test_all_silent_file(tmp_path: Path) -> None:
    write_wav(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, dtype=np.float32))
    _assert_audio_error(tmp_path / "silent.wav", "all-silent")
    # Without validation the same file loads (a later step may want to report it itself).
    assert load_audio(tmp_path / "silent.wav", validate=False).size == SAMPLE_RATE


def test_too_short_file(tmp_path: Path) -> None:
    write_wav(tmp_path / "short.wav", sine(300, 0.3, SAMPLE_RATE))
    _assert_audio_error(tmp_path / "short.wav", "too short")
    assert load_audio(tmp_path / "short.wav", min_seconds=0.2).size == int(0.3 * SAMPLE_RATE)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sr", [SAMPLE_RATE, 8000])
def test_non_finite_samples(tmp_path: Path, bad: float, sr: int) -> None:
    audio = sine(300, 1.0, sr)
    audio[100] = bad
    sf.write(str(tmp_path / "nf.wav"), audio, sr, subtype="FLOAT")
    _assert_audio_error(tmp_path / "nf.wav", "NaN or Inf")


def test_too_long_file_is_refused_before_reading(tmp_path: Path) -> None:
    write_wav(tmp_path / "long.wav", sine(300, 2.0, SAMPLE_RATE))
    _assert_audio_error(tmp_path / "long.wav", "too long", max_seconds=1.0)


def test_list_audio_files_and_file_ids(tmp_path: Path) -> None:
    for rel in ("b.wav", "a/c.FLAC", "a/d.wav", "notes.txt", "a/e.mp3"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = list_audio_files(tmp_path)
    assert [file_id(p, tmp_path) for p in found] == ["a/c.FLAC", "a/d.wav", "b.wav"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_audio_files(tmp_path / "nope")
