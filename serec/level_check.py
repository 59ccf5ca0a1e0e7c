"""Does the DNSMOS scoring level change the labels? An enhancement run re-scored the other way.

DNSMOS OVR rewards quieter output, so an enhancer that turns the level down can win a file
it did not improve. An enhancement run scored DNSMOS either as is (the reference behaviour)
or at one active-speech level (`enhancement_driver.py --dnsmos_level_db`, recorded in its
run.json as `scoring.dnsmos_level_db`). This re-scores the DNSMOS OVR of every (file,
system) of the first files of a run the other way (at the common level if the run scored
as is, as is if the run scored at a level) and compares the two settings: each system's
mean OVR and mean active output level, the label distribution, how many labels change,
and the oracle's headroom over the best single model.

Labels follow the run's own label rule (its run.json `label_rule`, All_Failed included)
when the rule's metric is DNSMOS OVR; otherwise (another label metric, or no rule
recorded) they are the plain argmax of OVR over the enhancers. The summary says which.

Files (OUT is the check's folder): `OUT/rescored.csv` (`RESCORED_COLUMNS`, one row per
(file, system) re-scored, appended whole as each chunk finishes, so a re-run skips the
pairs already there) and `OUT/summary.json` (the comparison; written atomically).
`benchmarks/bench_level.py` and the experiment's `level_check` step both run it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from serec.audio import AudioError, active_mask, load_audio
from serec.fileio import RowLog, write_json_atomic
from serec.labels import ALL_FAILED, NOISY_SYSTEM, LabelRule, label_one
from serec.lock import output_lock
from serec.parallel import Backend, ChunkJob, LocalBackend, WorkUnit, chunk_units, run_units
from serec.quality import QualityScorer
from serec.runinfo import RUN_JSON, recorded_dnsmos_level
from serec.schema import LABELS_CSV, SCORES_CSV, read_labels, read_scores

RESCORED_CSV = "rescored.csv"
SUMMARY_JSON = "summary.json"
# dnsmos_level_db: the level this row was re-scored at (empty: as is); active_level_db: the
# output's own active-speech level, dBFS.
RESCORED_COLUMNS = ("file", "system", "status", "error", "dnsmos_level_db", "active_level_db", "dnsmos_ovr")
DEFAULT_LEVEL_DB = -26.0
FILES_PER_UNIT = 8
METRIC = "dnsmos_ovr"


class LevelCheckError(ValueError):
    """The run cannot be checked as asked (no scores, a re-scored CSV made another way, ...)."""


def active_level_db(audio: np.ndarray) -> float:
    """Active-speech RMS level of `audio` in dBFS (the activity rule of the mixer and the scorer)."""
    x = np.asarray(audio, dtype=np.float64)
    active = x[active_mask(x)]
    return float(10 * np.log10(np.mean(active**2) + 1e-20)) if active.size else -200.0


def run_scoring(enhancement_dir: str | os.PathLike[str]) -> tuple[float | None, LabelRule | None]:
    """(the DNSMOS level the run scored at, None: as is; its label rule, None: not recorded)."""
    path = Path(enhancement_dir) / RUN_JSON
    rule = (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}).get("label_rule")
    return recorded_dnsmos_level(enhancement_dir), (LabelRule(**rule) if rule else None)


def system_audio_path(enhancement_dir: Path, noisy_dir: Path, system: str, fid: str) -> Path:
    """Where a system's audio of a file is: the noisy input, or ENH/enhanced/<MODEL>/<file>."""
    return noisy_dir / fid if system == NOISY_SYSTEM else enhancement_dir / "enhanced" / system / fid


# ---------------------------------------------------------------------------------------
# Re-scoring (the per-file work, through the one runner)


class _RescoringJob(ChunkJob[str]):
    """DNSMOS OVR (at `level_db`, or as is when None) and active level of a chunk of one system's files."""

    def __init__(self, enhancement_dir: Path, noisy_dir: Path, level_db: float | None, dnsmos: Any = None) -> None:
        self.enhancement_dir = enhancement_dir
        self.noisy_dir = noisy_dir
        self.level_db = level_db
        self.dnsmos = dnsmos  # None: the default DNSMOS (tests pass a stand-in)

    def setup(self, threads: int | None) -> None:
        # One thread, as the enhancement step scores: values do not depend on where a file ran.
        self._scorer = QualityScorer(dnsmos=self.dnsmos, metrics=[METRIC], num_threads=1,
                                     dnsmos_level_db=self.level_db)

    def _row(self, fid: str, system: str, **values: Any) -> dict[str, Any]:
        return {"file": fid, "system": system, "status": "ok", "error": "",
                "dnsmos_level_db": "" if self.level_db is None else self.level_db,
                "active_level_db": math.nan, METRIC: math.nan, **values}

    def process(self, unit: WorkUnit[str]) -> list[dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        loaded: list[tuple[str, np.ndarray]] = []
        for fid in unit.items:
            try:
                loaded.append((fid, load_audio(system_audio_path(self.enhancement_dir, self.noisy_dir, unit.key, fid),
                                               validate=False)))
            except AudioError as exc:
                rows[fid] = self._row(fid, unit.key, status="error", error=exc.reason)
        results = self._scorer.score_batch([audio for _, audio in loaded])
        for (fid, audio), result in zip(loaded, results, strict=True):
            value = result.values[METRIC]
            rows[fid] = self._row(fid, unit.key, active_level_db=round(active_level_db(audio), 3), **{
                METRIC: value, "status": "error" if math.isnan(value) else "ok", "error": result.error_text()})
        return [rows[fid] for fid in unit.items]

    def failed(self, unit: WorkUnit[str], reason: str) -> list[dict[str, Any]]:
        return [self._row(fid, unit.key, status="error", error=reason) for fid in unit.items]


def rescore(
    enhancement_dir: Path,
    noisy_dir: Path,
    pairs: Mapping[str, Sequence[str]],
    out_csv: Path,
    level_db: float | None,
    backend: Backend,
    *,
    dnsmos: Any = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Re-score each system's files (`pairs`: system -> file ids) into `out_csv`, skipping the
    (file, system) pairs already in it; returns every row of the CSV."""
    log = RowLog(out_csv, RESCORED_COLUMNS)
    recorded = log.read()
    other = sorted({r["dnsmos_level_db"] or "as is" for r in recorded
                    if (None if r["dnsmos_level_db"] == "" else float(r["dnsmos_level_db"])) != level_db})
    if other:
        raise LevelCheckError(f"{out_csv}: holds rows re-scored another way ({', '.join(other)}); "
                              "move it away to re-score")
    done = {(r["file"], r["system"]) for r in recorded}
    units = [unit for system, files in pairs.items()
             for unit in chunk_units(system, [f for f in files if (f, system) not in done], FILES_PER_UNIT)]
    if units:
        job = _RescoringJob(enhancement_dir, noisy_dir, level_db, dnsmos)
        setting = "as is" if level_db is None else f"at {level_db:g} dBFS"
        run_units(job, units, backend, lambda unit, rows: log.append(rows),
                  desc=f"DNSMOS {setting}", show=progress)
    return pd.DataFrame(log.read(), columns=list(RESCORED_COLUMNS))


# ---------------------------------------------------------------------------------------
# The comparison (pure table logic)


@dataclass(frozen=True)
class SettingSummary:
    """One scoring setting over the compared files: labels, best single model, oracle, headroom."""

    labels: pd.Series  # file -> label (a model or All_Failed)
    best_single: str
    best_single_ovr: float
    oracle_ovr: float

    @property
    def headroom(self) -> float:
        """The oracle's mean OVR (best model per file) minus the best single model's."""
        return self.oracle_ovr - self.best_single_ovr

    def as_dict(self) -> dict[str, Any]:
        return {"best_single": self.best_single, "best_single_ovr": self.best_single_ovr,
                "oracle_ovr": self.oracle_ovr, "headroom": self.headroom,
                "label_counts": {str(k): int(v) for k, v in self.labels.value_counts().items()}}


def setting_summary(wide: pd.DataFrame, models: Sequence[str], rule: LabelRule | None) -> SettingSummary:
    """A (file x system) OVR table's labels (by `rule`, or the argmax over `models` when None;
    ties go to the model listed first), best single model and oracle."""
    scores = wide[list(models)]
    means = scores.mean()
    best_single = str(means.idxmax())
    if rule is None:
        labels = scores.idxmax(axis=1)
    else:
        labels = pd.Series({fid: label_one(row[list(models)].to_dict(), models, rule,
                                           row.get(NOISY_SYSTEM))[0] for fid, row in wide.iterrows()})
    return SettingSummary(labels.astype(str), best_single, float(means[best_single]),
                          float(scores.max(axis=1).mean()))


def _numeric(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """`columns` as floats (CSV text; an empty cell is NaN)."""
    return table.assign(**{c: pd.to_numeric(table[c], errors="coerce") for c in columns})


def comparison_table(scores: pd.DataFrame, rescored: pd.DataFrame, run_level_db: float | None) -> pd.DataFrame:
    """One row per (file, system) scored ok both ways: file, system, active_level_db, ovr_as_is,
    ovr_at_level. `scores` is the run's (scored at `run_level_db`, None: as is), `rescored`
    the other way. The last row of a (file, system) counts (a retried pair's supersedes its error)."""
    scores, rescored = (t.drop_duplicates(["file", "system"], keep="last") for t in (scores, rescored))
    recorded = _numeric(scores[scores.status == "ok"][["file", "system", METRIC]], [METRIC])
    again = _numeric(rescored[rescored.status == "ok"][["file", "system", "active_level_db", METRIC]],
                     ["active_level_db", METRIC])
    table = recorded.merge(again, on=["file", "system"], suffixes=("_run", "_again"))
    run, other = ("ovr_at_level", "ovr_as_is") if run_level_db is not None else ("ovr_as_is", "ovr_at_level")
    table = table.rename(columns={f"{METRIC}_run": run, f"{METRIC}_again": other})
    return table[["file", "system", "active_level_db", "ovr_as_is", "ovr_at_level"]].dropna()


def compare(table: pd.DataFrame, systems: Sequence[str], rule: LabelRule | None) -> dict[str, Any]:
    """The comparison of a comparison_table over the files every system has both ways: per system
    means and wins, each setting's summary, and the labels that change."""
    models = [s for s in systems if s != NOISY_SYSTEM]
    complete = table.groupby("file").system.nunique()
    files = sorted(complete[complete == len(systems)].index)
    table = table[table.file.isin(files)]
    settings = {}
    for name in ("as_is", "at_level"):
        wide = table.pivot(index="file", columns="system", values=f"ovr_{name}").reindex(columns=list(systems))
        settings[name] = setting_summary(wide, models, rule) if files else None
    means = table.groupby("system")[["active_level_db", "ovr_as_is", "ovr_at_level"]].mean()
    rows = []
    for system in [*systems, *([ALL_FAILED] if rule is not None else [])]:
        entry: dict[str, Any] = {"system": system}
        if system in means.index:
            entry.update({k: float(v) for k, v in means.loc[system].items()})
        if system != NOISY_SYSTEM:
            for name, summary in settings.items():
                entry[f"wins_{name}"] = int((summary.labels == system).sum()) if summary else 0
        rows.append(entry)
    changed = int((settings["as_is"].labels != settings["at_level"].labels).sum()) if files else 0
    return {"files": len(files), "labels_changed": changed, "systems": rows,
            "settings": {name: s.as_dict() if s else None for name, s in settings.items()}}


def summary_sentence(summary: Mapping[str, Any]) -> str:
    """The measured change in one sentence (tables.md, the benchmark's output)."""
    level, files = f"{summary['common_level_db']:g} dBFS", summary["files"]
    if not files:
        return f"No file was scored both ways (as is and at {level}), so nothing is compared."
    as_is, at_level = summary["settings"]["as_is"], summary["settings"]["at_level"]
    changed = summary["labels_changed"]
    return (f"Scored at {level} instead of as is, the oracle's headroom over the best single model goes "
            f"from {as_is['headroom']:+.3f} ({as_is['best_single']} best single) to {at_level['headroom']:+.3f} "
            f"({at_level['best_single']}), and {changed} of {files} labels ({100 * changed / files:.0f}%) change.")


# ---------------------------------------------------------------------------------------
# The check


def run_level_check(
    enhancement_dir: str | os.PathLike[str],
    noisy_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_files: int | None = None,
    level_db: float = DEFAULT_LEVEL_DB,
    backend: Backend | None = None,
    dnsmos: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Re-score the first `max_files` files (sorted) of an enhancement run the other way and write
    OUT/rescored.csv and OUT/summary.json; returns the summary.

    The common level is the run's (its run.json) when it scored at one, else `level_db`.
    """
    enhancement_dir, noisy_dir, out_dir = Path(enhancement_dir), Path(noisy_dir), Path(out_dir)
    run_level, rule = run_scoring(enhancement_dir)
    common = run_level if run_level is not None else float(level_db)
    scores = pd.DataFrame(read_scores(enhancement_dir / SCORES_CSV))
    if scores.empty:
        raise LevelCheckError(f"{enhancement_dir / SCORES_CSV}: no rows to check")
    if METRIC not in scores:
        raise LevelCheckError(f"{enhancement_dir / SCORES_CSV}: no {METRIC} column")
    files = sorted(scores.file.unique())[:max_files]
    scores = scores[scores.file.isin(files)]
    models = (read_labels(enhancement_dir / LABELS_CSV).models if (enhancement_dir / LABELS_CSV).is_file()
              else [s for s in scores.system.unique() if s != NOISY_SYSTEM])
    systems = [NOISY_SYSTEM, *[m for m in models if m in set(scores.system)]]
    label_rule = rule if rule is not None and rule.metric == METRIC else None
    with output_lock(out_dir, "level check"):
        rescored = rescore(enhancement_dir, noisy_dir, {s: files for s in systems}, out_dir / RESCORED_CSV,
                           None if run_level is not None else common, backend or LocalBackend(1, isolate=True),
                           dnsmos=dnsmos, progress=progress)
        rescored = rescored[rescored.file.isin(files)]
        summary = {
            "enhancement_dir": str(enhancement_dir), "files_checked": len(files),
            "run_level_db": run_level, "common_level_db": common,
            "rescored_as": "as is" if run_level is not None else f"at {common:g} dBFS",
            "labels_by": (f"the run's label rule: {label_rule.describe()}" if label_rule is not None
                          else "the argmax of DNSMOS OVR over the enhancers (the run's label rule is "
                          + ("not recorded)" if rule is None else f"on {rule.metric}, not OVR)")),
            "label_rule": label_rule.as_dict() if label_rule is not None else None,
            "rescored_errors": int((rescored.status != "ok").sum()),
            **compare(comparison_table(scores, rescored, run_level), systems, label_rule),
        }
        write_json_atomic(out_dir / SUMMARY_JSON, summary)
    return summary


def read_summary(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """OUT/summary.json, or None when the check did not run there."""
    path = Path(out_dir) / SUMMARY_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
