"""The recommender at inference: class probabilities, recommendation and routed model per new file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from serec.audio import AudioError, file_id, list_audio_files, load_audio
from serec.feature_files import FEATURES_JSON, feature_path, read_features_meta
from serec.features import DEFAULT_MAX_SECONDS, FEATURE_SETS, file_features
from serec.fileio import RowLog, csv_text, write_csv_atomic, write_json_atomic, write_text_atomic
from serec.labels import ALL_FAILED
from serec.recommender.checkpoint import CheckpointMetadata, fold_name, load_checkpoint
from serec.recommender.errors import CheckpointError
from serec.recommender.fbank import FbankSpec, fbank_batch
from serec.recommender.kinds import ModelInputs, RecommenderModel
from serec.recommender.stages import (
    DEFAULT_THRESHOLD,
    pair_problems,
    route_two_stage,
    two_stage_proba,
)
from serec.routing import KEEP_NOISY, routed_model_for
from serec.schema import (
    ERROR_COLUMNS,
    ERRORS_CSV,
    RECOMMENDATIONS_CSV,
    RECOMMENDER_JSON,
    SINGLE_COLUMN,
    recommendation_columns,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageModel:
    """One loaded checkpoint: the model ready to predict and its metadata."""

    path: Path
    model: RecommenderModel
    metadata: CheckpointMetadata

    @property
    def stage(self) -> str:
        return self.metadata.stage

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata.class_names)

    @property
    def feature_names(self) -> list[str]:
        return list(self.metadata.feature_names)

    @property
    def fbank_spec(self) -> FbankSpec | None:
        return self.metadata.fbank

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def load_stage_model(path: str | os.PathLike[str], stage: str, device: str = "cpu") -> StageModel:
    """Load a checkpoint and check that it holds the expected stage (CheckpointError)."""
    model, metadata = load_checkpoint(path, device)
    loaded = StageModel(Path(path), model, metadata)
    if loaded.stage != stage:
        raise CheckpointError(f"{path}: holds a {loaded.stage!r} model, but was given as the {stage}")
    return loaded


def _differs(key: str, models: Sequence[StageModel]) -> str | None:
    values = {m.path: getattr(m.metadata.record, key) for m in models}
    if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
        return f"different {key}: " + ", ".join(f"{p} has {v!r}" for p, v in values.items())
    return None


def check_two_stage_pair(gatekeeper: StageModel, expert: StageModel) -> None:
    """Raise CheckpointError unless the two checkpoints form one two-stage pipeline."""
    keys = ("fold", "folds_sha256", "labels_sha256", "gatekeeper_class")
    problems = [p for p in (_differs(k, [gatekeeper, expert]) for k in keys) if p]
    problems += pair_problems(gatekeeper.class_names, expert.class_names,
                              gatekeeper.metadata.record.gatekeeper_class)  # fmt: skip
    if gatekeeper.feature_names and expert.feature_names and gatekeeper.feature_names != expert.feature_names:
        problems.append(
            f"different feature names: gatekeeper {gatekeeper.feature_names}, expert {expert.feature_names}"
        )
    if problems:
        raise CheckpointError(
            f"{gatekeeper.path} and {expert.path} are not a gatekeeper/expert pair: "
            + "; ".join(problems)
            + " (use the same fold's checkpoints from one training run)"
        )


@dataclass
class BatchPrediction:
    proba: np.ndarray  # (n, len(class_names))
    recommendations: list[str]
    single_recommendations: list[str] | None = None


class Recommender:
    """Gatekeeper + expert (two-stage) routing, or a single model's; optionally both.

    Two-stage probabilities and the recommendation follow `serec.recommender.stages`: the
    gatekeeper class when its probability reaches the threshold, else the expert's top class.

    Stage, classes and feature names come from the checkpoints' metadata; a pair trained on
    different folds or labels, whose classes do not partition, or whose feature names
    differ is refused with a `CheckpointError` that says which. With gatekeeper, expert
    and single all given, the two-stage pipeline routes and the single model's pick is
    reported beside it for comparison.
    """

    def __init__(
        self,
        gatekeeper: StageModel | None = None,
        expert: StageModel | None = None,
        single: StageModel | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        device: str = "cpu",
    ) -> None:
        if (gatekeeper is None) != (expert is None):
            raise ValueError("the two-stage recommender needs both a gatekeeper and an expert checkpoint")
        if gatekeeper is None and single is None:
            raise ValueError("give gatekeeper and expert checkpoints, or a single-model checkpoint")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"gatekeeper threshold must be in (0, 1], got {threshold}")
        self.gatekeeper, self.expert, self.single = gatekeeper, expert, single
        self.threshold = threshold
        self.device = device
        for stage in self.models:
            if stage.model.output != "proba":
                raise CheckpointError(
                    f"{stage.path}: a {stage.metadata.kind} model predicts scores, not the "
                    "classes the gatekeeper / expert / single routing needs"
                )
        if gatekeeper is not None and expert is not None:
            check_two_stage_pair(gatekeeper, expert)
            self.class_names = [gatekeeper.metadata.record.gatekeeper_class, *expert.class_names]
            if single is not None:
                self._check_single(single)
        else:
            assert single is not None
            self.class_names = single.class_names
        names = {tuple(m.feature_names) for m in self.models if m.feature_names}
        if len(names) > 1:
            raise CheckpointError(
                "the checkpoints use different feature names: "
                + "; ".join(f"{m.path}: {m.feature_names}" for m in self.models if m.feature_names)
            )
        self.feature_names: list[str] = list(next(iter(names))) if names else []

    def _check_single(self, single: StageModel) -> None:
        assert self.gatekeeper is not None
        problem = _differs("labels_sha256", [self.gatekeeper, single])
        if problem or sorted(single.class_names) != sorted(self.class_names):
            raise CheckpointError(
                f"{single.path}: the single model was trained on other labels than the "
                f"two-stage pair ({problem or f'classes {single.class_names} vs {self.class_names}'})"
            )

    @classmethod
    def from_checkpoints(
        cls,
        gatekeeper_path: str | os.PathLike[str] | None = None,
        expert_path: str | os.PathLike[str] | None = None,
        single_path: str | os.PathLike[str] | None = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        device: str = "cpu",
    ) -> Recommender:
        gatekeeper = load_stage_model(gatekeeper_path, "gatekeeper", device) if gatekeeper_path else None
        expert = load_stage_model(expert_path, "expert", device) if expert_path else None
        single = load_stage_model(single_path, "single", device) if single_path else None
        return cls(gatekeeper, expert, single, threshold=threshold, device=device)

    @property
    def models(self) -> list[StageModel]:
        return [m for m in (self.gatekeeper, self.expert, self.single) if m is not None]

    @property
    def gatekeeper_class(self) -> str:
        return self.models[0].metadata.record.gatekeeper_class

    @property
    def default_fallback(self) -> str:
        """The All_Failed fallback: the gatekeeper class (the dominant model), or keeping
        the noisy input when the gatekeeper class is All_Failed itself."""
        gk = self.gatekeeper_class
        return KEEP_NOISY if gk == ALL_FAILED else gk

    @property
    def fbank_specs(self) -> list[FbankSpec]:
        return list(dict.fromkeys(m.fbank_spec for m in self.models if m.fbank_spec is not None))

    @property
    def audio_seconds(self) -> float | None:
        """How much of each file the fbank inputs use (None: no fbank, audio not needed)."""
        specs = self.fbank_specs
        return max(s.audio_seconds for s in specs) if specs else None

    def describe(self) -> dict[str, Any]:
        """Checkpoints (path, sha256, stage, fold, classes) and settings, for recommender.json."""
        return {
            "checkpoints": {
                m.stage: {
                    "path": str(m.path),
                    "sha256": m.sha256,
                    "fold": fold_name(m.metadata.fold),
                    "class_names": m.class_names,
                    "feature_names": m.feature_names,
                    "model_kind": m.metadata.kind,
                }
                for m in self.models
            },
            "routing": "two_stage" if self.gatekeeper is not None else "single",
            "class_names": self.class_names,
            "gatekeeper_class": self.gatekeeper_class,
            "gatekeeper_threshold": self.threshold,
        }

    def _proba(self, stage: StageModel, fbanks: Mapping[FbankSpec, np.ndarray],
               features: np.ndarray | None) -> np.ndarray:
        spec = stage.fbank_spec
        inputs = ModelInputs(fbanks[spec] if spec is not None else None,
                             features if stage.feature_names else None)
        return stage.model.predict_proba(inputs)

    def predict(
        self, audios: Sequence[np.ndarray] | None, features: np.ndarray | None = None
    ) -> BatchPrediction:
        """Probabilities and recommendations for a batch of 16 kHz mono signals (and raw
        feature vectors in `feature_names` order when a model uses features)."""
        if self.fbank_specs and audios is None:
            raise ValueError("these checkpoints read spectrograms: they need the audio")
        if self.feature_names and features is None:
            raise ValueError(f"these checkpoints need features {self.feature_names}")
        fbanks = {spec: fbank_batch(list(audios or []), spec) for spec in self.fbank_specs}
        single_recs = None
        if self.single is not None:
            single_proba = self._proba(self.single, fbanks, features)
            single_recs = [self.single.class_names[i] for i in single_proba.argmax(axis=1)]
        if self.gatekeeper is None or self.expert is None:
            assert single_recs is not None
            return BatchPrediction(single_proba, single_recs)
        gk_col = self.gatekeeper.class_names.index(self.gatekeeper_class)
        p_gk = self._proba(self.gatekeeper, fbanks, features)[:, gk_col]
        p_expert = self._proba(self.expert, fbanks, features)
        recs = route_two_stage(p_gk, p_expert, self.gatekeeper_class, self.expert.class_names, self.threshold)
        return BatchPrediction(two_stage_proba(p_gk, p_expert), [str(r) for r in recs], single_recs)


# ---------------------------------------------------------------------------------------
# Features for inference


@dataclass
class FeatureSource:
    """Where a file's feature vector comes from: a features folder, else computed here
    with the feature set and crop length the checkpoints were trained with."""

    names: list[str]
    feature_set: str
    max_seconds: float | None
    features_dir: Path | None = None
    computed: int = 0
    read: int = 0

    @classmethod
    def for_recommender(
        cls, recommender: Recommender, features_dir: str | os.PathLike[str] | None = None
    ) -> FeatureSource | None:
        names = recommender.feature_names
        if not names:
            return None
        matches = [s.name for s in FEATURE_SETS.values() if list(s.names) == names]
        max_seconds: float | None = DEFAULT_MAX_SECONDS
        if features_dir is not None:
            meta = read_features_meta(features_dir)
            if [str(n) for n in meta["names"]] != names:
                raise CheckpointError(
                    f"{Path(features_dir) / FEATURES_JSON} names {meta['names']}, but the "
                    f"checkpoints were trained on {names}"
                )
            max_seconds = meta.get("params", {}).get("max_seconds", DEFAULT_MAX_SECONDS)
        else:
            max_seconds = _training_max_seconds(recommender, names)
        if not matches:
            if features_dir is None:
                raise CheckpointError(
                    f"the checkpoints use features {names}, which no known feature set "
                    "computes; pass --cekl_features_base_dir with those vectors"
                )
            feature_set = ""
        else:
            feature_set = matches[0]
        return cls(names, feature_set, max_seconds, Path(features_dir) if features_dir else None)

    def vector(self, audio_dir: Path, fid: str) -> np.ndarray:
        """One file's raw feature vector (AudioError for an unusable file)."""
        if self.features_dir is not None:
            path = feature_path(self.features_dir, fid)
            if path.is_file():
                vector = np.load(path, allow_pickle=False)
                if vector.shape != (len(self.names),):
                    raise AudioError(path, f"feature vector of shape {vector.shape}, expected {len(self.names)}")
                self.read += 1
                return vector.astype(np.float32)
            if not self.feature_set:
                raise AudioError(path, "no feature vector there, and its feature set is unknown here")
        self.computed += 1
        return file_features(audio_dir / fid, self.feature_set, self.max_seconds)


def _training_max_seconds(recommender: Recommender, names: list[str]) -> float | None:
    """The crop length of the features the checkpoints were trained on, when their
    features folder (recorded in the checkpoint) is still there; else the default."""
    for stage in recommender.models:
        feat_dir = stage.metadata.record.training.get("cekl_features_base_dir")
        if feat_dir and (Path(feat_dir) / FEATURES_JSON).is_file():
            meta = read_features_meta(feat_dir)
            if [str(n) for n in meta["names"]] == names:
                return meta.get("params", {}).get("max_seconds", DEFAULT_MAX_SECONDS)
    return DEFAULT_MAX_SECONDS


# ---------------------------------------------------------------------------------------
# A folder of new files -> recommendations.csv


@dataclass
class RecommendationSummary:
    files: int
    predicted_now: int
    reused: int
    errors: dict[str, str]
    counts: dict[str, int]
    inference_seconds_per_file: float
    recommendations_csv: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def _batches(
    recommender: Recommender,
    noisy_dir: Path,
    file_ids: Sequence[str],
    features: FeatureSource | None,
    batch_size: int,
) -> Iterator[tuple[list[str], BatchPrediction | None, dict[str, str], float]]:
    """(usable file ids, prediction, {file: reason} for unusable ones, seconds) per batch."""
    crop = recommender.audio_seconds
    for start in range(0, len(file_ids), batch_size):
        started = time.perf_counter()
        ok: list[str] = []
        audios: list[np.ndarray] = []
        vectors: list[np.ndarray] = []
        errors: dict[str, str] = {}
        for fid in file_ids[start : start + batch_size]:
            try:
                # Only the part of the file the AST inputs cover is read.
                audio = load_audio(noisy_dir / fid, crop_seconds=crop) if crop else None
                vector = features.vector(noisy_dir, fid) if features is not None else None
            except AudioError as exc:
                errors[fid] = exc.reason
                continue
            ok.append(fid)
            if audio is not None:
                audios.append(audio)
            if vector is not None:
                vectors.append(vector)
        prediction = None
        if ok:
            prediction = recommender.predict(
                audios if crop else None, np.stack(vectors) if vectors else None
            )
        yield ok, prediction, errors, time.perf_counter() - started


@dataclass
class _RecommenderRecord:
    """OUT/recommender.json: the checkpoints and settings the rows were predicted with, and
    the inference seconds summed over the files predicted so far (kept across resumes)."""

    path: Path
    described: dict[str, Any]
    fallback_model: str
    features: FeatureSource | None
    seconds: float = 0.0
    files: int = 0

    def resumes(self) -> bool:
        """True when the recorded run used the same checkpoints and settings (its timing is
        taken over); False when there is none or it differs."""
        if not self.path.is_file():
            return False
        previous = json.loads(self.path.read_text(encoding="utf-8"))
        if any(previous.get(k) != v for k, v in self.described.items()):
            return False
        timing = previous.get("inference", {})
        self.seconds, self.files = float(timing.get("seconds", 0.0)), int(timing.get("files", 0))
        return True

    def save(self) -> None:
        features = self.features
        write_json_atomic(self.path, {
            **self.described,
            "fallback_model": self.fallback_model,
            "features": None if features is None else {
                "names": features.names,
                "feature_set": features.feature_set,
                "max_seconds": features.max_seconds,
                "features_dir": str(features.features_dir) if features.features_dir else None,
            },
            "inference": {"seconds": round(self.seconds, 4), "files": self.files},
        })


def recommend_folder(
    recommender: Recommender,
    noisy_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fallback_model: str,
    *,
    features_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
) -> RecommendationSummary:
    """Predict every audio file under `noisy_dir`; write OUT/recommendations.csv, errors.csv
    and recommender.json (checkpoints, settings, inference seconds per file).

    Resumable: rows are appended per batch, and a re-run with the same checkpoints and
    threshold predicts only files without a row. Unusable files are listed in errors.csv.
    """
    noisy_dir, out_dir = Path(noisy_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fids = [file_id(p, noisy_dir) for p in list_audio_files(noisy_dir)]
    if not fids:
        raise FileNotFoundError(f"{noisy_dir}: no .wav or .flac files")
    features = FeatureSource.for_recommender(recommender, features_dir)
    columns = recommendation_columns(recommender.class_names, recommender.single is not None)
    record = _RecommenderRecord(out_dir / RECOMMENDER_JSON, recommender.describe(),
                                fallback_model, features)  # fmt: skip
    csv_path = out_dir / RECOMMENDATIONS_CSV
    if not record.resumes() and csv_path.exists():
        log.warning("%s: written with other checkpoints or settings; predicting again", csv_path)
        csv_path.unlink()
    rowlog = RowLog(csv_path, columns)
    done = {r["file"]: r for r in rowlog.read()}
    todo = [f for f in fids if f not in done]
    errors: dict[str, str] = {}
    with tqdm(total=len(todo), desc="recommend", unit="file") as bar:
        for ok, prediction, batch_errors, elapsed in _batches(
            recommender, noisy_dir, todo, features, batch_size
        ):
            errors.update(batch_errors)
            if prediction is not None:
                rows = _rows(ok, prediction, recommender.class_names, fallback_model)
                rowlog.append(rows)
                done.update({r["file"]: r for r in csv_rows(rows, columns)})
                record.seconds += elapsed
                record.files += len(ok)
                record.save()
            bar.update(len(ok) + len(batch_errors))
    record.save()
    final = _final_rows(csv_path, columns, [done[f] for f in fids if f in done], fallback_model)
    write_csv_atomic(out_dir / ERRORS_CSV, ERROR_COLUMNS,
                     ({"file": f, "reason": r} for f, r in sorted(errors.items())))
    counts = Counter(row["recommendation"] for row in final)
    return RecommendationSummary(
        files=len(fids),
        predicted_now=len(todo) - len(errors),
        reused=len(fids) - len(todo),
        errors=errors,
        counts=dict(counts.most_common()),
        inference_seconds_per_file=record.seconds / record.files if record.files else math.nan,
        recommendations_csv=csv_path,
        rows=final,
    )


def _final_rows(csv_path: Path, columns: Sequence[str], rows: list[dict[str, Any]],
                fallback_model: str) -> list[dict[str, Any]]:  # fmt: skip
    """The rows in file order with today's fallback routing; the CSV is rewritten only when
    that changes it (a no-op re-run leaves it untouched)."""
    for row in rows:
        row["routed_model"] = routed_model_for(row["recommendation"], fallback_model)
    text = csv_text(columns, rows)
    if csv_path.read_text(encoding="utf-8") != text:
        write_text_atomic(csv_path, text)
    return rows


def _rows(
    fids: Sequence[str], prediction: BatchPrediction, class_names: Sequence[str], fallback_model: str
) -> list[dict[str, Any]]:
    rows = []
    for i, fid in enumerate(fids):
        rec = prediction.recommendations[i]
        row: dict[str, Any] = {"file": fid, "recommendation": rec}
        row.update({f"p_{c}": round(float(p), 6) for c, p in zip(class_names, prediction.proba[i], strict=True)})
        row["routed_model"] = routed_model_for(rec, fallback_model)
        if prediction.single_recommendations is not None:
            row[SINGLE_COLUMN] = prediction.single_recommendations[i]
        rows.append(row)
    return rows


def csv_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows as they read back from CSV (all strings), so fresh and resumed rows look alike."""
    return list(csv.DictReader(io.StringIO(csv_text(columns, rows))))


__all__ = [
    "BatchPrediction",
    "FeatureSource",
    "RecommendationSummary",
    "Recommender",
    "StageModel",
    "check_two_stage_pair",
    "load_stage_model",
    "recommend_folder",
]
