"""Torch parts shared by the neural kinds: the feature scaler inside the network, one training
loop with inner-validation model selection for any `Objective` (classification: cross-entropy
and macro F1; regression: masked Huber and MAE), batched prediction and training curves."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm

from serec.fileio import atomic_path, write_csv_atomic
from serec.recommender.errors import RecommenderError
from serec.recommender.kinds import FitReport, FitSettings, ModelInputs

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_accuracy", "seconds")


def fit_scaler(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler mean and scale of these rows (constant features get scale 1)."""
    scaler = StandardScaler().fit(features)
    return scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ScaledFeatures(nn.Module):
    """Holds a StandardScaler's mean and scale as buffers, so a checkpoint carries them."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.n_features = n_features
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))

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


def _tensors(
    x: ModelInputs, rows: slice | torch.Tensor, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    part = x.take(rows.numpy() if isinstance(rows, torch.Tensor) else rows)
    fbank = None if part.fbank is None else torch.as_tensor(part.fbank).to(device)
    features = None
    if part.features is not None:
        features = torch.as_tensor(np.asarray(part.features, dtype=np.float32)).to(device)
    return fbank, features


@torch.no_grad()
def predict_logits(
    network: nn.Module, x: ModelInputs, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The network's logits for every file of `x`, in batches, on the CPU."""
    network.eval()
    logits = [
        network(*_tensors(x, slice(start, start + batch_size), device)).cpu()
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(logits) if logits else torch.zeros(0, 0)


@dataclass(frozen=True)
class Objective:
    """What a network is trained for: its training loss, its inner-validation metrics, which of
    them picks the epoch, and whether batches may be class-balanced (classification only)."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Callable[[torch.Tensor, np.ndarray], dict[str, float]]
    rank: Callable[[dict[str, float]], tuple[float, ...]]  # higher is better
    shown: str  # the metric in the progress bar
    class_balanced: bool = False
    target_dtype: torch.dtype = torch.long


def classification(settings: FitSettings) -> Objective:
    """Cross-entropy (label-smoothed in training); the epoch with the best inner-validation
    macro F1 is kept (ties: lower loss)."""

    def validate(logits: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        pred = logits.argmax(dim=1).numpy()
        return {"val_loss": float(nn.functional.cross_entropy(logits, torch.as_tensor(y))),
                "val_macro_f1": float(f1_score(y, pred, average="macro")),
                "val_accuracy": float(np.mean(pred == y))}  # fmt: skip

    return Objective(
        loss=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
        validate=validate,
        rank=lambda m: (m["val_macro_f1"], -m["val_loss"]),
        shown="val_macro_f1",
        class_balanced=settings.use_weighted_sampler,
    )


def masked_huber(predicted: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber loss over the finite targets only (NaN: that enhancer failed on that file)."""
    finite = torch.isfinite(target)
    if not bool(finite.any()):
        return predicted.sum() * 0.0  # no score in this batch: no gradient, but a graph
    return nn.functional.huber_loss(predicted[finite], target[finite], delta=delta)


def regression(delta: float) -> Objective:
    """Masked Huber loss on a (files, outputs) score matrix; the epoch with the lowest
    inner-validation mean absolute error (over finite targets) is kept."""

    def validate(predicted: torch.Tensor, y: np.ndarray) -> dict[str, float]:
        target = torch.as_tensor(np.asarray(y, dtype=np.float32))
        finite = torch.isfinite(target)
        error = (predicted[finite] - target[finite]).abs()
        return {"val_loss": float(masked_huber(predicted, target, delta)),
                "val_mae": float(error.mean()) if len(error) else math.inf}  # fmt: skip

    return Objective(
        loss=lambda predicted, target: masked_huber(predicted, target, delta),
        validate=validate,
        rank=lambda m: (-m["val_mae"],),
        shown="val_mae",
        target_dtype=torch.float32,
    )


def _batch_order(targets: np.ndarray, weighted: bool, generator: torch.Generator) -> torch.Tensor:
    n = len(targets)
    if not weighted:
        return torch.randperm(n, generator=generator)
    # Each class is drawn equally often on average: weight 1 / class count, with replacement.
    counts = np.bincount(targets)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _train_epoch(
    network: nn.Module,
    train: ModelInputs,
    y_train: np.ndarray,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    settings: FitSettings,
    generator: torch.Generator,
) -> float:
    """One pass over the training files; returns the mean training loss."""
    device = torch.device(settings.device)
    network.train()
    order = _batch_order(y_train, objective.class_balanced, generator)
    targets = torch.as_tensor(np.asarray(y_train)).to(objective.target_dtype)
    total = 0.0
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        optimizer.zero_grad()
        loss = objective.loss(network(*_tensors(train, batch, device)), targets[batch].to(device))
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / len(order)


def train_network(
    network: nn.Module,
    train: ModelInputs,
    y_train: np.ndarray,
    val: ModelInputs,
    y_val: np.ndarray,
    settings: FitSettings,
    objective: Objective,
) -> FitReport:
    """AdamW training of `network(fbank, features) -> outputs` for `objective`; keeps the
    weights of the epoch the objective ranks best on the inner validation files and stops
    after `patience` epochs without improvement."""
    if len(y_val) == 0:
        raise RecommenderError(
            f"{settings.desc}: the inner validation split holds no files of this stage"
        )
    device = torch.device(settings.device)
    network.to(device)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    best_state = copy.deepcopy(network.state_dict())
    best, best_epoch = (-math.inf,), 0
    history: list[dict[str, float]] = []
    epochs = tqdm(range(1, settings.num_epochs + 1), desc=settings.desc, unit="epoch")
    for epoch in epochs:
        started = time.perf_counter()
        train_loss = _train_epoch(network, train, y_train, optimizer, objective, settings, generator)
        metrics = objective.validate(predict_logits(network, val, settings.batch_size, device), y_val)
        history.append({"epoch": epoch, "train_loss": train_loss, **metrics,
                        "seconds": time.perf_counter() - started})  # fmt: skip
        epochs.set_postfix(loss=f"{train_loss:.3f}", **{objective.shown: f"{metrics[objective.shown]:.3f}"})
        if objective.rank(metrics) > best:
            best, best_epoch = objective.rank(metrics), epoch
            best_state = copy.deepcopy(network.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    epochs.close()
    network.load_state_dict(best_state)
    return FitReport(best_epoch=best_epoch, history=history)


def write_training_curves(history: list[dict[str, float]], csv_path: Path, title: str) -> Path:
    """Curves as CSV and a PNG beside it (loss and inner-validation macro F1 per epoch)."""
    from matplotlib.figure import Figure

    write_csv_atomic(csv_path, CURVE_COLUMNS, history)
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(8, 3.2))
    loss_ax, f1_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train (smoothed labels)")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="inner validation")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    f1_ax.plot(epochs, [h["val_macro_f1"] for h in history], color="C2")
    f1_ax.set_xlabel("epoch")
    f1_ax.set_ylabel("inner-validation macro F1")
    fig.suptitle(title)
    fig.tight_layout()
    png_path = csv_path.with_suffix(".png")
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return png_path
