"""experiments/reproduce.sh's engine: the whole protocol on a tiny corpus, then tables.md and its step times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from serec.demo import build_corpus
from serec.experiment import label_distribution, noise_classes
from serec.pipeline import PipelineError

REPO = Path(__file__).resolve().parents[1]
STEPS = ["mixing", "split", "enhancement", "level_check", "features", "recommender", "recommendation"]


def _experiment(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serec.experiment", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


def test_label_distribution_counts_each_label_per_value() -> None:
    table = pd.DataFrame({"snr_db": [0.0, 0.0, 0.0, 5.0], "label": ["a", "a", "b", "b"]})
    text = label_distribution(table, "snr_db", "SNR dB").splitlines()
    assert text[0] == "| SNR dB | files | a | b |"
    assert text[2] == "| 0 | 3 | 2 (67%) | 1 (33%) |"
    assert text[3] == "| 5 | 1 | 0 (0%) | 1 (100%) |"
    assert text[4] == "| **all** | 4 | 2 (50%) | 2 (50%) |"


def test_noise_classes_from_manifest_else_none(tmp_path: Path) -> None:
    assert noise_classes(tmp_path, None) == {}
    (tmp_path / "manifest.csv").write_text("file,noise_class\nsub/a_1.wav,engine\nb.wav,rain\n")
    assert noise_classes(tmp_path, None) == {"a_1.wav": "engine", "b.wav": "rain"}
    bad = tmp_path / "bad.csv"
    bad.write_text("file,kind\nb.wav,rain\n")
    with pytest.raises(PipelineError, match="bad.csv: no column noise_class"):
        noise_classes(tmp_path, bad)


# Three fast models: the tiny DNSMOS's near-random labels then leave every fold's expert two
# classes or more to train on.
@pytest.mark.slow
def test_experiment_end_to_end_writes_every_table_and_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    build_corpus(corpus, speech="synth", utterances_per_speaker=6, seed=1)
    (corpus / "noise" / "manifest.csv").write_text(
        "file,noise_class\n" + "".join(f"synth_{k}.wav,{'tonal' if k == 'hum' else 'noise'}\n"
                                       for k in ("pink", "brown", "babble", "hum", "impulsive", "modulated")))
    args = ["--name", "tiny", "--clean_dir", corpus / "clean", "--noise_dir", corpus / "noise",
            "--work_dir", tmp_path / "work", "--results_root", tmp_path / "results",
            "--num_mixtures", 48, "--test_fraction", 0.25, "--models", "webrtc", "spectral_gating", "spectral_gating_stationary",
            "--n_folds", 2, "--num_epochs", 2, "--num_workers", 2, "--level_check_files", 2,
            "--compare_learners"]  # no other gain learner: the AST's comparison has its own tests
    result = _experiment(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = (tmp_path / "results" / "tiny" / "tables.md").read_text()
    assert result.stdout.count("| strategy |") == 1 and "tables: " in result.stdout

    for heading in ("## Dataset", "### Label distribution by SNR", "### Label distribution by noise class",
                    "## Mean scores per model", "## Recommender: macro F1",
                    "## Adaptive selection vs fixed models and the oracle", "## Time of each step"):
        assert heading in tables
    assert "### Scoring level: DNSMOS at -26 dBFS vs as is (" in tables
    metadata = pd.read_csv(tmp_path / "work" / "mixtures" / "metadata.csv")
    assert f"| **all** | 48 | {metadata.speaker.nunique()} |" in tables
    assert "| tonal |" in tables and "| noise |" in tables
    for model in ("noisy", "webrtc", "spectral_gating", "spectral_gating_stationary"):
        assert f"\n| {model} | 48 | 0 |" in tables
    for system in ("two-stage (gatekeeper + hybrid expert)", "single AST model", "majority class",
                   "random (class prior)", "tabular (logistic regression on CE/KL features)"):
        assert f"| {system} | " in tables
    n_test = int((metadata.split == "test").sum())
    for strategy in ("adaptive", "oracle", "always_webrtc", "run_all_pick_best_ovr", "predict_best",
                     "predict_best_safe", "cost_aware", "verify_top2", "verify_fixed_top2"):
        assert f"\n| {strategy} | " in tables
    # The quality selector: trained on speaker- and noise-disjoint folds, its verdict and plot first.
    assert "## Quality selector" in tables and "**Verdict: " in tables
    assert tables.index("**Verdict: ") < tables.index("| strategy |")
    assert (tmp_path / "results" / "tiny" / "quality_vs_compute.png").stat().st_size > 1000
    assert "0 noise recordings in both splits" in tables
    assert "crossed with its noise_source" in tables and "files are held out once" in tables
    assert f"The {n_test} test files" in tables
    timings = json.loads((tmp_path / "results" / "tiny" / "timings.json").read_text())
    assert list(timings) == STEPS and all(runs[0]["finished"] for runs in timings.values())
    assert "python -m serec.experiment --name tiny" in tables

    again = _experiment(*args, cwd=tmp_path)  # every step finds its outputs and resumes
    assert again.returncode == 0, again.stderr[-3000:]
    timings = json.loads((tmp_path / "results" / "tiny" / "timings.json").read_text())
    assert all(len(runs) == 2 for runs in timings.values())
    assert "2 runs" in (tmp_path / "results" / "tiny" / "tables.md").read_text()


def test_tables_only_without_a_finished_run_is_a_clear_error(tmp_path: Path) -> None:
    result = _experiment("--name", "none", "--clean_dir", tmp_path, "--noise_dir", tmp_path,
                         "--work_dir", tmp_path / "work", "--results_root", tmp_path / "r", "--tables_only",
                         cwd=tmp_path)
    assert result.returncode == 2
    assert "run.json: not found" in result.stderr and "resume" in result.stderr


def test_tables_print_the_label_rule_the_enhancement_runs_recorded(tmp_path) -> None:
    from serec.experiment import label_rule_text
    from serec.labels import LabelRule
    from serec.runinfo import write_run_json

    assert "not recorded" in label_rule_text(tmp_path)
    relative = LabelRule("pesq_wb", "relative", min_gain=0.1)
    for split in ("train", "test"):
        write_run_json(tmp_path / f"enhancement_{split}", {}, label_rule=relative.as_dict())
    text = label_rule_text(tmp_path)
    assert "best PESQ-WB (pesq_wb)" in text and "beats the noisy input's pesq_wb by at least 0.1" in text
    write_run_json(tmp_path / "enhancement_test", {}, label_rule=LabelRule().as_dict())
    text = label_rule_text(tmp_path)
    assert "different rules" in text and "every model's dnsmos_ovr <= 2" in text


# ---------------------------------------------------------------------------------------
# The scoring-level check (serec.level_check; the experiment's level_check step)


def _long_table(as_is: dict[str, dict[str, float]], at_level: dict[str, dict[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"file": f, "system": s, "active_level_db": -30.0, "ovr_as_is": v,
                          "ovr_at_level": at_level[f][s]} for f, row in as_is.items() for s, v in row.items()])


def test_level_comparison_counts_label_changes_and_headroom_on_a_hand_made_table() -> None:
    from serec.labels import LabelRule
    from serec.level_check import compare

    as_is = {"a": {"noisy": 2.5, "m1": 3.0, "m2": 2.8}, "b": {"noisy": 2.0, "m1": 2.2, "m2": 2.6},
             "c": {"noisy": 1.5, "m1": 1.8, "m2": 1.9}, "d": {"noisy": 2.0, "m1": 2.0}}  # d: m2 failed
    at_level = {"a": {"noisy": 2.4, "m1": 2.5, "m2": 2.9}, "b": {"noisy": 2.1, "m1": 2.4, "m2": 2.0},
                "c": {"noisy": 1.6, "m1": 1.95, "m2": 1.7}, "d": {"noisy": 2.0, "m1": 2.0}}
    table = _long_table(as_is, at_level)
    by_argmax = compare(table, ["noisy", "m1", "m2"], None)
    assert by_argmax["files"] == 3  # d is not complete
    assert by_argmax["labels_changed"] == 3  # a m1->m2, b m2->m1, c m2->m1
    reference, levelled = by_argmax["settings"]["as_is"], by_argmax["settings"]["at_level"]
    assert reference["best_single"] == "m2" and levelled["best_single"] == "m1"
    assert reference["headroom"] == pytest.approx((3.0 + 2.6 + 1.9) / 3 - (2.8 + 2.6 + 1.9) / 3)
    assert levelled["headroom"] == pytest.approx((2.9 + 2.4 + 1.95) / 3 - (2.5 + 2.4 + 1.95) / 3)
    # The thesis rule: c is All_Failed both ways (best <= 2.0), so only a and b change.
    by_rule = compare(table, ["noisy", "m1", "m2"], LabelRule())
    assert by_rule["labels_changed"] == 2
    wins = {row["system"]: (row.get("wins_as_is"), row.get("wins_at_level")) for row in by_rule["systems"]}
    assert wins == {"noisy": (None, None), "m1": (1, 1), "m2": (1, 1), "All_Failed": (1, 1)}
    noisy = next(row for row in by_rule["systems"] if row["system"] == "noisy")
    assert noisy["ovr_as_is"] == pytest.approx((2.5 + 2.0 + 1.5) / 3)  # only the complete files


class _LoudnessDNSMOS:
    """A DNSMOS stand-in that, like the real one, rewards quieter signals: OVR = 3 - 0.02 x active
    level (dBFS) - 0.5 x the share of energy above 4 kHz (noise)."""

    def __init__(self) -> None:
        self.clips = 0

    def score(self, audio, sr):
        return self.score_batch([audio], sr)[0]

    def score_batch(self, audios, sr=16000):
        import numpy as np

        from serec.level_check import active_level_db

        self.clips += len(audios)
        out = []
        for audio in audios:
            power = np.abs(np.fft.rfft(audio)) ** 2
            high = power[np.fft.rfftfreq(len(audio), 1 / sr) > 4000].sum() / power.sum()
            ovr = 3.0 - 0.02 * active_level_db(audio) - 0.5 * high
            out.append({"sig": ovr, "bak": ovr, "ovr": ovr, "p808": ovr})
        return out


def _enhancement_run(folder: Path, run_level_db: float | None, dnsmos: _LoudnessDNSMOS) -> None:
    """noisy = a 440 Hz tone + white noise; `quiet` = noisy 26 dB down; `clean` = the tone alone.
    scores.csv holds the stand-in's OVR at `run_level_db` (None: as is), as the driver would."""
    import numpy as np

    from serec.audio import load_audio, write_wav
    from serec.fileio import write_csv_atomic
    from serec.labels import LabelRule
    from serec.quality import QualityScorer
    from serec.runinfo import write_run_json
    from serec.schema import SCORE_COLUMNS

    rng = np.random.default_rng(0)
    scorer = QualityScorer(dnsmos=dnsmos, metrics=["dnsmos_ovr"], dnsmos_level_db=run_level_db)
    rows = []
    for i in range(4):
        tone = 0.1 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
        noisy = tone + 0.05 * rng.standard_normal(16000)
        for system, audio in (("noisy", noisy), ("quiet", noisy * 10 ** (-26 / 20)), ("clean", tone)):
            path = folder / "noisy" / f"f{i}.wav" if system == "noisy" else folder / "enh" / "enhanced" / system / f"f{i}.wav"
            write_wav(path, audio.astype(np.float32))
            ovr = scorer.score(load_audio(path)).values["dnsmos_ovr"]
            rows.append({"file": f"f{i}.wav", "system": system, "status": "ok", "dnsmos_ovr": ovr})
    write_csv_atomic(folder / "enh" / "scores.csv", SCORE_COLUMNS, rows)
    write_run_json(folder / "enh", {}, scoring={"dnsmos_level_db": run_level_db}, label_rule=LabelRule().as_dict())


@pytest.mark.parametrize("run_level_db", [None, -26.0])
def test_level_check_rescores_the_other_way_and_the_quiet_system_wins_only_as_is(
        tmp_path: Path, run_level_db: float | None) -> None:
    from serec.level_check import LevelCheckError, read_summary, run_level_check
    from serec.parallel import InProcessBackend
    from serec.runinfo import write_run_json

    dnsmos = _LoudnessDNSMOS()
    _enhancement_run(tmp_path, run_level_db, dnsmos)
    made = dnsmos.clips
    check = {"max_files": 3, "backend": InProcessBackend(), "dnsmos": dnsmos, "progress": False}
    summary = run_level_check(tmp_path / "enh", tmp_path / "noisy", tmp_path / "check", **check)
    assert dnsmos.clips - made == 9  # 3 files x 3 systems, re-scored once
    rescored = pd.read_csv(tmp_path / "check" / "rescored.csv")
    # The run at -26 dBFS is re-scored as is (empty level), the run as is at -26 dBFS.
    assert rescored.dnsmos_level_db.isna().all() if run_level_db is not None else (rescored.dnsmos_level_db == -26).all()
    assert summary == read_summary(tmp_path / "check")
    assert summary["files"] == 3 and summary["common_level_db"] == -26.0
    assert summary["labels_by"].startswith("the run's label rule")
    systems = {row["system"]: row for row in summary["systems"]}
    # 26 dB quieter: as is it gains 0.52 OVR and wins every file; at a common level it equals
    # the noisy input and the tone alone (no noise) wins.
    assert systems["quiet"]["active_level_db"] - systems["noisy"]["active_level_db"] == pytest.approx(-26, abs=0.05)
    assert systems["quiet"]["ovr_as_is"] - systems["noisy"]["ovr_as_is"] == pytest.approx(0.52, abs=0.01)
    assert systems["quiet"]["ovr_at_level"] == pytest.approx(systems["noisy"]["ovr_at_level"], abs=1e-3)
    assert (systems["quiet"]["wins_as_is"], systems["clean"]["wins_at_level"]) == (3, 3)
    assert summary["labels_changed"] == 3
    assert summary["settings"]["as_is"]["best_single"] == "quiet"
    assert summary["settings"]["at_level"]["best_single"] == "clean"

    again = run_level_check(tmp_path / "enh", tmp_path / "noisy", tmp_path / "check", **check)
    assert again == summary and dnsmos.clips - made == 9  # resumed: nothing re-scored
    write_run_json(tmp_path / "enh", {}, scoring={"dnsmos_level_db": -20.0 if run_level_db is None else None})
    with pytest.raises(LevelCheckError, match="re-scored another way"):
        run_level_check(tmp_path / "enh", tmp_path / "noisy", tmp_path / "check", **check)


def test_level_check_section_reads_the_summary(tmp_path: Path) -> None:
    from serec.experiment import level_check_section
    from serec.fileio import write_json_atomic
    from serec.level_check import compare
    from serec.pipeline import LEVEL_CHECK_DIR

    assert level_check_section(tmp_path) == ""
    table = _long_table({"a": {"noisy": 2.5, "m1": 3.0, "m2": 2.8}, "b": {"noisy": 2.0, "m1": 2.2, "m2": 2.6}},
                        {"a": {"noisy": 2.4, "m1": 2.5, "m2": 2.9}, "b": {"noisy": 2.1, "m1": 2.4, "m2": 2.3}})
    summary = {"run_level_db": -26.0, "common_level_db": -26.0, "files_checked": 2, "rescored_as": "as is",
               "rescored_errors": 0, "labels_by": "argmax", **compare(table, ["noisy", "m1", "m2"], None)}
    write_json_atomic(tmp_path / LEVEL_CHECK_DIR / "summary.json", summary)
    text = level_check_section(tmp_path)
    assert text.startswith("### Scoring level: DNSMOS at -26 dBFS vs as is (2 training files)")
    assert "2 of 2 labels (100%) change" in text
    assert "| m1 | -30.0 | 2.600 | 2.450 | 1 | 1 |" in text
    assert "| at -26 dBFS | m2 | 2.600 | 2.650 | +0.050 |" in text


def test_level_check_step_runs_after_enhancement_only_when_asked(tmp_path: Path) -> None:
    from dataclasses import replace

    from serec.experiment import parse_args
    from serec.pipeline import PipelineConfig, bound_steps

    config = PipelineConfig(output_dir=tmp_path, clean_dir=tmp_path, noise_dir=tmp_path)
    assert "level_check" not in [name for name, _ in bound_steps(config)]  # the demo's default
    files = parse_args(["--name", "x", "--clean_dir", "c", "--noise_dir", "n"]).level_check_files
    assert files == 96
    assert [name for name, _ in bound_steps(replace(config, level_check_files=files))] == STEPS


def test_level_comparison_table_puts_the_run_s_scores_on_its_side_and_keeps_the_last_row() -> None:
    from serec.level_check import comparison_table

    scores = pd.DataFrame({"file": ["a", "a", "a"], "system": ["noisy", "m", "m"],
                           "status": ["ok", "error", "ok"], "dnsmos_ovr": ["2.0", "", "3.0"]})
    rescored = pd.DataFrame({"file": ["a", "a"], "system": ["noisy", "m"], "status": ["ok", "ok"],
                             "active_level_db": ["-20", "-30"], "dnsmos_ovr": ["2.1", "3.3"]})
    at_level_run = comparison_table(scores, rescored, -26.0).set_index("system")
    assert at_level_run.loc["m", ["ovr_as_is", "ovr_at_level"]].tolist() == [3.3, 3.0]
    as_is_run = comparison_table(scores, rescored, None).set_index("system")
    assert as_is_run.loc["m", ["ovr_as_is", "ovr_at_level", "active_level_db"]].tolist() == [3.0, 3.3, -30.0]


# ---------------------------------------------------------------------------------------
# Other gain learners beside the default one (--compare_learners)


def _strategies(folder: Path, rows: dict[str, tuple[float, float, float]], files: int = 4) -> None:
    """A strategies.csv with these (recommender_seconds, gain_over_best_single, oracle_gain_captured) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"strategy": name, "files": files, "recommender_seconds": sec, "gain_over_best_single": gain,
                   "oracle_gain_captured": captured} for name, (sec, gain, captured) in rows.items()]
                 ).to_csv(folder / "strategies.csv", index=False)


def test_learner_comparison_reads_each_learner_s_training_and_strategies(tmp_path: Path) -> None:
    from serec.experiment import learner_comparison_section
    from serec.runinfo import write_run_json

    write_run_json(tmp_path / "recommender" / "predictor", {}, selector_training={"seconds": 1.25, "oof_mae": [0.1, 0.3]})
    _strategies(tmp_path / "recommendation", {
        "adaptive": (0.0, 0.5, 0.9), "predict_best": (0.02, 0.05, 0.25), "predict_best_safe": (0.02, 0.01, 0.05),
        "verify_top2": (0.02, 0.12, 0.6), "oracle": (0.0, 0.2, 1.0)})
    assert learner_comparison_section(tmp_path) == ""  # lightgbm alone: no comparison
    write_run_json(tmp_path / "recommender" / "predictor_ast", {},
                   selector_training={"seconds": 40.5, "oof_mae": [0.2, 0.4, 0.9]})
    _strategies(tmp_path / "recommendation" / "selector_ast", {
        "predict_best": (2.0, -0.03, -0.15), "predict_best_safe": (2.0, 0.0, 0.0),
        "verify_top2": (2.0, 0.1, 0.5), "oracle": (0.0, 0.2, 1.0)})
    text = learner_comparison_section(tmp_path)
    assert text.startswith("### Gain learners on the same folds, targets and policies")
    lines = text.splitlines()
    header = lines.index("| learner | training s | OOF MAE | recommender s/file | predict_best gain | "
                         "predict_best captured | predict_best_safe gain | predict_best_safe captured | "
                         "verify_top2 gain | verify_top2 captured |")
    assert lines[header + 2] == "| lightgbm | 1.2 | 0.200 | 0.0050 | 0.050 | 25% | 0.010 | 5% | 0.120 | 60% |"
    assert lines[header + 3] == "| ast | 40.5 | 0.500 | 0.5000 | -0.030 | -15% | 0.000 | 0% | 0.100 | 50% |"
    assert lines[-1].startswith("The learner used by the routing policies above is lightgbm (the default")

    (tmp_path / "recommendation" / "selector_ast" / "strategies.csv").unlink()  # trained, not yet evaluated
    assert "| ast | 40.5 | 0.500 |  |  |  |" in learner_comparison_section(tmp_path)


def test_compare_learners_defaults_and_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serec import pipeline
    from serec.experiment import parse_args
    from serec.pipeline import PipelineConfig, recommendation_step, recommender_step

    base = ["--name", "x", "--clean_dir", "c", "--noise_dir", "n"]
    assert parse_args(base).compare_learners == ["ast"]
    assert parse_args([*base, "--compare_learners"]).compare_learners == []
    assert PipelineConfig(output_dir=tmp_path, clean_dir=tmp_path, noise_dir=tmp_path).compare_learners == ()

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(pipeline, "run_command", lambda step, args: calls.append((step, [str(a) for a in args])))
    config = PipelineConfig(output_dir=tmp_path, clean_dir=tmp_path, noise_dir=tmp_path, num_epochs=6,
                            compare_learners=("ast",))
    recommender_step(config)
    default, ast = calls[-2][1], calls[-1][1]
    assert "--predictor_learner" not in default and "--audio_dir" not in default
    assert ast[:len(default)] == default  # the same folds, features, targets and seed
    assert " ".join(ast[len(default):]) == (f"--predictor_learner ast --audio_dir {tmp_path}/train/noisy "
                                            "--pretrained_models none --ast_size tiny --learning_rate 5e-4 "
                                            "--num_epochs 6 --patience 2")
    calls.clear()
    recommendation_step(config)
    step, evaluate = calls[-1]
    assert step == "selection" and evaluate[:3] == ["evaluate", "--selector", f"{tmp_path}/recommender/selector_ast.pth"]
    assert f"--noisy_dir {tmp_path}/test/noisy --output_dir {tmp_path}/recommendation/selector_ast" in " ".join(evaluate)
    calls.clear()
    recommender_step(PipelineConfig(output_dir=tmp_path, clean_dir=tmp_path, noise_dir=tmp_path, quality_selector=False,
                                    compare_learners=("ast",)))
    assert not any("predictor" in args for _, args in calls)


def test_a_command_that_finished_with_the_same_line_is_not_run_again(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from serec import pipeline
    from serec.fileio import write_json_atomic

    ran: list[list[str]] = []
    monkeypatch.setattr(pipeline, "run_command", lambda step, args: ran.append(list(args)))
    selector = tmp_path / "selector_ast.pth"
    selector.write_bytes(b"x")
    args = ["evaluate", "--selector", selector]
    pipeline.run_unless_done("selection", args, tmp_path / "out", "timing", newer_than=selector)
    assert len(ran) == 1  # no record yet
    record = tmp_path / "out" / "run.json"
    write_json_atomic(record, {"command": ["-m serec.selection", "evaluate", "--selector", str(selector)]})
    pipeline.run_unless_done("selection", args, tmp_path / "out", "timing", newer_than=selector)
    assert len(ran) == 2  # started but not finished (no `timing`)
    write_json_atomic(record, {"command": ["-m serec.selection", "evaluate", "--selector", str(selector)],
                               "timing": {}})
    pipeline.run_unless_done("selection", args, tmp_path / "out", "timing", newer_than=selector)
    assert len(ran) == 2  # finished: skipped
    pipeline.run_unless_done("selection", [*args, "--seed", 1], tmp_path / "out", "timing", newer_than=selector)
    assert len(ran) == 3  # another command line
    later = record.stat().st_mtime + 10
    os.utime(selector, (later, later))  # the selector was retrained after the evaluation
    pipeline.run_unless_done("selection", args, tmp_path / "out", "timing", newer_than=selector)
    assert len(ran) == 4
