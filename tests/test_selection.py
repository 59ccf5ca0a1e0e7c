"""Quality-predictor routing end to end on a hand-made enhancement run with a planted rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serec.selection import (
    SelectionError,
    choose,
    kept_by_verification,
    load_gain_data,
    load_selector,
    train_selector,
)

MODELS = ["lowsnr_model", "highsnr_model", "slow_model"]
SECONDS_PER_AUDIO_S = {"lowsnr_model": 0.2, "highsnr_model": 0.05, "slow_model": 1.0}


def _write_run(root: Path, n: int, seed: int) -> None:
    """ENH/labels.csv + scores.csv, FEAT/*.npy + features.json, metadata.csv for n files.

    lowsnr_model gains most below ~10 dB, highsnr_model above; slow_model never wins.
    """
    rng = np.random.default_rng(seed)
    enh, feat = root / "enh", root / "feat"
    enh.mkdir(parents=True)
    feat.mkdir(parents=True)
    (feat / "features.json").write_text(json.dumps({"names": ["snr_est_db", "noise_a", "noise_b"],
                                                    "feature_set": "toy", "params": {}}))
    score_rows, label_rows, meta_rows = [], [], []
    for i in range(n):
        fid = f"f{i:04d}.wav"
        snr = rng.uniform(-5, 20)
        np.save(feat / f"f{i:04d}.npy", np.array([snr, *rng.standard_normal(2)], dtype=np.float32))
        noisy = 1.5 + 0.06 * snr
        ovr = {"lowsnr_model": noisy + 0.8 - 0.03 * snr, "highsnr_model": noisy + 0.1 + 0.02 * snr,
               "slow_model": noisy + 0.05}
        duration = 3.0
        for system, value in [("noisy", noisy), *ovr.items()]:
            score_rows.append({"file": fid, "system": system, "status": "ok", "error": "",
                               "dnsmos_ovr": value + 0.02 * rng.standard_normal(), "pesq_wb": value,
                               "seconds": 0.0 if system == "noisy" else SECONDS_PER_AUDIO_S[system] * duration,
                               "duration_s": duration})
        best = max(MODELS, key=lambda m: ovr[m])
        label_rows.append({"file": fid, "label": best, "best_model": best, "best_ovr": ovr[best],
                           **{f"{m}_ovr": ovr[m] for m in MODELS}})
        meta_rows.append({"file": fid, "speaker": f"spk{i % 10}", "noise_source": f"noise/{i % 7}.wav"})
    for path, rows in ((enh / "scores.csv", score_rows), (enh / "labels.csv", label_rows),
                       (root / "metadata.csv", meta_rows)):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("selection")
    _write_run(base / "train", 400, seed=0)
    _write_run(base / "test", 150, seed=1)
    return base / "train", base / "test"


def test_trained_selector_routes_by_the_planted_rule(runs: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = runs
    ckpt = tmp_path / "selector.pth"
    selector = train_selector(train / "enh" / "labels.csv", train / "feat", train / "metadata.csv", ckpt,
                              n_folds=3, seed=0, num_rounds=80)
    assert selector["models"] == MODELS
    assert selector["ranking"][0] == selector["best_single"]
    np.testing.assert_allclose(selector["seconds_per_audio_s"], [0.2, 0.05, 1.0])
    assert 0 < selector["training"]["held_out_files"] < 400
    # The checkpoint is plain data and reloads with weights_only.
    assert torch.load(ckpt, weights_only=True)["margin"] == selector["margin"]
    loaded, predictor = load_selector(ckpt)

    data = load_gain_data(test / "enh" / "labels.csv", test / "feat", "dnsmos_ovr")
    predicted, spread = predictor.predict(data.features)
    verified = np.array([[data.scores.value(f, m, "dnsmos_ovr") for m in MODELS] for f in data.files])
    choices = {c.name: c for c in choose(loaded, predicted, cost_lambda=0.1, verify_k=2)}
    assert set(choices) == {"predict_best", "predict_best_safe", "cost_aware", "verify_top2", "verify_fixed_top2"}
    truth = [MODELS[j] for j in np.argmax(data.gains, axis=1)]
    agree = np.mean([c == t for c, t in zip(choices["predict_best"].kept, truth, strict=True)])
    assert agree > 0.85
    assert "slow_model" not in choices["cost_aware"].kept
    assert all(len(r) == 2 for r in choices["verify_top2"].ran) and choices["verify_top2"].verifies
    assert all(r == loaded["ranking"][:2] for r in choices["verify_fixed_top2"].ran)
    # verify keeps the candidate whose output scored best
    kept = kept_by_verification(choices["verify_top2"], verified, MODELS)
    for fid_index, (model, ran) in enumerate(zip(kept, choices["verify_top2"].ran, strict=True)):
        assert model == max(ran, key=lambda m: verified[fid_index, MODELS.index(m)])


def test_selector_errors_name_the_file(runs: tuple[Path, Path], tmp_path: Path) -> None:
    train, _ = runs
    bad_meta = tmp_path / "metadata.csv"
    bad_meta.write_text("file,speaker\nf0000.wav,spk0\n")
    with pytest.raises(SelectionError, match="noise_source"):
        train_selector(train / "enh" / "labels.csv", train / "feat", bad_meta, tmp_path / "x.pth")
    with pytest.raises(SelectionError, match="unknown label metric"):
        load_gain_data(train / "enh" / "labels.csv", train / "feat", "mos")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SelectionError, match="junk.pth"):
        load_selector(junk)
    torch.save({"kind": "ast"}, tmp_path / "other.pth")
    with pytest.raises(SelectionError, match="--training_stage predictor"):
        load_selector(tmp_path / "other.pth")


def test_cli_trains_and_scores_every_policy_with_intervals(runs: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    import pandas as pd

    train, test = runs
    ckpt = tmp_path / "sel" / "selector.pth"
    trained = subprocess.run(
        [sys.executable, "-m", "serec.selection", "train", "--labels_csv", train / "enh" / "labels.csv",
         "--features_dir", train / "feat", "--metadata_csv", train / "metadata.csv", "--output", ckpt,
         "--n_folds", "3"], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "eval"
    evaluated = subprocess.run(
        [sys.executable, "-m", "serec.selection", "evaluate", "--selector", ckpt, "--labels_csv",
         test / "enh" / "labels.csv", "--features_dir", test / "feat", "--output_dir", out],
        capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    table = pd.read_csv(out / "strategies.csv").set_index("strategy")
    for name in ("predict_best", "predict_best_safe", "cost_aware", "verify_top2", "verify_fixed_top2",
                 "oracle", *(f"always_{m}" for m in MODELS)):
        assert name in table.index
    assert table.at["oracle", "oracle_gain_captured"] == pytest.approx(1.0)
    assert table.at["oracle", "regret"] == pytest.approx(0.0)
    best = table.loc[[f"always_{m}" for m in MODELS], "dnsmos_ovr"].idxmax()
    assert table.at[best, "gain_over_best_single"] == pytest.approx(0.0)
    assert table.at[best, "compute_vs_best_single"] == pytest.approx(1.0)
    # The planted rule is learnable: predicting beats the best fixed model, significantly.
    assert table.at["predict_best", "gain_ci_low"] > 0
    assert table.at["predict_best", "gain_ci_low"] <= table.at["predict_best", "gain_over_best_single"]
    # The fixed verify baseline pays DNSMOS on two outputs per file but no prediction.
    assert table.at["verify_fixed_top2", "recommender_seconds"] == 0
    assert (table.label_metric == "dnsmos_ovr").all()
    # verify runs two models per file: at least the enhancer time of the cheaper of them
    assert table.at["verify_top2", "enhancer_seconds"] > table.at["predict_best", "enhancer_seconds"]
    assert (table.filter(like="cost_aware@", axis=0).shape[0]) >= 5
    bad = subprocess.run([sys.executable, "-m", "serec.selection", "evaluate", "--selector", tmp_path / "none.pth",
                          "--labels_csv", test / "enh" / "labels.csv", "--features_dir", test / "feat",
                          "--output_dir", out], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "none.pth" in bad.stderr


def test_each_learner_has_its_own_checkpoint_and_record_folder() -> None:
    from serec.predictor import DEFAULT_LEARNER, LEARNERS
    from serec.selection import SELECTOR_CHECKPOINT, selector_checkpoint, selector_record_dir

    assert selector_checkpoint() == selector_checkpoint(DEFAULT_LEARNER) == SELECTOR_CHECKPOINT == "selector.pth"
    assert selector_record_dir() == "predictor"  # the default learner's files keep their names
    assert selector_checkpoint("ast") == "selector_ast.pth" and selector_record_dir("ast") == "predictor_ast"
    assert len({selector_checkpoint(name) for name in LEARNERS}) == len(LEARNERS)
    assert len({selector_record_dir(name) for name in LEARNERS}) == len(LEARNERS)
    with pytest.raises(SelectionError, match="unknown learner 'xgboost'"):
        selector_checkpoint("xgboost")
