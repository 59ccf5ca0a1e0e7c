"""Recommender training protocol: shared speaker-grouped folds, inner validation, cached
fbank inputs, scaler, training loop and per-fold gatekeeper / expert / single checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import transformers
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from torch import nn
from tqdm import tqdm
from transformers import ASTModel

from serec.audio import AudioError, load_audio
from serec.features import feature_path, load_feature_matrix
from serec.fileio import (
    UnsafeFileId,
    atomic_path,
    check_file_ids,
    write_csv_atomic,
    write_json_atomic,
)
from serec.mixing import DEFAULT_SPEAKER_REGEX
from serec.models import (
    ASTRecommender,
    FbankSpec,
    ast_config_for,
    checkpoint_metadata,
    compute_fbank,
    fit_logistic_recommender,
    load_ast_backbone,
    load_checkpoint,
    predict_proba,
    save_checkpoint,
)

STAGES = ("gatekeeper", "expert", "single")
FEATURE_TYPES = ("mel_spec", "cekl")
FOLDS_CSV = "folds.csv"
FOLDS_JSON = "folds.json"
SKIPPED_COLUMNS = ("file", "reason")
# The inner validation split is one of this many grouped, stratified parts of a fold's
# training part (about 20 %), fewer when the training part has fewer groups.
INNER_VAL_PARTS = 5
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_macro_f1", "val_accuracy", "seconds")

log = logging.getLogger(__name__)


class RecommenderError(ValueError):
    """A configuration or data problem the CLI reports as one line (what and how to fix)."""


@dataclass
class RecommenderConfig:
    """Everything one recommender run needs; field names are the CLI flag names."""

    labels_csv: Path
    output_dir: Path
    audio_dir: Path | None = None
    metadata_csv: Path | None = None
    cekl_features_base_dir: Path | None = None
    feature_type: str = "mel_spec"
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
    seed: int = 42
    device: str = "auto"
    gatekeeper_class: str | None = None
    gatekeeper_model_path: str = "gatekeeper_model_fold_{fold}_best.pth"
    expert_model_path: str = "expert_model_fold_{fold}_best_hybrid.pth"
    single_model_path: str = "single_model_fold_{fold}_best.pth"

    def __post_init__(self) -> None:
        self.labels_csv = Path(self.labels_csv)
        self.output_dir = Path(self.output_dir)
        if self.feature_type not in FEATURE_TYPES:
            raise RecommenderError(
                f"--feature_type {self.feature_type!r}: choose from {', '.join(FEATURE_TYPES)}"
            )
        if self.n_folds < 2:
            raise RecommenderError(f"--n_folds must be at least 2, got {self.n_folds}")
        if self.use_hybrid_features and self.feature_type != "mel_spec":
            raise RecommenderError("--use_hybrid_features applies to --feature_type mel_spec only")
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
    def needs_features(self) -> bool:
        return self.feature_type == "cekl" or self.use_hybrid_features

    def checkpoint_path(self, stage: str, fold: int) -> Path:
        """A stage's checkpoint for a fold; relative templates resolve inside output_dir."""
        template = getattr(self, f"{stage}_model_path")
        path = Path(template.format(fold=fold))
        return path if path.is_absolute() else self.output_dir / path

    def check_inputs(self) -> None:
        """Raise RecommenderError when a flag this run needs is missing."""
        if not self.labels_csv.is_file():
            raise RecommenderError(f"--labels_csv {self.labels_csv}: file not found")
        if self.feature_type == "mel_spec" and self.audio_dir is None:
            raise RecommenderError("--feature_type mel_spec needs --audio_dir (the noisy files)")
        if self.feature_type == "mel_spec" and not Path(self.audio_dir).is_dir():
            raise RecommenderError(f"--audio_dir {self.audio_dir}: not a directory")
        if self.needs_features and self.cekl_features_base_dir is None:
            raise RecommenderError(
                "--feature_type cekl and --use_hybrid_features need --cekl_features_base_dir "
                "(made by preprocess_features.py)"
            )

    def plain(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------
# Labels, groups, folds
#
# These fix the thesis' leaks (upstream.md section 1): folds are stratified by label and
# grouped by speaker, written once to folds.csv and reused by every stage; the best
# epoch, early stopping and the feature scaler use only the fold's training part.


def read_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """labels.csv -> DataFrame(file, label) in file order; RecommenderError if malformed."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={"file": str, "label": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RecommenderError(f"{path}: cannot read labels ({exc})") from exc
    missing = {"file", "label"} - set(table.columns)
    if missing:
        raise RecommenderError(f"{path}: no column(s) {sorted(missing)}; not a labels.csv")
    try:
        check_file_ids(table["file"], path)  # the ids are joined to --audio_dir and --output_dir
    except UnsafeFileId as exc:
        raise RecommenderError(str(exc)) from exc
    empty = table["label"].str.strip() == ""
    if empty.any():
        raise RecommenderError(
            f"{path}: {int(empty.sum())} rows without a label, e.g. {table.file[empty].iloc[0]}"
        )
    dupes = table["file"][table["file"].duplicated()]
    if len(dupes):
        raise RecommenderError(f"{path}: file listed twice: {dupes.iloc[0]}")
    if table["label"].nunique() < 2:
        raise RecommenderError(f"{path}: needs at least two different labels to learn from")
    return table[["file", "label"]].sort_values("file", kind="stable").reset_index(drop=True)


def file_groups(
    files: Sequence[str], metadata_csv: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, str]:
    """The fold group of each file and a description of how groups were found.

    With the mixing metadata.csv: its `speaker`, or `clean_source` where speaker is empty.
    Without it: the speaker field of corpus-style names (<dataset>_<speaker>_..., the
    mixing default); a file whose name does not match is its own group (so such files
    are not kept speaker-disjoint: pass --metadata_csv for that).
    """
    if metadata_csv is not None:
        path = Path(metadata_csv)
        try:
            meta = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise RecommenderError(f"{path}: cannot read metadata ({exc})") from exc
        if "file" not in meta.columns or not {"speaker", "clean_source"} & set(meta.columns):
            raise RecommenderError(f"{path}: needs columns file and speaker or clean_source")
        try:
            check_file_ids(meta["file"], path)
        except UnsafeFileId as exc:
            raise RecommenderError(str(exc)) from exc
        speaker = meta["speaker"] if "speaker" in meta.columns else pd.Series("", index=meta.index)
        source = meta["clean_source"] if "clean_source" in meta.columns else speaker
        group = speaker.where(speaker.str.strip() != "", "clean:" + source)
        lookup = dict(zip(meta["file"], group, strict=True))
        missing = [f for f in files if f not in lookup]
        if missing:
            raise RecommenderError(
                f"{path}: {len(missing)} labelled files are not in the metadata, e.g. {missing[0]}"
            )
        return np.array([lookup[f] for f in files], dtype=object), f"speaker from {path.name}"
    pattern = re.compile(DEFAULT_SPEAKER_REGEX)
    groups = []
    unmatched = 0
    for f in files:
        match = pattern.search(Path(f).name)
        if match:
            groups.append(match.group(1))
        else:
            groups.append("file:" + f)
            unmatched += 1
    how = "speaker field of the file name"
    if unmatched:
        log.warning(
            "%d of %d file names have no speaker field; each is its own fold group",
            unmatched,
            len(files),
        )
        how += f" ({unmatched} files without one are grouped alone)"
    return np.array(groups, dtype=object), how


def make_folds(labels: Sequence[str], groups: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold number (1..n_folds) per file: stratified by label, no group on two folds."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise RecommenderError(
            f"only {n_groups} speaker groups for {n_folds} folds; lower --n_folds"
        )
    folds = np.zeros(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for number, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups), 1):
        folds[test] = number
    return folds


def labels_digest(labels: pd.DataFrame) -> str:
    """A hash of the (file, label) pairs: folds are only valid for the labels they came from."""
    text = "\n".join(f"{f}\t{lab}" for f, lab in zip(labels.file, labels.label, strict=True))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_or_make_folds(
    output_dir: Path,
    labels: pd.DataFrame,
    groups: np.ndarray,
    group_by: str,
    n_folds: int,
    seed: int,
) -> np.ndarray:
    """The run's fold assignment, aligned with `labels` rows.

    Made once and written to OUTPUT_DIR/folds.csv (file, fold) with folds.json (how it was
    made); later stages reuse it. An existing folds.csv made from other labels, fold
    count, seed or grouping is an error rather than silently replaced, because the
    checkpoints beside it were trained on it.
    """
    csv_path, json_path = output_dir / FOLDS_CSV, output_dir / FOLDS_JSON
    recipe = {
        "n_folds": n_folds,
        "seed": seed,
        "group_by": group_by,
        "labels_sha256": labels_digest(labels),
        "n_files": len(labels),
    }
    if csv_path.exists():
        fix = f"use another --output_dir, or delete {csv_path} and the checkpoints trained on it"
        saved = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
        changed = [
            f"{k}: {saved[k]!r} there, {recipe[k]!r} now"
            for k in recipe
            if k in saved and saved[k] != recipe[k]
        ]
        table = pd.read_csv(csv_path, dtype={"file": str})
        if set(table.file) != set(labels.file):
            changed.insert(0, "its files differ from the labels file's")
        elif sorted(table.fold.unique()) != list(range(1, n_folds + 1)):
            changed.insert(0, f"its folds are {sorted(table.fold.unique())}")
        if changed:
            raise RecommenderError(
                f"{csv_path} was made for other data ({'; '.join(changed)}): {fix}"
            )
        return table.set_index("file").loc[labels.file, "fold"].to_numpy(dtype=np.int64)
    folds = make_folds(labels.label.to_numpy(), groups, n_folds, seed)
    write_csv_atomic(
        csv_path,
        ("file", "fold"),
        ({"file": f, "fold": int(k)} for f, k in zip(labels.file, folds, strict=True)),
    )
    write_json_atomic(json_path, recipe)
    return folds


def inner_validation_mask(
    labels: np.ndarray, groups: np.ndarray, train_part: np.ndarray, seed: int
) -> np.ndarray:
    """Files of a fold's training part held back for best-epoch choice and early stopping.

    One part of a grouped, stratified split of the training part, so it shares no speaker
    with the files trained on, and never includes the reported (held-out) fold.
    """
    idx = np.flatnonzero(train_part)
    n_groups = len(set(groups[idx]))
    if n_groups < 2:
        raise RecommenderError(
            "a fold's training part has fewer than two speaker groups; no inner validation "
            "split is possible (more speakers or fewer folds)"
        )
    splitter = StratifiedGroupKFold(
        n_splits=min(INNER_VAL_PARTS, n_groups), shuffle=True, random_state=seed
    )
    with warnings.catch_warnings():
        # Rare classes in small training parts: the split is still grouped, just less even.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, val = next(splitter.split(idx, labels[idx], groups[idx]))
    mask = np.zeros(len(labels), dtype=bool)
    mask[idx[val]] = True
    return mask


def default_gatekeeper_class(labels: Sequence[str]) -> str:
    """The most frequent label (ties: alphabetically first), the thesis' dominant model."""
    counts = pd.Series(list(labels)).value_counts()
    top = counts[counts == counts.max()].index
    return str(sorted(top)[0])


@dataclass(frozen=True)
class StageTask:
    """Which files a stage learns from and which class each is."""

    stage: str
    class_names: list[str]
    gatekeeper_class: str

    def targets(self, labels: Sequence[str]) -> np.ndarray:
        """Class index per file; -1 for files this stage does not use (expert: gatekeeper's)."""
        labels = np.asarray(labels)
        if self.stage == "gatekeeper":
            return np.where(labels == self.gatekeeper_class, 0, 1).astype(np.int64)
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.array([index.get(lab, -1) for lab in labels], dtype=np.int64)


def gatekeeper_rest_name(gatekeeper_class: str) -> str:
    return f"not_{gatekeeper_class}"


def stage_task(stage: str, all_classes: Sequence[str], gatekeeper_class: str) -> StageTask:
    """gatekeeper: [gk, not_gk]; expert: the other classes; single: all classes."""
    classes = sorted(all_classes)
    if gatekeeper_class not in classes:
        raise RecommenderError(
            f"--gatekeeper_class {gatekeeper_class!r} is not a label; labels are {classes}"
        )
    if stage == "gatekeeper":
        names = [gatekeeper_class, gatekeeper_rest_name(gatekeeper_class)]
    elif stage == "expert":
        names = [c for c in classes if c != gatekeeper_class]
        if len(names) < 2:
            raise RecommenderError(
                f"the expert needs at least two labels besides {gatekeeper_class!r}; "
                f"labels are {classes} (train a single model instead)"
            )
    elif stage == "single":
        names = classes
    else:
        raise RecommenderError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    return StageTask(stage, names, gatekeeper_class)


# ---------------------------------------------------------------------------------------
# Inputs: cached fbank and feature vectors


class FbankCache:
    """Fbank inputs computed once per file and kept on disk.

    OUTPUT_DIR/cache/fbank_<key>/<file id>.npy, where the key hashes the FbankSpec, the
    audio folder and the transformers version; a file is recomputed when its audio is
    newer than its cached input.
    """

    def __init__(self, cache_root: Path, spec: FbankSpec, audio_dir: Path) -> None:
        self.spec = spec
        self.audio_dir = Path(audio_dir)
        recipe = {
            **spec.as_dict(),
            "audio_dir": str(self.audio_dir.resolve()),
            "transformers": transformers.__version__,
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(cache_root) / f"fbank_{key}"

    def _cached(self, fid: str, audio_path: Path) -> np.ndarray | None:
        path = self.folder / f"{fid}.npy"
        try:
            if path.stat().st_mtime_ns < audio_path.stat().st_mtime_ns:
                return None
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return values if values.shape == (self.spec.max_length, self.spec.num_mel_bins) else None

    def get(self, fid: str) -> np.ndarray:
        """One file's input; AudioError (file + reason) when its audio is unusable."""
        audio_path = self.audio_dir / fid
        values = self._cached(fid, audio_path)
        if values is None:
            audio = load_audio(audio_path, crop_seconds=self.spec.audio_seconds)
            values = compute_fbank(audio, self.spec)
            with atomic_path(self.folder / f"{fid}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, values, allow_pickle=False)
        return values

    def load(self, files: Sequence[str]) -> tuple[np.ndarray, dict[str, str]]:
        """Inputs (n, max_length, mel) for `files` and {file: reason} for unusable ones
        (their rows are zeros)."""
        out = np.zeros((len(files), self.spec.max_length, self.spec.num_mel_bins), np.float32)
        errors: dict[str, str] = {}
        for row, fid in enumerate(tqdm(files, desc="fbank inputs", unit="file", leave=False)):
            try:
                out[row] = self.get(fid)
            except AudioError as exc:
                errors[fid] = exc.reason
        return out, errors


def load_features(
    feat_dir: Path, files: Sequence[str]
) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Feature matrix (rows in `files` order, zeros where missing), names, {file: reason}."""
    present = [f for f in files if feature_path(feat_dir, f).is_file()]
    errors = {
        f: f"no feature vector in {feat_dir} (see its errors.csv)"
        for f in files
        if f not in set(present)
    }
    try:
        matrix, names = load_feature_matrix(feat_dir, present)
    except (FileNotFoundError, ValueError) as exc:
        raise RecommenderError(str(exc)) from exc
    rows = {f: i for i, f in enumerate(present)}
    full = np.zeros((len(files), len(names)), dtype=np.float32)
    for i, f in enumerate(files):
        if f in rows:
            full[i] = matrix[rows[f]]
    return full, names, errors


@dataclass
class ExperimentData:
    """The labelled files of a run with their folds, groups and model inputs.

    Files whose audio or feature vector is unusable are dropped (listed in `skipped`);
    folds are assigned on the whole labels file first, so they do not depend on that.
    """

    files: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    folds: np.ndarray
    classes: list[str]
    gatekeeper_class: str
    folds_sha256: str
    labels_sha256: str
    skipped: dict[str, str] = field(default_factory=dict)
    fbank: dict[FbankSpec, np.ndarray] = field(default_factory=dict)
    features: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)

    def inputs_for(self, metadata: dict[str, Any], rows: np.ndarray) -> tuple[Any, Any]:
        """(fbank inputs, raw features) of `rows` for a checkpoint with this metadata."""
        inputs = None
        if metadata["model_kind"] == "ast":
            inputs = self.fbank[FbankSpec(**metadata["fbank"])][rows]
        features = None
        if metadata.get("feature_names"):
            if self.features is None or list(metadata["feature_names"]) != self.feature_names:
                raise RecommenderError(
                    f"the checkpoint uses features {metadata['feature_names']}, but "
                    f"--cekl_features_base_dir gives {self.feature_names or 'none'}"
                )
            features = self.features[rows]
        return inputs, features


def prepare_experiment(
    cfg: RecommenderConfig,
    fbank_specs: Sequence[FbankSpec] = (),
    need_features: bool = False,
) -> ExperimentData:
    """Read labels, make or reuse folds, and load every input the run's models need."""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    labels = read_labels(cfg.labels_csv)
    groups, group_by = file_groups(list(labels.file), cfg.metadata_csv)
    folds = load_or_make_folds(cfg.output_dir, labels, groups, group_by, cfg.n_folds, cfg.seed)
    classes = sorted(labels.label.unique())
    gatekeeper_class = cfg.gatekeeper_class or default_gatekeeper_class(labels.label)
    if gatekeeper_class not in classes:
        raise RecommenderError(
            f"--gatekeeper_class {gatekeeper_class!r} is not a label; labels are {classes}"
        )
    files = list(labels.file)
    skipped: dict[str, str] = {}
    fbank: dict[FbankSpec, np.ndarray] = {}
    for spec in dict.fromkeys(fbank_specs):
        if cfg.audio_dir is None:
            raise RecommenderError("AST models need --audio_dir (the noisy files)")
        fbank[spec], errors = FbankCache(cfg.output_dir / "cache", spec, cfg.audio_dir).load(files)
        skipped.update(errors)
    features, feature_names = None, []
    if need_features:
        if cfg.cekl_features_base_dir is None:
            raise RecommenderError("these models need --cekl_features_base_dir")
        features, feature_names, errors = load_features(cfg.cekl_features_base_dir, files)
        skipped.update(errors)
    keep = np.array([f not in skipped for f in files], dtype=bool)
    if not keep.any():
        raise RecommenderError(f"no usable files: e.g. {next(iter(skipped.items()))}")
    return ExperimentData(
        files=np.asarray(files, dtype=object)[keep],
        labels=labels.label.to_numpy(dtype=object)[keep],
        groups=groups[keep],
        folds=folds[keep],
        classes=classes,
        gatekeeper_class=gatekeeper_class,
        folds_sha256=file_digest(cfg.output_dir / FOLDS_CSV),
        labels_sha256=labels_digest(labels),
        skipped=skipped,
        fbank={spec: values[keep] for spec, values in fbank.items()},
        features=None if features is None else features[keep],
        feature_names=feature_names,
    )


def fit_scaler(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler mean and scale of these rows (constant features get scale 1)."""
    scaler = StandardScaler().fit(features)
    return scaler.mean_.astype(np.float32), scaler.scale_.astype(np.float32)


# ---------------------------------------------------------------------------------------
# Training loop


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda -> torch.device (auto: cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecommenderError("--device cuda, but torch sees no CUDA device (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise RecommenderError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 2.5e-5
    weight_decay: float = 1e-4
    batch_size: int = 32
    num_epochs: int = 50
    patience: int = 10
    use_weighted_sampler: bool = False
    label_smoothing: float = 0.1
    seed: int = 42

    @classmethod
    def from_config(cls, cfg: RecommenderConfig) -> TrainSettings:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


@dataclass
class TrainResult:
    best_epoch: int
    best_val_macro_f1: float
    history: list[dict[str, float]]


def _batch_order(targets: np.ndarray, weighted: bool, generator: torch.Generator) -> torch.Tensor:
    n = len(targets)
    if not weighted:
        return torch.randperm(n, generator=generator)
    # Each class is drawn equally often on average: weight 1 / class count, with replacement.
    counts = np.bincount(targets)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def _evaluate(
    model: nn.Module,
    inputs: torch.Tensor | None,
    features: torch.Tensor | None,
    targets: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float, float]:
    """(loss, macro F1, accuracy) without label smoothing."""
    model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(targets), batch_size):
            x = None if inputs is None else inputs[start : start + batch_size].to(device)
            f = None if features is None else features[start : start + batch_size].to(device)
            logits.append(model(x, f).cpu())
    all_logits = torch.cat(logits)
    y = torch.as_tensor(targets)
    loss = float(nn.functional.cross_entropy(all_logits, y))
    pred = all_logits.argmax(dim=1).numpy()
    return loss, float(f1_score(targets, pred, average="macro")), float(np.mean(pred == targets))


def train_classifier(
    model: ASTRecommender,
    inputs: np.ndarray,
    features: np.ndarray | None,
    targets: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    settings: TrainSettings,
    device: torch.device,
    desc: str = "train",
) -> TrainResult:
    """AdamW training; keeps the weights of the epoch with the best inner-validation macro
    F1 (ties: lower loss) and stops after `patience` epochs without improvement."""
    if len(val_rows) == 0:
        raise RecommenderError(f"{desc}: the inner validation split holds no files of this stage")
    model.to(device)
    x_all = torch.from_numpy(inputs)
    f_all = None if features is None else torch.from_numpy(np.asarray(features, np.float32))
    x_val = x_all[torch.as_tensor(val_rows)]
    f_val = None if f_all is None else f_all[torch.as_tensor(val_rows)]
    y_train = targets[train_rows]
    y_val = targets[val_rows]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    generator = torch.Generator().manual_seed(settings.seed)
    best_state = copy.deepcopy(model.state_dict())
    best = (-1.0, float("inf"))
    best_epoch = 0
    history: list[dict[str, float]] = []
    epochs = tqdm(range(1, settings.num_epochs + 1), desc=desc, unit="epoch")
    for epoch in epochs:
        started = time.perf_counter()
        model.train()
        order = _batch_order(y_train, settings.use_weighted_sampler, generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            rows = torch.as_tensor(train_rows)[batch]
            x = x_all[rows].to(device)
            f = None if f_all is None else f_all[rows].to(device)
            y = torch.as_tensor(y_train)[batch].to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x, f), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        val_loss, val_f1, val_acc = _evaluate(
            model, x_val, f_val, y_val, settings.batch_size, device
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / seen,
                "val_loss": val_loss,
                "val_macro_f1": val_f1,
                "val_accuracy": val_acc,
                "seconds": time.perf_counter() - started,
            }
        )
        epochs.set_postfix(loss=f"{total / seen:.3f}", val_f1=f"{val_f1:.3f}")
        if (val_f1, -val_loss) > (best[0], -best[1]):
            best, best_epoch = (val_f1, val_loss), epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    epochs.close()
    model.load_state_dict(best_state)
    return TrainResult(best_epoch=best_epoch, best_val_macro_f1=best[0], history=history)


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


# ---------------------------------------------------------------------------------------
# One stage over the folds


@dataclass
class FoldPredictions:
    """A stage model's output on its held-out fold."""

    fold: int
    files: list[str]
    targets: np.ndarray
    proba: np.ndarray
    checkpoint: Path
    best_epoch: int | None


@dataclass
class StageResult:
    stage: str
    class_names: list[str]
    gatekeeper_class: str
    folds: list[FoldPredictions]
    skipped: dict[str, str]
    stage_dir: Path


def _training_record(cfg: RecommenderConfig, settings: TrainSettings) -> dict[str, Any]:
    keys = (
        "feature_type",
        "pretrained_models",
        "ast_size",
        "ast_model_dir",
        "max_audio_seconds",
        "use_hybrid_features",
        "labels_csv",
        "audio_dir",
        "metadata_csv",
        "cekl_features_base_dir",
        "n_folds",
    )
    plain = cfg.plain()
    return {**asdict(settings), **{k: plain[k] for k in keys}}


def _backbone_factory(cfg: RecommenderConfig) -> tuple[Callable[[], ASTModel], FbankSpec]:
    """A function that returns a fresh AST encoder per fold, and that encoder's FbankSpec."""
    if cfg.pretrained_models == "none":
        config = ast_config_for(cfg.ast_size, cfg.max_audio_seconds)
        return (lambda: load_ast_backbone("none", cfg.ast_size, cfg.max_audio_seconds)), (
            FbankSpec.for_config(config)
        )
    pretrained = load_ast_backbone(
        cfg.pretrained_models, cfg.ast_size, cfg.max_audio_seconds, cfg.ast_model_dir
    )
    return (lambda: copy.deepcopy(pretrained)), FbankSpec.for_config(pretrained.config)


def write_skipped(stage_dir: Path, skipped: dict[str, str]) -> Path:
    return write_csv_atomic(
        stage_dir / "skipped_files.csv",
        SKIPPED_COLUMNS,
        ({"file": f, "reason": r} for f, r in sorted(skipped.items())),
    )


# Metadata fields that must match for an existing checkpoint to stand for this run's fold.
REUSE_KEYS = (
    "stage",
    "fold",
    "class_names",
    "gatekeeper_class",
    "feature_names",
    "training",
    "inner_val_files",
    "folds_sha256",
    "labels_sha256",
)


def _reusable_checkpoint(
    path: Path, wanted: dict[str, Any], device: torch.device
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The checkpoint at `path` when it was trained with exactly these settings, else None."""
    if not path.is_file():
        return None
    try:
        model, meta = load_checkpoint(path, device)
    except (ValueError, KeyError, RuntimeError) as exc:
        log.warning("%s: unreadable (%s); training this fold again", path, exc)
        return None
    plain = checkpoint_metadata(model, **{k: wanted[k] for k in REUSE_KEYS})
    if any(meta.get(k) != plain[k] for k in REUSE_KEYS):
        log.warning("%s: trained with other settings; training this fold again", path)
        return None
    return model, meta


def _fit_fold(
    cfg: RecommenderConfig,
    data: ExperimentData,
    targets: np.ndarray,
    n_classes: int,
    rows: tuple[np.ndarray, np.ndarray],
    make_backbone: Callable[[], ASTModel] | None,
    spec: FbankSpec | None,
    device: torch.device,
    seed: int,
    desc: str,
) -> tuple[nn.Module, int | None, list[dict[str, float]]]:
    """Train one fold's model -> (model, best epoch, curve); logistic models have no epochs."""
    fit_rows, val_rows = rows
    if cfg.feature_type == "cekl":
        model = fit_logistic_recommender(
            data.features[fit_rows],
            targets[fit_rows],
            n_classes,
            balanced=cfg.use_weighted_sampler,
            seed=seed,
        )
        return model, None, []
    n_features = len(data.feature_names) if cfg.use_hybrid_features else 0
    ast = ASTRecommender(make_backbone(), n_classes, n_features)
    if n_features:
        ast.set_scaler(*fit_scaler(data.features[fit_rows]))
    result = train_classifier(
        ast,
        data.fbank[spec],
        data.features if n_features else None,
        targets,
        fit_rows,
        val_rows,
        replace(TrainSettings.from_config(cfg), seed=seed),
        device,
        desc,
    )
    return ast, result.best_epoch, result.history


def train_stage(cfg: RecommenderConfig, stage: str) -> StageResult:
    """Train one stage's model on every requested fold; save a checkpoint per fold.

    Per fold k: the training part is every other fold; its inner validation split picks
    the best epoch (AST) and is recorded in the checkpoint for the gatekeeper threshold
    sweep; the scaler is fitted on the rest of the training part; the held-out fold k
    is only predicted, and those predictions are returned for the stage report. A fold
    whose checkpoint already exists with the same settings, folds and labels is reused,
    so an interrupted run resumes (delete a checkpoint to train its fold again).
    """
    cfg.check_inputs()
    device = resolve_device(cfg.device)
    make_backbone, spec = (None, None)
    if cfg.feature_type == "mel_spec":
        make_backbone, spec = _backbone_factory(cfg)
    data = prepare_experiment(cfg, [spec] if spec else [], cfg.needs_features)
    task = stage_task(stage, data.classes, data.gatekeeper_class)
    stage_dir = cfg.output_dir / stage
    write_skipped(stage_dir, data.skipped)
    targets = task.targets(data.labels)
    record = _training_record(cfg, TrainSettings.from_config(cfg))
    results: list[FoldPredictions] = []
    for fold in cfg.fold_numbers:
        seed_everything(cfg.seed + fold)
        held_out = data.folds == fold
        inner_val = inner_validation_mask(data.labels, data.groups, ~held_out, cfg.seed + fold)
        used = targets >= 0
        fit_rows = np.flatnonzero(~held_out & ~inner_val & used)
        val_rows = np.flatnonzero(inner_val & used)
        test_rows = np.flatnonzero(held_out & used)
        if len(set(targets[fit_rows])) < 2:
            raise RecommenderError(
                f"{stage} fold {fold}: its training part has only one class; fewer folds?"
            )
        metadata: dict[str, Any] = {
            "stage": stage,
            "fold": fold,
            "class_names": task.class_names,
            "gatekeeper_class": task.gatekeeper_class,
            "feature_names": data.feature_names if cfg.needs_features else [],
            "training": record,
            "inner_val_files": list(data.files[inner_val]),
            "n_train_files": len(fit_rows),
            "folds_sha256": data.folds_sha256,
            "labels_sha256": data.labels_sha256,
        }
        path = cfg.checkpoint_path(stage, fold)
        reused = _reusable_checkpoint(path, metadata, device)
        if reused is not None:
            model, saved = reused
            log.info("%s fold %d: reusing %s (same settings)", stage, fold, path)
        else:
            desc = f"{stage} fold {fold}"
            model, best_epoch, history = _fit_fold(
                cfg, data, targets, len(task.class_names), (fit_rows, val_rows),
                make_backbone, spec, device, cfg.seed + fold, desc,
            )  # fmt: skip
            if history:
                write_training_curves(
                    history,
                    stage_dir / "curves" / f"fold{fold}.csv",
                    f"{desc} (best epoch {best_epoch})",
                )
            metadata["best_epoch"] = best_epoch
            save_checkpoint(path, model, **metadata)
            saved = checkpoint_metadata(model, **metadata)
        test_inputs, test_features = data.inputs_for(saved, test_rows)
        proba = predict_proba(
            model, saved, test_inputs, test_features, batch_size=cfg.batch_size, device=device
        )
        results.append(
            FoldPredictions(
                fold,
                list(data.files[test_rows]),
                targets[test_rows],
                proba,
                path,
                saved.get("best_epoch"),
            )
        )
    return StageResult(
        stage, task.class_names, task.gatekeeper_class, results, data.skipped, stage_dir
    )
