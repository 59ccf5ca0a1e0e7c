"""The recommender's classifiers (AST, hybrid AST + features, logistic regression), their
fbank inputs, and weights_only-loadable checkpoints with the feature scaler inside."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

from serec.audio import SAMPLE_RATE
from serec.fileio import atomic_path

AST_HUB_ID = "MIT/ast-finetuned-audioset-10-10-0.4593"
PRETRAINED_CHOICES = ("none", "ast_finetuned_audioset")
AST_SIZES = ("tiny", "small", "base")
CHECKPOINT_FORMAT = "serec-recommender/1"
MODEL_KINDS = ("ast", "logistic_regression")
HEAD_DROPOUT = 0.3

# AST's Kaldi-style fbank: 25 ms (400-sample) windows every 10 ms (160 samples), no centring.
FBANK_WINDOW = 400
FBANK_HOP = 160
# AudioSet log-mel statistics the pretrained AST was trained with (ASTFeatureExtractor's).
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974

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


class PretrainedUnavailable(RuntimeError):
    """The pretrained AST could not be loaded (offline, missing or broken local copy)."""


# ---------------------------------------------------------------------------------------
# Inputs: AST fbank


def frames_for_seconds(seconds: float) -> int:
    """AST input length (fbank frames of 10 ms) that covers `seconds` of audio."""
    if seconds <= FBANK_WINDOW / SAMPLE_RATE:
        raise ValueError(
            f"max audio seconds must exceed {FBANK_WINDOW / SAMPLE_RATE} s, got {seconds}"
        )
    return int(round(seconds * SAMPLE_RATE / FBANK_HOP))


@dataclass(frozen=True)
class FbankSpec:
    """How audio becomes an AST input: log-mel fbank, padded or cut to `max_length` frames."""

    num_mel_bins: int
    max_length: int
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD

    @classmethod
    def for_config(cls, config: ASTConfig) -> FbankSpec:
        return cls(num_mel_bins=config.num_mel_bins, max_length=config.max_length)

    @property
    def audio_seconds(self) -> float:
        """The audio span the `max_length` frames cover; later samples are never used."""
        return (FBANK_WINDOW + FBANK_HOP * (self.max_length - 1)) / SAMPLE_RATE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=8)
def _extractor(spec: FbankSpec) -> ASTFeatureExtractor:
    # Building one computes the mel filter bank; reuse it for every file.
    return ASTFeatureExtractor(
        sampling_rate=SAMPLE_RATE,
        num_mel_bins=spec.num_mel_bins,
        max_length=spec.max_length,
        mean=spec.mean,
        std=spec.std,
        do_normalize=True,
    )


def compute_fbank(audio: np.ndarray, spec: FbankSpec) -> np.ndarray:
    """Normalised log-mel fbank (max_length, num_mel_bins) float32 of 16 kHz mono audio.

    ASTFeatureExtractor's own computation (its numpy path when torchaudio is absent), so
    inputs match what a pretrained AST expects.
    """
    values = _extractor(spec)(
        np.asarray(audio, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="np"
    )["input_values"]
    return np.ascontiguousarray(values[0], dtype=np.float32)


# ---------------------------------------------------------------------------------------
# AST backbone


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
    seconds = FbankSpec.for_config(backbone.config).audio_seconds
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


# ---------------------------------------------------------------------------------------
# Classifiers


def hybrid_hidden_size(embedding_size: int, n_features: int) -> int:
    """Width of the head's hidden layer: a quarter of its input (768 + 9 -> 194)."""
    return (embedding_size + n_features) // 4


class _ScaledFeatures(nn.Module):
    """Holds a StandardScaler's mean and scale; not in the state dict (metadata carries them)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.n_features = n_features
        self.register_buffer("feature_mean", torch.zeros(n_features), persistent=False)
        self.register_buffer("feature_scale", torch.ones(n_features), persistent=False)

    def set_scaler(self, mean: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor) -> None:
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        scale_t = torch.as_tensor(np.asarray(scale, dtype=np.float32))
        if mean_t.shape != (self.n_features,) or scale_t.shape != (self.n_features,):
            raise ValueError(
                f"scaler shapes {tuple(mean_t.shape)}, {tuple(scale_t.shape)} do not match "
                f"{self.n_features} features"
            )
        self.feature_mean.copy_(mean_t)
        self.feature_scale.copy_(scale_t)

    def standardise(self, features: torch.Tensor | None) -> torch.Tensor:
        if features is None or features.shape[-1] != self.n_features:
            got = None if features is None else tuple(features.shape)
            raise ValueError(f"expected features of width {self.n_features}, got {got}")
        return (features - self.feature_mean) / self.feature_scale


class ASTRecommender(_ScaledFeatures):
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


class LogisticRecommender(_ScaledFeatures):
    """Multinomial logistic regression on standardised features (the tabular baseline).

    Fitted with scikit-learn, stored as a Linear layer so it saves and loads like the AST.
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__(n_features)
        self.linear = nn.Linear(n_features, n_classes)

    def forward(
        self, input_values: torch.Tensor | None = None, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.linear(self.standardise(features))


def fit_logistic_recommender(
    features: np.ndarray,
    targets: np.ndarray,
    n_classes: int,
    *,
    balanced: bool = False,
    seed: int = 0,
) -> LogisticRecommender:
    """Fit a StandardScaler and a logistic regression on these rows only.

    `balanced` weights classes inversely to their frequency (the tabular counterpart of
    the weighted sampler). Classes absent from `targets` get a constant -inf-like logit,
    so the output still has `n_classes` columns.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    present = np.unique(targets)
    model = LogisticRecommender(features.shape[1], n_classes)
    model.set_scaler(scaler.mean_, scaler.scale_)
    weight = torch.zeros(n_classes, features.shape[1])
    # Classes never seen in training can never be predicted.
    bias = torch.full((n_classes,), -1e4)
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
        model.linear.weight.copy_(weight)
        model.linear.bias.copy_(bias)
    return model


# ---------------------------------------------------------------------------------------
# Checkpoints and prediction


def _to_plain(value: Any) -> Any:
    # weights_only loading accepts only containers of str/int/float/bool/None and tensors.
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def checkpoint_metadata(model: nn.Module, **metadata: Any) -> dict[str, Any]:
    """Metadata that rebuilds `model`: kind, architecture, scaler; plus the caller's fields.

    Callers pass at least `class_names`, `stage`, `fold`, `feature_names` and `training`.
    """
    meta: dict[str, Any] = dict(metadata)
    if isinstance(model, ASTRecommender):
        meta["model_kind"] = "ast"
        meta["ast_config"] = plain_ast_config(model.backbone.config)
        meta["fbank"] = FbankSpec.for_config(model.backbone.config).as_dict()
        meta["head_dropout"] = float(model.head[3].p)
    elif isinstance(model, LogisticRecommender):
        meta["model_kind"] = "logistic_regression"
    else:
        raise TypeError(f"not a recommender model: {type(model).__name__}")
    meta["scaler_mean"] = model.feature_mean.detach().cpu().clone()
    meta["scaler_scale"] = model.feature_scale.detach().cpu().clone()
    n_features = len(meta.get("feature_names", []))
    if n_features != model.n_features:
        raise ValueError(f"{n_features} feature names for a model of {model.n_features} features")
    return _to_plain(meta)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, **metadata: Any) -> Path:
    """Write `{"format", "state_dict", "metadata"}` atomically; loadable with weights_only."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": checkpoint_metadata(model, **metadata),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def build_model(metadata: Mapping[str, Any]) -> nn.Module:
    """An untrained model with the architecture and scaler a checkpoint's metadata describes."""
    n_classes = len(metadata["class_names"])
    n_features = len(metadata.get("feature_names", []))
    kind = metadata.get("model_kind")
    if kind == "ast":
        backbone = ASTModel(ASTConfig(**metadata["ast_config"]))
        model: _ScaledFeatures = ASTRecommender(
            backbone, n_classes, n_features, float(metadata.get("head_dropout", HEAD_DROPOUT))
        )
    elif kind == "logistic_regression":
        model = LogisticRecommender(n_features, n_classes)
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    model.set_scaler(metadata["scaler_mean"], metadata["scaler_scale"])
    return model


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a recommender checkpoint (weights_only) -> (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise ValueError(f"{path}: not a loadable checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a serec recommender checkpoint ({CHECKPOINT_FORMAT})")
    metadata = payload["metadata"]
    model = build_model(metadata)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), metadata


def fbank_batch(audios: Sequence[np.ndarray], spec: FbankSpec) -> np.ndarray:
    """Fbank inputs (n, max_length, num_mel_bins) for a list of 16 kHz mono signals."""
    if not len(audios):
        return np.zeros((0, spec.max_length, spec.num_mel_bins), dtype=np.float32)
    return np.stack([compute_fbank(a, spec) for a in audios])


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    metadata: Mapping[str, Any],
    inputs: np.ndarray | Sequence[np.ndarray] | None = None,
    features: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Class probabilities (n, len(class_names)), columns in metadata["class_names"] order.

    `inputs` are fbank arrays (n, max_length, num_mel_bins) from `compute_fbank` with the
    checkpoint's FbankSpec, or a list of 16 kHz mono signals (converted here); ignored by
    the logistic model. `features` are raw (unscaled) vectors in metadata["feature_names"]
    order, needed when the model has features.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    n_features = len(metadata.get("feature_names", []))
    is_ast = metadata["model_kind"] == "ast"
    if is_ast:
        if inputs is None:
            raise ValueError("an AST recommender needs fbank inputs or audio")
        if not isinstance(inputs, np.ndarray) or inputs.ndim != 3:
            inputs = fbank_batch(list(inputs), FbankSpec(**metadata["fbank"]))
        n = len(inputs)
    else:
        n = 0 if features is None else len(features)
    if n_features and (features is None or len(features) != n):
        raise ValueError(
            f"this model needs {n_features} features ({metadata['feature_names']}) per file"
        )
    out = np.zeros((n, len(metadata["class_names"])), dtype=np.float32)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = torch.as_tensor(inputs[start:stop], device=device) if is_ast else None
        f = (
            torch.as_tensor(np.asarray(features[start:stop], dtype=np.float32), device=device)
            if n_features
            else None
        )
        out[start:stop] = torch.softmax(model(x, f), dim=1).cpu().numpy()
    return out
