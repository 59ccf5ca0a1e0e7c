"""The quality predictor: from a noisy recording's features, each enhancer's score gain.

For every model in the zoo a gradient-boosted tree ensemble (LightGBM) predicts the label
metric's gain of that model's output over the noisy input (e.g. DNSMOS OVR of the output
minus OVR of the input). One booster per (fold, model) is trained on the other folds,
so the fold models give out-of-fold predictions for every training file (the inner
validation the routing policies' settings are chosen on) and, together, an ensemble whose
mean is the prediction and whose spread across folds is its uncertainty.

Boosters are kept as LightGBM's own text format, so a checkpoint is plain strings and
numbers (`torch.load(weights_only=True)` reads it; no pickled objects).

Gain learners. The selector's learner is chosen by name from `LEARNERS` (`learner_class`):
`lightgbm` (QualityPredictor, here) and `ast` (serec.recommender.ast_gain.ASTGainEnsemble,
the thesis' AST / hybrid with a regression head, imported only when asked for). Each has the
same small interface (`GainLearner`): `fit_gains(inputs, gains, folds, models, feature_names,
settings) -> (learner, out-of-fold predictions)`, `predict(inputs) -> (mean, spread)` over the
fold models, `to_metadata()` / `from_metadata()` (plain data and tensors only), and
`reads_audio` (whether its inputs need the noisy files as well as the feature vectors).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

PREDICTOR_KIND = "quality_predictor"
TARGET = "gain_over_noisy"
# Huber's transition for every gain learner: gains beyond +-0.3 MOS count linearly, not squared.
HUBER_DELTA = 0.3
# Small, regularised trees: a few hundred training files per fold, a few hundred features.
DEFAULT_BOOSTER_PARAMS: dict[str, Any] = {
    "objective": "huber",
    "alpha": HUBER_DELTA,
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.7,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 1,
    "verbosity": -1,
}
DEFAULT_NUM_ROUNDS = 300
# The smallest leaf on a small corpus (min_data_in_leaf shrinks to files / 8, not below this).
MIN_LEAF_FLOOR = 3


class PredictorError(ValueError):
    """Training or checkpoint data the predictor cannot use (message says which and why)."""


@dataclass
class GainInputs:
    """A gain learner's inputs, one row per file of `files`: the feature vectors and, for
    learners that read the audio, the folder the noisy files (ids relative to it) lie in;
    `cache_dir` (training) keeps what is computed from the audio for the next run."""

    features: np.ndarray
    files: Sequence[str] = ()
    audio_dir: Path | None = None
    cache_dir: Path | None = None


@dataclass(frozen=True)
class LearnerSettings:
    """Settings every gain learner gets; each uses those that apply to it."""

    seed: int = 0
    num_rounds: int = DEFAULT_NUM_ROUNDS  # lightgbm: boosting rounds
    # ast: a fold's training mask -> the part of it that picks the epoch (the stages' rule)
    inner_validation: Callable[[np.ndarray, int], np.ndarray] | None = None
    config: Any = None  # ast: the run's RecommenderConfig (backbone and fit settings)


class GainLearner(Protocol):
    """What the selector needs of a learner (see the module docstring)."""

    learner: ClassVar[str]
    reads_audio: ClassVar[bool]
    models: list[str]
    feature_names: list[str]

    @classmethod
    def fit_gains(cls, inputs: GainInputs, gains: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                  models: Sequence[str], feature_names: Sequence[str], settings: LearnerSettings
                  ) -> tuple[GainLearner, np.ndarray]: ...

    def predict(self, inputs: GainInputs) -> tuple[np.ndarray, np.ndarray]: ...

    def to_metadata(self) -> dict[str, Any]: ...

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> GainLearner: ...


# Learner name -> (module, class); modules are imported on demand (the AST's are heavy).
LEARNERS: dict[str, tuple[str, str]] = {
    "lightgbm": ("serec.predictor", "QualityPredictor"),
    "ast": ("serec.recommender.ast_gain", "ASTGainEnsemble"),
}
DEFAULT_LEARNER = "lightgbm"


def learner_class(name: str) -> type[GainLearner]:
    """The gain learner registered as `name`; PredictorError naming the known ones."""
    if name not in LEARNERS:
        raise PredictorError(f"unknown learner {name!r}; choose from {', '.join(LEARNERS)}")
    module, attribute = LEARNERS[name]
    return getattr(importlib.import_module(module), attribute)


def _lightgbm():
    try:
        import lightgbm
    except ImportError as exc:  # pragma: no cover - lightgbm is in requirements.txt
        raise PredictorError(f"the quality predictor needs lightgbm ({exc}); run make install") from exc
    return lightgbm


@dataclass
class QualityPredictor:
    """Fold ensemble of per-model boosters predicting each model's gain over the noisy input
    (the `lightgbm` learner)."""

    learner: ClassVar[str] = "lightgbm"
    reads_audio: ClassVar[bool] = False

    models: list[str]
    feature_names: list[str]
    boosters: list[list[str]]  # [fold][model]: LightGBM model text
    params: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_BOOSTER_PARAMS))
    num_rounds: int = DEFAULT_NUM_ROUNDS
    seed: int = 0

    def __post_init__(self) -> None:
        # Parsed boosters, built on the first predict(): parsing the model text costs far
        # more than predicting one file. Not a field, so checkpoints stay plain text.
        self._parsed: list[list[Any]] | None = None

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        gains: np.ndarray,
        folds: Sequence[tuple[np.ndarray, np.ndarray]],
        models: Sequence[str],
        feature_names: Sequence[str],
        *,
        seed: int = 0,
        params: Mapping[str, Any] | None = None,
        num_rounds: int = DEFAULT_NUM_ROUNDS,
    ) -> tuple[QualityPredictor, np.ndarray]:
        """Train one booster per (fold, model); return the predictor and out-of-fold predictions.

        `gains` is (files, models), NaN where a model failed on a file (that pair is left
        out of that model's training). `folds` are (train, held-out) boolean masks over the
        files, one pair per fold (from recommender.folds.Folds); a file in no held-out set
        keeps NaN out-of-fold predictions.
        """
        lgb = _lightgbm()
        features = np.asarray(features, dtype=np.float64)
        gains = np.asarray(gains, dtype=np.float64)
        if features.ndim != 2 or gains.shape != (features.shape[0], len(models)):
            raise PredictorError(
                f"features {features.shape} and gains {gains.shape} do not match "
                f"{len(models)} models and one row per file"
            )
        if features.shape[1] != len(feature_names):
            raise PredictorError(f"{features.shape[1]} feature columns but {len(feature_names)} names")
        if len(folds) < 2:
            raise PredictorError("the quality predictor needs at least 2 folds of training files")
        merged = {**DEFAULT_BOOSTER_PARAMS, **(params or {}), "seed": seed}
        oof = np.full(gains.shape, np.nan)
        boosters: list[list[str]] = []
        for fold, (train, held) in enumerate(folds):
            train, held = np.asarray(train, dtype=bool), np.asarray(held, dtype=bool)
            fold_boosters = []
            for j, model in enumerate(models):
                usable = train & np.isfinite(gains[:, j])
                if usable.sum() < 2 * MIN_LEAF_FLOOR:
                    raise PredictorError(
                        f"model {model}: only {int(usable.sum())} training files with a score outside "
                        f"fold {fold}; need at least {2 * MIN_LEAF_FLOOR}"
                    )
                # A small corpus gets smaller leaves rather than a single-leaf (constant) tree.
                leaf = min(int(merged["min_data_in_leaf"]), max(MIN_LEAF_FLOOR, int(usable.sum()) // 8))
                data = lgb.Dataset(features[usable], gains[usable, j], free_raw_data=True)
                booster = lgb.train({**merged, "min_data_in_leaf": leaf}, data, num_boost_round=num_rounds)
                if held.any():
                    oof[held, j] = booster.predict(features[held])
                fold_boosters.append(booster.model_to_string())
            boosters.append(fold_boosters)
        predictor = cls(list(models), list(feature_names), boosters, merged, num_rounds, seed)
        return predictor, oof

    @classmethod
    def fit_gains(cls, inputs: GainInputs, gains: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                  models: Sequence[str], feature_names: Sequence[str], settings: LearnerSettings
                  ) -> tuple[QualityPredictor, np.ndarray]:
        """fit() on the feature vectors (GainLearner's interface)."""
        return cls.fit(inputs.features, gains, folds, models, feature_names, seed=settings.seed,
                       num_rounds=settings.num_rounds)

    def predict(self, features: np.ndarray | GainInputs) -> tuple[np.ndarray, np.ndarray]:
        """(mean, spread): predicted gain per (file, model) and its std across the fold models."""
        lgb = _lightgbm()
        if isinstance(features, GainInputs):
            features = features.features
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.feature_names):
            raise PredictorError(
                f"expected {len(self.feature_names)} features per file, got shape {features.shape}"
            )
        if self._parsed is None:
            self._parsed = [[lgb.Booster(model_str=text) for text in fold] for fold in self.boosters]
        per_fold = np.stack([
            np.column_stack([booster.predict(features) for booster in fold]) for fold in self._parsed
        ])
        return per_fold.mean(axis=0), per_fold.std(axis=0)

    def to_metadata(self) -> dict[str, Any]:
        """Plain data for a checkpoint (strings, numbers, lists, dicts)."""
        return {"kind": PREDICTOR_KIND, "target": TARGET, **asdict(self)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> QualityPredictor:
        if meta.get("kind") != PREDICTOR_KIND:
            raise PredictorError(f"not a quality-predictor checkpoint (kind {meta.get('kind')!r})")
        try:
            predictor = cls(
                list(meta["models"]),
                list(meta["feature_names"]),
                [list(fold) for fold in meta["boosters"]],
                dict(meta["params"]),
                int(meta["num_rounds"]),
                int(meta["seed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PredictorError(f"quality-predictor checkpoint is incomplete ({exc}); retrain it") from exc
        if not predictor.boosters or any(len(f) != len(predictor.models) for f in predictor.boosters):
            raise PredictorError("quality-predictor checkpoint has no boosters or a fold missing models; retrain it")
        return predictor


def gain_table(
    scores: Mapping[tuple[str, str], float], files: Sequence[str], models: Sequence[str], noisy: str
) -> np.ndarray:
    """(files, models) gains score(file, model) - score(file, noisy); NaN where either is missing."""
    table = np.full((len(files), len(models)), np.nan)
    for i, fid in enumerate(files):
        base = scores.get((fid, noisy), math.nan)
        for j, model in enumerate(models):
            table[i, j] = scores.get((fid, model), math.nan) - base
    return table
