"""Score audio files and folders to the reference script's CSV, optionally in worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dnsmos.scorer import DNSMOS, REFERENCE_COLUMNS
from serec.audio import list_audio_files
from serec.fileio import write_csv_atomic

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


_worker_scorer: DNSMOS | None = None


def _init_worker(scorer: DNSMOS) -> None:
    global _worker_scorer
    _worker_scorer = scorer


def _score_in_worker(paths: list[str], validate: bool) -> list[dict[str, Any]]:
    assert _worker_scorer is not None, "worker used before _init_worker"
    return _worker_scorer.score_files(paths, validate=validate)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


def score_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    personalized: bool = False,
    model_dir: str | os.PathLike[str] | None = None,
    num_workers: int = 1,
    num_threads: int | None = None,
    progress: bool = True,
    validate: bool = True,
) -> list[dict[str, Any]]:
    """One row per file, in order: reference columns, or {'filename', 'error'} for a bad file.

    `validate`: silent, too short (< 0.5 s) and non-finite files are bad files, as in
    every other step; False scores every readable file.

    With num_workers > 1 each worker process scores its share of the files with its own
    ONNX sessions and, unless num_threads is given, cpu_count // num_workers threads.
    """
    files, rows = collect_paths(paths)
    names = [str(f) for f in files]
    if num_workers > 1 and num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // num_workers)
    scorer = DNSMOS(personalized=personalized, num_threads=num_threads, model_dir=model_dir)
    # Small tasks keep every worker busy; up to FILES_PER_TASK files share ONNX calls.
    per_task = max(1, min(FILES_PER_TASK, -(-len(names) // max(1, num_workers))))
    chunks = list(_chunks(names, per_task))
    bar = tqdm(total=len(names), desc="DNSMOS", unit="file", disable=not progress)
    if num_workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(num_workers, initializer=_init_worker, initargs=(scorer,)) as pool:
            for chunk_rows in pool.map(partial(_score_in_worker, validate=validate), chunks):
                rows.extend(chunk_rows)
                bar.update(len(chunk_rows))
    else:
        for chunk in chunks:
            rows.extend(scorer.score_files(chunk, validate=validate))
            bar.update(len(chunk))
    bar.close()
    return rows


def write_reference_csv(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """The reference CSV (filename, len_in_sec, sr, num_hops, raw and MOS columns), atomically."""
    return write_csv_atomic(path, REFERENCE_COLUMNS, [r for r in rows if "error" not in r])
