"""Score audio files and folders to the reference script's CSV, optionally in worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dnsmos.scorer import DNSMOS, REFERENCE_COLUMNS
from serec.audio import list_audio_files
from serec.fileio import write_csv_atomic
from serec.parallel import Backend, ChunkJob, LocalBackend, WorkUnit, chunk_units, run_units

FILES_PER_TASK = 8


def collect_paths(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files given directly plus .wav/.flac found under folders; rows for paths that don't exist."""
    found: list[Path] = []
    missing: list[dict[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(list_audio_files(path))
        elif path.is_file():
            found.append(path)
        else:
            missing.append({"filename": str(path), "error": "no such file or folder"})
    return found, missing


class _ScoringJob(ChunkJob[str]):
    """Score a chunk of files; each process keeps its ONNX sessions for every chunk."""

    def __init__(self, scorer: DNSMOS, validate: bool) -> None:
        self.scorer = scorer
        self.validate = validate

    def setup(self, threads: int | None) -> None:
        # A worker beside others (a Ray actor) with no thread count given would let
        # onnxruntime take every core in each of them.
        if threads == 1 and self.scorer.num_threads is None:
            self.scorer.num_threads = 1

    def process(self, unit: WorkUnit[str]) -> list[dict[str, Any]]:
        return self.scorer.score_files(unit.items, validate=self.validate)

    def failed(self, unit: WorkUnit[str], reason: str) -> list[dict[str, Any]]:
        return [{"filename": path, "error": reason} for path in unit.items]


def score_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    personalized: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    num_workers: int = 1,
    num_threads: int | None = None,
    progress: bool = True,
    validate: bool = True,
    backend: Backend | None = None,
) -> list[dict[str, Any]]:
    """One row per file, in order: reference columns, or {'filename', 'error'} for a bad file.

    `validate`: silent, too short (< 0.5 s) and non-finite files are bad files, as in
    every other step; False scores every readable file.

    With num_workers > 1 each worker process scores its share of the files with its own
    ONNX sessions and, unless num_threads is given, cpu_count // num_workers threads; a
    file that crashes its worker gets an error row. `backend` runs the work units
    (default: `num_workers` local worker processes).
    """
    files, rows = collect_paths(paths)
    names = [str(f) for f in files]
    if num_workers > 1 and num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // num_workers)
    scorer = DNSMOS(personalized=personalized, num_threads=num_threads, model_dir=model_dir)
    # Small tasks keep every worker busy; up to FILES_PER_TASK files share ONNX calls.
    per_task = max(1, min(FILES_PER_TASK, -(-len(names) // max(1, num_workers))))
    scored: dict[str, dict[str, Any]] = {}

    def record(unit: WorkUnit[str], unit_rows: list[dict[str, Any]]) -> None:
        scored.update(zip(unit.items, unit_rows, strict=True))

    run_units(_ScoringJob(scorer, validate), chunk_units("dnsmos", names, per_task),
              backend or LocalBackend(num_workers), record, desc="DNSMOS", show=progress)
    return rows + [scored[name] for name in names]


def write_reference_csv(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """The reference CSV (filename, len_in_sec, sr, num_hops, raw and MOS columns), atomically."""
    return write_csv_atomic(path, REFERENCE_COLUMNS, [r for r in rows if "error" not in r])
