"""The labelled files of a recommender run with their folds and model inputs: fbank inputs
cached on disk per file, and feature vectors from step 3's folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers
from tqdm import tqdm

from serec.audio import AudioError, load_audio
from serec.feature_files import feature_path, load_feature_matrix
from serec.fileio import atomic_path
from serec.recommender.config import RecommenderConfig
from serec.recommender.errors import RecommenderError
from serec.recommender.fbank import FbankSpec, compute_fbank
from serec.recommender.folds import (
    Folds,
    file_digest,
    labels_digest,
    read_labels,
    run_folds,
)
from serec.recommender.kinds import InputSpec, ModelInputs
from serec.recommender.stages import most_frequent_label
from serec.schema import FOLDS_CSV


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
    folds: Folds
    classes: list[str]
    gatekeeper_class: str
    folds_sha256: str
    labels_sha256: str
    skipped: dict[str, str] = field(default_factory=dict)
    fbank: dict[FbankSpec, np.ndarray] = field(default_factory=dict)
    features: np.ndarray | None = None
    feature_names: list[str] = field(default_factory=list)

    def inputs(self, spec: InputSpec, rows: np.ndarray) -> ModelInputs:
        """The inputs a model reading `spec` gets for `rows`."""
        fbank = None if spec.fbank is None else self.fbank[spec.fbank][rows]
        features = None
        if spec.feature_names:
            if self.features is None or list(spec.feature_names) != self.feature_names:
                raise RecommenderError(
                    f"the checkpoint uses features {list(spec.feature_names)}, but "
                    f"--cekl_features_base_dir gives {self.feature_names or 'none'}"
                )
            features = self.features[rows]
        return ModelInputs(fbank, features)


def prepare_experiment(
    cfg: RecommenderConfig,
    fbank_specs: Sequence[FbankSpec] = (),
    need_features: bool = False,
) -> ExperimentData:
    """Read labels, make or reuse folds, and load every input the run's models need."""
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    labels = read_labels(cfg.labels_csv)
    groups, folds = run_folds(cfg.output_dir, labels, cfg.metadata_csv, cfg.n_folds, cfg.seed)
    classes = sorted(labels.label.unique())
    gatekeeper_class = cfg.gatekeeper_class or most_frequent_label(labels.label)
    if gatekeeper_class not in classes:
        raise RecommenderError(
            f"--gatekeeper_class {gatekeeper_class!r} is not a label; labels are {classes}"
        )
    files = list(labels.file)
    skipped: dict[str, str] = {}
    fbank: dict[FbankSpec, np.ndarray] = {}
    for spec in dict.fromkeys(fbank_specs):
        if cfg.audio_dir is None:
            raise RecommenderError("models that read audio need --audio_dir (the noisy files)")
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
        folds=folds.subset(keep),
        classes=classes,
        gatekeeper_class=gatekeeper_class,
        folds_sha256=file_digest(cfg.output_dir / FOLDS_CSV),
        labels_sha256=labels_digest(labels),
        skipped=skipped,
        fbank={spec: values[keep] for spec, values in fbank.items()},
        features=None if features is None else features[keep],
        feature_names=feature_names,
    )
