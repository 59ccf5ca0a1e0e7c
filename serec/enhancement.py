"""Run every enhancer on every noisy file, score every output, and label each file's best model.

This is the longest step users run (hours to days with diffusion models), so it never
loses work: each enhanced WAV is written atomically, each score row is appended whole
to `scores.csv` as soon as its chunk finishes, and a re-run skips (file, system) pairs
that are already complete. Work is split into chunks of a few files of one system, run
by serec.parallel: the chunks of built-in enhancers in `num_workers` single-threaded
worker processes (at least one, so that a native crash costs a file, not the run);
external (subprocess) enhancers in the main process with big batches.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dnsmos.models import MODEL_DIR_ENV
from serec.audio import (
    SAMPLE_RATE,
    AudioError,
    audio_info,
    file_id,
    list_audio_files,
    load_audio,
    quantise_pcm16,
    write_wav,
)
from serec.enhancer_jobs import EnhancerJob, enhancer_units
from serec.enhancers import Enhancer, create_enhancer, load_models_config
from serec.exitcodes import ExitStatus
from serec.fileio import RowLog, csv_text, write_text_atomic
from serec.labels import NOISY_SYSTEM, LabelRule, label_files
from serec.lock import output_lock
from serec.parallel import Backend, LocalBackend, WorkUnit, run_units
from serec.quality import METRIC_NAMES, QualityScorer
from serec.runinfo import (
    check_model_settings,
    check_scoring_settings,
    recorded_model_settings,
    settings_record,
    write_run_json,
)
from serec.schema import LABELS_CSV, SCORE_COLUMNS, SCORES_CSV, label_columns


@dataclass
class EnhancementConfig:
    noisy_dir: Path
    output_dir: Path
    models: list[str]
    clean_dir: Path | None = None
    models_config: Path | None = None
    rule: LabelRule = field(default_factory=LabelRule)
    num_workers: int = 1
    device: str = "cpu"
    limit: int | None = None
    overwrite: bool = False
    retry_errors: bool = False
    seed: int = 0
    chunk_size: int = 8
    # DNSMOS on every system at this active-speech level (dBFS); None scores signals as they are.
    dnsmos_level_db: float | None = None

    @property
    def scoring(self) -> dict[str, Any]:
        # The DNSMOS models, when not speechmos's (SEREC_DNSMOS_MODEL_DIR): scores of two
        # models must not mix either.
        return {"dnsmos_level_db": self.dnsmos_level_db, "dnsmos_model_dir": os.environ.get(MODEL_DIR_ENV) or None}


@dataclass
class EnhancementSummary:
    files: int
    pairs_done_now: int
    pairs_skipped: int
    errors: int
    label_counts: dict[str, int]
    metric_means: dict[str, dict[str, float]]
    scores_csv: Path
    labels_csv: Path
    elapsed_s: float
    # (file, system, reason) of every pair recorded with status=error, in file order.
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return ExitStatus.PARTIAL if self.errors else ExitStatus.OK


class _EnhancementJob(EnhancerJob[str]):
    """Enhance (unless the unit's key is `noisy`), write and score a chunk of files of one system."""

    def __init__(self, config: EnhancementConfig, enhancers: dict[str, Enhancer],
                 model_configs: dict[str, dict]) -> None:
        super().__init__(enhancers, model_configs, config.device, config.seed)
        self.config = config

    def setup(self, threads: int | None) -> None:
        super().setup(threads)
        # One scorer thread whatever the process: DNSMOS values then do not depend on
        # where a file was scored, and N workers use N cores.
        self._scorer = QualityScorer(num_threads=1, dnsmos_level_db=self.config.dnsmos_level_db)

    def failed(self, unit: WorkUnit[str], reason: str) -> list[dict[str, Any]]:
        return [_error_row(fid, unit.key, reason) for fid in unit.items]

    def writes_to(self) -> tuple[Path, ...]:
        return (self.config.output_dir,)

    def process(self, unit: WorkUnit[str]) -> list[dict[str, Any]]:
        config, system = self.config, unit.key
        rows: dict[str, dict[str, Any]] = {}
        inputs: list[tuple[str, np.ndarray, np.ndarray | None, str]] = []
        for fid in unit.items:
            try:
                audio = load_audio(config.noisy_dir / fid)
            except AudioError as exc:
                reason = exc.reason if system == NOISY_SYSTEM else f"input: {exc.reason}"
                rows[fid] = _error_row(fid, system, reason)
                continue
            reference, ref_note = _load_reference(config, fid)
            inputs.append((fid, audio, reference, ref_note))

        outputs: list[tuple[str, np.ndarray, np.ndarray | None, str, float]] = []
        if system == NOISY_SYSTEM:
            outputs = [(fid, audio, ref, note, 0.0) for fid, audio, ref, note in inputs]
        elif inputs:
            started = time.perf_counter()
            results = self.enhancer(system).enhance_batch(
                [audio for _, audio, _, _ in inputs], file_ids=[fid for fid, *_ in inputs]
            )
            elapsed = time.perf_counter() - started
            total = sum(audio.size for _, audio, _, _ in inputs)
            for (fid, audio, ref, note), result in zip(inputs, results, strict=True):
                seconds = elapsed * audio.size / total  # batch time shared by duration
                if isinstance(result, Exception):
                    rows[fid] = _error_row(fid, system, str(result), audio.size / SAMPLE_RATE)
                    continue
                write_wav(config.output_dir / "enhanced" / system / fid, result)
                # Score what the WAV holds, so scores match a later evaluation of the file.
                outputs.append((fid, quantise_pcm16(result), ref, note, seconds))
        rows.update(self._score(system, outputs))
        return [rows[fid] for fid in unit.items]

    def _score(
        self, system: str, outputs: list[tuple[str, np.ndarray, np.ndarray | None, str, float]]
    ) -> dict[str, dict[str, Any]]:
        rows = {}
        scored = self._scorer.score_batch([o[1] for o in outputs], [o[2] for o in outputs])
        for (fid, audio, _, note, seconds), result in zip(outputs, scored, strict=True):
            errors = [f"{m}: {e}" for m, e in result.errors.items() if m in METRIC_NAMES]
            if note:
                errors.insert(0, note)
            row = {m: _stable(result.values.get(m, math.nan)) for m in METRIC_NAMES}
            row.update(
                file=fid,
                system=system,
                status="ok",
                error="; ".join(errors),
                seconds=round(seconds, 4),
                duration_s=round(audio.size / SAMPLE_RATE, 4),
            )
            rows[fid] = row
        return rows


def _stable(value: float) -> float:
    # numpy's vectorised sums (ESTOI's) differ in the last bits with the memory alignment
    # of their temporaries, i.e. from process to process; 10 decimals keep every
    # meaningful digit and make a file's scores the same wherever it was scored.
    return round(float(value), 10) + 0.0 if math.isfinite(value) else value


def _error_row(fid: str, system: str, reason: str, duration_s: float = math.nan) -> dict[str, Any]:
    row = {c: math.nan for c in METRIC_NAMES}
    row.update(
        file=fid, system=system, status="error", error=reason, seconds=math.nan, duration_s=duration_s
    )
    return row


def _load_reference(config: EnhancementConfig, fid: str) -> tuple[np.ndarray | None, str]:
    if config.clean_dir is None:
        return None, ""
    path = config.clean_dir / fid
    if not path.exists():
        return None, f"no clean reference at {path}"
    try:
        return load_audio(path, validate=False), ""
    except AudioError as exc:
        return None, f"clean reference: {exc.reason}"


def _latest_rows(log: RowLog) -> dict[tuple[str, str], dict[str, str]]:
    """The last row written for each (file, system): later rows supersede retried ones."""
    return {(r["file"], r["system"]): r for r in log.read()}


def _pair_complete(
    config: EnhancementConfig, row: dict[str, str] | None, fid: str, system: str
) -> bool:
    if row is None:
        return False
    if row["status"] == "error":
        return not config.retry_errors
    if system == NOISY_SYSTEM:
        return True
    wav = config.output_dir / "enhanced" / system / fid
    if not wav.exists():
        return False
    try:
        return audio_info(wav).frames == audio_info(config.noisy_dir / fid).frames
    except AudioError:
        return False


def _prepare_output(config: EnhancementConfig) -> None:
    config.output_dir.mkdir(parents=True, exist_ok=True)
    # Temp files of writes that a kill interrupted: never complete, never read.
    for stale in (config.output_dir / "enhanced").glob("**/.*.tmp*"):
        stale.unlink(missing_ok=True)
    if config.overwrite:
        for name in (SCORES_CSV, LABELS_CSV):
            (config.output_dir / name).unlink(missing_ok=True)
        enhanced = (config.output_dir / "enhanced").resolve()
        for model in config.models:
            folder = (enhanced / model).resolve()
            # Only ever a model's own folder inside enhanced/, whatever the name holds.
            if folder.parent != enhanced:
                raise ValueError(f"--overwrite: model name {model!r} is not a folder name inside {enhanced}")
            shutil.rmtree(folder, ignore_errors=True)


def _check_models(config: EnhancementConfig, model_configs: dict[str, dict]) -> dict[str, Enhancer]:
    """Build every requested enhancer and check it before any work starts."""
    enhancers = {}
    for name in config.models:
        enhancer = create_enhancer(
            name, model_configs.get(name), device=config.device, seed=config.seed
        )
        enhancer.check()
        enhancers[name] = enhancer
    return enhancers


def run_enhancement(config: EnhancementConfig, backend: Backend | None = None) -> EnhancementSummary:
    """Run (or resume) the enhancement step; see the module docstring.

    Holds the output folder's lock for the whole run (OutputLocked if another run holds
    it) and refuses, unless `overwrite`, a model whose settings differ from those its
    outputs there were made with (SettingsChanged). `backend` runs the work units
    (default: `num_workers` local worker processes).
    """
    started = time.perf_counter()
    if NOISY_SYSTEM in config.models:
        raise ValueError(f"'{NOISY_SYSTEM}' is reserved for the untouched input; it is not a model")
    if len(set(config.models)) != len(config.models):
        raise ValueError(f"a model is listed twice in {config.models}")
    model_configs = load_models_config(config.models_config) if config.models_config else {}
    enhancers = _check_models(config, model_configs)

    paths = list_audio_files(config.noisy_dir)
    if config.limit is not None:
        paths = paths[: config.limit]
    if not paths:
        raise FileNotFoundError(f"{config.noisy_dir}: no .wav or .flac files")
    fids = [file_id(p, config.noisy_dir) for p in paths]
    backend = backend or LocalBackend(config.num_workers, isolate=True)
    with output_lock(config.output_dir, "enhancement"):
        return _run_locked(config, model_configs, enhancers, fids, backend, started)


def _run_locked(
    config: EnhancementConfig,
    model_configs: dict[str, dict],
    enhancers: dict[str, Enhancer],
    fids: list[str],
    backend: Backend,
    started: float,
) -> EnhancementSummary:
    settings = {name: settings_record(e.output_settings()) for name, e in enhancers.items()}
    check_scoring_settings(config.output_dir, config.scoring)
    if not config.overwrite:
        check_model_settings(config.output_dir, settings)
    recorded = recorded_model_settings(config.output_dir)
    _prepare_output(config)
    scores_path = config.output_dir / SCORES_CSV
    log = RowLog(scores_path, SCORE_COLUMNS)
    latest = _latest_rows(log)
    systems = [NOISY_SYSTEM, *config.models]
    pending = {
        system: [f for f in fids if not _pair_complete(config, latest.get((f, system)), f, system)]
        for system in systems
    }
    todo = sum(len(v) for v in pending.values())
    # Settings of models run into this folder before are kept: they describe its outputs.
    model_settings = {**recorded, **settings}
    if todo or model_settings != recorded:
        write_run_json(
            config.output_dir,
            {k: v for k, v in vars(config).items() if k != "rule"},
            label_rule=vars(config.rule),
            scoring=config.scoring,
            models=config.models,
            systems=systems,
            files=len(fids),
            model_settings=model_settings,
        )
    if todo:
        _run_pending(config, model_configs, enhancers, pending, log, backend)
        latest = _latest_rows(log)

    wanted = {(f, s) for f in fids for s in systems}
    final = [latest[k] for k in sorted(wanted, key=lambda k: (k[0], systems.index(k[1])))]
    extra = [r for k, r in latest.items() if k not in wanted]  # other runs' files/models, kept
    _write_if_changed(scores_path, SCORE_COLUMNS, final + extra)
    labels = label_files(final, config.models, config.rule)
    labels_path = config.output_dir / LABELS_CSV
    _write_if_changed(labels_path, label_columns(config.models), labels)

    return EnhancementSummary(
        files=len(fids),
        pairs_done_now=todo,
        pairs_skipped=len(wanted) - todo,
        errors=sum(1 for r in final if r["status"] == "error"),
        failures=[(r["file"], r["system"], r["error"]) for r in final if r["status"] == "error"],
        label_counts=dict(Counter(str(r["label"]) for r in labels).most_common()),
        metric_means=_metric_means(final, systems),
        scores_csv=scores_path,
        labels_csv=labels_path,
        elapsed_s=time.perf_counter() - started,
    )


def _run_pending(
    config: EnhancementConfig,
    model_configs: dict[str, dict],
    enhancers: dict[str, Enhancer],
    pending: dict[str, list[str]],
    log: RowLog,
    backend: Backend,
) -> None:
    run_units(
        _EnhancementJob(config, enhancers, model_configs),
        enhancer_units(pending, enhancers, config.chunk_size),
        backend,
        lambda _unit, rows: log.append(rows),
        desc="enhance",
        per_key=True,
    )


def _write_if_changed(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Rewrite a CSV atomically, but leave it untouched (mtime too) when nothing changed."""
    text = csv_text(columns, rows)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


def _metric_means(rows: list[dict[str, Any]], systems: Sequence[str]) -> dict[str, dict[str, float]]:
    means: dict[str, dict[str, float]] = {}
    for system in systems:
        ok = [r for r in rows if r["system"] == system and r["status"] == "ok"]
        means[system] = {}
        for metric in [*METRIC_NAMES, "seconds"]:
            values = [float(r[metric]) for r in ok if r[metric] not in ("", None)]
            values = [v for v in values if not math.isnan(v)]
            means[system][metric] = float(np.mean(values)) if values else math.nan
    return means


def format_summary(summary: EnhancementSummary) -> str:
    """Label distribution and the mean of every metric per system, as a printable table."""
    lines = [
        f"files: {summary.files}; pairs run now: {summary.pairs_done_now}, "
        f"already complete: {summary.pairs_skipped}; errors: {summary.errors}; "
        f"{summary.elapsed_s:.1f} s",
        "",
        "label distribution:",
    ]
    total = sum(summary.label_counts.values()) or 1
    for label, count in summary.label_counts.items():
        lines.append(f"  {label:<20} {count:>6}  {100 * count / total:5.1f}%")
    metrics = [m for m in [*METRIC_NAMES, "seconds"] if any(
        not math.isnan(v.get(m, math.nan)) for v in summary.metric_means.values())]
    lines += ["", "mean per system:", "  " + f"{'system':<18}" + "".join(f"{m:>12}" for m in metrics)]
    for system, values in summary.metric_means.items():
        lines.append("  " + f"{system:<18}" + "".join(f"{values[m]:>12.3f}" for m in metrics))
    return "\n".join(lines)


def format_failures(summary: EnhancementSummary, limit: int = 5) -> str:
    """The first `limit` failed files, each with its failed systems and reason ('' if none)."""
    by_file: dict[str, tuple[list[str], str]] = {}
    for fid, system, reason in summary.failures:
        systems, _ = by_file.setdefault(fid, ([], reason))
        systems.append(system)
    lines = [f"failed: {len(by_file)} file(s), {len(summary.failures)} (file, system) pair(s); first ones:"]
    for fid, (systems, reason) in list(by_file.items())[:limit]:
        lines.append(f"  {fid} [{', '.join(systems)}]: {reason}")
    if len(by_file) > limit:
        lines.append(f"  ... {len(by_file) - limit} more: status=error rows of {summary.scores_csv}")
    return "\n".join(lines) if by_file else ""


__all__ = [
    "EnhancementConfig",
    "EnhancementSummary",
    "format_failures",
    "format_summary",
    "run_enhancement",
]
