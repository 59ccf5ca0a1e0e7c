"""DNSMOS: parity with speechmos (the reference), window plan, P.808 features, inputs, models, CLI."""

from __future__ import annotations

import csv
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import speechmos.dnsmos

from dnsmos import DNSMOS, REFERENCE_COLUMNS, DnsmosModelError, find_model_files
from dnsmos.features import mel_filterbank, p808_features, run_samples
from dnsmos.models import REGULAR
from dnsmos.windows import plan_windows
from serec.audio import resample, write_wav
from serec.synth import NOISE_KINDS, speech_like

# These check the real models against speechmos and their own properties.
pytestmark = pytest.mark.real_dnsmos

TOLERANCE = 1e-4
KEYS = {"sig": "sig_mos", "bak": "bak_mos", "ovr": "ovrl_mos", "p808": "p808_mos"}


def noisy_speech(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    speech = speech_like(rng, seconds, sr)
    noise = NOISE_KINDS["pink"](rng, seconds)
    if sr != 16000:
        noise = resample(noise, 16000, sr)
    n = min(speech.size, noise.size)
    return np.clip(speech[:n] + 0.2 * noise[:n], -1, 1).astype(np.float32)


def reference(audio: np.ndarray, personalized: bool = False) -> dict[str, float]:
    model_type = "dnsmos_personalized" if personalized else "dnsmos"
    out = speechmos.dnsmos.run(audio, sr=16000, model_type=model_type)
    return {key: float(out[ref_key]) for key, ref_key in KEYS.items()}


def assert_close(ours: dict[str, float], ref: dict[str, float]) -> None:
    diffs = {k: abs(ours[k] - ref[k]) for k in KEYS}
    assert max(diffs.values()) <= TOLERANCE, (ours, ref)


@pytest.fixture(scope="module")
def scorer() -> DNSMOS:
    return DNSMOS()


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Short clips the reference tiles: 2.15 s -> 17.2 s (8 hops; the reference drops
    window 7 for being one sample short), 2.8 s -> 11.2 s (2 windows), 4.7 s -> 9.4 s (1)."""
    rng = np.random.default_rng(11)
    return [noisy_speech(rng, s) for s in (2.15, 2.8, 4.7)]


def _reference_starts(n: int) -> tuple[list[int], int]:
    # speechmos' loop, literally, on sample indices.
    audio = np.arange(n)
    while len(audio) < int(9.01 * 16000):
        audio = np.append(audio, audio)
    num_hops = int(np.floor(len(audio) / 16000) - 9.01) + 1
    starts = [
        int(i * 16000)
        for i in range(num_hops)
        if len(audio[int(i * 16000) : int((i + 9.01) * 16000)]) >= int(9.01 * 16000)
    ]
    return starts, num_hops


@pytest.mark.parametrize("n", [1, 1000, 72_079, 144_159, 144_160, 160_000, 17_200 * 16, 16_000 * 130])
def test_window_plan_matches_reference_loop(n: int) -> None:
    plan = plan_windows(n)
    starts, num_hops = _reference_starts(n)
    assert list(plan.starts) == starts
    assert plan.num_hops == num_hops


def test_window_plan_drops_the_windows_the_reference_drops() -> None:
    plan = plan_windows(16_000 * 130)
    dropped = sorted(set(range(plan.num_hops)) - {s // 16_000 for s in plan.starts})
    assert dropped == [*range(7, 24), 119, 120]


def test_p808_features_match_librosa() -> None:
    librosa = pytest.importorskip("librosa")
    assert np.allclose(mel_filterbank(), librosa.filters.mel(sr=16000, n_fft=321, n_mels=120), atol=1e-8)
    rng = np.random.default_rng(5)
    run = noisy_speech(rng, run_samples(3) / 16000 + 0.01)[: run_samples(3)]
    ours = p808_features(run, 3)
    for w in range(3):
        window = run[16000 * w : 16000 * w + 144160]
        mel = librosa.feature.melspectrogram(y=window[:-160], sr=16000, n_fft=321, hop_length=160, n_mels=120)
        expected = ((librosa.power_to_db(mel, ref=np.max) + 40) / 40).T
        assert np.abs(ours[w] - expected).max() < 1e-3


@pytest.mark.parametrize("personalized", [False, True])
def test_parity_with_speechmos(clips: list[np.ndarray], personalized: bool) -> None:
    ours = DNSMOS(personalized=personalized).score_batch(clips)
    for clip, score in zip(clips, ours, strict=True):
        assert_close(score, reference(clip, personalized))


def test_whole_window_path_and_short_runs_agree(scorer: DNSMOS, clips: list[np.ndarray]) -> None:
    shared = scorer.score(clips[1], 16000)
    assert_close(DNSMOS(share_windows=False).score(clips[1], 16000), shared)
    assert_close(DNSMOS(max_run_windows=1, batch_windows=1).score(clips[1], 16000), shared)


def test_batch_equals_one_by_one(scorer: DNSMOS, clips: list[np.ndarray]) -> None:
    batch = scorer.score_batch(clips[1:])
    for clip, score in zip(clips[1:], batch, strict=True):
        assert score == pytest.approx(scorer.score(clip, 16000), abs=1e-6)


@pytest.mark.parametrize("sr", [8000, 48000])
def test_other_rates_are_resampled(scorer: DNSMOS, sr: int) -> None:
    audio = noisy_speech(np.random.default_rng(sr), 4.7, sr)
    assert_close(scorer.score(audio, sr), reference(resample(audio, sr, 16000)))


def test_48k_scores_close_to_16k_original(scorer: DNSMOS) -> None:
    # Speech only: DNSMOS reacts to broadband noise near 8 kHz, which resampling trims.
    audio = speech_like(np.random.default_rng(3), 4.7)
    at_16k = scorer.score(audio, 16000)
    at_48k = scorer.score(resample(audio, 16000, 48000), 48000)
    assert max(abs(at_16k[k] - at_48k[k]) for k in KEYS) < 0.05


def test_stereo_is_downmixed(scorer: DNSMOS) -> None:
    rng = np.random.default_rng(4)
    left, right = noisy_speech(rng, 4.7), noisy_speech(rng, 4.7)
    stereo = np.stack([left, right], axis=1)  # (samples, channels), as soundfile reads it
    assert_close(scorer.score(stereo, 16000), reference(stereo.mean(axis=1).astype(np.float32)))
    with pytest.raises(ValueError, match="samples, channels"):
        scorer.score(stereo.T, 16000)


def test_bad_input_raises(scorer: DNSMOS) -> None:
    with pytest.raises(ValueError, match="empty"):
        scorer.score(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="clip 1: .*NaN"):
        scorer.score_batch([np.zeros(16000, np.float32), np.full(16000, np.nan, np.float32)])


def test_raw_values_and_hops(scorer: DNSMOS) -> None:
    audio = noisy_speech(np.random.default_rng(8), 4.7)  # tiled to 9.4 s: one window
    result = scorer.score_clips([audio])[0]
    assert result.num_hops == 1 and result.len_in_sec == pytest.approx(audio.size / 16000)
    assert result.ovr == pytest.approx(np.polyval(REGULAR.ovr_poly, result.ovr_raw))
    assert result.sig == pytest.approx(np.polyval(REGULAR.sig_poly, result.sig_raw))


def test_pickled_scorer_rebuilds_sessions(scorer: DNSMOS, clips: list[np.ndarray]) -> None:
    expected = scorer.score(clips[2], 16000)
    clone = pickle.loads(pickle.dumps(scorer))
    assert clone._sessions is None
    assert clone.score(clips[2], 16000) == pytest.approx(expected, abs=1e-6)


def _link_models(target: Path, layout: dict[str, Path]) -> None:
    for relative, source in layout.items():
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).symlink_to(source)


def test_model_dir_layouts_and_errors(tmp_path: Path) -> None:
    regular, personalized = find_model_files(False), find_model_files(True)
    microsoft = tmp_path / "DNS-Challenge"
    _link_models(
        microsoft,
        {
            "DNSMOS/sig_bak_ovr.onnx": regular.primary,
            "DNSMOS/model_v8.onnx": regular.p808,
            "pDNSMOS/sig_bak_ovr.onnx": personalized.primary,
        },
    )
    assert find_model_files(True, microsoft).primary == microsoft / "pDNSMOS/sig_bak_ovr.onnx"
    assert find_model_files(False, microsoft).p808 == microsoft / "DNSMOS/model_v8.onnx"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DnsmosModelError) as err:
        DNSMOS(model_dir=empty)
    assert str(empty / "DNSMOS" / "sig_bak_ovr.onnx") in str(err.value)
    assert "speechmos" in str(err.value)

    swapped = tmp_path / "swapped"
    _link_models(swapped, {"sig_bak_ovr.onnx": regular.p808, "model_v8.onnx": regular.p808})
    with pytest.raises(DnsmosModelError, match="not the expected DNSMOS model"):
        DNSMOS(model_dir=swapped).score(np.zeros(16000, np.float32), 16000)

    garbage = tmp_path / "garbage"
    _link_models(garbage, {"model_v8.onnx": regular.p808})
    (garbage / "sig_bak_ovr.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(DnsmosModelError, match="cannot be read as an ONNX model"):
        DNSMOS(model_dir=garbage).score(np.zeros(16000, np.float32), 16000)


def test_cli_writes_reference_columns(tmp_path: Path, scorer: DNSMOS) -> None:
    rng = np.random.default_rng(9)
    audio_dir = tmp_path / "audio"
    clips = {"a.wav": noisy_speech(rng, 4.7), "sub/b.wav": noisy_speech(rng, 2.4)}
    for name, audio in clips.items():
        write_wav(audio_dir / name, audio)
    (audio_dir / "broken.wav").write_bytes(b"not a wav file")
    out = tmp_path / "scores.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "dnsmos", str(audio_dir), "--csv", str(out), "--num_workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert "broken.wav" in proc.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
        assert tuple(rows[0].keys()) == REFERENCE_COLUMNS
    assert [Path(r["filename"]).relative_to(audio_dir).as_posix() for r in rows] == ["a.wav", "sub/b.wav"]
    for row, name in zip(rows, clips, strict=True):
        expected = scorer.score_clips([pytest.importorskip("soundfile").read(audio_dir / name, dtype="float32")[0]])[0]
        assert int(row["num_hops"]) == expected.num_hops and int(row["sr"]) == 16000
        assert float(row["OVRL"]) == pytest.approx(expected.ovr, abs=1e-6)
        assert float(row["P808_MOS"]) == pytest.approx(expected.p808, abs=1e-6)
        assert float(row["SIG_raw"]) == pytest.approx(expected.sig_raw, abs=1e-6)


def test_only_the_known_primary_graph_is_split() -> None:
    import onnx

    from dnsmos.models import split_primary

    files = find_model_files(False)
    assert split_primary(onnx.load(str(files.primary))) is not None
    assert split_primary(onnx.load(str(files.p808))) is None


def test_model_folder_from_the_environment_unless_one_is_passed(
    tiny_dnsmos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dnsmos.models import MODEL_DIR_ENV

    bundled = find_model_files(False)
    monkeypatch.setenv(MODEL_DIR_ENV, str(tiny_dnsmos_dir))
    assert find_model_files(False).primary == tiny_dnsmos_dir / "DNSMOS" / "sig_bak_ovr.onnx"
    assert DNSMOS().files.p808 == tiny_dnsmos_dir / "DNSMOS" / "model_v8.onnx"
    assert find_model_files(False, bundled.primary.parent.parent).primary == bundled.primary
    monkeypatch.setenv(MODEL_DIR_ENV, str(tiny_dnsmos_dir / "nowhere"))
    with pytest.raises(DnsmosModelError, match="nowhere"):
        find_model_files(False)
