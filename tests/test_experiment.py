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
STEPS = ["mixing", "split", "enhancement", "features", "recommender", "recommendation"]


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


def test_experiment_end_to_end_writes_every_table_and_resumes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    build_corpus(corpus, speech="synth", utterances_per_speaker=6, seed=1)
    (corpus / "noise" / "manifest.csv").write_text(
        "file,noise_class\n" + "".join(f"synth_{k}.wav,{'tonal' if k == 'hum' else 'noise'}\n"
                                       for k in ("pink", "brown", "babble", "hum", "impulsive", "modulated")))
    args = ["--name", "tiny", "--clean_dir", corpus / "clean", "--noise_dir", corpus / "noise",
            "--work_dir", tmp_path / "work", "--results_root", tmp_path / "results",
            "--num_mixtures", 48, "--test_fraction", 0.25, "--models", "webrtc", "spectral_gating",
            "--n_folds", 2, "--num_epochs", 2, "--num_workers", 2]
    result = _experiment(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = (tmp_path / "results" / "tiny" / "tables.md").read_text()
    assert result.stdout.count("| strategy |") == 1 and "tables: " in result.stdout

    for heading in ("## Dataset", "### Label distribution by SNR", "### Label distribution by noise class",
                    "## Mean scores per model", "## Recommender: macro F1",
                    "## Adaptive selection vs fixed models and the oracle", "## Time of each step"):
        assert heading in tables
    metadata = pd.read_csv(tmp_path / "work" / "mixtures" / "metadata.csv")
    assert f"| **all** | 48 | {metadata.speaker.nunique()} |" in tables
    assert "| tonal |" in tables and "| noise |" in tables
    for model in ("noisy", "webrtc", "spectral_gating"):
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
