"""Untrusted inputs (issue 15): file ids and model names that would escape their folders,
broken symlinks in input folders, and the one validation rule of every step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serec.audio import write_wav
from serec.fileio import UnsafeFileId, check_file_id
from serec.synth import speech_like

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def write_speech(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    return write_wav(path, speech_like(np.random.default_rng(seed), seconds))


@pytest.mark.parametrize("fid", ["../outside.wav", "a/../../outside.wav", "/etc/passwd", "C:\\x.wav", "a\\..\\b", ""])
def test_unsafe_file_ids_are_refused_naming_the_csv(fid: str) -> None:
    with pytest.raises(UnsafeFileId, match="labels.csv: file id"):
        check_file_id(fid, "labels.csv")


def test_safe_file_ids_pass_unchanged() -> None:
    for fid in ("a.wav", "spk1/utt 1.wav", "a..b.wav", "x:y.wav"):
        assert check_file_id(fid, "labels.csv") == fid


def test_recommender_refuses_label_ids_outside_audio_dir(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    for i in range(4):
        write_speech(audio / f"set_spk{i}_0.wav", seed=i)
    write_speech(tmp_path / "outside.wav")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({
        "file": [f"set_spk{i}_0.wav" for i in range(4)] + ["../outside.wav"],
        "label": ["webrtc", "speex", "webrtc", "speex", "webrtc"],
    }).to_csv(labels, index=False)
    out = tmp_path / "rec"
    done = run_script("model_recommender_w_scaler.py", "--training_stage", "single", "--labels_csv", labels,
                      "--output_dir", out, "--audio_dir", audio, "--pretrained_models", "none",
                      "--n_folds", "2", "--num_epochs", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{labels}: file id '../outside.wav' contains '..'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.npy")) and not list(out.rglob("*.npy"))


def test_training_metadata_and_split_links_refuse_escaping_ids(tmp_path: Path) -> None:
    from serec.pipeline import PipelineError, split_folders
    from serec.recommender.errors import RecommenderError
    from serec.recommender.folds import file_groups

    metadata = tmp_path / "mixtures" / "metadata.csv"
    metadata.parent.mkdir()
    pd.DataFrame({"file": ["a.wav", "/abs/b.wav"], "speaker": ["s1", "s2"],
                  "split": ["train", "test"]}).to_csv(metadata, index=False)
    with pytest.raises(RecommenderError, match="'/abs/b.wav' is an absolute path"):
        file_groups(["a.wav"], metadata)
    with pytest.raises(PipelineError, match="'/abs/b.wav' is an absolute path"):
        split_folders(metadata.parent, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_strategy_comparison_refuses_escaping_label_ids(tmp_path: Path) -> None:
    from serec.strategies import read_enhancement_scores

    labels = tmp_path / "labels.csv"
    labels.write_text("file,label,best_model,best_ovr,webrtc_ovr\n../x.wav,webrtc,webrtc,3.0,3.0\n")
    (tmp_path / "scores.csv").write_text("file,system,status\n")
    with pytest.raises(UnsafeFileId, match="'../x.wav' contains '..'"):
        read_enhancement_scores(labels)


@pytest.mark.parametrize("name", ["../victim", "/abs/model", "a\\b", ".", "=HYPERLINK(1)", "-x"])
def test_path_or_formula_like_model_names_are_refused(tmp_path: Path, name: str) -> None:
    from serec.enhancers import ModelsConfigError, load_models_config

    config = tmp_path / "models.toml"
    config.write_text(f'["{name}"]\ntype = "webrtc"\n'.replace("\\", "\\\\"))
    with pytest.raises(ModelsConfigError, match=f"{config}: model name"):
        load_models_config(config)


def test_overwrite_with_a_path_like_model_name_deletes_nothing(tmp_path: Path) -> None:
    noisy = tmp_path / "noisy"
    write_speech(noisy / "a.wav")
    out = tmp_path / "out"
    victim = out / "victim"
    (victim / "keep.txt").parent.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    config = tmp_path / "models.toml"
    config.write_text('["../victim"]\ntype = "webrtc"\n')
    done = run_script("enhancement_driver.py", "--noisy_dir", noisy, "--output_dir", out, "--models",
                      "../victim", "--models_config", config, "--overwrite")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model name [../victim] is empty or path-like" in done.stderr
    assert (victim / "keep.txt").read_text() == "precious"


def bad_folder(root: Path) -> Path:
    """good.wav, an all-silent file, a 0.1 s file and a broken symbolic link."""
    write_speech(root / "good.wav")
    write_wav(root / "silent.wav", np.zeros(16000, np.float32))
    write_speech(root / "short.wav", seconds=0.1)
    (root / "broken.wav").symlink_to(root / "gone.wav")
    return root


def test_a_broken_symlink_is_listed_and_reported(tmp_path: Path) -> None:
    from serec.audio import AudioError, list_audio_files, load_audio

    folder = bad_folder(tmp_path / "in")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.wav").symlink_to(tmp_path / "nowhere.wav")
    assert [p.name for p in list_audio_files(folder)] == ["broken.wav", "good.wav", "short.wav", "silent.wav",
                                                          "deep.wav"]
    assert "deep.wav" not in [p.name for p in list_audio_files(folder, recursive=False)]
    with pytest.raises(AudioError, match=f"broken symbolic link \\(its target {tmp_path / 'in' / 'gone.wav'}"):
        load_audio(folder / "broken.wav")


def test_enhancement_driver_prints_the_failed_files_and_reasons(tmp_path: Path) -> None:
    noisy = bad_folder(tmp_path / "noisy")
    done = run_script("enhancement_driver.py", "--noisy_dir", noisy, "--output_dir", tmp_path / "out",
                      "--models", "none")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "failed: 3 file(s), 6 (file, system) pair(s)" in done.stderr
    assert "broken.wav [noisy, none]: broken symbolic link" in done.stderr
    assert "short.wav [noisy, none]: too short: 0.100 s" in done.stderr
    assert "silent.wav [noisy, none]: all-silent" in done.stderr


def test_dnsmos_cli_applies_the_validation_rule_of_every_step(tmp_path: Path) -> None:
    folder = bad_folder(tmp_path / "in")

    def dnsmos(*flags: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        out = tmp_path / "dnsmos.csv"
        done = subprocess.run([sys.executable, "-m", "dnsmos", str(folder), "--csv", str(out), *flags],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        return done, sorted(Path(f).name for f in pd.read_csv(out).filename)

    done, scored = dnsmos()
    assert done.returncode == 3 and scored == ["good.wav"]
    for name, reason in [("silent", "all-silent"), ("short", "too short"), ("broken", "broken symbolic link")]:
        assert f"skipped {folder / name}.wav: {reason}" in done.stderr
    done, scored = dnsmos("--score_anyway")
    assert done.returncode == 3 and scored == ["good.wav", "short.wav", "silent.wav"]
    assert "broken symbolic link" in done.stderr


def test_dnsmos_timing_is_measured_once_per_set_of_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serec import strategies

    files = [write_speech(tmp_path / f"f{i}.wav", seed=i) for i in range(2)]
    cache = tmp_path / "out" / strategies.DNSMOS_TIMING_JSON
    first = strategies.measure_dnsmos_seconds_per_file(files, cache=cache)
    assert first > 0 and cache.is_file()

    timed: list[int] = []
    monkeypatch.setattr(strategies, "_time_dnsmos", lambda sample: timed.append(len(sample)) or 0.5)
    assert strategies.measure_dnsmos_seconds_per_file(files, cache=cache) == first  # a re-run: not re-timed
    assert timed == []
    write_speech(files[1], seconds=2.0, seed=9)  # what was timed changed: measured again
    assert strategies.measure_dnsmos_seconds_per_file(files, cache=cache) == 0.5 and timed == [2]
    assert strategies.measure_dnsmos_seconds_per_file(files[:1], cache=cache) == 0.5 and timed == [2, 1]


def test_clipped_input_and_mp3_bytes_in_a_wav_are_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    import soundfile as sf

    from serec.audio import load_audio

    tone = 0.3 * np.sin(2 * np.pi * 200 * np.arange(32000) / 16000)
    sf.write(tmp_path / "clipped.wav", np.clip(4 * tone, -1, 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "coded.mp3", tone, 16000, format="MP3")
    os.replace(tmp_path / "coded.mp3", tmp_path / "coded.wav")
    sf.write(tmp_path / "fine.wav", tone, 16000)
    with caplog.at_level("WARNING", logger="serec.audio"):
        for name in ("clipped.wav", "coded.wav", "fine.wav"):
            assert load_audio(tmp_path / name).size >= 31000
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"{tmp_path / 'clipped.wav'}: clipped input: ")
    assert messages[1].startswith(f"{tmp_path / 'coded.wav'}: MP3 data in a .wav file")
