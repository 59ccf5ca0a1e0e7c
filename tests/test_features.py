"""CE/KL and cekl_plus features against direct formulas and librosa; the folder run and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest

from serec.audio import load_audio, resample, write_wav
from serec.feature_files import FeatureConfigError, load_feature_matrix, run_feature_extraction
from serec.features import (
    CEKL_FEATURE_NAMES,
    FEATURE_SETS,
    ce_kl_matrices,
    cekl_features,
    extract_features,
    feature_names,
    file_features,
    snr_estimate_db,
    spectral_centroid_hz,
    spectral_flatness,
    spectrogram_power,
)
from serec.synth import coloured_noise, speech_like

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "preprocess_features.py"


def _clip(rng: np.random.Generator) -> np.ndarray:
    """Speech, a stretch of digital silence (all-zero frames), then noise: about 1 s."""
    return np.concatenate(
        [speech_like(rng, 0.4), np.zeros(4000, np.float32), coloured_noise(rng, 0.35, 1.0)]
    )


def _direct_power(audio: np.ndarray, n_fft: int = 1024, hop: int = 512) -> np.ndarray:
    """Frame by frame with an explicit DFT matrix: centred, reflect-padded, periodic Hann."""
    x = np.pad(audio.astype(np.float64), n_fft // 2, mode="reflect")
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n_fft // 2 + 1), n) / n_fft)
    n_frames = 1 + audio.size // hop
    out = np.empty((n_fft // 2 + 1, n_frames))
    for t in range(n_frames):
        out[:, t] = np.abs(dft @ (x[t * hop : t * hop + n_fft] * window)) ** 2
    return out


def _loop_cekl(power: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """The upstream.md section 1 definition written out with a double loop over frames."""
    n_bins, n_frames = power.shape
    p = np.empty((n_frames, n_bins))
    for t in range(n_frames):
        total = power[:, t].sum()
        if total < eps:
            total = 1.0
        p[t] = power[:, t] / (total + eps)
    ce = np.empty((n_frames, n_frames))
    for i in range(n_frames):
        for j in range(n_frames):
            ce[i, j] = -np.sum(p[i] * np.log2(p[j] + eps))
    kl = ce - np.diag(ce)[:, None]
    kl[kl < 0] = 0.0
    off = ~np.eye(n_frames, dtype=bool)

    def stats(m: np.ndarray) -> list[float]:
        adjacent = np.concatenate([np.diag(m, 1), np.diag(m, -1)])
        return [m[off].mean(), np.var(m[off]), adjacent.mean(), np.var(adjacent)]

    return np.array([np.var(np.diag(ce)), *stats(ce), *stats(kl)])


def test_spectrogram_matches_direct_framing_and_librosa(rng: np.random.Generator) -> None:
    audio = _clip(rng)
    power = spectrogram_power(audio)
    assert power.shape == (513, 1 + audio.size // 512)
    scale = power.max()
    np.testing.assert_allclose(power, _direct_power(audio), rtol=0, atol=1e-9 * scale)
    reference = (
        np.abs(
            librosa.stft(
                audio.astype(np.float64),
                n_fft=1024,
                hop_length=512,
                window="hann",
                center=True,
                pad_mode="reflect",
            )
        )
        ** 2
    )
    np.testing.assert_allclose(power, reference, rtol=0, atol=1e-9 * scale)


def test_spectrogram_matches_torch_stft(rng: np.random.Generator) -> None:
    # torchaudio's Spectrogram is torch.stft with these defaults (torchaudio is not installable).
    torch = pytest.importorskip("torch")
    audio = _clip(rng)
    reference = torch.stft(
        torch.from_numpy(audio.astype(np.float64)), 1024, 512,
        window=torch.hann_window(1024, dtype=torch.float64), center=True, pad_mode="reflect",
        normalized=False, onesided=True, return_complex=True,
    ).abs().pow(2).numpy()  # fmt: skip
    power = spectrogram_power(audio)
    np.testing.assert_allclose(power, reference, rtol=0, atol=1e-12 * power.max())


def test_spectrogram_rejects_too_short_audio() -> None:
    with pytest.raises(ValueError, match="too short"):
        spectrogram_power(np.ones(512))


def test_cekl_matches_double_loop_definition(rng: np.random.Generator) -> None:
    audio = _clip(rng)
    power = _direct_power(audio)
    assert (power.sum(axis=0) < 1e-10).any(), "the clip should contain all-zero frames"
    expected = _loop_cekl(power)
    got = cekl_features(audio)
    assert got.dtype == np.float32 and got.shape == (9,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    ce, kl = ce_kl_matrices(power)
    assert np.all(kl >= 0) and np.all(np.diagonal(kl) == 0)
    assert np.all(np.isfinite(ce))


def test_cekl_resamples_other_rates(rng: np.random.Generator) -> None:
    audio_8k = speech_like(rng, 1.0, sr=8000)
    np.testing.assert_allclose(
        cekl_features(audio_8k, 8000), cekl_features(resample(audio_8k, 8000, 16000)), rtol=1e-6
    )


def test_feature_names_and_order() -> None:
    assert CEKL_FEATURE_NAMES == (
        "ce_diag_var", "ce_offdiag_mean", "ce_offdiag_var", "ce_adjacent_mean",
        "ce_adjacent_var", "kl_offdiag_mean", "kl_offdiag_var", "kl_adjacent_mean",
        "kl_adjacent_var",
    )  # fmt: skip
    assert feature_names("cekl") == list(CEKL_FEATURE_NAMES)
    plus = feature_names("cekl_plus")
    assert plus[:9] == list(CEKL_FEATURE_NAMES) and len(plus) == len(set(plus)) == 19
    assert {"dnsmos_sig", "dnsmos_bak", "dnsmos_ovr", "dnsmos_p808", "snr_est_db",
            "duration_s"} <= set(plus)  # fmt: skip
    assert set(FEATURE_SETS) == {"cekl", "cekl_plus", "dnsmos_embed"}
    with pytest.raises(ValueError, match="unknown feature set"):
        feature_names("mfcc")


class _FixedScores:
    """Stand-in scorer with distinct values, to check where each DNSMOS score lands."""

    def score(self, audio: np.ndarray, sr: int) -> dict[str, float]:
        return {"sig": 3.1, "bak": 2.2, "ovr": 2.7, "p808": 3.4}


def test_cekl_plus_layout_and_descriptors(rng: np.random.Generator) -> None:
    audio = speech_like(rng, 2.0) + coloured_noise(rng, 2.0, 0.0) * 0.05
    vector = extract_features(audio, 16000, "cekl_plus", dnsmos=_FixedScores(), duration_s=7.5)
    named = dict(zip(feature_names("cekl_plus"), vector.tolist(), strict=True))
    assert vector.dtype == np.float32
    np.testing.assert_allclose(vector[:9], cekl_features(audio), rtol=1e-6)
    assert [named[k] for k in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovr", "dnsmos_p808")] == (
        pytest.approx([3.1, 2.2, 2.7, 3.4])
    )
    assert named["duration_s"] == 7.5
    power = spectrogram_power(audio)
    magnitude = np.sqrt(power)
    flatness = librosa.feature.spectral_flatness(S=magnitude, power=2.0)[0]
    centroid = librosa.feature.spectral_centroid(S=magnitude, sr=16000, n_fft=1024)[0]
    np.testing.assert_allclose(spectral_flatness(power), flatness, rtol=1e-6)
    np.testing.assert_allclose(spectral_centroid_hz(power), centroid, rtol=1e-6)
    assert named["spectral_centroid_mean_hz"] == pytest.approx(centroid.mean(), rel=1e-5)
    assert named["spectral_flatness_std"] == pytest.approx(flatness.std(), rel=1e-5)


def test_snr_estimate_rises_with_true_snr(rng: np.random.Generator) -> None:
    speech = speech_like(rng, 4.0)
    noise = coloured_noise(rng, 4.0, 1.0)
    noise = noise / np.sqrt(np.mean(noise**2))
    estimates = []
    for snr_db in (0, 10, 20):
        gain = np.sqrt(np.mean(speech**2) / 10 ** (snr_db / 10))
        estimates.append(snr_estimate_db(spectrogram_power(speech + gain * noise)))
    assert estimates[0] < estimates[1] < estimates[2]


@pytest.mark.real_dnsmos
def test_cekl_plus_folder_run_with_real_dnsmos(tmp_path: Path, rng: np.random.Generator) -> None:
    dnsmos = pytest.importorskip("dnsmos")
    data, feat = tmp_path / "noisy", tmp_path / "feat"
    for name, seconds in (("a.wav", 1.5), ("sub/b.wav", 2.5)):
        write_wav(data / name, speech_like(rng, seconds) + 0.05 * coloured_noise(rng, seconds))
    # Two workers: the scorer reaches them through the pool initializer.
    summary = run_feature_extraction(
        data, feat, "cekl_plus", max_seconds=2.0, num_workers=2, progress=False
    )
    assert (summary.done, summary.errors) == (2, 0)
    matrix, names = load_feature_matrix(feat, ["a.wav", "sub/b.wav"])
    assert names == feature_names("cekl_plus") and matrix.shape == (2, 19)
    named = dict(zip(names, matrix[1].tolist(), strict=True))
    head = load_audio(data / "sub/b.wav", crop_seconds=2.0)
    expected = dnsmos.DNSMOS().score(head, 16000)
    for key in ("sig", "bak", "ovr", "p808"):
        assert named[f"dnsmos_{key}"] == pytest.approx(expected[key], abs=1e-5)
    assert named["duration_s"] == pytest.approx(2.5)  # the whole file, not the crop
    np.testing.assert_allclose(matrix[1, :9], cekl_features(head), rtol=1e-6)


def test_file_features_crops_to_max_seconds(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "long.wav"
    write_wav(path, speech_like(rng, 3.0))
    head = load_audio(path)[:16000]
    np.testing.assert_allclose(file_features(path, max_seconds=1.0), cekl_features(head), rtol=1e-6)
    assert not np.allclose(file_features(path, max_seconds=None), cekl_features(head))


def _make_input(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    clips = {
        "a.wav": speech_like(rng, 1.0),
        "sub/b.wav": speech_like(rng, 1.5) + 0.02 * coloured_noise(rng, 1.5, 1.0),
        "sub/deeper/c.wav": speech_like(rng, 0.8),
    }
    for name, audio in clips.items():
        write_wav(root / name, audio)
    (root / "sub" / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    return clips


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_end_to_end_resume_and_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    data, feat = tmp_path / "noisy", tmp_path / "feat"
    clips = _make_input(data, rng)
    result = _run_cli("--base_data_dir", str(data), "--output_base_dir", str(feat),
                      "--num_workers", "2")  # fmt: skip
    assert result.returncode == 3, result.stderr  # the corrupt file failed (partial)
    assert "3 computed, 0 already done, 1 failed of 4 files" in result.stdout
    meta = json.loads((feat / "features.json").read_text())
    assert meta["names"] == list(CEKL_FEATURE_NAMES) and meta["feature_set"] == "cekl"
    assert meta["params"]["max_seconds"] == 20.0 and meta["params"]["n_fft"] == 1024
    errors = (feat / "errors.csv").read_text().splitlines()
    assert errors[0] == "file,reason" and errors[1].startswith("sub/corrupt.wav,")
    for name in clips:
        vector = np.load(feat / Path(name).with_suffix(".npy"))
        np.testing.assert_allclose(vector, file_features(data / name), rtol=1e-6)
    assert (feat / "run.json").is_file()

    matrix, names = load_feature_matrix(feat, ["sub/deeper/c.wav", "a.wav"])
    assert matrix.shape == (2, 9) and names == list(CEKL_FEATURE_NAMES)
    np.testing.assert_array_equal(matrix[1], np.load(feat / "a.npy"))
    with pytest.raises(FileNotFoundError, match="sub/corrupt.wav"):
        load_feature_matrix(feat, ["a.wav", "sub/corrupt.wav"])

    # Resume: valid vectors are kept untouched, a truncated one is recomputed.
    kept = feat / "a.npy"
    stamp = kept.stat().st_mtime_ns
    broken = feat / "sub" / "b.npy"
    broken.write_bytes(broken.read_bytes()[:20])
    result = _run_cli("--base_data_dir", str(data), "--output_base_dir", str(feat))
    assert "1 computed, 2 already done, 1 failed of 4 files" in result.stdout, result.stdout
    assert kept.stat().st_mtime_ns == stamp
    np.testing.assert_allclose(np.load(broken), file_features(data / "sub/b.wav"), rtol=1e-6)

    # Other settings into the same folder: refused, then recomputed with --overwrite.
    result = _run_cli("--base_data_dir", str(data), "--output_base_dir", str(feat),
                      "--max_seconds", "0.5")  # fmt: skip
    assert result.returncode == 2 and "max_seconds: 20.0 -> 0.5" in result.stderr
    (data / "sub" / "corrupt.wav").unlink()
    result = _run_cli("--input_dir", str(data), "--output_base_dir", str(feat),
                      "--max_seconds", "0.5", "--overwrite")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "1 computed, 0 already done, 0 failed of 1 files" in result.stdout
    assert sorted(p.name for p in feat.rglob("*.npy")) == ["a.npy"]  # old vectors removed
    assert json.loads((feat / "features.json").read_text())["params"]["max_seconds"] == 0.5


def test_run_refuses_another_feature_set(tmp_path: Path, rng: np.random.Generator) -> None:
    data, feat = tmp_path / "noisy", tmp_path / "feat"
    write_wav(data / "x.wav", speech_like(rng, 1.0))
    summary = run_feature_extraction(data, feat, progress=False)
    assert (summary.done, summary.skipped, summary.errors) == (1, 0, 0)
    with pytest.raises(FeatureConfigError, match="feature_set: 'cekl' -> 'cekl_plus'"):
        run_feature_extraction(data, feat, feature_set="cekl_plus")
    (feat / "x.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="x.npy"):
        load_feature_matrix(feat, ["x.wav"])


def test_load_feature_matrix_without_features_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="features.json"):
        load_feature_matrix(tmp_path, ["a.wav"])
