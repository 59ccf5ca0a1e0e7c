"""Per-file engineered features for the recommender: the thesis' 9 CE/KL statistics and
`cekl_plus` (those 9 plus cheap non-intrusive descriptors), and the resumable folder run
that writes one float32 .npy per audio file plus FEAT/features.json.

CE/KL follows upstream.md section 1: power spectrogram with torchaudio `Spectrogram`
defaults (n_fft 1024, hop 512, periodic Hann, centred frames, reflect padding, power 2),
each frame normalised to a distribution over frequency, the cross-entropy matrix over all
frame pairs, KL = CE minus each row's own entropy (negatives to 0), then 9 statistics. All
of it runs in float64 and is stored as float32 (torchaudio works in float32; on a 20 s
clip the features from its float32 spectrogram agree with ours to about 1e-7 relative).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits
from tqdm.contrib.logging import logging_redirect_tqdm

from dnsmos.embedding import DnsmosEmbedder, embedding_names
from serec.audio import (
    SAMPLE_RATE,
    AudioError,
    Seconds,
    audio_info,
    file_id,
    list_audio_files,
    load_audio,
    resample,
)
from serec.fileio import RowLog, atomic_path, write_csv_atomic, write_json_atomic
from serec.lock import output_lock
from serec.parallel import Backend, ChunkJob, LocalBackend, WorkUnit, chunk_units, run_units

N_FFT = 1024
HOP_LENGTH = 512
EPS = 1e-10
DEFAULT_MAX_SECONDS: Seconds = 20.0
# Frame-power percentiles of the SNR estimate: the quietest frames stand for the noise
# floor (speech has pauses), the loudest for speech plus noise. P20 rather than P10: on
# 100 corpus mixtures with non-stationary noise it tracked the mixing SNR better
# (Pearson r 0.80 vs 0.72; see BENCHMARKS.md "Features").
SNR_NOISE_PERCENTILE = 20.0
SNR_SPEECH_PERCENTILE = 90.0
# Power floor of the SNR estimate (-100 dB re. the frame power unit): keeps digitally
# silent stretches from giving an infinite SNR.
SNR_POWER_FLOOR = 1e-10
# librosa's spectral_flatness `amin`: power floor so silent bins do not give log(0).
FLATNESS_AMIN = 1e-10

CEKL_FEATURE_NAMES: tuple[str, ...] = (
    "ce_diag_var",
    "ce_offdiag_mean",
    "ce_offdiag_var",
    "ce_adjacent_mean",
    "ce_adjacent_var",
    "kl_offdiag_mean",
    "kl_offdiag_var",
    "kl_adjacent_mean",
    "kl_adjacent_var",
)
DNSMOS_FEATURE_NAMES: tuple[str, ...] = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovr", "dnsmos_p808")
DESCRIPTOR_FEATURE_NAMES: tuple[str, ...] = (
    "snr_est_db",
    "spectral_flatness_mean",
    "spectral_flatness_std",
    "spectral_centroid_mean_hz",
    "spectral_centroid_std_hz",
    "duration_s",
)
EMBEDDING_NAMES: tuple[str, ...] = embedding_names()
FEATURES_JSON = "features.json"
ERRORS_CSV = "errors.csv"
ERROR_COLUMNS = ("file", "reason")

log = logging.getLogger(__name__)


class DnsmosScorer(Protocol):
    """What cekl_plus needs from a DNSMOS scorer: `score(audio, sr)` -> sig/bak/ovr/p808."""

    def score(self, audio: np.ndarray, sr: int) -> Mapping[str, float]: ...


class FeatureConfigError(ValueError):
    """An output folder already holds features computed with another set or parameters."""


# ---------------------------------------------------------------------------------------
# Spectrogram and CE/KL


def periodic_hann(n: int) -> np.ndarray:
    """torch.hann_window(n) (periodic=True): the DFT-even Hann window."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def spectrogram_power(
    audio: np.ndarray, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH
) -> np.ndarray:
    """Power spectrogram (n_fft // 2 + 1 bins, frames), float64, as torchaudio's Spectrogram.

    Frames are centred (the signal is reflect-padded by n_fft // 2 on each side), windowed
    with a periodic Hann window of length n_fft, one-sided, unnormalised, power 2. There
    are 1 + len(audio) // hop_length frames.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {x.shape}")
    pad = n_fft // 2
    # torch's reflect padding needs more samples than the pad; numpy would silently repeat.
    if x.size <= pad:
        raise ValueError(f"audio too short for the spectrogram: {x.size} samples, need > {pad}")
    padded = np.pad(x, pad, mode="reflect")
    frames = sliding_window_view(padded, n_fft)[::hop_length] * periodic_hann(n_fft)
    spectrum = np.fft.rfft(frames, axis=1)
    return (spectrum.real**2 + spectrum.imag**2).T


def frame_distributions(power: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Each frame (column) of a power spectrogram as a distribution over bins: (frames, bins).

    Frame sums below eps are replaced by 1 (so a silent frame stays all-zero), then
    P = S / (sum + eps), as the thesis does.
    """
    sums = power.sum(axis=0)
    sums = np.where(sums < eps, 1.0, sums)
    return (power / (sums + eps)).T


def ce_kl_matrices(power: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy and KL matrices over all frame pairs of a power spectrogram.

    CE[i, j] = -sum_f P_i(f) log2(P_j(f) + eps); KL = CE - diag(CE)[:, None] with
    negatives set to 0. Both (frames, frames), float64.
    """
    p = frame_distributions(np.asarray(power, dtype=np.float64), eps)
    ce = -(p @ np.log2(p + eps).T)
    kl = np.maximum(ce - np.diagonal(ce)[:, None], 0.0)
    return ce, kl


def _offdiag_mean_var(m: np.ndarray) -> tuple[float, float]:
    # Whole-matrix sums minus the diagonal's share: no boolean mask, no copy of the
    # n*(n-1) entries. Variance from squared deviations (not E[x^2] - mean^2) for accuracy.
    n = m.shape[0]
    count = n * (n - 1)
    diag = np.diagonal(m)
    mean = (m.sum() - diag.sum()) / count
    dev = m - mean
    diag_dev = diag - mean
    var = (np.vdot(dev, dev) - np.dot(diag_dev, diag_dev)) / count
    return float(mean), float(var)


def _adjacent_mean_var(m: np.ndarray) -> tuple[float, float]:
    adjacent = np.concatenate((np.diagonal(m, 1), np.diagonal(m, -1)))
    return float(adjacent.mean()), float(adjacent.var())


def _cekl_from_power(power: np.ndarray) -> np.ndarray:
    ce, kl = ce_kl_matrices(power)
    ce_off = _offdiag_mean_var(ce)
    ce_adj = _adjacent_mean_var(ce)
    kl_off = _offdiag_mean_var(kl)
    kl_adj = _adjacent_mean_var(kl)
    return np.array(
        [float(np.var(np.diagonal(ce))), *ce_off, *ce_adj, *kl_off, *kl_adj], dtype=np.float64
    )


def _as_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("audio contains NaN or Inf samples")
    return resample(x, sr, SAMPLE_RATE)


def cekl_features(audio: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The 9 CE/KL features (CEKL_FEATURE_NAMES order) of mono audio, float32, shape (9,).

    Other rates are resampled to 16 kHz first. The whole signal is used: crop long files
    before calling (the matrices are frames x frames, about 3 MB at 20 s).
    """
    return _cekl_from_power(spectrogram_power(_as_16k(audio, sr))).astype(np.float32)


# ---------------------------------------------------------------------------------------
# cekl_plus descriptors


def snr_estimate_db(power: np.ndarray) -> float:
    """Blind SNR estimate (dB) from frame powers: (P90 - P20) / P20 of the per-frame power.

    The 20th percentile of frame power (64 ms frames) stands for the noise floor (speech
    pauses), the 90th for speech plus noise. Coarse (it reads several dB high, and low for
    speech without pauses) but cheap and monotone in the true SNR. Powers are floored at
    SNR_POWER_FLOOR.
    """
    frame_power = power.sum(axis=0)
    noise = max(float(np.percentile(frame_power, SNR_NOISE_PERCENTILE)), SNR_POWER_FLOOR)
    loud = float(np.percentile(frame_power, SNR_SPEECH_PERCENTILE))
    return 10.0 * np.log10(max(loud - noise, SNR_POWER_FLOOR) / noise)


def spectral_flatness(power: np.ndarray) -> np.ndarray:
    """Per-frame spectral flatness (geometric / arithmetic mean of power), as librosa's."""
    floored = np.maximum(power, FLATNESS_AMIN)
    return np.exp(np.mean(np.log(floored), axis=0)) / np.mean(floored, axis=0)


def spectral_centroid_hz(power: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Per-frame magnitude-weighted mean frequency (Hz), as librosa's; 0 for silent frames."""
    magnitude = np.sqrt(power)
    n_fft = 2 * (power.shape[0] - 1)
    freqs = np.arange(power.shape[0]) * sr / n_fft
    sums = magnitude.sum(axis=0)
    safe = np.where(sums > 0, sums, 1.0)
    return np.where(sums > 0, (freqs @ magnitude) / safe, 0.0)


def _descriptors(power: np.ndarray, duration_s: float) -> np.ndarray:
    flatness = spectral_flatness(power)
    centroid = spectral_centroid_hz(power)
    return np.array(
        [
            snr_estimate_db(power),
            flatness.mean(),
            flatness.std(),
            centroid.mean(),
            centroid.std(),
            duration_s,
        ],
        dtype=np.float64,
    )


def build_dnsmos(num_threads: int | None = None) -> DnsmosScorer:
    """A `dnsmos.DNSMOS` scorer; RuntimeError (with the reason) when it cannot be had."""
    try:
        from dnsmos import DNSMOS
    except ImportError as exc:
        raise RuntimeError(
            f"feature set cekl_plus needs the project's dnsmos package ({exc})"
        ) from exc
    try:
        return DNSMOS(num_threads=num_threads)
    except Exception as exc:  # a missing or wrong model file: one clear line for the CLI
        raise RuntimeError(f"feature set cekl_plus: DNSMOS unavailable ({exc})") from exc


@cache
def default_dnsmos() -> DnsmosScorer:
    """One DNSMOS scorer per process (ONNX sessions are costly to build, cheap to reuse)."""
    return build_dnsmos()


@cache
def default_embedder() -> DnsmosEmbedder:
    """One DNSMOS embedder per process, on one onnxruntime thread (parallelism is per file)."""
    return DnsmosEmbedder(num_threads=1)


def _dnsmos_scores(audio: np.ndarray, scorer: DnsmosScorer) -> np.ndarray:
    scores = scorer.score(audio, SAMPLE_RATE)
    return np.array([scores[k] for k in ("sig", "bak", "ovr", "p808")], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# Feature sets


@dataclass(frozen=True)
class FeatureSet:
    """A named feature vector: its names in order, whether it needs DNSMOS, its parameters."""

    name: str
    names: tuple[str, ...]
    needs_dnsmos: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    # Append the DNSMOS network's internal activations (dnsmos.embedding).
    needs_embedding: bool = False


_CEKL_PARAMS = {
    "sample_rate": SAMPLE_RATE,
    "n_fft": N_FFT,
    "hop_length": HOP_LENGTH,
    "window": "hann_periodic",
    "center": True,
    "pad_mode": "reflect",
    "power": 2.0,
    "eps": EPS,
}

FEATURE_SETS: dict[str, FeatureSet] = {
    "cekl": FeatureSet("cekl", CEKL_FEATURE_NAMES, needs_dnsmos=False, params=_CEKL_PARAMS),
    "cekl_plus": FeatureSet(
        "cekl_plus",
        CEKL_FEATURE_NAMES + DNSMOS_FEATURE_NAMES + DESCRIPTOR_FEATURE_NAMES,
        needs_dnsmos=True,
        params={
            **_CEKL_PARAMS,
            "dnsmos": "dnsmos.DNSMOS() defaults on the (cropped) noisy input",
            "snr_est": f"frame power percentiles P{SNR_SPEECH_PERCENTILE:g} / "
            f"P{SNR_NOISE_PERCENTILE:g}, floor {SNR_POWER_FLOOR:g}",
            "flatness_amin": FLATNESS_AMIN,
            "duration": "whole file, before cropping",
        },
    ),
}
FEATURE_SETS["dnsmos_embed"] = FeatureSet(
    "dnsmos_embed",
    FEATURE_SETS["cekl_plus"].names + EMBEDDING_NAMES,
    needs_dnsmos=True,
    params={
        **FEATURE_SETS["cekl_plus"].params,
        "embedding": "dnsmos.embedding.DnsmosEmbedder: mean over DNSMOS windows of the P.835 "
        "network's global max pooling (64) and last hidden layer (64)",
    },
    needs_embedding=True,
)


def get_feature_set(feature_set: str) -> FeatureSet:
    try:
        return FEATURE_SETS[feature_set]
    except KeyError:
        raise ValueError(
            f"unknown feature set {feature_set!r}; choose from {sorted(FEATURE_SETS)}"
        ) from None


def feature_names(feature_set: str) -> list[str]:
    """The names of a feature set's vector entries, in vector order."""
    return list(get_feature_set(feature_set).names)


def extract_features(
    audio: np.ndarray,
    sr: int = SAMPLE_RATE,
    feature_set: str = "cekl",
    dnsmos: DnsmosScorer | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """One feature vector (float32, feature_names(feature_set) order) for mono audio.

    `dnsmos` is the scorer cekl_plus uses (default: one `dnsmos.DNSMOS()` per process).
    `duration_s` is the file's duration when `audio` was cropped (default: len / sr).
    """
    spec = get_feature_set(feature_set)
    x = _as_16k(audio, sr)
    power = spectrogram_power(x)
    parts = [_cekl_from_power(power)]
    if spec.needs_dnsmos:
        parts.append(_dnsmos_scores(x, dnsmos if dnsmos is not None else default_dnsmos()))
        parts.append(
            _descriptors(power, x.size / SAMPLE_RATE if duration_s is None else duration_s)
        )
    if spec.needs_embedding:
        parts.append(default_embedder().embed(x, SAMPLE_RATE))
    vector = np.concatenate(parts).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        bad = [n for n, v in zip(spec.names, vector, strict=True) if not np.isfinite(v)]
        raise ValueError(f"non-finite feature values: {', '.join(bad)}")
    return vector


def file_features(
    path: str | os.PathLike[str],
    feature_set: str = "cekl",
    max_seconds: Seconds | None = DEFAULT_MAX_SECONDS,
    dnsmos: DnsmosScorer | None = None,
) -> np.ndarray:
    """Feature vector of one audio file, reading only its first `max_seconds` (None: all).

    The same path the folder run takes, so inference computes exactly what training saw.
    Raises AudioError (file + reason) for unusable files.
    """
    duration_s = audio_info(path).duration
    audio = load_audio(path, crop_seconds=max_seconds)
    try:
        return extract_features(audio, SAMPLE_RATE, feature_set, dnsmos, duration_s=duration_s)
    except ValueError as exc:
        raise AudioError(path, str(exc)) from exc


# ---------------------------------------------------------------------------------------
# Folder run


def feature_path(output_root: str | os.PathLike[str], fid: str) -> Path:
    """Where a file id's vector lives: FEAT/<file id with its audio suffix replaced by .npy>."""
    return Path(output_root) / Path(fid).with_suffix(".npy")


def features_meta(feature_set: str, max_seconds: Seconds | None) -> dict[str, Any]:
    """The features.json content for a feature set and crop length."""
    spec = get_feature_set(feature_set)
    return {
        "names": list(spec.names),
        "feature_set": spec.name,
        "params": {**spec.params, "max_seconds": max_seconds},
    }


def read_features_meta(feat_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(feat_dir) / FEATURES_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run preprocess_features.py to create {feat_dir}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("names"), list):
        raise ValueError(f"{path}: no 'names' list; not a features.json")
    return meta


def _is_valid_vector(path: Path, size: int) -> bool:
    try:
        vector = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (
        vector.shape == (size,) and vector.dtype == np.float32 and bool(np.all(np.isfinite(vector)))
    )


@dataclass
class FeatureRunSummary:
    """What a folder run did; `files_per_s` counts only files computed in this run."""

    output_root: Path
    feature_set: str
    total: int
    done: int
    skipped: int
    errors: int
    seconds: float
    errors_csv: Path

    @property
    def files_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class _Job:
    fid: str
    source: Path
    target: Path


class _FeatureJob(ChunkJob[_Job]):
    """Compute and write the vectors of a chunk of files: (file id, None or the reason) each.

    The DNSMOS scorer (cekl_plus) travels with the job, so each process builds its ONNX
    sessions once, on first use, and keeps them for every chunk.
    """

    def __init__(self, feature_set: str, max_seconds: Seconds | None, dnsmos: DnsmosScorer | None,
                 output_root: Path) -> None:
        self.feature_set = feature_set
        self.max_seconds = max_seconds
        self.dnsmos = dnsmos
        self.output_root = output_root

    def writes_to(self) -> tuple[Path, ...]:
        return (self.output_root,)

    def process(self, unit: WorkUnit[_Job]) -> list[tuple[str, str | None]]:
        # Parallelism comes from --num_workers. A multi-threaded BLAS on these small matrices
        # (frames x frames, at most 626 x 626) was 2-20x slower on a busy 2-core machine.
        with threadpool_limits(1):
            return [self._compute(job) for job in unit.items]

    def failed(self, unit: WorkUnit[_Job], reason: str) -> list[tuple[str, str | None]]:
        return [(job.fid, reason) for job in unit.items]

    def _compute(self, job: _Job) -> tuple[str, str | None]:
        try:
            vector = file_features(job.source, self.feature_set, self.max_seconds, self.dnsmos)
            with atomic_path(job.target) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, vector, allow_pickle=False)
        except AudioError as exc:
            return job.fid, exc.reason
        except Exception as exc:  # one bad file must not stop the run; the reason is recorded
            return job.fid, f"{type(exc).__name__}: {exc}"
        return job.fid, None


def _list_inputs(input_root: Path, recursive: bool) -> list[Path]:
    if recursive:
        return list_audio_files(input_root)
    files = list_audio_files(input_root, recursive=False)
    nested = len(list_audio_files(input_root)) - len(files)
    if nested:
        log.warning(
            "%s: %d audio files in subfolders are not read (use --base_data_dir for those)",
            input_root,
            nested,
        )
    return files


def _check_existing_meta(output_root: Path, meta: dict[str, Any]) -> None:
    path = output_root / FEATURES_JSON
    if not path.exists():
        return
    try:
        existing = read_features_meta(output_root)
    except ValueError as exc:
        raise FeatureConfigError(f"{exc}; use --overwrite to recompute everything") from exc
    # Compare through JSON so tuples and lists, ints and floats compare as written.
    wanted = json.loads(json.dumps(meta))
    if existing != wanted:
        old_params, new_params = existing.get("params") or {}, wanted["params"]
        changes = [
            f"{key}: {old_params.get(key)!r} -> {new_params.get(key)!r}"
            for key in sorted(set(old_params) | set(new_params))
            if old_params.get(key) != new_params.get(key)
        ]
        if existing.get("feature_set") != wanted["feature_set"]:
            changes.insert(
                0, f"feature_set: {existing.get('feature_set')!r} -> {wanted['feature_set']!r}"
            )
        elif existing.get("names") != wanted["names"]:
            changes.insert(0, "feature names differ")
        raise FeatureConfigError(
            f"{path}: this folder holds features made with other settings "
            f"({'; '.join(changes)}); use --overwrite to recompute all files, "
            "or another output folder"
        )


def _remove_vectors(output_root: Path) -> None:
    # Vectors made with the old settings must not survive next to a features.json that
    # describes the new ones, including those of files no longer in the input.
    stale = list(output_root.rglob("*.npy"))
    for path in stale:
        path.unlink()
    log.warning("%s: removed %d vectors made with other feature settings", output_root, len(stale))


def run_feature_extraction(
    input_root: str | os.PathLike[str],
    output_root: str | os.PathLike[str],
    feature_set: str = "cekl",
    max_seconds: Seconds | None = DEFAULT_MAX_SECONDS,
    num_workers: int = 1,
    overwrite: bool = False,
    recursive: bool = True,
    progress: bool = True,
    backend: Backend | None = None,
) -> FeatureRunSummary:
    """Compute features for every .wav/.flac under `input_root` into `output_root`.

    Mirrors relative paths (FEAT/<file>.npy), writes FEAT/features.json first, skips files
    whose .npy is already a valid vector of the right length (unless `overwrite`), and
    refuses an output folder made with another feature set or parameters (with
    `overwrite`, its old .npy files are deleted and everything is recomputed). Unusable
    files are recorded in FEAT/errors.csv (file, reason; rewritten each run, so it lists
    the files that still fail) and the run goes on. Holds FEAT's lock for the run
    (OutputLocked if another run holds it); `backend` runs the work units (default:
    `num_workers` local processes).
    """
    spec = get_feature_set(feature_set)
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    input_root, output_root = Path(input_root), Path(output_root)
    sources = _list_inputs(input_root, recursive)
    meta = features_meta(feature_set, max_seconds)
    try:
        _check_existing_meta(output_root, meta)
        settings_changed = False
    except FeatureConfigError:
        if not overwrite:
            raise
        settings_changed = True
    workers = max(1, min(num_workers, len(sources)))
    with output_lock(output_root, "features"):
        return _extract_locked(
            input_root, output_root, sources, spec, meta, max_seconds, workers, overwrite,
            settings_changed, progress, backend or LocalBackend(workers),
        )


def _extract_locked(
    input_root: Path,
    output_root: Path,
    sources: list[Path],
    spec: FeatureSet,
    meta: dict[str, Any],
    max_seconds: Seconds | None,
    workers: int,
    overwrite: bool,
    settings_changed: bool,
    progress: bool,
    backend: Backend,
) -> FeatureRunSummary:
    # Built here so a missing package or model fails before the folder is touched; its
    # ONNX sessions are created on first use, in the process that scores.
    scorer = (
        build_dnsmos(num_threads=max(1, (os.cpu_count() or 1) // workers))
        if spec.needs_dnsmos
        else None
    )
    if settings_changed:
        _remove_vectors(output_root)
    write_json_atomic(output_root / FEATURES_JSON, meta)
    errors_csv = output_root / ERRORS_CSV
    write_csv_atomic(errors_csv, ERROR_COLUMNS, [])
    errors = RowLog(errors_csv, ERROR_COLUMNS)

    jobs: list[_Job] = []
    owners: dict[Path, str] = {}
    skipped = collisions = 0
    for source in sources:
        fid = file_id(source, input_root)
        target = feature_path(output_root, fid)
        if target in owners:
            errors.append([{"file": fid, "reason": f"same feature file as {owners[target]}"}])
            collisions += 1
            continue
        owners[target] = fid
        if not overwrite and _is_valid_vector(target, len(spec.names)):
            skipped += 1
        else:
            jobs.append(_Job(fid, source, target))

    started = time.perf_counter()
    failed = 0

    def record(_unit: WorkUnit[_Job], results: list[tuple[str, str | None]]) -> None:
        nonlocal failed
        for fid, reason in results:
            if reason is not None:
                errors.append([{"file": fid, "reason": reason}])
                log.warning("%s: %s", fid, reason)
                failed += 1

    # Small chunks keep the bar moving and every worker busy.
    units = chunk_units("features", jobs, max(1, min(8, len(jobs) // (4 * workers))))
    # Route warnings through tqdm so they do not break the progress bar.
    with logging_redirect_tqdm():
        run_units(_FeatureJob(spec.name, max_seconds, scorer, output_root), units, backend, record,
                  desc="features", show=progress)
    return FeatureRunSummary(
        output_root=output_root,
        feature_set=spec.name,
        total=len(sources),
        done=len(jobs) - failed,
        skipped=skipped,
        errors=failed + collisions,
        seconds=time.perf_counter() - started,
        errors_csv=errors_csv,
    )


def load_feature_matrix(
    feat_dir: str | os.PathLike[str], file_ids: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Stack the vectors of `file_ids` (rows in that order) from a features folder.

    Returns (float32 array [n, d], names). Raises FileNotFoundError naming the missing
    files, ValueError naming any vector whose length does not match features.json.
    """
    feat_dir = Path(feat_dir)
    names = [str(n) for n in read_features_meta(feat_dir)["names"]]
    paths = [feature_path(feat_dir, fid) for fid in file_ids]
    missing = [fid for fid, p in zip(file_ids, paths, strict=True) if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{feat_dir}: no feature vector for {len(missing)} of {len(file_ids)} files "
            f"({shown}); see {feat_dir / ERRORS_CSV} or run preprocess_features.py on their folder"
        )
    matrix = np.empty((len(paths), len(names)), dtype=np.float32)
    for row, path in enumerate(paths):
        try:
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{path}: unreadable feature vector ({exc})") from exc
        if vector.shape != (len(names),):
            raise ValueError(
                f"{path}: shape {vector.shape}, but {feat_dir / FEATURES_JSON} names "
                f"{len(names)} features; recompute with --overwrite"
            )
        matrix[row] = vector
    return matrix, names
