"""Step 3's files: one float32 .npy per audio file plus FEAT/features.json (names in vector
order, feature set, parameters) and FEAT/errors.csv, the resumable folder run that writes
them, and their readers."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.contrib.logging import logging_redirect_tqdm

from serec.audio import AudioError, Seconds, file_id, list_audio_files
from serec.features import (
    DEFAULT_MAX_SECONDS,
    DnsmosScorer,
    FeatureSet,
    build_dnsmos,
    file_features,
    get_feature_set,
)
from serec.fileio import RowLog, atomic_path, write_csv_atomic, write_json_atomic
from serec.lock import output_lock
from serec.parallel import Backend, ChunkJob, LocalBackend, WorkUnit, chunk_units, run_units

FEATURES_JSON = "features.json"
ERRORS_CSV = "errors.csv"
ERROR_COLUMNS = ("file", "reason")

log = logging.getLogger(__name__)


class FeatureConfigError(ValueError):
    """An output folder already holds features computed with another set or parameters."""


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
