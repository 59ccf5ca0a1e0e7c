"""Evaluate routed output: noisy vs enhanced scores per file (evaluation.csv) and per rec group
with 95% t-intervals (summary.csv).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from serec.audio import SAMPLE_RATE, AudioError, list_audio_files, load_audio
from serec.fileio import RowLog, csv_text, write_csv_atomic, write_text_atomic
from serec.parallel import Backend, ChunkJob, LocalBackend, WorkUnit, chunk_units, run_units
from serec.quality import METRIC_NAMES, QualityScorer
from serec.routing import ENHANCED_DIR, find_rec_folders, group_files
from serec.schema import (
    EVALUATION_COLUMNS,
    EVALUATION_CSV,
    EVALUATION_SIDES,
    ROUTING_CSV,
    SUMMARY_COLUMNS,
    SUMMARY_CSV,
)

ALL_GROUPS = "all"
# How many noisy files without a clean reference, or other mismatches, are named in messages.
SHOWN = 5


@dataclass(frozen=True)
class EvalPair:
    """One routed file: its noisy copy, enhanced output (None if absent), clean reference."""

    file: str
    group: str
    noisy: Path
    enhanced: Path | None
    clean: Path | None
    note: str = ""

    def inputs_sha1(self) -> str:
        """A fingerprint of the files the row is scored from: a changed file is rescored."""
        digest = hashlib.sha1()
        for path in (self.noisy, self.enhanced, self.clean):
            digest.update(b"\0" if path is None else path.read_bytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]


@dataclass
class Pairing:
    pairs: list[EvalPair]
    missing_enhanced: list[str] = field(default_factory=list)
    orphan_enhanced: list[str] = field(default_factory=list)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    missing_clean: list[str] = field(default_factory=list)
    unmatched_clean: int = 0
    clean_dir: Path | None = None

    def messages(self) -> list[str]:
        """One line per kind of mismatch, naming a few files."""
        out = []
        if self.missing_enhanced:
            out.append(f"{len(self.missing_enhanced)} noisy copies have no enhanced output: {_show(self.missing_enhanced)}")
        if self.orphan_enhanced:
            out.append(f"{len(self.orphan_enhanced)} enhanced files have no noisy copy beside them (ignored): "
                       f"{_show(self.orphan_enhanced)}")
        if self.duplicates:
            out.append(f"{len(self.duplicates)} files are in more than one rec folder: "
                       + _show([f"{f} ({', '.join(g)})" for f, g in self.duplicates.items()]))
        if self.missing_clean:
            out.append(f"{len(self.missing_clean)} noisy files have no clean reference of the same name in "
                       f"{self.clean_dir} (intrusive metrics left empty): {_show(self.missing_clean)}")
        if self.unmatched_clean:
            out.append(f"{self.unmatched_clean} files in {self.clean_dir} match no routed noisy file")
        return out


def _show(items: Sequence[str]) -> str:
    return ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")


def pair_rec_folders(out_dir: str | os.PathLike[str], clean_dir: str | os.PathLike[str] | None = None) -> Pairing:
    """Find every rec_<LABEL>/ folder in OUT and pair its files by name.

    Raises FileNotFoundError when OUT has no rec folder, and ValueError when a clean
    folder is given but none of its names match a routed file (names must match).
    """
    out_dir = Path(out_dir)
    folders = find_rec_folders(out_dir)
    if not folders:
        raise FileNotFoundError(f"{out_dir}: no rec_<LABEL> folders to evaluate (run without --eval_only first)")
    clean_root = Path(clean_dir) if clean_dir is not None else None
    if clean_root is not None and not clean_root.is_dir():
        raise FileNotFoundError(f"{clean_root}: clean speech folder not found")
    pairing = Pairing(pairs=[], clean_dir=clean_root)
    seen: dict[str, list[str]] = {}
    for label, folder in folders.items():
        noisy = group_files(folder)
        enhanced_dir = folder / ENHANCED_DIR
        enhanced = set(group_files(enhanced_dir)) if enhanced_dir.is_dir() else set()
        pairing.orphan_enhanced += [f"{folder.name}/{ENHANCED_DIR}/{f}" for f in sorted(enhanced - set(noisy))]
        for fid in noisy:
            seen.setdefault(fid, []).append(label)
            if fid not in enhanced:
                pairing.missing_enhanced.append(f"{folder.name}/{fid}")
            clean, note = None, ""
            if clean_root is not None:
                clean = clean_root / fid
                if not clean.is_file():
                    pairing.missing_clean.append(fid)
                    clean, note = None, f"no clean reference {clean_root / fid}"
            output = enhanced_dir / fid if fid in enhanced else None
            pairing.pairs.append(EvalPair(fid, label, folder / fid, output, clean, note))
    pairing.duplicates = {f: g for f, g in seen.items() if len(g) > 1}
    if clean_root is not None:
        clean_ids = {p.relative_to(clean_root).as_posix() for p in list_audio_files(clean_root)}
        pairing.unmatched_clean = len(clean_ids - set(seen))
        if pairing.pairs and len(pairing.missing_clean) == len(pairing.pairs):
            raise ValueError(
                f"no routed file has a clean reference of the same name in {clean_root} "
                f"(e.g. {pairing.pairs[0].file} has none; {len(clean_ids)} clean files there): "
                "--clean_speech_dir must hold the noisy files' clean versions under the same names"
            )
    return pairing


# ---------------------------------------------------------------------------------------
# Scoring


class _EvaluationJob(ChunkJob[tuple[EvalPair, str, str]]):
    """Score chunks of (pair, routed model, inputs_sha1) items with one scorer per process."""

    recoverable = (AudioError, RuntimeError, ValueError, OSError)

    def __init__(self, dnsmos_level_db: float | None = None) -> None:
        self.dnsmos_level_db = dnsmos_level_db

    def setup(self, threads: int | None) -> None:
        self._scorer = QualityScorer(num_threads=threads, dnsmos_level_db=self.dnsmos_level_db)

    def process(self, unit: WorkUnit[tuple[EvalPair, str, str]]) -> list[dict[str, Any]]:
        return score_chunk(unit.items, self._scorer)

    def failed(self, unit: WorkUnit[tuple[EvalPair, str, str]], reason: str) -> list[dict[str, Any]]:
        return [_error_row(pair, routed, reason, sha1) for pair, routed, sha1 in unit.items]


def _error_row(pair: EvalPair, routed: str, reason: str, sha1: str, duration_s: float = math.nan) -> dict[str, Any]:
    row: dict[str, Any] = {c: math.nan for c in EVALUATION_COLUMNS}
    row.update(file=pair.file, group=pair.group, routed_model=routed, status="error", error=reason,
               duration_s=duration_s, inputs_sha1=sha1)
    return row


def score_chunk(chunk: Sequence[tuple[EvalPair, str, str]], scorer: QualityScorer) -> list[dict[str, Any]]:
    """Score (pair, routed model, inputs_sha1) items: noisy and enhanced against clean."""
    rows: dict[int, dict[str, Any]] = {}
    ready = []
    for i, (pair, routed, sha1) in enumerate(chunk):
        if pair.enhanced is None:
            rows[i] = _error_row(pair, routed, "no enhanced output", sha1)
            continue
        try:
            noisy = load_audio(pair.noisy)
            enhanced = load_audio(pair.enhanced, validate=False)
        except AudioError as exc:
            rows[i] = _error_row(pair, routed, str(exc), sha1)
            continue
        duration = round(noisy.size / SAMPLE_RATE, 4)
        if enhanced.size != noisy.size:
            rows[i] = _error_row(pair, routed, f"enhanced has {enhanced.size} samples, noisy {noisy.size}",
                                 sha1, duration)
            continue
        clean, notes = None, [pair.note] if pair.note else []
        if pair.clean is not None:
            try:
                clean = load_audio(pair.clean, validate=False)
            except AudioError as exc:
                notes.append(f"clean reference: {exc.reason}")
        ready.append((i, pair, routed, sha1, noisy, enhanced, clean, notes, duration))
    noisy_scores = scorer.score_batch([r[4] for r in ready], [r[6] for r in ready])
    enhanced_scores = scorer.score_batch([r[5] for r in ready], [r[6] for r in ready])
    for (i, pair, routed, sha1, _, _, _, notes, duration), ns, es in zip(
        ready, noisy_scores, enhanced_scores, strict=True
    ):
        errors = notes + [f"noisy {m}: {e}" for m, e in ns.errors.items() if m in METRIC_NAMES]
        errors += [f"enhanced {m}: {e}" for m, e in es.errors.items() if m in METRIC_NAMES]
        row: dict[str, Any] = {"file": pair.file, "group": pair.group, "routed_model": routed, "status": "ok",
                               "error": "; ".join(errors), "duration_s": duration, "inputs_sha1": sha1}
        for m in METRIC_NAMES:
            before, after = ns.values.get(m, math.nan), es.values.get(m, math.nan)
            row[f"noisy_{m}"] = _r(before)
            row[f"enhanced_{m}"] = _r(after)
            row[f"delta_{m}"] = _r(after - before)
        rows[i] = row
    return [rows[i] for i in range(len(chunk))]


def _r(value: float) -> float:
    # Six decimals hide float noise of BLAS threading; "+ 0.0" turns a rounded -0.0 into 0.0,
    # so a rebuilt evaluation.csv is byte-identical.
    return round(float(value), 6) + 0.0 if value is not None and math.isfinite(value) else math.nan


def _routed_models(out_dir: Path) -> dict[str, str]:
    path = out_dir / ROUTING_CSV
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["file"]: r["routed_model"] for r in csv.DictReader(fh)}


@dataclass
class EvaluationSummary:
    files: int
    scored_now: int
    reused: int
    errors: int
    messages: list[str]
    summary_rows: list[dict[str, Any]]
    evaluation_csv: Path
    summary_csv: Path


def evaluate_rec_folders(
    out_dir: str | os.PathLike[str],
    clean_dir: str | os.PathLike[str] | None = None,
    *,
    num_workers: int = 1,
    chunk_size: int = 8,
    backend: Backend | None = None,
    dnsmos_level_db: float | None = None,
) -> EvaluationSummary:
    """Score every rec folder's files; write evaluation.csv and summary.csv.

    evaluation.csv: one row per file with noisy, enhanced and delta = enhanced - noisy for
    every metric. summary.csv: per group and `all`, per metric, the mean and 95% confidence
    interval of the noisy input, the enhanced output and the improvement. Rows are appended
    as chunks finish and reused by a re-run while the files they were scored from are
    unchanged (`inputs_sha1`), so an interrupted evaluation resumes. `backend` runs the
    work units (default: `num_workers` local worker processes, at least one, so that a
    crash of a native metric costs a file). `dnsmos_level_db` scores DNSMOS at that
    active-speech level (None: as the files are).
    """
    out_dir = Path(out_dir)
    pairing = pair_rec_folders(out_dir, clean_dir)
    routed = _routed_models(out_dir)
    items = [(p, routed.get(p.file, ""), p.inputs_sha1()) for p in pairing.pairs]
    log = RowLog(out_dir / EVALUATION_CSV, EVALUATION_COLUMNS)
    latest = {(r["file"], r["group"]): r for r in log.read()}
    todo = [it for it in items if latest.get((it[0].file, it[0].group), {}).get("inputs_sha1") != it[2]]
    if todo:
        run_units(_EvaluationJob(dnsmos_level_db), chunk_units("evaluate", todo, chunk_size),
                  backend or LocalBackend(num_workers, isolate=True),
                  lambda _unit, rows: log.append(rows), desc="evaluate")
        latest = {(r["file"], r["group"]): r for r in log.read()}
    final = [latest[(p.file, p.group)] for p, _, _ in sorted(items, key=lambda it: (it[0].group, it[0].file))]
    for row in final:  # routing.csv may have been rewritten since the row was scored
        row["routed_model"] = routed.get(row["file"], row["routed_model"])
    text = csv_text(EVALUATION_COLUMNS, final)
    if log.path.read_text(encoding="utf-8") != text:
        write_text_atomic(log.path, text)
    summary_rows = summarise(final)
    summary_csv = write_csv_atomic(out_dir / SUMMARY_CSV, SUMMARY_COLUMNS, summary_rows)
    return EvaluationSummary(
        files=len(items),
        scored_now=len(todo),
        reused=len(items) - len(todo),
        errors=sum(r["status"] == "error" for r in final),
        messages=pairing.messages(),
        summary_rows=summary_rows,
        evaluation_csv=log.path,
        summary_csv=summary_csv,
    )


# ---------------------------------------------------------------------------------------
# Summary


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t confidence interval (NaN bounds for fewer than 2)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def _as_float(value: Any) -> float:
    try:
        return float(value) if value not in ("", None) else math.nan
    except (TypeError, ValueError):
        return math.nan


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """summary.csv rows: per group (then `all`) and metric, over files scored on both sides."""
    ok = [r for r in rows if r["status"] == "ok"]
    groups = sorted({str(r["group"]) for r in ok})
    out = []
    for group in [*groups, ALL_GROUPS]:
        members = ok if group == ALL_GROUPS else [r for r in ok if r["group"] == group]
        for metric in METRIC_NAMES:
            paired = [r for r in members if math.isfinite(_as_float(r[f"delta_{metric}"]))]
            if not paired:
                continue
            row: dict[str, Any] = {"group": group, "metric": metric, "n": len(paired)}
            for side in EVALUATION_SIDES:
                mean, low, high = mean_ci95([_as_float(r[f"{side}_{metric}"]) for r in paired])
                row.update({f"{side}_mean": _r(mean), f"{side}_ci95_low": _r(low), f"{side}_ci95_high": _r(high)})
            out.append(row)
    return out


def read_csv_rows(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def format_summary(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("dnsmos_ovr", "pesq_wb", "stoi")) -> str:
    """Enhanced mean [95% CI] and improvement per group, for the terminal."""
    width = max([len("group"), *(len(str(r["group"])) for r in rows)]) + 2
    lines = [f"  {'group':<{width}}{'metric':<12}{'n':>5}{'noisy':>9}{'enhanced [95% CI]':>26}{'delta [95% CI]':>26}"]
    for row in rows:
        if row["metric"] not in metrics:
            continue
        enh = f"{_f(row['enhanced_mean'])} [{_f(row['enhanced_ci95_low'])}, {_f(row['enhanced_ci95_high'])}]"
        delta = f"{_f(row['delta_mean'], True)} [{_f(row['delta_ci95_low'], True)}, {_f(row['delta_ci95_high'], True)}]"
        lines.append(f"  {row['group']:<{width}}{row['metric']:<12}{row['n']:>5}{_f(row['noisy_mean']):>9}{enh:>26}{delta:>26}")
    return "\n".join(lines)


def _f(value: Any, signed: bool = False) -> str:
    v = _as_float(value)
    if not math.isfinite(v):
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


__all__ = [
    "ALL_GROUPS",
    "EVALUATION_COLUMNS",
    "EVALUATION_CSV",
    "SUMMARY_COLUMNS",
    "SUMMARY_CSV",
    "EvalPair",
    "EvaluationSummary",
    "Pairing",
    "evaluate_rec_folders",
    "format_summary",
    "mean_ci95",
    "pair_rec_folders",
    "read_csv_rows",
    "score_chunk",
    "summarise",
]
