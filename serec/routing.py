"""Route each noisy file to its recommended model: a copy in OUT/rec_<LABEL>/, enhanced into
OUT/rec_<LABEL>/enhanced/ by the routed enhancer (All_Failed: the fallback model).
"""

from __future__ import annotations

import filecmp
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from serec.audio import (
    SAMPLE_RATE,
    AudioError,
    audio_info,
    file_id,
    list_audio_files,
    load_audio,
    write_wav,
)
from serec.enhancers import EnhancementError, Enhancer, create_enhancer
from serec.fileio import RowLog, atomic_path, csv_text, write_text_atomic
from serec.labels import ALL_FAILED
from serec.parallel import use_single_thread

# The recommendation step's output folder (OUT): these names are its layout.
REC_PREFIX = "rec_"
ENHANCED_DIR = "enhanced"
ROUTING_CSV = "routing.csv"
RECOMMENDATIONS_CSV = "recommendations.csv"
RECOMMENDER_JSON = "recommender.json"
ROUTING_COLUMNS = ["file", "recommendation", "routed_model", "status", "error", "seconds", "duration_s"]
# The registry's passthrough enhancer: `--fallback_model none` keeps the noisy input.
KEEP_NOISY = "none"


@dataclass(frozen=True)
class Route:
    """One file's routing: its recommendation (a model or All_Failed) and the model that runs."""

    file: str
    recommendation: str
    routed_model: str


def rec_folder_name(label: str) -> str:
    """`rec_<LABEL>`; whitespace becomes `_` (a thesis-style `All Failed` -> `rec_All_Failed`)."""
    name = "_".join(str(label).split())
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"label {label!r} cannot name a rec folder")
    return REC_PREFIX + name


def label_from_folder(name: str) -> str:
    if not name.startswith(REC_PREFIX) or len(name) == len(REC_PREFIX):
        raise ValueError(f"{name!r} is not a rec_<LABEL> folder")
    return name[len(REC_PREFIX) :]


def routed_model_for(recommendation: str, fallback_model: str) -> str:
    """The enhancer a recommendation runs: the recommended model, or the fallback for All_Failed."""
    return fallback_model if recommendation == ALL_FAILED else recommendation


def find_rec_folders(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Every `OUT/rec_<LABEL>/` folder, label -> path, sorted by label."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: not a directory")
    folders = {
        label_from_folder(p.name): p
        for p in out_dir.iterdir()
        if p.is_dir() and p.name.startswith(REC_PREFIX) and len(p.name) > len(REC_PREFIX)
    }
    return dict(sorted(folders.items()))


def group_files(folder: str | os.PathLike[str]) -> list[str]:
    """File ids of the noisy copies in a rec folder (its `enhanced/` subfolder excluded)."""
    folder = Path(folder)
    enhanced = folder / ENHANCED_DIR
    return [
        file_id(p, folder)
        for p in list_audio_files(folder)
        if enhanced not in p.parents and not p.name.startswith(".")
    ]


def noisy_copy_path(out_dir: Path, route: Route) -> Path:
    return out_dir / rec_folder_name(route.recommendation) / route.file


def enhanced_path(out_dir: Path, route: Route) -> Path:
    return out_dir / rec_folder_name(route.recommendation) / ENHANCED_DIR / route.file


# ---------------------------------------------------------------------------------------
# Copies


@dataclass
class CopySummary:
    copied: int
    unchanged: int
    removed_stale: int


def copy_routed_files(
    noisy_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], routes: Sequence[Route]
) -> CopySummary:
    """Copy each file's own bytes into its rec folder, once; remove it from any other rec folder.

    This avoids the thesis' routing bugs (upstream.md section 1): every copy holds its own
    file's bytes (compared on every run), folder names have no spaces (`rec_All_Failed`),
    and folders are created and searched in the same OUT dir (`find_rec_folders`). A copy
    that already matches its source byte for byte is kept (with its enhanced output); a
    differing one is rewritten atomically and its enhanced output removed, since that
    output came from other audio. A file whose recommendation changed is moved.
    """
    noisy_dir, out_dir = Path(noisy_dir), Path(out_dir)
    if len({r.file for r in routes}) != len(routes):
        raise ValueError("a file is routed twice")
    folders = find_rec_folders(out_dir) if out_dir.is_dir() else {}
    copied = unchanged = removed = 0
    for route in tqdm(routes, desc="route", unit="file"):
        home = rec_folder_name(route.recommendation)
        for folder in folders.values():
            if folder.name == home:
                continue
            for stale in (folder / route.file, folder / ENHANCED_DIR / route.file):
                if stale.exists():
                    stale.unlink()
                    removed += 1
        source = noisy_dir / route.file
        target = noisy_copy_path(out_dir, route)
        if target.is_file() and filecmp.cmp(source, target, shallow=False):
            unchanged += 1
            continue
        enhanced_path(out_dir, route).unlink(missing_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        copied += 1
    return CopySummary(copied, unchanged, removed)


# ---------------------------------------------------------------------------------------
# Enhancement per rec folder


@dataclass(frozen=True)
class _Chunk:
    routed_model: str
    routes: tuple[Route, ...]


@dataclass
class EnhanceSummary:
    files: int
    done_now: int
    skipped: int
    errors: int
    seconds_by_model: dict[str, float]
    routing_csv: Path


# Per-process state: each worker builds its enhancers once and reuses them for every chunk.
_state: dict[str, Any] = {}


def _init_worker(
    out_dir: Path,
    model_configs: Mapping[str, Mapping[str, Any]],
    device: str,
    seed: int,
    single_thread: bool,
) -> None:
    if single_thread:
        use_single_thread()
    _state.clear()
    _state.update(out_dir=out_dir, model_configs=model_configs, device=device, seed=seed, enhancers={})


def _enhancer(name: str) -> Enhancer:
    enhancers: dict[str, Enhancer] = _state["enhancers"]
    if name not in enhancers:
        enhancers[name] = create_enhancer(
            name, _state["model_configs"].get(name), device=_state["device"], seed=_state["seed"]
        )
    return enhancers[name]


def _row(route: Route, status: str, error: str = "", seconds: float = math.nan,
         duration_s: float = math.nan) -> dict[str, Any]:
    return {
        "file": route.file,
        "recommendation": route.recommendation,
        "routed_model": route.routed_model,
        "status": status,
        "error": error,
        "seconds": seconds,
        "duration_s": duration_s,
    }


def enhance_chunk(chunk: _Chunk) -> list[dict[str, Any]]:
    """Enhance one chunk's noisy copies with its routed model; one routing.csv row per file."""
    out_dir: Path = _state["out_dir"]
    rows: dict[str, dict[str, Any]] = {}
    inputs = []
    for route in chunk.routes:
        try:
            inputs.append((route, load_audio(noisy_copy_path(out_dir, route))))
        except AudioError as exc:
            rows[route.file] = _row(route, "error", f"input: {exc.reason}")
    if inputs:
        started = time.perf_counter()
        results = _enhancer(chunk.routed_model).enhance_batch(
            [audio for _, audio in inputs], SAMPLE_RATE, [route.file for route, _ in inputs]
        )
        elapsed = time.perf_counter() - started
        total = sum(audio.size for _, audio in inputs)
        for (route, audio), result in zip(inputs, results, strict=True):
            duration = round(audio.size / SAMPLE_RATE, 4)
            if isinstance(result, Exception):
                rows[route.file] = _row(route, "error", str(result), duration_s=duration)
                continue
            write_wav(enhanced_path(out_dir, route), result)
            # A batch's time is shared among its files by duration.
            rows[route.file] = _row(route, "ok", "", round(elapsed * audio.size / total, 4), duration)
    return [rows[route.file] for route in chunk.routes]


def _safe_enhance(chunk: _Chunk) -> list[dict[str, Any]]:
    """enhance_chunk, with a chunk-level failure recorded on each of its files."""
    try:
        return enhance_chunk(chunk)
    except (EnhancementError, AudioError, RuntimeError, ValueError, OSError) as exc:
        return [_row(r, "error", f"{type(exc).__name__}: {exc}") for r in chunk.routes]


def _complete(out_dir: Path, route: Route, row: Mapping[str, str] | None, retry_errors: bool) -> bool:
    if row is None or row["routed_model"] != route.routed_model or row["recommendation"] != route.recommendation:
        return False
    if row["status"] == "error":
        return not retry_errors
    output = enhanced_path(out_dir, route)
    if not output.is_file():
        return False
    try:
        source, result = audio_info(noisy_copy_path(out_dir, route)), audio_info(output)
    except AudioError:
        return False
    # Outputs are written at 16 kHz; a 16 kHz input's output has exactly its length.
    return source.samplerate != SAMPLE_RATE or source.frames == result.frames


def check_enhancers(
    models: Sequence[str],
    model_configs: Mapping[str, Mapping[str, Any]],
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Enhancer]:
    """Build and check every routed model before any work (raises EnhancerUnavailable)."""
    enhancers = {}
    for name in dict.fromkeys(models):
        enhancer = create_enhancer(name, model_configs.get(name), device=device, seed=seed)
        enhancer.check()
        enhancers[name] = enhancer
    return enhancers


def _chunks(pending: Sequence[Route], sizes: Mapping[str, int]) -> Iterator[_Chunk]:
    by_model: dict[str, list[Route]] = {}
    for route in pending:
        by_model.setdefault(route.routed_model, []).append(route)
    for model, routes in by_model.items():
        size = max(1, sizes[model])
        for start in range(0, len(routes), size):
            yield _Chunk(model, tuple(routes[start : start + size]))


def enhance_routed_files(
    out_dir: str | os.PathLike[str],
    routes: Sequence[Route],
    model_configs: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
    num_workers: int = 1,
    chunk_size: int = 8,
    retry_errors: bool = False,
) -> EnhanceSummary:
    """Run each file's routed enhancer on its rec-folder copy (copies must exist).

    All_Failed files are enhanced too, by the route's fallback model. Resumable like the
    enhancement step: outputs are written atomically, one routing.csv row per file is
    appended as its chunk finishes, and a re-run skips files whose output and row are
    complete (failed files are retried only with `retry_errors`).
    """
    out_dir = Path(out_dir)
    model_configs = dict(model_configs or {})
    enhancers = check_enhancers([r.routed_model for r in routes], model_configs, device, seed)
    log = RowLog(out_dir / ROUTING_CSV, ROUTING_COLUMNS)
    latest = {r["file"]: r for r in log.read()}
    pending = [r for r in routes if not _complete(out_dir, r, latest.get(r.file), retry_errors)]
    if pending:
        _run_pending(out_dir, pending, enhancers, model_configs, device, seed, num_workers, chunk_size, log)
        latest = {r["file"]: r for r in log.read()}

    wanted = {r.file for r in routes}
    final = [latest[r.file] for r in sorted(routes, key=lambda r: r.file)]
    extra = [row for fid, row in sorted(latest.items()) if fid not in wanted]
    text = csv_text(ROUTING_COLUMNS, final + extra)
    if log.path.read_text(encoding="utf-8") != text:
        write_text_atomic(log.path, text)
    seconds: dict[str, float] = {}
    for row in final:
        if row["status"] == "ok":
            seconds[row["routed_model"]] = seconds.get(row["routed_model"], 0.0) + float(row["seconds"])
    return EnhanceSummary(
        files=len(routes),
        done_now=len(pending),
        skipped=len(routes) - len(pending),
        errors=sum(row["status"] == "error" for row in final),
        seconds_by_model=seconds,
        routing_csv=log.path,
    )


def _run_pending(
    out_dir: Path,
    pending: Sequence[Route],
    enhancers: Mapping[str, Enhancer],
    model_configs: Mapping[str, Mapping[str, Any]],
    device: str,
    seed: int,
    num_workers: int,
    chunk_size: int,
    log: RowLog,
) -> None:
    sizes = {
        name: max(chunk_size, e.batch_size) if e.kind == "external" else chunk_size
        for name, e in enhancers.items()
    }
    chunks = list(_chunks(pending, sizes))
    # External (subprocess) enhancers manage their own parallelism: run them here.
    main_chunks = [c for c in chunks if enhancers[c.routed_model].kind == "external"]
    pool_chunks = [c for c in chunks if c not in main_chunks]
    bar = tqdm(total=len(pending), desc="enhance", unit="file")

    def record(rows: list[dict[str, Any]]) -> None:
        log.append(rows)
        bar.update(len(rows))

    try:
        _init_worker(out_dir, model_configs, device, seed, single_thread=False)
        for chunk in main_chunks:
            record(_safe_enhance(chunk))
        if num_workers <= 1:
            for chunk in pool_chunks:
                record(_safe_enhance(chunk))
            return
        with ProcessPoolExecutor(
            num_workers, initializer=_init_worker, initargs=(out_dir, model_configs, device, seed, True)
        ) as pool:
            queue = iter(pool_chunks)
            running: dict[Future, _Chunk] = {}
            # A bounded number of chunks in flight, so rows land as they finish.
            for chunk in queue:
                running[pool.submit(_safe_enhance, chunk)] = chunk
                if len(running) >= 2 * num_workers:
                    break
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    record(future.result())
                    nxt = next(queue, None)
                    if nxt is not None:
                        running[pool.submit(_safe_enhance, nxt)] = nxt
    finally:
        bar.close()


__all__ = [
    "ENHANCED_DIR",
    "KEEP_NOISY",
    "RECOMMENDATIONS_CSV",
    "RECOMMENDER_JSON",
    "REC_PREFIX",
    "ROUTING_COLUMNS",
    "ROUTING_CSV",
    "CopySummary",
    "EnhanceSummary",
    "Route",
    "check_enhancers",
    "copy_routed_files",
    "enhance_routed_files",
    "enhanced_path",
    "find_rec_folders",
    "group_files",
    "label_from_folder",
    "noisy_copy_path",
    "rec_folder_name",
    "routed_model_for",
]
