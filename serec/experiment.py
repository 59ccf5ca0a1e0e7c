"""The full protocol on one corpus with fixed seeds, written up as results/<name>/tables.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from serec.fileio import atomic_path, write_json_atomic, write_text_atomic
from serec.labels import LabelRule
from serec.lock import OutputLocked, output_lock
from serec.pipeline import (
    PipelineConfig,
    PipelineError,
    bound_steps,
    learner_evaluation_dir,
    run_steps,
    shown,
)
from serec.predictor import DEFAULT_LEARNER, LEARNERS
from serec.quality import METRIC_NAMES, METRICS
from serec.ray_backend import RayUnavailable, add_backend_arguments, backend_from_args
from serec.runinfo import RUN_JSON, write_run_json
from serec.schema import STRATEGIES_CSV
from serec.selection import DEFAULT_VERIFY_K, selector_record_dir

# The source checkout, when serec runs from one (its git commit is recorded).
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMINGS_JSON = "timings.json"
QUALITY_COMPUTE_PNG = "quality_vs_compute.png"
TABLES_MD = "tables.md"
# The policies the gain learners are compared on (learner_comparison_section).
LEARNER_POLICIES = ("predict_best", "predict_best_safe", f"verify_top{DEFAULT_VERIFY_K}")
SPLITS = ("train", "test")
F1_TITLES = {
    "two_stage": "two-stage (gatekeeper + hybrid expert)",
    "two_stage_tuned": "two-stage, threshold tuned on inner folds",
    "single": "single AST model",
    "tabular": "tabular (logistic regression on CE/KL features)",
    "majority": "majority class",
    "random": "random (class prior)",
}


# ---------------------------------------------------------------------------------------
# Markdown


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; the first column is left-aligned, the others right-aligned."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"
    body = ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _count_pct(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.0f}%)" if total else "0"


# ---------------------------------------------------------------------------------------
# Step times


def record_step_time(timings_path: Path, step: str, seconds: float, finished: bool) -> None:
    """Append one invocation of a step (its wall time, whether it finished) to timings.json."""
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings.setdefault(step, []).append({
        "seconds": round(seconds, 2), "finished": finished,
        "ended_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    write_json_atomic(timings_path, timings)


def timings_table(timings: Mapping[str, list[Mapping[str, Any]]]) -> str:
    rows, total = [], 0.0
    for step, runs in timings.items():
        seconds = sum(run["seconds"] for run in runs)
        total += seconds
        note = "" if len(runs) == 1 else f"{len(runs)} runs (an interrupted run and its resume add up)"
        if not runs[-1]["finished"]:
            note = "not finished"
        rows.append([step, f"{seconds:.0f}", f"{seconds / 60:.1f}", note])
    rows.append(["**total**", f"**{total:.0f}**", f"**{total / 60:.1f}**", ""])
    return markdown_table(["step", "seconds", "minutes", "note"], rows)


# ---------------------------------------------------------------------------------------
# Dataset statistics


def noise_classes(noise_dir: Path, manifest: Path | None) -> dict[str, str]:
    """Noise file name -> class, from a manifest CSV with `file` and `noise_class` columns.

    Default manifest: NOISE_DIR/manifest.csv when it exists. Files it does not list (or
    every file, without a manifest) are their own class: the file name without extension.
    """
    manifest = manifest or (noise_dir / "manifest.csv")
    if not manifest.is_file():
        return {}
    table = pd.read_csv(manifest)
    missing = {"file", "noise_class"} - set(table.columns)
    if missing:
        raise PipelineError(f"{manifest}: no column {', '.join(sorted(missing))} (want file, noise_class)")
    return {Path(str(f)).name: str(c) for f, c in zip(table.file, table.noise_class, strict=True)}


def both_splits(work_dir: Path, name: str) -> pd.DataFrame:
    """enhancement_train/NAME and enhancement_test/NAME (scores.csv or labels.csv) as one table."""
    return pd.concat([pd.read_csv(work_dir / f"enhancement_{split}" / name) for split in SPLITS])


def label_rule_text(work_dir: Path) -> str:
    """The label rule the enhancement runs recorded in their run.json, in words."""
    rules = {}
    for split in SPLITS:
        path = work_dir / f"enhancement_{split}" / RUN_JSON
        recorded = json.loads(path.read_text()).get("label_rule") if path.is_file() else None
        rules[split] = LabelRule(**recorded) if recorded else None
    known = {rule for rule in rules.values() if rule is not None}
    if not known:
        return "Labels: the rule is not recorded in the enhancement runs' run.json."
    if len(known) > 1 or None in rules.values():
        return "Labels: the two splits were labelled by different rules: " + "; ".join(
            f"{split}: {rule.describe() if rule else 'not recorded'}" for split, rule in rules.items()
        ) + "."
    rule = known.pop()
    return (f"Labels: the model with the best {METRICS[rule.metric].heading} ({rule.metric}) per "
            f"file; {rule.describe()} (from the enhancement runs' run.json).")


def labelled_mixtures(work_dir: Path, classes: Mapping[str, str]) -> pd.DataFrame:
    """metadata.csv of the mixtures joined with both splits' labels, plus a noise_class column."""
    metadata = pd.read_csv(work_dir / "mixtures" / "metadata.csv")
    labels = both_splits(work_dir, "labels.csv")
    table = metadata.merge(labels[["file", "label"]], on="file", how="left")
    names = table.noise_source.map(lambda p: Path(str(p)).name)
    table["noise_class"] = [classes.get(n, Path(n).stem) for n in names]
    table["label"] = table.label.fillna("(no label: enhancement failed)")
    return table


def label_distribution(table: pd.DataFrame, by: str, heading: str) -> str:
    """Counts (row %) of each label per value of `by`, most frequent label first, then all rows."""
    order = table.label.value_counts().index.tolist()
    counts = pd.crosstab(table[by], table.label).reindex(columns=order, fill_value=0)
    rows = []
    for value, row in counts.iterrows():
        total = int(row.sum())
        rows.append([_fmt(value, 0) if isinstance(value, float) else value, total,
                     *(_count_pct(int(row[c]), total) for c in order)])
    overall = table.label.value_counts()
    rows.append(["**all**", len(table), *(_count_pct(int(overall[c]), len(table)) for c in order)])
    return markdown_table([heading, "files", *order], rows)


def dataset_section(work_dir: Path, config: Mapping[str, Any], classes: Mapping[str, str]) -> str:
    table = labelled_mixtures(work_dir, classes)
    durations = both_splits(work_dir, "scores.csv")
    durations = durations.drop_duplicates("file").set_index("file").duration_s
    rows = []
    for split in (*SPLITS, None):
        part = table if split is None else table[table.split == split]
        hours = durations.reindex(part.file).sum() / 3600
        rows.append([split or "**all**", len(part), part.speaker.nunique(), part.clean_source.nunique(),
                     part.noise_source.nunique(), part.noise_class.nunique(), f"{hours:.2f}"])
    overlap = set(table[table.split == "train"].speaker) & set(table[table.split == "test"].speaker)
    shared_noise = set(table[table.split == "train"].noise_source) & set(table[table.split == "test"].noise_source)
    snrs = sorted(table.snr_db.unique())
    return "\n\n".join([
        "## Dataset",
        f"Corpus: clean `{config['clean_dir']}`, noise `{config['noise_dir']}`. "
        f"{len(table)} mixtures at SNR {', '.join(_fmt(s, 0) for s in snrs)} dB, split by speaker "
        f"and noise recording ({len(overlap)} speakers and {len(shared_noise)} noise recordings in both "
        f"splits). {label_rule_text(work_dir)}",
        markdown_table(["split", "mixtures", "speakers", "clean files", "noise files", "noise classes", "hours"], rows),
        "### Label distribution by SNR (files, row %)",
        label_distribution(table, "snr_db", "SNR dB"),
        "### Label distribution by noise class (files, row %)",
        label_distribution(table, "noise_class", "noise class"),
    ])


# ---------------------------------------------------------------------------------------
# Scores, recommender and routing


def model_scores_section(work_dir: Path) -> str:
    """Mean of each score per model over every mixture (both splits), real-time factor, win share."""
    scores = both_splits(work_dir, "scores.csv")
    labels = both_splits(work_dir, "labels.csv")
    wins = labels.label.value_counts()
    rows = []
    for system, group in scores.groupby("system", sort=False):
        ok = group[group.status == "ok"]
        means = [_fmt(float(ok[c].mean())) if c in ok else "" for c in METRIC_NAMES]
        rtf = ok.seconds.sum() / ok.duration_s.sum() if system != "noisy" else float("nan")
        best = "" if system == "noisy" else _count_pct(int(wins.get(system, 0)), len(labels))
        rows.append([system, len(ok), len(group) - len(ok), *means, _fmt(rtf, 4), best])
    return "\n\n".join([
        "## Mean scores per model",
        f"All {scores.file.nunique()} mixtures of both splits (`enhancement_train/` and "
        "`enhancement_test/` scores.csv; errors left out of the means). RTF = enhancement "
        "seconds / audio seconds on one core; best = files labelled with the model (its label "
        "metric is the best and passes the label rule).",
        markdown_table(["model", "files", "errors", *(METRICS[m].heading for m in METRIC_NAMES),
                        "RTF", "best"], rows),
    ])


def level_check_tables(summary: Mapping[str, Any]) -> str:
    """serec.level_check's summary as two tables: per system (level, OVR and wins both ways), and
    each setting's best single model, oracle and headroom."""
    level = f"{summary['common_level_db']:g} dBFS"
    systems = markdown_table(
        ["system", "mean active level dBFS", "OVR as is", f"OVR at {level}", "labels as is", f"labels at {level}"],
        [[row["system"], _fmt(row.get("active_level_db"), 1), _fmt(row.get("ovr_as_is")),
          _fmt(row.get("ovr_at_level")), row.get("wins_as_is", ""), row.get("wins_at_level", "")]
         for row in summary["systems"]])
    settings = [(name, summary["settings"][key]) for name, key in (("as is", "as_is"), (f"at {level}", "at_level"))]
    headroom = markdown_table(
        ["scoring", "best single", "its OVR", "oracle OVR", "headroom"],
        [[name, s["best_single"], _fmt(s["best_single_ovr"]), _fmt(s["oracle_ovr"]), f"{s['headroom']:+.3f}"]
         for name, s in settings if s])
    return f"{systems}\n\n{headroom}"


def level_check_section(work_dir: Path) -> str:
    """The scoring-level check of the training files (serec.level_check), when the run made one."""
    from serec.level_check import read_summary, summary_sentence
    from serec.pipeline import LEVEL_CHECK_DIR

    summary = read_summary(work_dir / LEVEL_CHECK_DIR)
    if summary is None:
        return ""
    run = "as is" if summary["run_level_db"] is None else f"at {summary['run_level_db']:g} dBFS"
    return "\n\n".join([
        f"### Scoring level: DNSMOS at {summary['common_level_db']:g} dBFS vs as is "
        f"({summary['files']} training files)",
        f"**{summary_sentence(summary)}** The enhancement run scored the training split {run}; the first "
        f"{summary['files_checked']} training files (sorted; never test files) were re-scored "
        f"{summary['rescored_as']} (`{LEVEL_CHECK_DIR}/rescored.csv`, {summary['rescored_errors']} errors) and "
        f"the {summary['files']} files every system has both ways are compared. Level = mean active-speech "
        f"level of the output as written; labels by {summary['labels_by']}; headroom = the oracle's mean "
        "OVR (best model per file) minus the best single model's.",
        level_check_tables(summary),
    ])


def f1_section(work_dir: Path) -> str:
    metrics = json.loads((work_dir / "recommender" / "evaluate_pipeline" / "metrics.json").read_text())
    rows = [[F1_TITLES.get(system, system),
             f"{entry['macro_f1_mean']:.3f} ± {entry['macro_f1_std']:.3f}",
             f"{entry['accuracy_mean']:.3f} ± {entry['accuracy_std']:.3f}", entry["n_folds"]]
            for system, entry in metrics["summary"].items()]
    return "\n\n".join([
        "## Recommender: macro F1",
        f"Cross-validation on the training split (`recommender/evaluate_pipeline/metrics.json`), on "
        f"the folds the quality selector uses too (`recommender/folds.csv`; groups: "
        f"{metrics.get('group_by', 'not recorded')}): a file whose speaker and noise recording fall in "
        f"different folds is on neither side of that fold, so {metrics.get('held_out_files', '?')} of "
        f"{metrics.get('files', '?')} files are held out once. Mean ± std over folds "
        f"{', '.join(map(str, metrics['folds_evaluated']))}; classes {', '.join(metrics['class_names'])}; "
        f"gatekeeper class {metrics['gatekeeper_class']}.",
        markdown_table(["recommender", "macro F1", "accuracy", "folds"], rows),
    ])


def selector_training(work_dir: Path, learner: str) -> dict[str, Any] | None:
    """The learner's training record (REC/predictor*/run.json's selector_training), None when absent."""
    record = work_dir / "recommender" / selector_record_dir(learner) / RUN_JSON
    return json.loads(record.read_text()).get("selector_training", {}) if record.is_file() else None


def strategies_table(folder: Path) -> pd.DataFrame:
    """FOLDER/strategies.csv (step 5's, or python -m serec.selection evaluate's)."""
    return pd.read_csv(folder / STRATEGIES_CSV)


def selector_section(work_dir: Path) -> str:
    """How the quality selector was trained (REC/predictor/run.json), when the run trained one."""
    training = selector_training(work_dir, DEFAULT_LEARNER)
    if training is None:
        return ""
    mae = ", ".join(f"{v:.3f}" for v in training.get("oof_mae", []))
    return "\n\n".join([
        "## Quality selector",
        f"Per-model LightGBM regressors of each model's label-metric gain over the noisy input, on "
        f"{training.get('files')} training files with `dnsmos_embed` features (CE/KL, cheap descriptors, the "
        f"input's DNSMOS and the DNSMOS network's pooled and last hidden activations). "
        f"{training.get('folds')} folds disjoint in speakers AND noise recordings (a file whose speaker "
        f"and noise fall in different folds is left out of both sides): training files per fold "
        f"{training.get('fold_train_files')}, {training.get('held_out_files')} files held out once. The "
        f"deployed predictor is the ensemble of the fold models (mean; spread = uncertainty); the safe "
        f"policy's margin was chosen on the out-of-fold predictions, never on the test split. Out-of-fold "
        f"mean absolute error per model: {mae}.",
    ])


def routing_section(work_dir: Path, results_dir: Path) -> str:
    from serec.report import quality_compute_figure
    from serec.strategies import verdict

    strategies = strategies_table(work_dir / "recommendation")
    records = strategies.to_dict("records")
    files = int(strategies.files.iloc[0])
    label = str(strategies.label_metric.iloc[0])
    figure = quality_compute_figure(records)
    plot = ""
    if figure is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(results_dir / QUALITY_COMPUTE_PNG) as tmp:
            figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plot = f"![quality vs compute]({QUALITY_COMPUTE_PNG})"
    rows = []
    for row in strategies.itertuples(index=False):
        captured = ("" if pd.isna(row.oracle_gain_captured) else
                    f"{100 * row.oracle_gain_captured:.0f}% [{100 * row.captured_ci_low:.0f}, "
                    f"{100 * row.captured_ci_high:.0f}]")
        rows.append([row.strategy, _fmt(row.dnsmos_ovr), _fmt(row.dnsmos_sig), _fmt(row.dnsmos_bak),
                     _fmt(row.pesq_wb), _fmt(row.stoi), _fmt(row.si_sdr, 2),
                     f"{_fmt(row.gain_over_best_single)} [{_fmt(row.gain_ci_low)}, {_fmt(row.gain_ci_high)}]",
                     captured, _fmt(row.regret), _fmt(row.total_seconds, 1), _fmt(row.compute_vs_best_single, 2),
                     _fmt(row.pesq_best_agreement, 2)])
    return "\n\n".join(filter(None, [
        "## Adaptive selection vs fixed models and the oracle",
        f"**Verdict: {verdict(records)}.**",
        plot,
        f"The {files} test files (speakers and noise recordings never seen in training; "
        "`recommendation/strategies.csv`). `adaptive` and `adaptive_single_model` are the thesis's "
        "classifiers (gatekeeper + expert, and single model, refitted on every training file), routed and enhanced for real; "
        "the selector's policies (`predict_best` ... `verify_fixed_top2`, `cost_aware@lambda` the sweep) "
        "are scored from `enhancement_test/scores.csv`, where every model ran on every test file, so "
        "their outputs and scores are the ones those policies would keep. Gain = mean "
        f"{METRICS[label].heading} minus the best single model's, with a 95% paired-bootstrap interval over "
        "files; captured = that gain as a share of the oracle's (with its interval); regret = mean loss per "
        "file against the oracle; compute = enhancers run + recommender (features + prediction) + DNSMOS "
        "scorings made to choose, in seconds on one core for all test files, and as a multiple of the "
        "best single model's; PESQ agree = share of files where the kept model is also the PESQ-best.",
        markdown_table(["strategy", "OVR", "SIG", "BAK", "PESQ-WB", "STOI", "SI-SDR", "gain [95% CI]",
                        "captured [95% CI]", "regret", "total s", "x compute", "PESQ agree"], rows),
    ]))


def learner_row(learner: str, training: Mapping[str, Any], strategies: pd.DataFrame | None) -> list[str]:
    """One learner's row: training seconds, mean out-of-fold MAE, recommender seconds per file,
    and each compared policy's gain over the best single model and captured share of the oracle's."""
    mae = [float(v) for v in training.get("oof_mae", [])]
    rows = {} if strategies is None else {r["strategy"]: r for r in strategies.to_dict("records")}
    best = rows.get("predict_best")
    cells = [learner, _fmt(training.get("seconds"), 1), _fmt(sum(mae) / len(mae) if mae else None),
             _fmt(best["recommender_seconds"] / best["files"], 4) if best else ""]
    for policy in LEARNER_POLICIES:
        row = rows.get(policy)
        captured = None if row is None else row["oracle_gain_captured"]
        cells += [_fmt(None if row is None else row["gain_over_best_single"]),
                  "" if captured is None or pd.isna(captured) else f"{100 * captured:.0f}%"]
    return cells


def learner_comparison_section(work_dir: Path) -> str:
    """The gain learners side by side (the default's step-5 policies and every other learner's
    `serec.selection evaluate`), when the run trained another learner."""
    others = [name for name in LEARNERS if name != DEFAULT_LEARNER and selector_training(work_dir, name) is not None]
    if not others or selector_training(work_dir, DEFAULT_LEARNER) is None:
        return ""
    rows = []
    for name in (DEFAULT_LEARNER, *others):
        folder = work_dir / "recommendation" if name == DEFAULT_LEARNER else learner_evaluation_dir(work_dir, name)
        strategies = strategies_table(folder) if (folder / STRATEGIES_CSV).is_file() else None
        rows.append(learner_row(name, selector_training(work_dir, name) or {}, strategies))
    policy_columns = [f"{p} {c}" for p in LEARNER_POLICIES for c in ("gain", "captured")]
    return "\n\n".join([
        "### Gain learners on the same folds, targets and policies",
        "Each learner predicts every model's gain on the same training files, folds (`recommender/folds.csv`) "
        "and `dnsmos_embed` features (`ast` also reads the noisy audio); its policies are scored on the same "
        "test files (`recommendation/strategies.csv`, `recommendation/selector_<learner>/strategies.csv`). "
        "Training s = fitting every fold (`recommender/predictor*/run.json`); OOF MAE = out-of-fold mean "
        "absolute error on the training folds, averaged over models; recommender s/file = features + "
        "prediction per test file on one thread; gain = mean gain over the best single model; captured = "
        "share of the oracle's gain.",
        markdown_table(["learner", "training s", "OOF MAE", "recommender s/file", *policy_columns], rows),
        f"The learner used by the routing policies above is {DEFAULT_LEARNER} (the default, chosen before "
        "seeing test results); these rows are reported, not used to choose anything.",
    ])


def targets_section(work_dir: Path) -> str:
    """The quality selector's targets on the test split, met or not, and what limits them (serec.targets)."""
    from serec.level_check import read_summary
    from serec.pipeline import LEVEL_CHECK_DIR
    from serec.targets import limits_text, target_checks

    folder = work_dir / "recommendation"
    if not (folder / STRATEGIES_CSV).is_file():
        return ""
    rows = {r["strategy"]: r for r in strategies_table(folder).to_dict("records")}
    checks = target_checks(rows, DEFAULT_VERIFY_K)
    if not checks:
        return ""
    training = selector_training(work_dir, DEFAULT_LEARNER) or {}
    summary = read_summary(work_dir / LEVEL_CHECK_DIR)
    changed = summary["labels_changed"] / summary["files"] if summary and summary.get("files") else None
    limits = limits_text(rows, [float(v) for v in training.get("oof_mae", [])], changed, DEFAULT_VERIFY_K)
    return "\n\n".join(filter(None, [
        "### The selector's targets",
        f"Measured on the test files above (the {DEFAULT_LEARNER} learner); nothing was tuned on them.",
        markdown_table(["target", "measured", "met"], [[t, m, "yes" if ok else "**no**"] for t, m, ok in checks]),
        f"What limits them: {limits}." if limits else "",
    ]))


def write_tables(work_dir: Path, results_dir: Path, classes: Mapping[str, str]) -> Path:
    """results_dir/tables.md, with copies of run.json and timings.json, from the files the steps wrote."""
    run = json.loads((work_dir / "run.json").read_text())
    settings = {k: v for k, v in run["flags"].items() if k not in ("tables_only", "results_root", "work_dir")}
    timings = json.loads((work_dir / TIMINGS_JSON).read_text()) if (work_dir / TIMINGS_JSON).is_file() else {}
    header = "\n".join([
        f"# serec results: {run['flags']['name']}",
        "",
        "Written by `serec.experiment` from the files under its work folder; every number below "
        "is read from those files.",
        "",
        f"- command: `{run['command']}` (`experiments/reproduce.sh NAME CLEAN_DIR NOISE_DIR FLAGS` "
        "runs `python -m serec.experiment --name NAME --clean_dir CLEAN_DIR --noise_dir NOISE_DIR FLAGS`)",
        f"- settings: {json.dumps(settings)}",
        f"- steps started {run.get('started_utc', 'at a time not recorded')} by code "
        f"{run.get('code', 'not recorded')}; tables written "
        f"{datetime.now(UTC).isoformat(timespec='seconds')} by code {_git_commit()}",
        f"- machine: {run.get('machine', 'not recorded')}; packages: "
        + ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v),
    ])
    sections = [header, dataset_section(work_dir, settings, classes), model_scores_section(work_dir),
                level_check_section(work_dir),
                f1_section(work_dir), selector_section(work_dir), routing_section(work_dir, results_dir),
                targets_section(work_dir), learner_comparison_section(work_dir),
                "## Time of each step\n\nWall time on this machine (`timings.json`).\n\n" + timings_table(timings)]
    path = results_dir / TABLES_MD
    write_text_atomic(path, "\n\n".join(filter(None, sections)) + "\n")
    write_json_atomic(results_dir / "run.json", run)
    if timings:
        write_json_atomic(results_dir / TIMINGS_JSON, timings)
    return path


# ---------------------------------------------------------------------------------------
# Command line


def _git_commit() -> str:
    """The checkout's commit (with -dirty for uncommitted changes), so a table names its code."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True)
        return f"git {out.stdout.strip()}"
    except (OSError, subprocess.CalledProcessError):
        return "git commit unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="experiment name: results go to RESULTS_ROOT/NAME")
    p.add_argument("--clean_dir", type=Path, required=True, help="clean speech (recursive)")
    p.add_argument("--noise_dir", type=Path, required=True, help="noise recordings (recursive)")
    p.add_argument("--noise_manifest", type=Path,
                   help="CSV with file, noise_class columns (default NOISE_DIR/manifest.csv when it "
                   "exists; otherwise each noise file is its own class)")
    p.add_argument("--work_dir", type=Path, help="audio, models and step outputs (default runs/NAME)")
    p.add_argument("--results_root", type=Path, default=Path("results"), help="tables.md goes to RESULTS_ROOT/NAME")
    p.add_argument("--speaker_regex", help="the mixing step's --speaker_regex")
    p.add_argument("--models", nargs="+", help="enhancers (default: the enhancement driver's built-ins)")
    p.add_argument("--models_config", type=Path,
                   help="TOML configuring external models (SGMSE, StoRM, CDiffuSE), for steps 2 and 5")
    p.add_argument("--num_mixtures", type=int, default=1000)
    p.add_argument("--test_fraction", type=float, default=0.2, help="share of speakers held out as test")
    p.add_argument("--n_folds", type=int, default=5)
    p.add_argument("--num_epochs", type=int, default=50)
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1))
    add_backend_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="mixing, enhancement and routing seed")
    p.add_argument("--recommender_seed", type=int, default=42, help="folds and training seed")
    p.add_argument("--level_check_files", type=int, default=96,
                   help="re-score the DNSMOS of the first N training files as is (the run scores at "
                   "-26 dBFS) and report how labels and headroom change in tables.md; 0: leave it out")
    p.add_argument("--compare_learners", nargs="*", default=["ast"], metavar="NAME",
                   choices=[name for name in LEARNERS if name != DEFAULT_LEARNER],
                   help=f"gain learners trained beside {DEFAULT_LEARNER} on the same folds, features and "
                   "targets, evaluated on the test split and reported in tables.md (never used to route); "
                   "the flag alone: none")
    p.add_argument("--no_quality_selector", action="store_true",
                   help="leave out the quality selector (its features, training and policies' rows)")
    p.add_argument("--tables_only", action="store_true",
                   help="only rebuild tables.md from the work folder of a finished run")
    args = p.parse_args(argv)
    if args.level_check_files < 0:
        p.error("--level_check_files must be 0 (leave the check out) or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path("runs") / args.name
    results_dir = args.results_root / args.name
    config = PipelineConfig(
        output_dir=work_dir, clean_dir=args.clean_dir, noise_dir=args.noise_dir,
        speaker_regex=args.speaker_regex, models=tuple(args.models) if args.models else None,
        models_config=args.models_config,
        num_mixtures=args.num_mixtures, test_fraction=args.test_fraction, n_folds=args.n_folds,
        num_epochs=args.num_epochs, num_workers=args.num_workers, seed=args.seed,
        backend=args.backend, ray_address=args.ray_address,
        recommender_seed=args.recommender_seed, quality_selector=not args.no_quality_selector,
        level_check_files=args.level_check_files, compare_learners=tuple(args.compare_learners),
    )
    command = shlex.join(["python", "-m", "serec.experiment", *(argv if argv is not None else sys.argv[1:])])
    try:
        classes = noise_classes(args.noise_dir, args.noise_manifest)
        # One experiment per work folder (each step also locks its own output folder).
        with output_lock(work_dir, "experiment"):
            if not args.tables_only:
                for folder in (args.clean_dir, args.noise_dir):
                    if not folder.is_dir():
                        raise PipelineError(f"{folder}: not a folder")
                # Ray is joined (or started) now, so a bad setup stops before step 1; the
                # steps then share the connection.
                backend_from_args(args, args.num_workers)
                write_run_json(work_dir, vars(args), command=command, code=_git_commit(),
                               machine=f"{platform.machine()}, {os.cpu_count()} cores")
                started = time.perf_counter()
                run_steps(bound_steps(config),
                          on_step_end=lambda step, seconds, finished: record_step_time(
                              work_dir / TIMINGS_JSON, step, seconds, finished))
                print(f"\nall steps done in {time.perf_counter() - started:.0f} s", flush=True)
            path = write_tables(work_dir, results_dir, classes)
    except (PipelineError, OutputLocked, RayUnavailable) as exc:
        print(f"experiment: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"experiment: error: {exc.filename}: not found (did every step finish? run without "
              "--tables_only to resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print("\n" + path.read_text(encoding="utf-8"))
    print(f"tables: {shown(path.resolve())}\nwork folder (audio, models): {shown(work_dir.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
