"""The AST kinds: an Audio Spectrogram Transformer on the log-mel filterbank, optionally joined
with the standardised feature vector (the thesis' hybrid model). `ast` classifies (the thesis'
recommender); `ast_scores` regresses one score gain per enhancer (the quality selector's AST
learner). Both share the network, its training loop and its checkpoints (`ASTKind`)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers import ASTConfig, ASTModel

from serec.predictor import HUBER_DELTA
from serec.recommender.errors import CheckpointError, RecommenderError
from serec.recommender.fbank import FbankSpec, frames_for_seconds
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
from serec.recommender.neural import (
    Objective,
    ScaledFeatures,
    classification,
    fit_scaler,
    predict_logits,
    regression,
    train_network,
)

if TYPE_CHECKING:
    from serec.recommender.config import RecommenderConfig

AST_HUB_ID = "MIT/ast-finetuned-audioset-10-10-0.4593"
PRETRAINED_CHOICES = ("none", "ast_finetuned_audioset")
AST_SIZES = ("tiny", "small", "base")
HEAD_DROPOUT = 0.3
# A checkpoint may declare at most this many parameters more than its state dict holds
# before it is refused unbuilt: allocating a model its weights cannot fill is never useful,
# and a crafted config could ask for terabytes.
PARAMETER_SLACK = 1_000_000

# The ASTConfig fields that define the architecture; only these go into checkpoints, so a
# checkpoint does not depend on transformers' bookkeeping fields.
AST_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "patch_size",
    "qkv_bias",
    "frequency_stride",
    "time_stride",
    "max_length",
    "num_mel_bins",
)
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size",
              "frequency_stride", "time_stride", "max_length", "num_mel_bins")  # fmt: skip

# Random-init presets for --pretrained_models none. base is the real AST (ASTConfig
# defaults). tiny trains on CPU in seconds per epoch: 64 mel bins and non-overlapping
# 16x16 patches give 4 x 37 = 148 tokens for 6 s instead of 12 x 101 for 10.24 s.
AST_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "num_mel_bins": 64,
        "frequency_stride": 16,
        "time_stride": 16,
    },
    "small": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    },
    "base": {},
}
DEFAULT_AUDIO_SECONDS = {"tiny": 6.0, "small": 10.24, "base": 10.24}


class PretrainedUnavailable(RecommenderError):
    """The pretrained AST could not be loaded (offline, missing or broken local copy)."""


def fbank_spec_for(config: ASTConfig) -> FbankSpec:
    """The filterbank an AST with this configuration reads."""
    return FbankSpec(num_mel_bins=config.num_mel_bins, max_length=config.max_length)


def ast_config_for(ast_size: str, max_audio_seconds: float | None = None) -> ASTConfig:
    """Random-init AST configuration: a size preset, with an input length for the audio."""
    if ast_size not in AST_PRESETS:
        raise ValueError(f"unknown --ast_size {ast_size!r}; choose from {', '.join(AST_SIZES)}")
    seconds = DEFAULT_AUDIO_SECONDS[ast_size] if max_audio_seconds is None else max_audio_seconds
    return ASTConfig(**AST_PRESETS[ast_size], max_length=frames_for_seconds(seconds))


def _pretrained_help(source: str, reason: str) -> str:
    return (
        f"cannot load the pretrained AST from {source}: {reason}.\n"
        f"Get a local copy where the hub is reachable:\n"
        f"  huggingface-cli download {AST_HUB_ID} --local-dir ast-finetuned-audioset\n"
        f"then pass --ast_model_dir ast-finetuned-audioset, or train from random "
        f"initialisation with --pretrained_models none --ast_size tiny|small|base."
    )


def load_ast_backbone(
    pretrained_models: str,
    ast_size: str = "base",
    max_audio_seconds: float | None = None,
    ast_model_dir: str | os.PathLike[str] | None = None,
) -> ASTModel:
    """The AST encoder: AudioSet-finetuned weights, or random init from a size preset.

    `ast_finetuned_audioset` loads `AST_HUB_ID` with from_pretrained (the hub or its
    cache), or `ast_model_dir` (a save_pretrained / huggingface-cli copy) without any
    network access. Its input length is fixed by its position embeddings (1024 frames,
    10.24 s). Raises PretrainedUnavailable with instructions when it cannot be loaded.
    """
    if pretrained_models == "none":
        return ASTModel(ast_config_for(ast_size, max_audio_seconds))
    if pretrained_models != "ast_finetuned_audioset":
        raise ValueError(
            f"unknown --pretrained_models {pretrained_models!r}; choose from "
            f"{', '.join(PRETRAINED_CHOICES)}"
        )
    if ast_model_dir is not None:
        local = Path(ast_model_dir)
        if not (local / "config.json").is_file():
            raise PretrainedUnavailable(_pretrained_help(str(local), "no config.json there"))
        source, kwargs = str(local), {"local_files_only": True}
    else:
        source, kwargs = AST_HUB_ID, {}
    try:
        backbone = ASTModel.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise PretrainedUnavailable(_pretrained_help(source, str(exc).splitlines()[0])) from exc
    seconds = fbank_spec_for(backbone.config).audio_seconds
    if max_audio_seconds is not None and abs(max_audio_seconds - seconds) > 0.05:
        raise ValueError(
            f"a pretrained AST takes {backbone.config.max_length} frames ({seconds:.2f} s) of "
            f"audio, fixed by its position embeddings; drop --max_audio_seconds "
            f"({max_audio_seconds:g}) or use --pretrained_models none"
        )
    return backbone


def plain_ast_config(config: ASTConfig) -> dict[str, Any]:
    """The architecture fields of an ASTConfig as a plain dict (checkpoint metadata)."""
    return {key: getattr(config, key) for key in AST_CONFIG_KEYS}


def hybrid_hidden_size(embedding_size: int, n_features: int) -> int:
    """Width of the head's hidden layer: a quarter of its input (768 + 9 -> 194)."""
    return (embedding_size + n_features) // 4


class ASTNetwork(ScaledFeatures):
    """AST encoder, mean-pooled last hidden state, optionally joined with the standardised
    feature vector, then LayerNorm -> Linear -> ReLU -> Dropout -> Linear(n_classes).

    With n_features = 0 this is the thesis' AST head; with 9 CE/KL features it is its
    hybrid model (upstream.md section 1), plus the scaler the thesis left out.
    """

    def __init__(
        self, backbone: ASTModel, n_classes: int, n_features: int = 0, dropout: float = HEAD_DROPOUT
    ) -> None:
        super().__init__(n_features)
        self.backbone = backbone
        width = backbone.config.hidden_size + n_features
        hidden = hybrid_hidden_size(backbone.config.hidden_size, n_features)
        self.head = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(
        self, input_values: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        pooled = self.backbone(input_values).last_hidden_state.mean(dim=1)
        if self.n_features:
            pooled = torch.cat((pooled, self.standardise(features)), dim=1)
        return self.head(pooled)


def estimated_parameters(config: Mapping[str, Any], n_classes: int, n_features: int) -> int:
    """Parameters of an ASTNetwork with this configuration, from its sizes alone (nothing built)."""
    h, layers, inner, patch = (int(config[k]) for k in _SIZE_KEYS[:4])
    f_stride, t_stride, frames, mels = (int(config[k]) for k in _SIZE_KEYS[4:])
    if min(h, layers, inner, patch, f_stride, t_stride, frames, mels) < 1:
        raise ValueError("sizes must be positive")
    tokens = max(1, (mels - patch) // f_stride + 1) * max(1, (frames - patch) // t_stride + 1)
    layer = 4 * (h * h + h) + 2 * h * inner + inner + h + 4 * h
    embeddings = patch * patch * h + h + (tokens + 2) * h + 2 * h
    width, hidden = h + n_features, hybrid_hidden_size(h, n_features)
    head = 2 * width + width * hidden + hidden + hidden * n_classes + n_classes
    return layers * layer + embeddings + 2 * h + head + 2 * n_features


class ASTKind(RecommenderModel):
    """An ASTNetwork as a recommender model: what the classifier (`ast`) and the score
    predictor (`ast_scores`) share: building, device, and weights_only checkpoints."""

    def __init__(self, network: ASTNetwork, classes: Sequence[str], feature_names: Sequence[str]):
        super().__init__(classes, InputSpec(fbank_spec_for(network.backbone.config),
                                            tuple(feature_names)))
        self.network = network

    @classmethod
    def builder(cls, config: RecommenderConfig) -> ModelBuilder:
        make_backbone, ast_config = _backbone_factory(config)
        spec = fbank_spec_for(ast_config)

        def make(classes: list[str], feature_names: list[str]) -> ASTKind:
            network = ASTNetwork(make_backbone(), len(classes), len(feature_names))
            return cls(network, classes, feature_names)

        return ModelBuilder(fbank=spec, uses_features=config.use_hybrid_features, make=make)

    def _fit(self, train: ModelInputs, y_train: np.ndarray, val: ModelInputs, y_val: np.ndarray,
             settings: FitSettings, objective: Objective) -> FitReport:  # fmt: skip
        if self.inputs.feature_names:
            self.network.set_scaler(*fit_scaler(train.features))
        report = train_network(self.network, train, y_train, val, y_val, settings, objective)
        self.device = torch.device(settings.device)
        return report

    def _outputs(self, x: ModelInputs, batch_size: int) -> torch.Tensor:
        """The network's last layer for every file of `x` (n, len(classes))."""
        x.check(self.inputs, self.kind)
        x = ModelInputs(x.fbank, x.features if self.inputs.feature_names else None)
        return predict_logits(self.network, x, batch_size, self.device).reshape(
            len(x), len(self.classes))

    def to(self, device: str | torch.device) -> ASTKind:
        super().to(device)
        self.network.to(self.device)
        return self

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {
            "ast_config": plain_ast_config(self.network.backbone.config),
            "head_dropout": float(self.network.head[3].p),
        }
        return config, self.network.state_dict()

    @classmethod
    def from_checkpoint(cls, model_config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        classes: Sequence[str], inputs: InputSpec) -> ASTKind:  # fmt: skip
        n_classes, n_features = len(classes), len(inputs.feature_names)
        try:
            ast_config = dict(model_config["ast_config"])
            declared = estimated_parameters(ast_config, n_classes, n_features)
            dropout = float(model_config.get("head_dropout", HEAD_DROPOUT))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"its AST configuration is unusable ({exc})") from exc
        held = sum(int(t.numel()) for t in state.values())
        if declared > held + PARAMETER_SLACK:
            raise CheckpointError(
                f"it declares an AST of about {declared:,} parameters but holds {held:,} "
                "values; refused before building it"
            )
        config = ASTConfig(**ast_config)
        _check_shapes(lambda: ASTNetwork(ASTModel(config), n_classes, n_features, dropout), state)
        # Sizes and shapes are checked: building it now allocates no more than the file holds.
        network = ASTNetwork(ASTModel(config), n_classes, n_features, dropout)
        network.load_state_dict(dict(state))
        if inputs.fbank is not None and inputs.fbank != fbank_spec_for(config):
            raise CheckpointError(f"its fbank {inputs.fbank} does not match its AST {config}")
        return cls(network.eval(), classes, inputs.feature_names)


@register_kind
class ASTClassifier(ASTKind):
    """The thesis' AST classifier (`--model_kind ast`, `--feature_type mel_spec`)."""

    kind = "ast"

    def fit(self, train: ModelInputs, y_train: np.ndarray, val: ModelInputs, y_val: np.ndarray,
            settings: FitSettings) -> FitReport:  # fmt: skip
        return self._fit(train, y_train, val, y_val, settings, classification(settings))

    def predict_proba(self, x: ModelInputs, batch_size: int = 32) -> np.ndarray:
        return torch.softmax(self._outputs(x, batch_size), dim=1).numpy()


@register_kind
class ASTScorePredictor(ASTKind):
    """The AST (hybrid with feature names) with a regression head: one predicted score gain
    per class, i.e. per enhancer (`ast_scores`; the quality selector's AST learner).

    fit() takes a (files, enhancers) float matrix, NaN where an enhancer failed on a file
    (left out of the masked Huber loss); the inner validation MAE picks the epoch. One
    network has no spread of its own: predict()'s uncertainty is NaN (unknown, never a
    false 0); the selector's fold ensemble (`serec.recommender.ast_gain`) reports the
    spread of its fold networks instead.
    """

    kind = "ast_scores"
    output = "scores"

    def fit(self, train: ModelInputs, y_train: np.ndarray, val: ModelInputs, y_val: np.ndarray,
            settings: FitSettings) -> FitReport:  # fmt: skip
        shape = (len(train), len(self.classes))
        if np.shape(y_train) != shape or np.shape(y_val) != (len(val), len(self.classes)):
            raise ValueError(f"an {self.kind} model needs (files, {len(self.classes)}) score targets, "
                             f"got {np.shape(y_train)} and {np.shape(y_val)}")
        return self._fit(train, np.asarray(y_train, np.float32), val, np.asarray(y_val, np.float32),
                         settings, regression(HUBER_DELTA))

    def predict(self, x: ModelInputs, batch_size: int = 32) -> ScorePrediction:
        scores = self._outputs(x, batch_size).numpy().astype(np.float64)
        return ScorePrediction(scores, np.full_like(scores, np.nan))


def _check_shapes(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor]) -> None:
    """CheckpointError unless `state` has exactly the tensors of the network `build` makes;
    the network is built on the meta device, so nothing is allocated."""
    try:
        with torch.device("meta"):
            skeleton = build()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"its architecture cannot be built ({exc})") from exc
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    held = {k: tuple(v.shape) for k, v in state.items()}
    if wanted != held:
        differ = sorted(k for k in wanted.keys() | held.keys() if wanted.get(k) != held.get(k))
        raise CheckpointError(
            f"its weights do not fit its declared architecture ({len(differ)} tensors differ, "
            f"e.g. {differ[0]}: {held.get(differ[0])} saved, {wanted.get(differ[0])} declared)"
        )


def _backbone_factory(config: RecommenderConfig) -> tuple[Callable[[], ASTModel], ASTConfig]:
    """A function that returns a fresh AST encoder per fold (a pretrained one is loaded once),
    and the encoders' configuration."""
    try:
        if config.pretrained_models == "none":
            ast_config = ast_config_for(config.ast_size, config.max_audio_seconds)
            return (lambda: ASTModel(ast_config)), ast_config
        pretrained = load_ast_backbone(
            config.pretrained_models, config.ast_size, config.max_audio_seconds,
            config.ast_model_dir,
        )
    except PretrainedUnavailable:
        raise
    except ValueError as exc:
        raise RecommenderError(str(exc)) from exc
    return (lambda: copy.deepcopy(pretrained)), pretrained.config

