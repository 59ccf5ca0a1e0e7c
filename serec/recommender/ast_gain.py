"""The quality selector's `ast` learner: a fold ensemble of `ast_scores` networks.

The same contract as the LightGBM learner (serec.predictor's `GainLearner`): per fold of the
selector, one AST-with-regression-head network (hybrid: the AST embedding joined with the
standardised feature vector, since the selector always has the feature vectors) is trained
on the fold's training part, its epoch picked on that part's inner validation split (the
stages' rule), and predicts the held-out files (the out-of-fold predictions the safe margin
is chosen on). Deployed, the prediction is the mean over the fold networks and the
uncertainty their standard deviation.

The fbank inputs come from the noisy files: cached per file during training (FbankCache, as
the stages do), computed from the audio at prediction time (so timing counts them). The
metadata is plain values and tensors (one state dict per fold), read with weights_only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from serec.audio import load_audio
from serec.predictor import TARGET, GainInputs, LearnerSettings, PredictorError
from serec.recommender.ast_model import ASTScorePredictor
from serec.recommender.errors import RecommenderError
from serec.recommender.fbank import FbankSpec, fbank_batch
from serec.recommender.inputs import FbankCache
from serec.recommender.kinds import InputSpec, ModelInputs, resolve_device
from serec.recommender.neural import seed_everything

ENSEMBLE_KIND = "ast_gain_ensemble"


def _fbank(inputs: GainInputs, spec: FbankSpec) -> np.ndarray:
    """The files' fbank inputs: from the cache when `inputs.cache_dir` is set, else computed."""
    if inputs.audio_dir is None:
        raise PredictorError("the ast learner reads the noisy audio: give the noisy files' folder "
                             "(--noisy_dir, or --audio_dir of --training_stage predictor)")
    if inputs.cache_dir is None:
        return fbank_batch([load_audio(inputs.audio_dir / f, crop_seconds=spec.audio_seconds)
                            for f in inputs.files], spec)
    values, errors = FbankCache(inputs.cache_dir, spec, inputs.audio_dir).load(list(inputs.files))
    if errors:
        fid, reason = next(iter(errors.items()))
        raise PredictorError(f"{len(errors)} noisy files are unusable, e.g. {inputs.audio_dir / fid}: {reason}")
    return values


def _model_inputs(inputs: GainInputs, spec: FbankSpec, feature_names: Sequence[str]) -> ModelInputs:
    """The networks' inputs for these files: their fbank and their feature vectors."""
    features = np.asarray(inputs.features, dtype=np.float32)
    if features.ndim != 2 or features.shape != (len(inputs.files), len(feature_names)):
        raise PredictorError(f"expected {len(feature_names)} features for each of {len(inputs.files)} files, "
                             f"got shape {features.shape}")
    return ModelInputs(_fbank(inputs, spec), features)


class ASTGainEnsemble:
    """Fold networks of kind `ast_scores` predicting each model's gain over the noisy input."""

    learner: ClassVar[str] = "ast"
    reads_audio: ClassVar[bool] = True

    def __init__(self, networks: Sequence[ASTScorePredictor], training: Mapping[str, Any] | None = None):
        if not networks:
            raise PredictorError("an ast gain ensemble needs at least one fold network")
        self.networks = list(networks)
        self.models = list(self.networks[0].classes)
        self.feature_names = list(self.networks[0].inputs.feature_names)
        self.training = dict(training or {})

    @property
    def fbank(self) -> FbankSpec:
        spec = self.networks[0].inputs.fbank
        assert spec is not None
        return spec

    @classmethod
    def fit_gains(cls, inputs: GainInputs, gains: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                  models: Sequence[str], feature_names: Sequence[str], settings: LearnerSettings
                  ) -> tuple[ASTGainEnsemble, np.ndarray]:
        """One network per fold; returns the ensemble and the out-of-fold predictions (NaN for
        files no fold holds out). `settings.config` (a RecommenderConfig) sizes the AST and
        trains it (learning rate, epochs, patience, batch size, device)."""
        config, inner_validation = settings.config, settings.inner_validation
        if config is None or inner_validation is None:
            raise PredictorError("the ast learner needs the run's AST settings (a RecommenderConfig) and "
                                 "the folds' inner validation rule")
        gains = np.asarray(gains, dtype=np.float64)
        if len(folds) < 2 or gains.shape != (len(inputs.files), len(models)):
            raise PredictorError(f"gains {gains.shape} do not match {len(inputs.files)} files x {len(models)} "
                                 f"models, or fewer than 2 folds ({len(folds)})")
        try:
            builder = ASTScorePredictor.builder(config)
            device = resolve_device(config.device)
        except RecommenderError as exc:
            raise PredictorError(str(exc)) from exc
        assert builder.fbank is not None
        x = _model_inputs(inputs, builder.fbank, feature_names)
        scored = np.isfinite(gains).any(axis=1)
        oof = np.full(gains.shape, np.nan)
        networks, best_epochs = [], []
        for k, (train, held) in enumerate(folds, start=1):
            train, held = np.asarray(train, bool), np.asarray(held, bool)
            inner = inner_validation(train, k)
            fit_rows, val_rows = np.flatnonzero(train & ~inner & scored), np.flatnonzero(inner & scored)
            seed_everything(settings.seed + k)
            model = builder.make(list(models), list(feature_names))
            report = model.fit(x.take(fit_rows), gains[fit_rows], x.take(val_rows), gains[val_rows],
                               config.fit_settings(settings.seed + k, str(device), f"ast gain fold {k}"))
            model.to("cpu")
            if held.any():
                oof[held] = model.predict(x.take(np.flatnonzero(held)), config.batch_size).scores
            networks.append(model)
            best_epochs.append(report.best_epoch)
        training = {"best_epochs": best_epochs, "fit": {k: getattr(config, k) for k in FIT_FLAGS}}
        return cls(networks, training), oof

    def predict(self, inputs: GainInputs) -> tuple[np.ndarray, np.ndarray]:
        """(mean, spread): predicted gain per (file, model) and its std across the fold networks."""
        x = _model_inputs(inputs, self.fbank, self.feature_names)
        per_fold = np.stack([network.predict(x).scores for network in self.networks])
        return per_fold.mean(axis=0), per_fold.std(axis=0)

    def to_metadata(self) -> dict[str, Any]:
        """Plain values and tensors: the AST configuration once, one state dict per fold."""
        model_config, _ = self.networks[0].to_checkpoint()
        return {
            "kind": ENSEMBLE_KIND, "target": TARGET, "models": self.models, "feature_names": self.feature_names,
            "fbank": self.fbank.as_dict(), "model_config": model_config,
            "states": [{k: v.detach().cpu() for k, v in n.to_checkpoint()[1].items()} for n in self.networks],
            "training": self.training,
        }  # fmt: skip

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ASTGainEnsemble:
        if meta.get("kind") != ENSEMBLE_KIND:
            raise PredictorError(f"not an ast gain-ensemble checkpoint (kind {meta.get('kind')!r})")
        try:
            inputs = InputSpec(FbankSpec(**meta["fbank"]), tuple(str(n) for n in meta["feature_names"]))
            models, model_config, states = list(meta["models"]), dict(meta["model_config"]), list(meta["states"])
            networks = [ASTScorePredictor.from_checkpoint(model_config, state, models, inputs) for state in states]
        except (KeyError, TypeError, ValueError) as exc:  # CheckpointError is a ValueError
            raise PredictorError(f"ast gain-ensemble checkpoint is unusable ({exc}); retrain it") from exc
        return cls(networks, meta.get("training"))


# The RecommenderConfig fields the ensemble's training record keeps.
FIT_FLAGS = ("pretrained_models", "ast_size", "max_audio_seconds", "learning_rate", "weight_decay",
             "batch_size", "num_epochs", "patience")

