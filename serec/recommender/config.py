"""What one recommender run (step 4) is asked to do: its flags, checked once, as a dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serec.recommender.checkpoint import REFIT_FOLD, fold_name
from serec.recommender.errors import RecommenderError
from serec.recommender.kinds import FitSettings, kind_class

# The thesis' --feature_type named the model kind by its input; kept as an alias.
FEATURE_TYPE_KINDS = {"mel_spec": "ast", "cekl": "logistic_regression"}


@dataclass
class RecommenderConfig:
    """Everything one recommender run needs; field names are the CLI flag names."""

    labels_csv: Path
    output_dir: Path
    audio_dir: Path | None = None
    metadata_csv: Path | None = None
    cekl_features_base_dir: Path | None = None
    model_kind: str = "ast"
    pretrained_models: str = "ast_finetuned_audioset"
    ast_size: str = "base"
    ast_model_dir: Path | None = None
    max_audio_seconds: float | None = None
    use_hybrid_features: bool = False
    use_weighted_sampler: bool = False
    learning_rate: float = 2.5e-5
    weight_decay: float = 1e-4
    batch_size: int = 32
    num_epochs: int = 50
    patience: int = 10
    label_smoothing: float = 0.1
    n_folds: int = 5
    folds: list[int] | None = None
    refit: bool = False
    seed: int = 42
    device: str = "auto"
    gatekeeper_class: str | None = None
    gatekeeper_model_path: str = "gatekeeper_model_fold_{fold}_best.pth"
    expert_model_path: str = "expert_model_fold_{fold}_best_hybrid.pth"
    single_model_path: str = "single_model_fold_{fold}_best.pth"

    def __post_init__(self) -> None:
        self.labels_csv = Path(self.labels_csv)
        self.output_dir = Path(self.output_dir)
        kind_class(self.model_kind)
        if self.n_folds < 2:
            raise RecommenderError(f"--n_folds must be at least 2, got {self.n_folds}")
        bad = [f for f in self.folds or [] if not 1 <= f <= self.n_folds]
        if bad:
            raise RecommenderError(f"--folds {bad}: folds are numbered 1..{self.n_folds}")
        for name in ("gatekeeper_model_path", "expert_model_path", "single_model_path"):
            if "{fold}" not in getattr(self, name):
                raise RecommenderError(
                    f"--{name} {getattr(self, name)!r} has no {{fold}}: every fold would "
                    "overwrite the same checkpoint"
                )

    @property
    def fold_numbers(self) -> list[int]:
        return sorted(set(self.folds)) if self.folds else list(range(1, self.n_folds + 1))

    @property
    def training_folds(self) -> list[int]:
        """The folds a stage trains: fold_numbers, then the refit when asked for."""
        return [*self.fold_numbers, *([REFIT_FOLD] if self.refit else [])]

    def checkpoint_path(self, stage: str, fold: int) -> Path:
        """A stage's checkpoint for a fold ("all" for the refit); relative templates resolve
        inside output_dir."""
        template = getattr(self, f"{stage}_model_path")
        path = Path(template.format(fold=fold_name(fold)))
        return path if path.is_absolute() else self.output_dir / path

    def check_inputs(self, reads_audio: bool, reads_features: bool) -> None:
        """Raise RecommenderError when a flag the run's models need is missing."""
        if not self.labels_csv.is_file():
            raise RecommenderError(f"--labels_csv {self.labels_csv}: file not found")
        if reads_audio and self.audio_dir is None:
            raise RecommenderError(
                f"--model_kind {self.model_kind} reads the audio: it needs --audio_dir "
                "(the noisy files)"
            )
        if reads_audio and not Path(self.audio_dir).is_dir():
            raise RecommenderError(f"--audio_dir {self.audio_dir}: not a directory")
        if reads_features and self.cekl_features_base_dir is None:
            raise RecommenderError(
                f"--model_kind {self.model_kind}"
                + (" with --use_hybrid_features" if self.use_hybrid_features else "")
                + " reads feature vectors: it needs --cekl_features_base_dir (made by "
                "preprocess_features.py)"
            )

    def fit_settings(self, seed: int, device: str, desc: str) -> FitSettings:
        """This run's training settings for one model (its own seed, device and label)."""
        shared = {k: getattr(self, k) for k in FitSettings.__dataclass_fields__
                  if hasattr(self, k) and k not in ("seed", "device")}  # fmt: skip
        return FitSettings(**shared, seed=seed, device=device, desc=desc)

    def plain(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
