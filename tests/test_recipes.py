"""The recipes of docs/architecture.md, each done with a toy: an enhancer, a metric, a recommender
kind (a classifier and a score predictor) and a label policy, added the way the recipe says and
used by the real steps without touching anything else."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from serec.audio import write_wav
from serec.cli.enhancement_driver import parse_args
from serec.enhancement import EnhancementConfig, run_enhancement
from serec.enhancers import register_enhancer
from serec.enhancers.builtin import BuiltinEnhancer
from serec.feature_files import feature_path
from serec.labels import ALL_FAILED, LABEL_POLICIES, LabelPolicy, LabelRule, label_files
from serec.parallel import InProcessBackend
from serec.recommender.checkpoint import TrainingRecord, load_checkpoint, save_checkpoint
from serec.recommender.config import RecommenderConfig
from serec.recommender.errors import CheckpointError
from serec.recommender.inference import Recommender
from serec.recommender.kinds import (
    FitReport,
    FitSettings,
    InputSpec,
    ModelBuilder,
    ModelInputs,
    RecommenderModel,
    ScorePrediction,
    register_kind,
)
from serec.recommender.training import train_stage
from serec.synth import NOISE_KINDS, speech_like

REPO = Path(__file__).resolve().parents[1]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _noisy_files(root: Path, n: int = 2) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    for i in range(n):
        clean = speech_like(rng, 1.5)
        write_wav(root / "clean" / f"x{i}.wav", clean)
        write_wav(root / "noisy" / f"x{i}.wav", clean + 0.2 * NOISE_KINDS["pink"](rng, 1.5))
    return root / "noisy", root / "clean"


# ---------------------------------------------------------------------------------------
# Recipe: add an enhancer


@register_enhancer("toy_half_gain")
class HalfGain(BuiltinEnhancer):
    """Halves the level: the smallest enhancer there is."""

    def process(self, audio: np.ndarray) -> np.ndarray:
        return 0.5 * audio


def test_recipe_enhancer_is_run_scored_and_labelled_by_name(tmp_path: Path) -> None:
    noisy, _ = _noisy_files(tmp_path)
    config = EnhancementConfig(noisy, tmp_path / "enh", ["toy_half_gain"])
    summary = run_enhancement(config, backend=InProcessBackend())
    assert summary.errors == 0
    rows = [r for r in _read(tmp_path / "enh" / "scores.csv") if r["system"] == "toy_half_gain"]
    assert len(rows) == 2 and all(r["status"] == "ok" and r["dnsmos_ovr"] for r in rows)
    assert "toy_half_gain_ovr" in _read(tmp_path / "enh" / "labels.csv")[0]


# ---------------------------------------------------------------------------------------
# Recipe: add a metric (one MetricSpec in quality.METRICS): simulated in a fresh process by
# adding it to METRICS before anything else imports the list, as the edited module would.

METRIC_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from serec import quality

def peak_ratio(processed, reference):
    return float(np.max(np.abs(processed)) / np.max(np.abs(reference)))

quality.METRICS["peak_ratio"] = quality.MetricSpec(
    "peak_ratio", True, 16000, "output peak / reference peak", "PEAK", higher_is_better=False,
    function=peak_ratio)
quality.METRIC_NAMES = tuple(quality.METRICS)

from serec.enhancement import EnhancementConfig, run_enhancement
from serec.labels import LabelRule
from serec.parallel import InProcessBackend
root = Path(sys.argv[1])
config = EnhancementConfig(root / "noisy", root / "enh", ["speex", "none"], clean_dir=root / "clean",
                           rule=LabelRule("peak_ratio", threshold=10.0))
print(run_enhancement(config, backend=InProcessBackend()).errors)
"""


def test_recipe_metric_flows_into_scores_and_labels(tmp_path: Path) -> None:
    _noisy_files(tmp_path)
    done = subprocess.run([sys.executable, "-c", METRIC_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)  # fmt: skip
    assert done.returncode == 0 and done.stdout.split()[-1] == "0", done.stderr[-2000:]
    scores = _read(tmp_path / "enh" / "scores.csv")
    assert all(float(r["peak_ratio"]) > 0 for r in scores)
    # Lower is better for this metric: the label is each file's lowest peak ratio.
    for row in _read(tmp_path / "enh" / "labels.csv"):
        values = {m: float(row[f"{m}_ovr"]) for m in ("speex", "none")}
        assert row["label"] == min(values, key=lambda m: (values[m], m != "speex"))
    run = json.loads((tmp_path / "enh" / "run.json").read_text())
    assert run["label_rule"]["metric"] == "peak_ratio"


# ---------------------------------------------------------------------------------------
# Recipe: add a recommender kind (one module with @register_kind)


@register_kind
class NearestCentroid(RecommenderModel):
    """Each class is the mean of its files' standardised feature vectors; a file goes to the
    nearest, with a softmax over negative distances as probabilities."""

    kind = "toy_centroid"

    def __init__(self, classes: Sequence[str], feature_names: Sequence[str]) -> None:
        super().__init__(classes, InputSpec(None, tuple(feature_names)))
        width = len(feature_names)
        self.mean, self.scale = torch.zeros(width), torch.ones(width)
        self.centroids = torch.zeros(len(self.classes), width)

    @classmethod
    def builder(cls, config: RecommenderConfig) -> ModelBuilder:
        return ModelBuilder(fbank=None, uses_features=True, make=cls)

    def fit(self, train: ModelInputs, y_train: np.ndarray, val: ModelInputs, y_val: np.ndarray,
            settings: FitSettings) -> FitReport:  # fmt: skip
        x = torch.as_tensor(train.features, dtype=torch.float32)
        self.mean, self.scale = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.scale
        for c in range(len(self.classes)):
            if (y_train == c).any():
                self.centroids[c] = z[torch.as_tensor(y_train == c)].mean(0)
        return FitReport()

    def predict_proba(self, x: ModelInputs, batch_size: int = 32) -> np.ndarray:
        z = (torch.as_tensor(x.features, dtype=torch.float32) - self.mean) / self.scale
        return torch.softmax(-torch.cdist(z, self.centroids), dim=1).numpy()

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"mean": self.mean, "scale": self.scale, "centroids": self.centroids}

    @classmethod
    def from_checkpoint(cls, model_config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        classes: Sequence[str], inputs: InputSpec) -> NearestCentroid:  # fmt: skip
        if tuple(state["centroids"].shape) != (len(classes), len(inputs.feature_names)):
            raise CheckpointError(f"centroids of shape {tuple(state['centroids'].shape)}")
        model = cls(classes, inputs.feature_names)
        model.mean, model.scale, model.centroids = state["mean"], state["scale"], state["centroids"]
        return model


def _separable_set(root: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """labels.csv of 10 speakers x 6 files and a features folder where each label has its own
    cluster, so any sensible classifier gets them right."""
    rng = np.random.default_rng(0)
    centres = {"A": [0.0, 0.0], "B": [6.0, 0.0], "C": [0.0, 6.0]}
    rows, vectors = [], {}
    (root / "feat").mkdir(parents=True)
    (root / "feat" / "features.json").write_text(
        json.dumps({"names": ["f0", "f1"], "feature_set": "toy", "params": {}}))
    for s in range(10):
        for u, label in enumerate("AABBCC"):
            fid = f"so762_spk{s:04d}_{u:04d}.wav"
            vectors[fid] = (np.array(centres[label]) + rng.normal(size=2)).astype(np.float32)
            np.save(feature_path(root / "feat", fid), vectors[fid])
            rows.append({"file": fid, "label": label, "best_model": label, "best_ovr": 3.0})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv", root / "feat", vectors


def test_recipe_recommender_kind_trains_saves_loads_and_routes(tmp_path: Path) -> None:
    labels_csv, feat, vectors = _separable_set(tmp_path)
    cfg = RecommenderConfig(labels_csv=labels_csv, output_dir=tmp_path / "rec", n_folds=2,
                            cekl_features_base_dir=feat, model_kind="toy_centroid")  # fmt: skip
    result = train_stage(cfg, "single")
    truth = pd.read_csv(labels_csv).set_index("file").label
    for fold in result.folds:
        predicted = [result.class_names[i] for i in fold.proba.argmax(1)]
        assert np.mean(np.array(predicted) == truth[fold.files].to_numpy()) > 0.9
    model, meta = load_checkpoint(result.folds[0].checkpoint)
    assert isinstance(model, NearestCentroid) and meta.kind == "toy_centroid"
    torch.load(result.folds[0].checkpoint, weights_only=True)
    recommender = Recommender.from_checkpoints(single_path=result.folds[0].checkpoint)
    files = sorted(vectors)[:6]
    batch = recommender.predict(None, np.stack([vectors[f] for f in files]))
    assert batch.recommendations == list(truth[files])


@register_kind
class MeanGainPredictor(RecommenderModel):
    """A score predictor: each enhancer's predicted score is its mean score in training
    (ignoring the file), its uncertainty the standard deviation."""

    kind = "toy_mean_score"
    output = "scores"

    def __init__(self, classes: Sequence[str], feature_names: Sequence[str]) -> None:
        super().__init__(classes, InputSpec(None, tuple(feature_names)))
        self.mean, self.std = torch.zeros(len(self.classes)), torch.zeros(len(self.classes))

    @classmethod
    def builder(cls, config: RecommenderConfig) -> ModelBuilder:
        return ModelBuilder(fbank=None, uses_features=True, make=cls)

    def fit(self, train: ModelInputs, y_train: np.ndarray, val: ModelInputs, y_val: np.ndarray,
            settings: FitSettings) -> FitReport:  # fmt: skip
        scores = torch.as_tensor(y_train, dtype=torch.float32)
        self.mean, self.std = scores.mean(0), scores.std(0)
        return FitReport()

    def predict(self, x: ModelInputs, batch_size: int = 32) -> ScorePrediction:
        n = len(x)
        return ScorePrediction(self.mean.expand(n, -1).numpy(), self.std.expand(n, -1).numpy())

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"mean": self.mean, "std": self.std}

    @classmethod
    def from_checkpoint(cls, model_config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        classes: Sequence[str], inputs: InputSpec) -> MeanGainPredictor:  # fmt: skip
        model = cls(classes, inputs.feature_names)
        model.mean, model.std = state["mean"], state["std"]
        return model


def test_a_score_predictor_fits_the_same_protocol(tmp_path: Path) -> None:
    model = MeanGainPredictor(["rnnoise", "speex"], ["f0"])
    features = np.zeros((4, 1), dtype=np.float32)
    scores = np.array([[3.0, 2.0], [3.2, 2.4], [2.8, 2.2], [3.0, 2.2]])
    model.fit(ModelInputs(features=features), scores, ModelInputs(), np.zeros(0), FitSettings())
    save_checkpoint(tmp_path / "p.pth", model, TrainingRecord("single", 1))
    loaded, meta = load_checkpoint(tmp_path / "p.pth")
    prediction = loaded.predict(ModelInputs(features=features[:2]))
    np.testing.assert_allclose(prediction.scores, [[3.0, 2.2]] * 2, atol=1e-6)
    assert prediction.uncertainty.shape == (2, 2) and meta.kind == "toy_mean_score"
    assert loaded.recommend(ModelInputs(features=features[:2])) == ["rnnoise", "rnnoise"]
    with pytest.raises(TypeError, match="predicts scores"):
        loaded.predict_proba(ModelInputs(features=features))
    with pytest.raises(CheckpointError, match="predicts scores"):
        Recommender.from_checkpoints(single_path=tmp_path / "p.pth")


# ---------------------------------------------------------------------------------------
# Recipe: add a label policy (one LabelPolicy in labels.LABEL_POLICIES)


def test_recipe_label_policy_is_chosen_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # All_Failed unless the best model beats the noisy input by min_gain AND passes threshold.
    both = LabelPolicy(
        "toy_both",
        failed=lambda best, noisy, rule: best <= rule.threshold or best - noisy < rule.min_gain,
        describe=lambda rule: f"All_Failed unless {rule.metric} > {rule.threshold:g} and "
        f"beats the noisy input by {rule.min_gain:g}",
        needs_noisy_score=True,
    )
    monkeypatch.setitem(LABEL_POLICIES, "toy_both", both)
    rule = LabelRule(policy="toy_both", threshold=2.0, min_gain=0.5)
    rows = []
    for fid, noisy, speex in (("a.wav", 1.0, 2.6), ("b.wav", 2.4, 2.6), ("c.wav", 1.0, 1.9)):
        rows += [{"file": fid, "system": "noisy", "status": "ok", "dnsmos_ovr": noisy},
                 {"file": fid, "system": "speex", "status": "ok", "dnsmos_ovr": speex}]
    labels = {r["file"]: r["label"] for r in label_files(rows, ["speex"], rule)}
    assert labels == {"a.wav": "speex", "b.wav": ALL_FAILED, "c.wav": ALL_FAILED}
    assert "beats the noisy input by 0.5" in rule.describe()
    # The driver's flag offers every registered policy: nothing to edit there.
    args = parse_args(["--noisy_dir", "n", "--output_dir", "o", "--all_failed_policy", "toy_both"])
    assert args.all_failed_policy == "toy_both"


def test_every_recipe_is_in_the_architecture_page() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    for recipe in ("Add an enhancer", "Add a metric", "Add a recommender kind", "Add a label policy"):
        assert f"### {recipe}" in text
    assert "tests/test_recipes.py" in text
