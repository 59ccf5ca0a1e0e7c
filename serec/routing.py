"""Route each noisy file to its recommended model: a copy in OUT/rec_<LABEL>/, enhanced into
OUT/rec_<LABEL>/enhanced/ by the routed enhancer (All_Failed: the fallback model).
"""

from __future__ import annotations

import filecmp
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
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
from serec.enhancer_jobs import EnhancerJob, enhancer_units
from serec.enhancers import Enhancer, create_enhancer
from serec.fileio import RowLog, atomic_path, csv_text, write_text_atomic
from serec.labels import ALL_FAILED
from serec.parallel import Backend, LocalBackend, WorkUnit, run_units
from serec.schema import RECOMMENDATIONS_CSV, RECOMMENDER_JSON, ROUTING_COLUMNS, ROUTING_CSV

# The recommendation step's output folder (OUT): these names are its layout.
REC_PREFIX = "rec_"
ENHANCED_DIR = "enhanced"
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


@dataclass
class EnhanceSummary:
    files: int
    done_now: int
    skipped: int
    errors: int
    seconds_by_model: dict[str, float]
    routing_csv: Path


class _RoutingJob(EnhancerJob[Route]):
    """Enhance a chunk of routed files (noisy copies) with their routed model; one row each."""

    def __init__(self, out_dir: Path, enhancers: Mapping[str, Enhancer],
                 model_configs: Mapping[str, Mapping[str, Any]], device: str, seed: int) -> None:
        super().__init__(enhancers, model_configs, device, seed)
        self.out_dir = out_dir

    def failed(self, unit: WorkUnit[Route], reason: str) -> list[dict[str, Any]]:
        return [_row(route, "error", reason) for route in unit.items]

    def writes_to(self) -> tuple[Path, ...]:
        return (self.out_dir,)

    def process(self, unit: WorkUnit[Route]) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        inputs = []
        for route in unit.items:
            try:
                inputs.append((route, load_audio(noisy_copy_path(self.out_dir, route))))
            except AudioError as exc:
                rows[route.file] = _row(route, "error", f"input: {exc.reason}")
        if inputs:
            started = time.perf_counter()
            results = self.enhancer(unit.key).enhance_batch(
                [audio for _, audio in inputs], SAMPLE_RATE, [route.file for route, _ in inputs]
            )
            elapsed = time.perf_counter() - started
            total = sum(audio.size for _, audio in inputs)
            for (route, audio), result in zip(inputs, results, strict=True):
                duration = round(audio.size / SAMPLE_RATE, 4)
                if isinstance(result, Exception):
                    rows[route.file] = _row(route, "error", str(result), duration_s=duration)
                    continue
                write_wav(enhanced_path(self.out_dir, route), result)
                # A batch's time is shared among its files by duration.
                rows[route.file] = _row(route, "ok", "", round(elapsed * audio.size / total, 4), duration)
        return [rows[route.file] for route in unit.items]


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
    backend: Backend | None = None,
) -> EnhanceSummary:
    """Run each file's routed enhancer on its rec-folder copy (copies must exist).

    All_Failed files are enhanced too, by the route's fallback model. Resumable like the
    enhancement step: outputs are written atomically, one routing.csv row per file is
    appended as its chunk finishes, and a re-run skips files whose output and row are
    complete (failed files are retried only with `retry_errors`). `backend` runs the
    work units (default: `num_workers` local worker processes, at least one, so that a
    native crash costs a file).
    """
    out_dir = Path(out_dir)
    model_configs = dict(model_configs or {})
    enhancers = check_enhancers([r.routed_model for r in routes], model_configs, device, seed)
    log = RowLog(out_dir / ROUTING_CSV, ROUTING_COLUMNS)
    latest = {r["file"]: r for r in log.read()}
    pending = [r for r in routes if not _complete(out_dir, r, latest.get(r.file), retry_errors)]
    if pending:
        by_model: dict[str, list[Route]] = {}
        for route in pending:
            by_model.setdefault(route.routed_model, []).append(route)
        run_units(
            _RoutingJob(out_dir, enhancers, model_configs, device, seed),
            enhancer_units(by_model, enhancers, chunk_size),
            backend or LocalBackend(num_workers, isolate=True),
            lambda _unit, rows: log.append(rows), desc="enhance",
        )
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
