"""The recommender-model protocol and the registry of model kinds.

A kind is a `RecommenderModel` subclass registered under its `kind` name: it says what it
reads per file (`InputSpec`: an fbank of the audio, feature vectors, or both), learns with
`fit`, answers with `predict_proba` (a classifier over `classes`) or `predict` (a score
predictor: one predicted score per class, i.e. per enhancer, with its uncertainty), and
saves to / rebuilds from a weights_only checkpoint (`to_checkpoint` / `from_checkpoint`).
Training, cross-validation and inference only use this protocol, so a new kind is one
module with `@register_kind` (docs/architecture.md, "Add a recommender kind").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import torch

from serec.recommender.errors import CheckpointError, RecommenderError
from serec.recommender.fbank import FbankSpec

if TYPE_CHECKING:
    from serec.recommender.config import RecommenderConfig

Output = Literal["proba", "scores"]


@dataclass(frozen=True)
class InputSpec:
    """What a model reads per file: a filterbank of the audio and/or a feature vector."""

    fbank: FbankSpec | None = None
    feature_names: tuple[str, ...] = ()


@dataclass
class ModelInputs:
    """A batch of inputs in a model's `InputSpec`: fbank (n, frames, mels), raw features (n, k)."""

    fbank: np.ndarray | None = None
    features: np.ndarray | None = None

    def __len__(self) -> int:
        present = [len(x) for x in (self.fbank, self.features) if x is not None]
        return present[0] if present else 0

    def take(self, rows: np.ndarray | slice) -> ModelInputs:
        """These files' rows (`rows` indexes files)."""
        return ModelInputs(None if self.fbank is None else self.fbank[rows],
                           None if self.features is None else self.features[rows])

    def check(self, spec: InputSpec, kind: str) -> None:
        """Raise ValueError unless these inputs are what a model with `spec` reads."""
        if spec.fbank is not None:
            shape = (spec.fbank.max_length, spec.fbank.num_mel_bins)
            if self.fbank is None or tuple(self.fbank.shape[1:]) != shape:
                got = None if self.fbank is None else tuple(self.fbank.shape[1:])
                raise ValueError(f"a {kind} model needs fbank inputs of shape {shape}, got {got}")
        if spec.feature_names:
            width = len(spec.feature_names)
            if self.features is None or self.features.shape[1:] != (width,):
                raise ValueError(
                    f"a {kind} model needs {width} features ({list(spec.feature_names)}) per file"
                )
        if spec.fbank is not None and self.features is not None and spec.feature_names:
            if len(self.fbank) != len(self.features):
                raise ValueError("fbank and feature inputs hold different numbers of files")


@dataclass(frozen=True)
class FitSettings:
    """Training settings every kind gets; each uses those that apply to it."""

    learning_rate: float = 2.5e-5
    weight_decay: float = 1e-4
    batch_size: int = 32
    num_epochs: int = 50
    patience: int = 10
    use_weighted_sampler: bool = False
    label_smoothing: float = 0.1
    seed: int = 42
    device: str = "cpu"
    desc: str = "train"


@dataclass
class FitReport:
    """How a fit went: the epoch kept (None for kinds without epochs) and the curve."""

    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ScorePrediction:
    """A score predictor's answer: per file and class (enhancer) the predicted score and its
    uncertainty (a standard deviation in the score's unit)."""

    scores: np.ndarray
    uncertainty: np.ndarray


@dataclass(frozen=True)
class ModelBuilder:
    """Fresh, untrained models of one kind for one run (one per fold), and what they read.

    `make(class_names, feature_names)` returns an untrained model; `fbank` is the audio input
    the models read (None: no audio), `uses_features` whether they read feature vectors.
    """

    fbank: FbankSpec | None
    uses_features: bool
    make: Callable[[list[str], list[str]], RecommenderModel]


class RecommenderModel(ABC):
    """One recommender model: `classes` are the labels it chooses between (for a score
    predictor, the enhancers it scores); `inputs` what it reads per file."""

    kind: ClassVar[str]
    output: ClassVar[Output] = "proba"

    def __init__(self, classes: Sequence[str], inputs: InputSpec) -> None:
        self.classes = [str(c) for c in classes]
        self.inputs = inputs
        self.device = torch.device("cpu")

    @classmethod
    @abstractmethod
    def builder(cls, config: RecommenderConfig) -> ModelBuilder:
        """Untrained models of this kind as a run's flags configure them; RecommenderError
        for flags this kind cannot honour."""

    @abstractmethod
    def fit(
        self,
        train: ModelInputs,
        y_train: np.ndarray,
        val: ModelInputs,
        y_val: np.ndarray,
        settings: FitSettings,
    ) -> FitReport:
        """Learn from `train`; `val` (never the reported fold) may pick epochs or stop early.
        Targets: class indices for classifiers, a (n, classes) score matrix for predictors."""

    def predict_proba(self, x: ModelInputs, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (n, len(classes)) (classifiers)."""
        raise TypeError(f"a {self.kind} model predicts scores: use predict()")

    def predict(self, x: ModelInputs, batch_size: int = 32) -> ScorePrediction:
        """Predicted score and uncertainty per file and class (score predictors)."""
        raise TypeError(f"a {self.kind} model is a classifier: use predict_proba()")

    def recommend(self, x: ModelInputs, batch_size: int = 32) -> list[str]:
        """The class each file is sent to: the most probable, or the best predicted score."""
        values = (
            self.predict_proba(x, batch_size)
            if self.output == "proba"
            else self.predict(x, batch_size).scores
        )
        return [self.classes[i] for i in values.argmax(axis=1)]

    def to(self, device: str | torch.device) -> RecommenderModel:
        """Run on `device` from now on (kinds without torch parts ignore it)."""
        self.device = torch.device(device)
        return self

    @abstractmethod
    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(model_config, state): plain values that rebuild the architecture, and tensors."""

    @classmethod
    @abstractmethod
    def from_checkpoint(
        cls,
        model_config: Mapping[str, Any],
        state: Mapping[str, torch.Tensor],
        classes: Sequence[str],
        inputs: InputSpec,
    ) -> RecommenderModel:
        """Rebuild a saved model; CheckpointError when the saved parts do not fit together
        (checked before any large allocation)."""


K = TypeVar("K", bound=type[RecommenderModel])
_KINDS: dict[str, type[RecommenderModel]] = {}


def register_kind(cls: K) -> K:
    """Class decorator: make a RecommenderModel subclass available under its `kind`."""
    if cls.kind in _KINDS and _KINDS[cls.kind] is not cls:
        raise ValueError(f"recommender kind {cls.kind!r} is already registered by "
                         f"{_KINDS[cls.kind].__name__}")
    _KINDS[cls.kind] = cls
    return cls


def available_kinds() -> list[str]:
    return sorted(_KINDS)


def kind_class(kind: str, *, checkpoint: str | None = None) -> type[RecommenderModel]:
    """The class registered as `kind`; RecommenderError (CheckpointError when read from
    `checkpoint`) naming the known kinds."""
    if kind not in _KINDS:
        known = ", ".join(available_kinds())
        if checkpoint is not None:
            raise CheckpointError(
                f"{checkpoint}: a recommender of kind {kind!r}, which this serec does not know "
                f"(known: {known}); retrain it with model_recommender_w_scaler.py"
            )
        raise RecommenderError(f"--model_kind {kind!r}: choose from {known}")
    return _KINDS[kind]


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda -> torch.device (auto: cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecommenderError("--device cuda, but torch sees no CUDA device (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise RecommenderError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)
