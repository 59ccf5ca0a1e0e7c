"""Recommender checkpoints: `.pth` files that load with torch.load(weights_only=True), holding a
state dict and typed metadata (`CheckpointMetadata`: the kind, classes, inputs, the kind's
model config, and how and on what the model was trained)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serec.fileio import atomic_path
from serec.recommender.errors import CheckpointError
from serec.recommender.fbank import FbankSpec
from serec.recommender.kinds import InputSpec, RecommenderModel, kind_class

# The fold number of a refit (--refit): trained on every labelled file, held out none; its
# checkpoints and reports name it "all". It is the model to deploy.
REFIT_FOLD = 0


def fold_name(fold: int) -> int | str:
    """A fold as file names and reports show it: its number, or "all" for the refit."""
    return "all" if fold == REFIT_FOLD else fold

CHECKPOINT_FORMAT = "serec-recommender/2"
# The first format: the same content, but with flat metadata (model_kind, ast_config, fbank,
# head_dropout, scaler_mean / scaler_scale beside the state dict). Still loaded.
FORMAT_V1 = "serec-recommender/1"
RETRAIN = "retrain it with model_recommender_w_scaler.py (same flags, a new --output_dir)"


@dataclass
class TrainingRecord:
    """How and on what a checkpoint was trained: what decides whether it can be reused."""

    stage: str
    fold: int
    gatekeeper_class: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    inner_val_files: list[str] = field(default_factory=list)
    n_train_files: int = 0
    folds_sha256: str = ""
    labels_sha256: str = ""
    best_epoch: int | None = None

    def same_training(self, other: TrainingRecord) -> bool:
        """True when both were trained the same way on the same data (outcomes may differ)."""
        outcome = {"n_train_files", "best_epoch"}
        return all(
            getattr(self, f.name) == getattr(other, f.name)
            for f in fields(self)
            if f.name not in outcome
        )


@dataclass
class CheckpointMetadata:
    """Everything a checkpoint says besides its weights."""

    kind: str
    class_names: list[str]
    feature_names: list[str]
    fbank: FbankSpec | None
    model_config: dict[str, Any]
    record: TrainingRecord

    @property
    def inputs(self) -> InputSpec:
        return InputSpec(self.fbank, tuple(self.feature_names))

    @property
    def stage(self) -> str:
        return self.record.stage

    @property
    def fold(self) -> int:
        return self.record.fold

    def plain(self) -> dict[str, Any]:
        """Only str/int/float/bool/None, lists, dicts and tensors: what weights_only loads."""
        values = asdict(self)
        values["fbank"] = None if self.fbank is None else self.fbank.as_dict()
        return _to_plain(values)

    @classmethod
    def from_plain(cls, values: Mapping[str, Any]) -> CheckpointMetadata:
        fbank = values.get("fbank")
        return cls(
            kind=str(values["kind"]),
            class_names=[str(c) for c in values["class_names"]],
            feature_names=[str(n) for n in values.get("feature_names") or []],
            fbank=None if fbank is None else FbankSpec(**fbank),
            model_config=dict(values.get("model_config") or {}),
            record=TrainingRecord(**values["record"]),
        )


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


def describe(model: RecommenderModel, record: TrainingRecord) -> CheckpointMetadata:
    """The metadata a checkpoint of `model` trained as `record` says (its model config included)."""
    model_config, _ = model.to_checkpoint()
    return CheckpointMetadata(
        kind=model.kind,
        class_names=list(model.classes),
        feature_names=list(model.inputs.feature_names),
        fbank=model.inputs.fbank,
        model_config=model_config,
        record=record,
    )


def save_checkpoint(
    path: str | os.PathLike[str], model: RecommenderModel, record: TrainingRecord
) -> CheckpointMetadata:
    """Write `{"format", "state_dict", "metadata"}` atomically; returns the metadata written."""
    model_config, state = model.to_checkpoint()
    metadata = describe(model, record)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "metadata": metadata.plain(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return metadata


def _upgrade_v1(metadata: Mapping[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Format 1's flat metadata as format 2's; its scaler moves into the state dict."""
    record_keys = {f.name for f in fields(TrainingRecord)}
    generic = {"model_kind", "class_names", "feature_names", "fbank", "scaler_mean",
               "scaler_scale", *record_keys}  # fmt: skip
    state["feature_mean"] = metadata["scaler_mean"]
    state["feature_scale"] = metadata["scaler_scale"]
    return {
        "kind": metadata["model_kind"],
        "class_names": metadata["class_names"],
        "feature_names": metadata.get("feature_names") or [],
        "fbank": metadata.get("fbank"),
        "model_config": {k: v for k, v in metadata.items() if k not in generic},
        "record": {k: metadata[k] for k in record_keys if k in metadata},
    }


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[CheckpointMetadata, dict[str, Any]]:
    """A checkpoint's metadata and state dict, without building its model; CheckpointError
    (saying how to fix it) for anything that is not a usable serec checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise CheckpointError(f"{path}: not a loadable checkpoint ({exc}); {RETRAIN}") from exc
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, FORMAT_V1):
        raise CheckpointError(
            f"{path}: not a serec recommender checkpoint (format {fmt!r}, expected "
            f"{CHECKPOINT_FORMAT!r}); {RETRAIN}"
        )
    try:
        state = dict(payload["state_dict"])
        values = payload["metadata"]
        if fmt == FORMAT_V1:
            values = _upgrade_v1(values, state)
        metadata = CheckpointMetadata.from_plain(values)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: incomplete or malformed metadata ({exc!r}); {RETRAIN}") from exc
    return metadata, state


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[RecommenderModel, CheckpointMetadata]:
    """Load a recommender checkpoint (weights_only) -> (model ready to predict, metadata)."""
    metadata, state = read_checkpoint(path)
    cls = kind_class(metadata.kind, checkpoint=str(path))
    try:
        model = cls.from_checkpoint(metadata.model_config, state, metadata.class_names,
                                    metadata.inputs)  # fmt: skip
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}; {RETRAIN}") from exc
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its weights cannot be loaded ({exc}); {RETRAIN}") from exc
    return model.to(device), metadata
