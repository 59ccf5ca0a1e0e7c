"""The demo's embedded corpus, its train/test split folders and its step runner (the full demo is not a test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serec.audio import SAMPLE_RATE, audio_info, list_audio_files, load_audio
from serec.demo import (
    DEMO_NOISES,
    ESPEAK_SPEAKERS,
    DemoError,
    EspeakSpeaker,
    build_corpus,
    espeak_available,
    espeak_utterance,
)
from serec.mixing import MixingConfig, compile_speaker_regex, run_mixing, speaker_of
from serec.pipeline import COMMANDS, PipelineError, run_command, split_folders

DEFAULT_SPEAKER_REGEX = compile_speaker_regex(r"^[^_]+_([^_]+)_")
needs_espeak = pytest.mark.skipif(
    not espeak_available(), reason="espeak-ng not installed (Debian package espeak-ng; `make system-deps`)"
)


def _speakers(clean_dir: Path) -> set[str]:
    return {speaker_of(p, DEFAULT_SPEAKER_REGEX) for p in list_audio_files(clean_dir)}


def test_synth_corpus_names_noises_and_reuse(tmp_path: Path) -> None:
    content = build_corpus(tmp_path, speech="synth", utterances_per_speaker=2, seed=3)
    clean = list_audio_files(tmp_path / "clean")
    assert content["clean_files"] == len(clean) == 2 * len(ESPEAK_SPEAKERS)
    assert len(_speakers(tmp_path / "clean")) == len(ESPEAK_SPEAKERS)
    noises = list_audio_files(tmp_path / "noise")
    assert sorted(p.stem for p in noises) == sorted(f"synth_{kind}" for kind in DEMO_NOISES)
    for path in clean + noises:
        assert audio_info(path).samplerate == SAMPLE_RATE
        load_audio(path)  # valid: not silent, long enough, finite

    # Same recipe: reused untouched; another recipe: refused rather than mixed with the old files.
    stamps = {p: p.stat().st_mtime_ns for p in clean}
    assert build_corpus(tmp_path, speech="synth", utterances_per_speaker=2, seed=3) == content
    assert {p: p.stat().st_mtime_ns for p in clean} == stamps
    with pytest.raises(DemoError, match="other settings"):
        build_corpus(tmp_path, speech="synth", utterances_per_speaker=2, seed=4)


def test_espeak_required_but_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not espeak_available()
    with pytest.raises(DemoError, match="apt-get install espeak-ng"):
        build_corpus(tmp_path / "corpus", speech="espeak")
    # auto falls back to synthetic speech (with a printed note) instead of stopping
    assert build_corpus(tmp_path / "corpus", speech="auto", utterances_per_speaker=1)["recipe"]["speech"] == "synth"


@needs_espeak
def test_espeak_corpus_voices_are_distinct_speakers(tmp_path: Path) -> None:
    content = build_corpus(tmp_path, speech="espeak", utterances_per_speaker=1, seed=0)
    assert content["recipe"]["speech"] == "espeak"
    clean = list_audio_files(tmp_path / "clean")
    assert len(clean) == len(ESPEAK_SPEAKERS)
    assert all(p.name.startswith("espeak_") for p in clean)
    assert _speakers(tmp_path / "clean") == {s.name for s in ESPEAK_SPEAKERS}
    durations = [audio_info(p).frames / audio_info(p).samplerate for p in clean]
    assert all(audio_info(p).samplerate == SAMPLE_RATE for p in clean)
    assert 1.0 < min(durations) and max(durations) < 8.0


@needs_espeak
def test_espeak_rate_and_pitch_change_the_voice() -> None:
    text = "The kettle boiled while we were still talking."
    slow = espeak_utterance(text, EspeakSpeaker("en", 50, 120))
    fast = espeak_utterance(text, EspeakSpeaker("en", 50, 200))
    assert slow.size > 1.3 * fast.size  # words per minute
    low, high = (espeak_utterance(text, EspeakSpeaker("en", p, 160)) for p in (10, 90))
    assert _median_f0(high) > 1.3 * _median_f0(low)
    assert np.max(np.abs(slow)) > 0.05


def _median_f0(audio: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """Autocorrelation pitch (60-400 Hz) of the loudest 40 ms frames."""
    frames = audio[: audio.size // 640 * 640].reshape(-1, 640)
    loud = frames[np.sum(frames**2, axis=1) >= np.quantile(np.sum(frames**2, axis=1), 0.7)]
    lags = np.arange(sr // 400, sr // 60)
    f0 = []
    for frame in loud:
        corr = np.correlate(frame, frame, mode="full")[frame.size - 1 :]
        f0.append(sr / lags[np.argmax(corr[lags])])
    return float(np.median(f0))


def test_split_folders_link_each_split_and_follow_metadata(
    speech_noise_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    clean, noise = speech_noise_dirs
    mixtures = tmp_path / "mixtures"
    run_mixing(MixingConfig(clean_dir=(clean,), noise_dir=(noise,), output_dir=mixtures,
                            num_mixtures=9, seed=1, test_fraction=0.34))
    metadata = pd.read_csv(mixtures / "metadata.csv")
    counts = split_folders(mixtures, tmp_path)
    assert counts == metadata.split.value_counts().to_dict()
    for split in ("train", "test"):
        expected = sorted(metadata[metadata.split == split].file)
        for kind in ("noisy", "clean"):
            folder = tmp_path / split / kind
            assert sorted(p.name for p in folder.iterdir()) == expected
            for fid in expected:
                assert (folder / fid).is_symlink()
                assert (folder / fid).read_bytes() == (mixtures / kind / fid).read_bytes()
        assert sorted(pd.read_csv(tmp_path / split / "metadata.csv").file) == expected
    assert not set(os.listdir(tmp_path / "train" / "noisy")) & set(os.listdir(tmp_path / "test" / "noisy"))

    # A link the metadata no longer lists is removed on a re-run.
    stale = tmp_path / "train" / "noisy" / "old.wav"
    stale.symlink_to(mixtures / "noisy" / metadata.file.iloc[0])
    split_folders(mixtures, tmp_path)
    assert not stale.exists() and not stale.is_symlink()


def test_run_command_stops_on_a_failed_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PipelineError, match="exit status 2"):
        run_command("features", ["--input_dir", tmp_path / "missing", "--output_base_dir", tmp_path / "f"])
    assert "$ python preprocess_features.py --input_dir" in capsys.readouterr().out


def test_every_step_runs_without_the_scripts_by_path() -> None:
    # The pipeline imports each command's main from the package, so it runs from an
    # installed serec too; the scripts at the top level are only shims around the same main.
    import importlib

    repo = Path(__file__).resolve().parents[1]
    for command in COMMANDS.values():
        assert callable(importlib.import_module(command.module).main)
        if command.script.startswith("-m "):  # a module run as python -m, no shim
            assert command.script == f"-m {command.module}"
            continue
        shim = (repo / command.script).read_text()
        assert f"from {command.module} import main" in shim


def test_demo_cli_wants_both_corpus_folders(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serec.demo", "--output_dir", str(tmp_path), "--clean_dir", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "give both --clean_dir and --noise_dir" in result.stderr
