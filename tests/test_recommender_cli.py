"""model_recommender_w_scaler.py end to end on generated recordings: gatekeeper, expert and
single on shared folds, checkpoints that reload and predict the same, evaluate_pipeline."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from serec.audio import write_wav
from serec.feature_files import load_feature_matrix, run_feature_extraction
from serec.recommender.checkpoint import load_checkpoint
from serec.recommender.inputs import FbankCache
from serec.recommender.kinds import ModelInputs
from serec.synth import NOISE_KINDS, speech_like

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "model_recommender_w_scaler.py"
# Each label goes with one noise kind, so the task is learnable; SGMSE is the most frequent.
NOISE_OF = {"SGMSE": "pink", "StoRM": "babble", "All_Failed": "hum"}
LABEL_CYCLE = ["SGMSE", "StoRM", "SGMSE", "All_Failed", "SGMSE", "StoRM"]


def cli_main():
    """The script's main(), imported from its file (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("model_recommender_w_scaler", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """36 one-second mixtures of 6 speakers, labels.csv, metadata.csv and CE/KL features."""
    root = tmp_path_factory.mktemp("rec")
    rng = np.random.default_rng(5)
    labels, meta = [], []
    for s in range(6):
        for u in range(6):
            label = LABEL_CYCLE[(s + u) % 6]
            speech = speech_like(rng, 1.0)
            noise = NOISE_KINDS[NOISE_OF[label]](rng, 1.0)[: len(speech)]
            name = f"so762_spk{s:04d}_{u:04d}__{NOISE_OF[label]}__snr+0_{s * 6 + u:05d}.wav"
            write_wav(root / "noisy" / name, 0.5 * speech + 0.5 * noise)
            labels.append({"file": name, "label": label, "best_model": label, "best_ovr": 3.1})
            meta.append(
                {"file": name, "clean_source": f"c{s}_{u}.wav", "speaker": f"so762_{s:04d}"}
            )
    pd.DataFrame(labels).to_csv(root / "labels.csv", index=False)
    pd.DataFrame(meta).to_csv(root / "metadata.csv", index=False)
    run_feature_extraction(root / "noisy", root / "feat", progress=False)
    return {
        "root": root,
        "labels": root / "labels.csv",
        "noisy": root / "noisy",
        "meta": root / "metadata.csv",
        "feat": root / "feat",
        "out": root / "out",
    }


def common_flags(corpus: dict[str, Path]) -> list[str]:
    return [
        "--labels_csv", str(corpus["labels"]),
        "--audio_dir", str(corpus["noisy"]),
        "--metadata_csv", str(corpus["meta"]),
        "--cekl_features_base_dir", str(corpus["feat"]),
        "--output_dir", str(corpus["out"]),
        "--n_folds", "3",
        "--pretrained_models", "none",
        "--ast_size", "tiny",
        "--max_audio_seconds", "1",
        "--num_epochs", "2",
        "--learning_rate", "1e-3",
        "--batch_size", "8",
        "--device", "cpu",
    ]  # fmt: skip


def run_stage(corpus: dict[str, Path], stage: str, *extra: str) -> int:
    threads = torch.get_num_threads()  # main() sets torch's process-wide thread count
    try:
        return cli_main()(["--training_stage", stage, *common_flags(corpus), *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, Path]:
    assert run_stage(corpus, "gatekeeper", "--use_hybrid_features", "--use_weighted_sampler") == 0
    assert run_stage(corpus, "expert", "--use_hybrid_features") == 0
    assert run_stage(corpus, "single", "--feature_type", "cekl") == 0
    return corpus


def test_stages_share_folds_and_checkpoints_reload_and_predict_the_same(trained):
    out = trained["out"]
    folds = pd.read_csv(out / "folds.csv").set_index("file").fold
    assert sorted(folds.unique()) == [1, 2, 3]
    features, _ = load_feature_matrix(trained["feat"], list(folds.index))
    feature_of = dict(zip(folds.index, features, strict=True))
    label_of = pd.read_csv(trained["labels"]).set_index("file").label
    for stage, template in (
        ("gatekeeper", "gatekeeper_model_fold_{}_best.pth"),
        ("expert", "expert_model_fold_{}_best_hybrid.pth"),
        ("single", "single_model_fold_{}_best.pth"),
    ):
        predictions = pd.read_csv(out / stage / "predictions.csv")
        for fold in (1, 2, 3):
            path = out / template.format(fold)
            torch.load(path, weights_only=True)  # no pickled objects
            model, meta = load_checkpoint(path)
            rows = predictions[predictions.fold == fold]
            assert set(rows.file) <= set(folds.index[folds == fold])
            files = list(rows.file)
            fbank = None
            if meta.fbank is not None:
                fbank, errors = FbankCache(out / "cache", meta.fbank, trained["noisy"]).load(files)
                assert not errors
            vectors = np.stack([feature_of[f] for f in files])
            proba = model.predict_proba(ModelInputs(fbank, vectors))
            expected = rows[[f"p_{c}" for c in meta.class_names]].to_numpy()
            np.testing.assert_allclose(proba, expected, atol=1e-5)
            # The hybrid scaler was fitted on the files trained on: not the held-out fold,
            # not the inner validation files, and for the expert only its labels' files.
            if stage != "single":
                inner = set(meta.record.inner_val_files)
                fit = [
                    f
                    for f in folds.index
                    if folds[f] != fold
                    and f not in inner
                    and (stage == "gatekeeper" or label_of[f] != "SGMSE")
                ]
                fit_mean = np.stack([feature_of[f] for f in fit]).mean(axis=0)
                mean = model.network.feature_mean.numpy()
                np.testing.assert_allclose(mean, fit_mean, rtol=1e-4)
    gk = load_checkpoint(out / "gatekeeper_model_fold_2_best.pth")[1]
    ex = load_checkpoint(out / "expert_model_fold_2_best_hybrid.pth")[1]
    assert gk.record.folds_sha256 == ex.record.folds_sha256
    assert gk.record.inner_val_files == ex.record.inner_val_files
    assert gk.class_names == ["SGMSE", "not_SGMSE"]
    assert ex.class_names == ["All_Failed", "StoRM"]
    assert gk.record.training["use_weighted_sampler"] is True
    curve = pd.read_csv(out / "gatekeeper" / "curves" / "fold1.csv")
    assert list(curve.epoch) == [1, 2] and (out / "gatekeeper" / "curves" / "fold1.png").is_file()
    best = load_checkpoint(out / "gatekeeper_model_fold_1_best.pth")[1].record.best_epoch
    assert curve.val_macro_f1[best - 1] == curve.val_macro_f1.max()
    report = json.loads((out / "expert" / "metrics.json").read_text())
    assert set(report["summary"]["expert"]) >= {"macro_f1_mean", "macro_f1_std"}


def test_evaluate_pipeline_cli_writes_its_report(trained):
    out = trained["out"]
    done = subprocess.run(
        [sys.executable, str(CLI), "--training_stage", "evaluate_pipeline", *common_flags(trained)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for title in ("two-stage (threshold 0.5)", "single model", "tabular baseline", "majority class",
                  "random (stratified)"):  # fmt: skip
        assert title in done.stdout
    report_dir = out / "evaluate_pipeline"
    report = json.loads((report_dir / "metrics.json").read_text())
    assert set(report["summary"]) == {
        "two_stage", "two_stage_tuned", "single", "tabular", "majority", "random"
    }  # fmt: skip
    assert report["gatekeeper_class"] == "SGMSE"
    for fold in ("1", "2", "3"):
        metrics = report["folds"][fold]["two_stage"]
        assert set(metrics["per_class"]) == {"All_Failed", "SGMSE", "StoRM"}
        assert np.sum(metrics["confusion_matrix"]) == metrics["n_files"]
        b = report["bottleneck"][fold]["two_stage"]
        errors = round(metrics["n_files"] * (1 - metrics["accuracy"]))
        assert (
            b["errors"]
            == errors
            == (
                b["gatekeeper_false_positive"]
                + b["gatekeeper_false_negative"]
                + b["expert_mistake"]
            )
        )
        assert 0.05 <= report["gatekeeper_thresholds"][fold] <= 0.95
    predictions = pd.read_csv(report_dir / "predictions.csv")
    assert sorted(predictions.file) == sorted(pd.read_csv(trained["labels"]).file)
    with open(report_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["system"], r["fold"]) for r in rows} >= {("two_stage", "mean"), ("random", "std")}
    for system in report["summary"]:
        assert (report_dir / f"confusion_{system}.png").is_file()
    sweep = pd.read_csv(report_dir / "threshold_sweep.csv")
    assert sweep.groupby("fold").chosen.sum().tolist() == [1, 1, 1]


def test_clear_errors(trained, capsys):
    code = run_stage(trained, "evaluate_pipeline", "--expert_model_path", "missing_{fold}.pth")
    assert code == 2 and "no expert checkpoint" in capsys.readouterr().err
    for fold in (1, 2, 3):
        (trained["root"] / f"broken_{fold}.pth").write_bytes(b"\x00 truncated")
    broken = str(trained["root"] / "broken_{fold}.pth")
    code = run_stage(trained, "evaluate_pipeline", "--gatekeeper_model_path", broken)
    err = capsys.readouterr().err
    assert code == 2 and "not a loadable checkpoint" in err and "retrain it" in err
    code = run_stage(trained, "gatekeeper", "--seed", "1")
    assert code == 2 and "seed: 42 there, 1 now" in capsys.readouterr().err
    code = run_stage(
        trained, "gatekeeper", "--pretrained_models", "ast_finetuned_audioset",
        "--ast_model_dir", str(trained["root"] / "no_ast"),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "huggingface-cli download" in err and "--pretrained_models none" in err


def test_rerun_reuses_checkpoints_trained_with_the_same_settings(trained):
    out = trained["out"]
    checkpoints = sorted(out.glob("gatekeeper_model_fold_*_best.pth"))
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    before = json.loads((out / "gatekeeper" / "metrics.json").read_text())["summary"]
    flags = ("--use_hybrid_features", "--use_weighted_sampler")
    assert run_stage(trained, "gatekeeper", *flags) == 0
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps
    assert json.loads((out / "gatekeeper" / "metrics.json").read_text())["summary"] == before
    assert run_stage(trained, "gatekeeper", *flags, "--folds", "2", "--num_epochs", "1") == 0
    changed = [p.stat().st_mtime_ns != s for p, s in zip(checkpoints, stamps, strict=True)]
    assert changed == [False, True, False]
