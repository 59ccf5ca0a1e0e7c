"""Mixing: active-speech SNR, noise looping/cropping, clip guard, splits, and whole runs."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from serec.audio import PCM16_SCALE, SAMPLE_RATE, active_mask, load_audio, write_wav
from serec.mixing import (
    METADATA_COLUMNS,
    MixingConfig,
    MixingError,
    compile_speaker_regex,
    mixture_name,
    run_mixing,
    speaker_of,
    split_speakers,
)
from serec.snr_mixing import (
    CLIP_PEAK,
    active_snr_db,
    crossfade_length,
    loop_noise,
    mix_at_snr,
    noise_segment,
    noise_usable_under_speech,
)
from serec.synth import NOISE_KINDS, coloured_noise, speech_like


def reference_active_snr_db(clean: np.ndarray, noise: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """The activity rule written out frame by frame: 20 ms frames, 30 dB below the 95th pct."""
    step = int(0.02 * sr)
    starts = range(0, len(clean), step)
    energies = [10 * math.log10(np.mean(clean[s : s + step] ** 2, dtype=np.float64) + 1e-20)
                for s in starts]
    threshold = np.percentile(energies, 95) - 30
    signal_energy = noise_energy = 0.0
    for start, energy in zip(starts, energies, strict=True):
        if energy > threshold:
            signal_energy += float(np.sum(clean[start : start + step].astype(np.float64) ** 2))
            noise_energy += float(np.sum(noise[start : start + step].astype(np.float64) ** 2))
    return 10 * math.log10(signal_energy / noise_energy)


def speech_with_pauses(rng: np.random.Generator, seconds: float = 2.5) -> np.ndarray:
    """Speech-like signal with a 0.5 s digital-silence pause at each end."""
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    return np.concatenate([pause, speech_like(rng, seconds - 1.0), pause])


# ---------------------------------------------------------------- activity and SNR


def test_active_mask_marks_speech_not_pauses(rng: np.random.Generator) -> None:
    clean = speech_with_pauses(rng)
    mask = active_mask(clean)
    assert mask.shape == clean.shape and mask.dtype == bool
    assert not mask[: SAMPLE_RATE // 2].any() and not mask[-SAMPLE_RATE // 2 :].any()
    # speech_like has its own gaps between syllables, so only part of the middle is active.
    assert 0.2 < mask[SAMPLE_RATE // 2 : -SAMPLE_RATE // 2].mean() < 0.9
    frame = int(0.02 * SAMPLE_RATE)
    energies = np.array([np.mean(clean[s : s + frame] ** 2) for s in range(0, clean.size, frame)])
    loud = np.repeat(energies > 0.1 * energies.max(), frame)[: clean.size]
    assert mask[loud].all()  # everything within 10 dB of the loudest frame is speech
    np.testing.assert_array_equal(active_mask(clean * 1e-3), mask)  # level-independent


@pytest.mark.parametrize("length", [SAMPLE_RATE, SAMPLE_RATE + 123])
def test_active_snr_matches_frame_by_frame_reference(rng: np.random.Generator, length: int) -> None:
    clean = np.resize(speech_with_pauses(rng), length)
    noise = coloured_noise(rng, length / SAMPLE_RATE, 1.0)[:length]
    assert active_snr_db(clean, noise) == pytest.approx(reference_active_snr_db(clean, noise), abs=1e-9)


def test_active_snr_ignores_pauses_unlike_global_snr(rng: np.random.Generator) -> None:
    clean = speech_with_pauses(rng, 3.0)
    noise = 0.01 * rng.standard_normal(clean.size)
    global_snr = 10 * math.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(noise**2))
    assert active_snr_db(clean, noise) > global_snr + 1.0
    assert active_snr_db(clean, np.zeros_like(clean)) == math.inf


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 7.5, 20.0])
@pytest.mark.parametrize("kind", ["white", "babble", "hum"])
def test_mix_hits_the_target_snr_and_level(rng: np.random.Generator, snr_db: float, kind: str) -> None:
    clean = speech_with_pauses(rng)
    noise = NOISE_KINDS[kind](rng, clean.size / SAMPLE_RATE)[: clean.size]
    mixture = mix_at_snr(clean, noise, snr_db, target_level_db=-28.0)
    assert abs(mixture.measured_snr_db - snr_db) < 0.05
    assert reference_active_snr_db(mixture.clean, mixture.noise) == pytest.approx(
        mixture.measured_snr_db, abs=1e-6
    )
    # noisy is exactly clean + noise on the 16-bit grid.
    pcm = {name: np.round(getattr(mixture, name).astype(np.float64) * PCM16_SCALE).astype(int)
           for name in ("clean", "noise", "noisy")}
    np.testing.assert_array_equal(pcm["noisy"], pcm["clean"] + pcm["noise"])
    if not mixture.clipped:
        level = 10 * math.log10(np.mean(mixture.clean[active_mask(clean)].astype(np.float64) ** 2))
        assert level == pytest.approx(-28.0, abs=0.01)
    assert max(np.max(np.abs(getattr(mixture, n))) for n in ("clean", "noise", "noisy")) <= CLIP_PEAK + 1e-4


def test_clip_guard_scales_everything_together(rng: np.random.Generator) -> None:
    clean = speech_with_pauses(rng)
    noise = NOISE_KINDS["impulsive"](rng, clean.size / SAMPLE_RATE)[: clean.size]
    mixture = mix_at_snr(clean, noise, -5.0, target_level_db=-10.0)
    assert mixture.clipped
    assert np.max(np.abs(mixture.noisy)) == pytest.approx(CLIP_PEAK, abs=1e-4)
    assert abs(mixture.measured_snr_db + 5.0) < 0.05
    quiet = mix_at_snr(clean, NOISE_KINDS["pink"](rng, 2.5)[: clean.size], 20.0, target_level_db=-35.0)
    assert not quiet.clipped


def test_mix_rejects_mismatched_or_silent_noise(rng: np.random.Generator) -> None:
    clean = speech_with_pauses(rng)
    with pytest.raises(ValueError, match="samples"):
        mix_at_snr(clean, np.ones(10), 0.0)
    with pytest.raises(ValueError, match="silence"):
        mix_at_snr(clean, np.zeros(clean.size), 0.0)


# ---------------------------------------------------------------- noise segments


def test_long_noise_is_cropped_at_a_random_offset(rng: np.random.Generator) -> None:
    noise = rng.standard_normal(3 * SAMPLE_RATE)
    offsets = set()
    for _ in range(5):
        segment, offset = noise_segment(noise, SAMPLE_RATE, rng)
        assert 0 <= offset <= 2 * SAMPLE_RATE
        np.testing.assert_array_equal(segment, noise[offset : offset + SAMPLE_RATE])
        offsets.add(offset)
    assert len(offsets) == 5


def test_short_noise_is_looped_with_a_crossfade(rng: np.random.Generator) -> None:
    noise = rng.standard_normal(SAMPLE_RATE)
    length = int(3.3 * SAMPLE_RATE)
    segment, offset = noise_segment(noise, length, rng)
    crossfade = crossfade_length(noise.size)
    assert crossfade == int(0.05 * SAMPLE_RATE)
    period = noise.size - crossfade
    assert segment.shape == (length,) and 0 <= offset < period
    # Outside the crossfades the loop is the noise itself, read from the offset.
    position = (offset + np.arange(length)) % period
    plain = position >= crossfade
    np.testing.assert_array_equal(segment[plain], noise[position[plain]])
    # Equal-power fades keep uncorrelated noise at its level through every seam.
    fades = segment[~plain]
    assert np.mean(fades**2) == pytest.approx(np.mean(noise**2), rel=0.15)


def test_looped_noise_has_no_jump_at_the_seam() -> None:
    # A 1 s tone of 100.25 Hz ends at a peak: plain tiling would jump from 1 to 0.
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * 100.25 * t)
    max_step = 2 * np.pi * 100.25 / SAMPLE_RATE
    assert np.max(np.abs(np.diff(np.tile(tone, 3)))) > 10 * max_step
    looped = loop_noise(tone, 3 * SAMPLE_RATE, offset=1234, crossfade=crossfade_length(tone.size))
    assert np.max(np.abs(np.diff(looped))) < 1.5 * max_step
    with pytest.raises(ValueError, match="crossfade"):
        loop_noise(tone, 10, 0, crossfade=0)


def test_noise_that_is_silent_under_the_speech_is_not_usable(rng: np.random.Generator) -> None:
    clean = speech_with_pauses(rng)
    mask = active_mask(clean)
    noise = rng.standard_normal(clean.size)
    assert noise_usable_under_speech(noise, mask)
    noise[mask] = 0.0
    assert not noise_usable_under_speech(noise, mask)
    noise[mask] = 1e-4 * rng.standard_normal(int(mask.sum()))  # -80 dB re the rest
    assert not noise_usable_under_speech(noise, mask)


# ---------------------------------------------------------------- speakers and names


def test_speaker_regex() -> None:
    pattern = compile_speaker_regex(r"^[^_]+_([^_]+)_")
    assert speaker_of(Path("/x/so762_spk0001_000010095.wav"), pattern) == "spk0001"
    with pytest.raises(MixingError, match="does not match --speaker_regex") as info:
        speaker_of(Path("/x/nounderscore.wav"), pattern)
    assert info.value.path == "/x/nounderscore.wav"
    for bad in (r"^([^_]+)_([^_]+)", r"^[^_]+", r"(unclosed"):
        with pytest.raises(ValueError, match="speaker_regex"):
            compile_speaker_regex(bad)


def test_split_is_speaker_disjoint_deterministic_and_sized() -> None:
    speakers = [f"spk{i:02d}" for i in range(20)] * 3
    split = split_speakers(speakers, 0.2, seed=5)
    assert sorted(split) == sorted(set(speakers))
    assert sum(v == "test" for v in split.values()) == 4
    assert split == split_speakers(reversed(speakers), 0.2, seed=5)
    assert split != split_speakers(speakers, 0.2, seed=6)
    assert set(split_speakers(speakers, 0.0, 1).values()) == {"train"}
    assert set(split_speakers(speakers, 1.0, 1).values()) == {"test"}
    # Tiny corpora still get both splits.
    assert sorted(split_speakers(["a", "b"], 0.1, 1).values()) == ["test", "train"]


def test_mixture_names_are_filesystem_safe() -> None:
    name = mixture_name(Path("my clean (take 2).wav"), Path("café noise.flac"), -5.0, 7)
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name)
    assert name.endswith("__snr-5_00007.wav")
    assert mixture_name(Path("a.wav"), Path("b.wav"), 7.25, 123456) == "a__b__snr+7.25_123456.wav"


def test_config_rejects_bad_flags(tmp_path: Path) -> None:
    base = {"clean_dir": [tmp_path], "noise_dir": [tmp_path], "output_dir": tmp_path / "o"}
    for bad, message in [
        ({"snr_range": (10.0, 0.0)}, "LO <= HI"),
        ({"snr_levels": ()}, "at least one"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"num_workers": 0}, "num_workers"),
        ({"num_mixtures": 0}, "num_mixtures"),
        ({"target_level_jitter": -1.0}, "jitter"),
        ({"speaker_regex": "no group"}, "capture groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            MixingConfig(**base, **bad)


# ---------------------------------------------------------------- whole runs


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_output_matches_the_contract(speech_noise_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    out = tmp_path / "out"
    summary = run_mixing(MixingConfig(
        clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=out, num_mixtures=9,
        snr_range=(-5.0, 20.0), target_level_jitter=3.0, seed=3, test_fraction=0.34,
        save_noise=True,
    ))
    assert (summary.made, summary.skipped, summary.exit_status) == (9, [], 0)
    with open(out / "metadata.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == METADATA_COLUMNS
    rows = read_csv(out / "metadata.csv")
    assert len(rows) == 9 and read_csv(out / "skipped.csv") == []
    assert (out / "run.json").is_file()
    clean_files = sorted(clean_dir.iterdir())
    for index, row in enumerate(rows):
        # Clean files are used in sorted order, cycling.
        assert row["clean_source"] == str(clean_files[index % len(clean_files)])
        assert row["speaker"] == Path(row["clean_source"]).name.split("_")[1]
        assert row["file"].endswith(f"_{index:05d}.wav") and row["seed"] == "3"
        assert -5.0 <= float(row["snr_db"]) <= 20.0
        assert -28.0 <= float(row["target_level_db"]) <= -22.0
        noisy = load_audio(out / "noisy" / row["file"])
        clean = load_audio(out / "clean" / row["file"])
        noise = load_audio(out / "noise" / row["file"])
        assert noisy.size == clean.size == noise.size == sf.info(row["clean_source"]).frames
        np.testing.assert_allclose(noisy, clean + noise, atol=1e-6)
        measured = reference_active_snr_db(clean, noise)
        assert measured == pytest.approx(float(row["measured_snr_db"]), abs=2e-4)
        assert abs(measured - float(row["snr_db"])) < 0.05
        noise_seconds = sf.info(row["noise_source"]).duration
        assert 0.0 <= float(row["noise_offset_s"]) < noise_seconds
    by_split: dict[str, set[str]] = {"train": set(), "test": set()}
    for row in rows:
        by_split[row["split"]].add(row["speaker"])
    assert by_split["train"] and by_split["test"] and not by_split["train"] & by_split["test"]


def test_output_does_not_depend_on_workers_or_reruns(
    speech_noise_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    hashes = []
    for name, workers in (("w1", 1), ("w2", 2), ("w1", 1)):
        run_mixing(MixingConfig(
            clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=tmp_path / name,
            num_mixtures=10, seed=11, num_workers=workers, save_noise=True,
        ))
        hashes.append(tree_hashes(tmp_path / name))
    assert len(hashes[0]) == 3 * 10 + 2  # noisy/clean/noise + metadata.csv + skipped.csv
    assert hashes[0] == hashes[1] == hashes[2]
    other_seed = run_mixing(MixingConfig(
        clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=tmp_path / "s12",
        num_mixtures=10, seed=12,
    ))
    assert [r["file"] for r in other_seed.rows] != [
        r["file"] for r in read_csv(tmp_path / "w1" / "metadata.csv")
    ]


def test_bad_sources_are_skipped_recorded_and_the_run_goes_on(
    speech_noise_dirs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    (clean_dir / "tiny_spk0009_0000.wav").write_bytes(b"RIFF garbage")
    write_wav(clean_dir / "tiny_spk0009_0001.wav", np.zeros(SAMPLE_RATE, dtype=np.float32))
    write_wav(clean_dir / "tiny_spk0009_0002.wav", speech_like(np.random.default_rng(0), 0.3))
    write_wav(clean_dir / "oddname.wav", speech_like(np.random.default_rng(1), 1.0))
    nan_noise = np.ones(SAMPLE_RATE, dtype=np.float32)
    nan_noise[5] = np.nan
    sf.write(str(noise_dir / "nan.wav"), nan_noise, SAMPLE_RATE, subtype="FLOAT")

    out = tmp_path / "out"
    summary = run_mixing(MixingConfig(
        clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=out, seed=1, num_workers=2,
    ))
    reasons = {Path(r["file"]).name: (r["role"], r["reason"]) for r in read_csv(out / "skipped.csv")}
    assert reasons == {
        "tiny_spk0009_0000.wav": ("clean", reasons["tiny_spk0009_0000.wav"][1]),
        "tiny_spk0009_0001.wav": ("clean", "all-silent (peak at or below -80 dBFS)"),
        "tiny_spk0009_0002.wav": ("clean", reasons["tiny_spk0009_0002.wav"][1]),
        "oddname.wav": ("clean", reasons["oddname.wav"][1]),
        "nan.wav": ("noise", "contains NaN or Inf samples"),
    }
    assert reasons["tiny_spk0009_0000.wav"][1].startswith("unreadable or not audio")
    assert reasons["tiny_spk0009_0002.wav"][1].startswith("too short")
    assert "does not match --speaker_regex" in reasons["oddname.wav"][1]
    assert "oddname.wav" in caplog.text and "nan.wav" in caplog.text
    # The six good clean files are each mixed once, only with good noise.
    rows = read_csv(out / "metadata.csv")
    assert len(rows) == summary.made == summary.requested == 6
    assert not any("nan.wav" in r["noise_source"] or "spk0009" in r["file"] for r in rows)
    assert summary.exit_status == 3


def test_nothing_to_mix_is_reported(speech_noise_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    clean_dir, _ = speech_noise_dirs
    silent_noise = tmp_path / "silent_noise"
    write_wav(silent_noise / "zeros.wav", np.zeros(SAMPLE_RATE, dtype=np.float32))
    summary = run_mixing(MixingConfig(
        clean_dir=[clean_dir], noise_dir=[silent_noise], output_dir=tmp_path / "out",
    ))
    assert summary.made == 0 and summary.exit_status == 2
    assert read_csv(tmp_path / "out" / "metadata.csv") == []
    assert [r["role"] for r in read_csv(tmp_path / "out" / "skipped.csv")] == ["noise"]


def test_noise_test_fraction_keeps_test_noises_out_of_training(
    speech_noise_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    clean_dir, noise_dir = speech_noise_dirs
    summary = run_mixing(MixingConfig(
        clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=tmp_path / "out", num_mixtures=24,
        seed=4, test_fraction=0.34, noise_test_fraction=0.34,
    ))
    assert summary.exit_status == 0
    noises: dict[str, set[str]] = {"train": set(), "test": set()}
    speakers: dict[str, set[str]] = {"train": set(), "test": set()}
    for row in summary.rows:
        noises[row["split"]].add(row["noise_source"])
        speakers[row["split"]].add(row["speaker"])
    assert noises["train"] and noises["test"] and not noises["train"] & noises["test"]
    assert not speakers["train"] & speakers["test"]
    # Without the flag every recording serves both splits, as before the flag existed.
    shared = run_mixing(MixingConfig(
        clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=tmp_path / "shared", num_mixtures=24,
        seed=4, test_fraction=0.34,
    ))
    used = {split: {r["noise_source"] for r in shared.rows if r["split"] == split} for split in ("train", "test")}
    assert used["train"] & used["test"]
    with pytest.raises(ValueError, match="noise_test_fraction"):
        MixingConfig(clean_dir=[clean_dir], noise_dir=[noise_dir], output_dir=tmp_path, noise_test_fraction=1.5)
