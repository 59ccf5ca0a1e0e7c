"""Recommender protocol: groups, shared folds, inner validation, fbank cache, sampler, scaler."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from serec.audio import write_wav
from serec.feature_files import feature_path
from serec.recommender import inputs, neural
from serec.recommender.checkpoint import load_checkpoint
from serec.recommender.config import RecommenderConfig
from serec.recommender.errors import RecommenderError
from serec.recommender.fbank import FbankSpec, compute_fbank
from serec.recommender.folds import (
    crossed_folds,
    file_groups,
    inner_validation_mask,
    load_or_make_folds,
    make_folds,
    read_labels,
)
from serec.recommender.inputs import FbankCache
from serec.recommender.kinds import ModelInputs
from serec.recommender.stages import stage_task
from serec.recommender.training import train_stage
from serec.synth import speech_like

LABELS = ["SGMSE"] * 5 + ["StoRM"] * 3 + ["All_Failed"] * 2  # per speaker, shuffled


def labelled_files(n_speakers: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_speakers):
        for u, label in enumerate(rng.permutation(LABELS)):
            rows.append(
                {
                    "file": f"so762_spk{s:04d}_{u:04d}__pink__snr+5_{s * 10 + u:05d}.wav",
                    "label": label,
                }
            )
    return pd.DataFrame(rows)


def write_labels(path: Path, table: pd.DataFrame) -> Path:
    table.assign(best_model=table.label, best_ovr=3.0).to_csv(path, index=False)
    return path


def test_groups_from_metadata_file_names_or_files(tmp_path):
    files = ["a.wav", "b.wav", "c.wav"]
    meta = pd.DataFrame(
        {"file": files, "clean_source": ["x.wav", "y.wav", "y.wav"], "speaker": ["s1", "", "s1"]}
    )
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    groups, how = file_groups(files, tmp_path / "metadata.csv")
    assert list(groups) == ["s1", "clean:y.wav", "s1"] and "metadata.csv" in how
    with pytest.raises(RecommenderError, match="not in the metadata"):
        file_groups(["a.wav", "zzz.wav"], tmp_path / "metadata.csv")
    names = ["so762_spk0001_0001__pink__snr+5_00001.wav", "sub/so762_spk0002_0003.wav", "odd.wav"]
    groups, how = file_groups(names)
    assert list(groups) == ["spk0001", "spk0002", "file:odd.wav"] and "grouped alone" in how


def test_folds_are_stratified_grouped_and_deterministic():
    table = labelled_files()
    groups, _ = file_groups(list(table.file))
    folds = make_folds(table.label, groups, n_folds=5, seed=42)
    assert sorted(set(folds)) == [1, 2, 3, 4, 5]
    for speaker in set(groups):
        assert len(set(folds[groups == speaker])) == 1, "a speaker is on two folds"
    overall = Counter(table.label)
    for k in range(1, 6):
        in_fold = Counter(table.label[folds == k])
        assert sum(in_fold.values()) == 40
        for label, count in overall.items():
            assert in_fold[label] == count / 5  # 4 speakers per fold, identical label mix
    np.testing.assert_array_equal(folds, make_folds(table.label, groups, 5, 42))
    assert not np.array_equal(folds, make_folds(table.label, groups, 5, 7))
    with pytest.raises(RecommenderError, match="speaker groups"):
        make_folds(table.label[:20], groups[:20], n_folds=5, seed=0)


def test_crossed_folds_share_no_speaker_or_noise_between_sides() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(["A", "B", "C"], 400)
    speakers = np.array([f"spk{i}" for i in rng.integers(0, 12, 400)])
    noises = np.array([f"noise{i}" for i in rng.integers(0, 15, 400)])
    folds = crossed_folds(labels, speakers, noises, 4, seed=3)
    assert sorted(set(folds.held_out)) == [0, 1, 2, 3, 4]
    for k in range(1, 5):
        train, held = folds.training_part(k), folds.held_out == k
        assert held.any() and train.any() and not (train & held).any()
        for keys in (speakers, noises):
            assert not set(keys[train]) & set(keys[held])
        # A crossed file (speaker in k, noise elsewhere, or the reverse) is on neither side.
        crossed = (folds.speaker == k) != (folds.noise == k)
        assert crossed.any() and not (crossed & (train | held)).any()
    np.testing.assert_array_equal(crossed_folds(labels, speakers, noises, 4, seed=3).held_out, folds.held_out)
    # Without noise recordings the folds are the speaker folds, and every file is held out once.
    by_speaker = crossed_folds(labels, speakers, None, 4, seed=3)
    np.testing.assert_array_equal(by_speaker.held_out, make_folds(labels, speakers, 4, 3))
    np.testing.assert_array_equal(by_speaker.training_part(2), by_speaker.held_out != 2)
    with pytest.raises(RecommenderError, match="only 2 noise recordings for 3 folds"):
        crossed_folds(labels[:6], speakers[:6], np.array(["x", "y"] * 3), 3, seed=0)


def test_folds_are_written_once_and_reused_or_refused(tmp_path):
    table = labelled_files().sort_values("file").reset_index(drop=True)
    groups, how = file_groups(list(table.file))
    folds = load_or_make_folds(tmp_path, table, groups, how, 5, 42).held_out
    written = pd.read_csv(tmp_path / "folds.csv")
    assert list(written.columns) == ["file", "fold", "speaker_fold", "noise_fold"]
    assert json.loads((tmp_path / "folds.json").read_text())["seed"] == 42
    # A later stage (any seed for its models) gets exactly these folds back, even if the
    # grouping code would now split differently.
    (tmp_path / "folds.csv").write_text(
        written.assign(fold=written.fold % 5 + 1).to_csv(index=False)
    )
    reused = load_or_make_folds(tmp_path, table, groups, how, 5, 42)
    np.testing.assert_array_equal(reused.held_out, folds % 5 + 1)
    # An older folds.csv of speaker folds only reads as held out by the speaker's fold.
    (tmp_path / "folds.csv").write_text(written[["file", "fold"]].to_csv(index=False))
    np.testing.assert_array_equal(load_or_make_folds(tmp_path, table, groups, how, 5, 42).training_part(1),
                                  folds != 1)
    relabelled = table.copy()
    relabelled.loc[3, "label"] = "StoRM" if table.label[3] != "StoRM" else "SGMSE"
    with pytest.raises(RecommenderError, match="labels_sha256"):
        load_or_make_folds(tmp_path, relabelled, groups, how, 5, 42)
    with pytest.raises(RecommenderError, match="seed"):
        load_or_make_folds(tmp_path, table, groups, how, 5, 1)
    with pytest.raises(RecommenderError, match="files differ"):
        load_or_make_folds(tmp_path, table.iloc[1:], groups[1:], how, 5, 42)


def test_inner_validation_is_grouped_and_inside_the_training_part():
    table = labelled_files()
    groups, _ = file_groups(list(table.file))
    labels = table.label.to_numpy()
    folds = make_folds(labels, groups, 5, 42)
    held_out = folds == 2
    val = inner_validation_mask(labels, groups, ~held_out, seed=44)
    assert val.any() and not (val & held_out).any()
    fit = ~held_out & ~val
    assert not set(groups[val]) & set(groups[fit])
    assert set(labels[val]) == set(labels)
    np.testing.assert_array_equal(val, inner_validation_mask(labels, groups, ~held_out, seed=44))


def test_inner_validation_holds_two_labels_when_a_part_can():
    """A rare label in few speakers: a part of the training part can hold only the common
    label, which would leave the expert (trained on the other labels) nothing to validate on."""
    groups = np.repeat(np.arange(10), 3)
    labels = np.where(groups >= 8, "StoRM", "SGMSE").astype(object)
    for seed in range(20):
        val = inner_validation_mask(labels, groups, np.ones(len(labels), bool), seed)
        assert set(labels[val]) == {"SGMSE", "StoRM"}, seed
        assert val.sum() == 6 and not set(groups[val]) & set(groups[~val])


def test_stage_tasks():
    classes = ["All_Failed", "SGMSE", "StoRM"]
    gk = stage_task("gatekeeper", classes, "SGMSE")
    assert gk.class_names == ["SGMSE", "not_SGMSE"]
    assert list(gk.targets(["SGMSE", "StoRM", "All_Failed"])) == [0, 1, 1]
    expert = stage_task("expert", classes, "SGMSE")
    assert expert.class_names == ["All_Failed", "StoRM"]
    assert list(expert.targets(["SGMSE", "StoRM", "All_Failed"])) == [-1, 1, 0]
    assert stage_task("single", classes, "SGMSE").class_names == classes
    with pytest.raises(RecommenderError, match="at least two labels"):
        stage_task("expert", ["A", "B"], "A")
    with pytest.raises(RecommenderError, match="not a label"):
        stage_task("single", classes, "CDiffuSE")


def test_read_labels_rejects_bad_tables(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,label\na.wav,X\na.wav,Y\n")
    with pytest.raises(RecommenderError, match="listed twice"):
        read_labels(path)
    path.write_text("file,label\na.wav,X\nb.wav,\n")
    with pytest.raises(RecommenderError, match="without a label"):
        read_labels(path)
    path.write_text("file,best\na.wav,X\n")
    with pytest.raises(RecommenderError, match="not a labels.csv"):
        read_labels(path)


def test_weighted_sampler_balances_classes():
    targets = np.array([0] * 90 + [1] * 10)
    generator = torch.Generator().manual_seed(0)
    drawn = np.concatenate(
        [targets[neural._batch_order(targets, True, generator).numpy()] for _ in range(20)]
    )
    assert 0.45 < drawn.mean() < 0.55
    plain = neural._batch_order(targets, False, generator).numpy()
    assert sorted(plain) == list(range(100))


def test_fbank_cache_computes_once_and_records_bad_files(tmp_path, rng, monkeypatch):
    audio_dir = tmp_path / "noisy"
    write_wav(audio_dir / "a.wav", speech_like(rng, 1.0))
    write_wav(audio_dir / "sub" / "b.wav", speech_like(rng, 0.8))
    write_wav(audio_dir / "silent.wav", np.zeros(16000, dtype=np.float32))
    spec = FbankSpec(num_mel_bins=64, max_length=80)
    calls = []
    monkeypatch.setattr(
        inputs, "compute_fbank", lambda a, s: calls.append(1) or compute_fbank(a, s)
    )
    cache = FbankCache(tmp_path / "cache", spec, audio_dir)
    files = ["a.wav", "sub/b.wav", "silent.wav", "missing.wav"]
    values, errors = cache.load(files)
    assert len(calls) == 2 and set(errors) == {"silent.wav", "missing.wav"}
    assert "silent" in errors["silent.wav"]
    again, _ = cache.load(files)
    assert len(calls) == 2, "cached inputs were recomputed"
    np.testing.assert_array_equal(again, values)
    # Newer audio invalidates its cached input only.
    later = os.stat(audio_dir / "a.wav").st_mtime_ns + 10**9
    os.utime(audio_dir / "a.wav", ns=(later, later))
    cache.load(files)
    assert len(calls) == 3
    assert FbankCache(tmp_path / "cache", FbankSpec(64, 90), audio_dir).folder != cache.folder


def write_features(feat_dir: Path, table: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    names = [f"f{i}" for i in range(4)]
    (feat_dir).mkdir(parents=True)
    (feat_dir / "features.json").write_text(
        json.dumps({"names": names, "feature_set": "test", "params": {}})
    )
    matrix = rng.normal(size=(len(table), 4)).astype(np.float32) * [1, 5, 50, 0.5] + [0, 3, 100, -1]
    # Make the first speaker's files extreme, so a scaler that saw them is visibly off.
    matrix[table.file.str.contains("spk0000")] += 1000
    for fid, vector in zip(table.file, matrix.astype(np.float32), strict=True):
        np.save(feature_path(feat_dir, fid), vector)
    return matrix.astype(np.float32)


@pytest.mark.parametrize("crossed", [False, True], ids=["speaker folds", "speaker x noise folds"])
def test_scaler_and_model_see_only_the_training_part(tmp_path, rng, crossed):
    table = labelled_files(n_speakers=10)
    labels_csv = write_labels(tmp_path / "labels.csv", table)
    matrix = write_features(tmp_path / "feat", table, rng)
    metadata_csv = None
    if crossed:  # with the mixing metadata's noise_source, folds are crossed with noise recordings
        metadata_csv = tmp_path / "metadata.csv"
        pd.DataFrame({"file": table.file, "speaker": table.file.str.split("_").str[1],
                      "noise_source": [f"noise{i}.wav" for i in rng.integers(0, 8, len(table))]}
                     ).to_csv(metadata_csv, index=False)
    cfg = RecommenderConfig(
        labels_csv=labels_csv,
        output_dir=tmp_path / "rec",
        cekl_features_base_dir=tmp_path / "feat",
        metadata_csv=metadata_csv,
        model_kind="logistic_regression",
        n_folds=5,
    )
    result = train_stage(cfg, "single")
    folds = pd.read_csv(tmp_path / "rec" / "folds.csv").set_index("file")
    assert (folds.fold == 0).any() == crossed  # crossed files are held out by no fold
    by_file = dict(zip(table.file, matrix, strict=True))
    for fold_result in result.folds:
        model, meta = load_checkpoint(fold_result.checkpoint)
        assert (meta.stage, meta.fold, meta.kind) == ("single", fold_result.fold,
                                                      "logistic_regression")  # fmt: skip
        k = fold_result.fold
        held_out = set(folds.index[folds.fold == k])
        inner_val = set(meta.record.inner_val_files)
        training = folds.index[(folds.speaker_fold != k) & (folds.noise_fold != k)]
        fit = [f for f in training if f not in inner_val]
        assert not inner_val & held_out and meta.record.n_train_files == len(fit)
        assert inner_val <= set(training)
        fit_matrix = np.stack([by_file[f] for f in fit])
        scaler = model.network
        np.testing.assert_allclose(scaler.feature_mean.numpy(), fit_matrix.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(scaler.feature_scale.numpy(), fit_matrix.std(axis=0), rtol=1e-4)
        assert set(fold_result.files) == held_out
        test_matrix = np.stack([by_file[f] for f in fold_result.files])
        np.testing.assert_allclose(
            model.predict_proba(ModelInputs(features=test_matrix)), fold_result.proba, atol=1e-6
        )
    # The fold holding speaker 0 must have a scaler that never saw its +1000 offset.
    spk0_fold = int(folds.speaker_fold[table.file[0]])
    model = load_checkpoint(result.folds[spk0_fold - 1].checkpoint)[0]
    assert model.network.feature_mean[0] < 100


def test_refit_trains_on_every_file_and_is_held_out_of_the_report(tmp_path, rng):
    table = labelled_files(n_speakers=6)
    labels_csv = write_labels(tmp_path / "labels.csv", table)
    write_features(tmp_path / "feat", table, rng)
    cfg = RecommenderConfig(labels_csv=labels_csv, output_dir=tmp_path / "rec", cekl_features_base_dir=tmp_path / "feat",
                            model_kind="logistic_regression", n_folds=3, refit=True)
    result = train_stage(cfg, "single")
    assert [f.fold for f in result.folds] == [1, 2, 3]
    assert result.refit == tmp_path / "rec" / "single_model_fold_all_best.pth"
    meta = load_checkpoint(result.refit)[1]
    assert meta.fold == 0
    assert meta.record.n_train_files == len(table) - len(meta.record.inner_val_files) > 0
    # The fold checkpoints do not depend on --refit: a run without it reuses them.
    stamps = {f.checkpoint: f.checkpoint.stat().st_mtime_ns for f in result.folds}
    again = train_stage(RecommenderConfig(**{**cfg.__dict__, "refit": False}), "single")
    assert again.refit is None and {f.checkpoint: f.checkpoint.stat().st_mtime_ns for f in again.folds} == stamps


def test_config_refuses_templates_without_fold(tmp_path):
    with pytest.raises(RecommenderError, match="no \\{fold\\}"):
        RecommenderConfig(
            labels_csv=tmp_path / "l.csv", output_dir=tmp_path, expert_model_path="e.pth"
        )
    with pytest.raises(RecommenderError, match="numbered 1..5"):
        RecommenderConfig(labels_csv=tmp_path / "l.csv", output_dir=tmp_path, folds=[0, 2])


@pytest.mark.parametrize("n_speakers", [3, 5])
def test_a_set_too_small_for_the_inner_split_is_a_clear_error(tmp_path, rng, n_speakers):
    # One file per speaker, three labels: no label has two files for the 2-fold split.
    table = pd.DataFrame({"file": [f"so762_spk{s:04d}_0000.wav" for s in range(n_speakers)],
                          "label": [("A", "B", "C")[s % 3] for s in range(n_speakers)]})
    labels_csv = write_labels(tmp_path / "labels.csv", table)
    write_features(tmp_path / "feat", table, rng)
    cfg = RecommenderConfig(labels_csv=labels_csv, output_dir=tmp_path / "rec", n_folds=2,
                            cekl_features_base_dir=tmp_path / "feat",
                            model_kind="logistic_regression")  # fmt: skip
    with pytest.raises(RecommenderError, match="too few files to split"):
        train_stage(cfg, "single")
