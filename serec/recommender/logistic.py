"""The `logistic_regression` kind: multinomial logistic regression on standardised feature
vectors (the tabular model, and the tabular baseline of cross-validation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from serec.recommender.errors import CheckpointError, RecommenderError
from serec.recommender.kinds import (
    FitReport,
    FitSettings,
    InputSpec,
    ModelBuilder,
    ModelInputs,
    RecommenderModel,
    register_kind,
)
from serec.recommender.neural import ScaledFeatures, predict_logits

if TYPE_CHECKING:
    from serec.recommender.config import RecommenderConfig

# Logit of a class never seen in training: it can never be predicted.
UNSEEN_CLASS_LOGIT = -1e4


class LinearNetwork(ScaledFeatures):
    """Standardise, then one Linear layer: the fitted regression stored as torch weights."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__(n_features)
        self.linear = nn.Linear(n_features, n_classes)

    def forward(
        self, input_values: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.linear(self.standardise(features))


@register_kind
class LogisticClassifier(RecommenderModel):
    """Logistic regression fitted with scikit-learn (`--model_kind logistic_regression`,
    the thesis' `--feature_type cekl`); `balanced` weights classes inversely to frequency."""

    kind = "logistic_regression"

    def __init__(self, classes: Sequence[str], feature_names: Sequence[str]) -> None:
        super().__init__(classes, InputSpec(None, tuple(feature_names)))
        self.network = LinearNetwork(len(self.inputs.feature_names), len(self.classes))

    @classmethod
    def builder(cls, config: RecommenderConfig) -> ModelBuilder:
        if config.use_hybrid_features:
            raise RecommenderError(
                "--use_hybrid_features joins features to an AST; logistic regression reads "
                "the features alone (drop the flag)"
            )
        return ModelBuilder(fbank=None, uses_features=True, make=cls)

    def fit(self, train: ModelInputs, y_train: np.ndarray, val: ModelInputs, y_val: np.ndarray,
            settings: FitSettings) -> FitReport:  # fmt: skip
        """Fit on `train` only (no epochs: `val` is not needed)."""
        self.fit_features(train.features, y_train, balanced=settings.use_weighted_sampler,
                          seed=settings.seed)  # fmt: skip
        return FitReport()

    def fit_features(
        self, features: np.ndarray, targets: np.ndarray, *, balanced: bool = False, seed: int = 0
    ) -> LogisticClassifier:
        """Fit the scaler and the regression on these rows; class indices absent from
        `targets` get a logit that is never the largest, so the output keeps every column."""
        scaler = StandardScaler().fit(features)
        self.network.set_scaler(scaler.mean_, scaler.scale_)
        present = np.unique(targets)
        weight = torch.zeros(len(self.classes), features.shape[1])
        bias = torch.full((len(self.classes),), UNSEEN_CLASS_LOGIT)
        if present.size == 1:
            bias[int(present[0])] = 0.0
        else:
            lr = LogisticRegression(
                max_iter=2000, class_weight="balanced" if balanced else None, random_state=seed
            ).fit(scaler.transform(features), targets)
            coef = torch.as_tensor(lr.coef_, dtype=torch.float32)
            intercept = torch.as_tensor(lr.intercept_, dtype=torch.float32)
            idx = torch.as_tensor(lr.classes_.astype(np.int64))
            if present.size == 2:
                # sklearn's binary model is one logit z for classes_[1]: softmax([0, z]).
                weight[idx[1]], bias[idx[1]], bias[idx[0]] = coef[0], intercept[0], 0.0
            else:
                weight[idx], bias[idx] = coef, intercept
        with torch.no_grad():
            self.network.linear.weight.copy_(weight)
            self.network.linear.bias.copy_(bias)
        return self

    def predict_proba(self, x: ModelInputs, batch_size: int = 32) -> np.ndarray:
        x.check(self.inputs, self.kind)
        logits = predict_logits(self.network, ModelInputs(features=x.features), batch_size,
                                self.device)  # fmt: skip
        return torch.softmax(logits, dim=1).numpy().reshape(len(x), len(self.classes))

    def to(self, device: str | torch.device) -> LogisticClassifier:
        super().to(device)
        self.network.to(self.device)
        return self

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, self.network.state_dict()

    @classmethod
    def from_checkpoint(cls, model_config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        classes: Sequence[str], inputs: InputSpec) -> LogisticClassifier:  # fmt: skip
        model = cls(classes, inputs.feature_names)
        wanted = {k: tuple(v.shape) for k, v in model.network.state_dict().items()}
        held = {k: tuple(v.shape) for k, v in state.items()}
        if wanted != held:
            raise CheckpointError(
                f"its weights {held} do not fit {len(classes)} classes of "
                f"{len(inputs.feature_names)} features ({wanted})"
            )
        model.network.load_state_dict(dict(state))
        model.network.eval()
        return model
