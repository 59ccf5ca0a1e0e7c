"""Which files the recommender learns from and how they are split: labels.csv, speaker and
noise-recording groups, the shared k folds (folds.csv) and each fold's inner validation split.

These fix the thesis' leaks (upstream.md section 1): folds are stratified by label and
grouped by speaker, written once to folds.csv and reused by every stage; the best epoch,
early stopping and the feature scaler use only the fold's training part. With the mixing
metadata (its noise_source column), folds are crossed: speakers and noise recordings are
each dealt to the k folds, fold k holds out the files whose speaker and noise are both in
k and trains on those whose speaker and noise are both elsewhere, and a file with one in
k and the other not is on neither side of fold k, so no held-out file shares a speaker or
a noise recording with what its fold's models learnt from (as at deployment).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from serec.fileio import UnsafeFileId, check_file_ids, write_json_atomic
from serec.mixing import DEFAULT_SPEAKER_REGEX
from serec.recommender.errors import RecommenderError
from serec.schema import FOLDS_CSV, read_folds, write_folds

FOLDS_JSON = "folds.json"
# The inner validation split is one of this many grouped, stratified parts of a fold's
# training part (about 20 %), fewer when the training part has fewer groups.
INNER_VAL_PARTS = 5

log = logging.getLogger(__name__)


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


def noise_groups(
    files: Sequence[str], metadata_csv: str | os.PathLike[str] | None
) -> np.ndarray | None:
    """Each file's noise recording (the mixing metadata's noise_source), or None when the
    metadata is not given or has no such column (folds are then grouped by speaker only)."""
    if metadata_csv is None:
        return None
    path = Path(metadata_csv)
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)  # file_groups has read it already
    if "noise_source" not in meta.columns:
        return None
    lookup = dict(zip(meta["file"], meta["noise_source"], strict=True))
    missing = [f for f in files if not lookup.get(f, "").strip()]
    if missing:
        raise RecommenderError(f"{path}: {len(missing)} files have no noise_source, e.g. {missing[0]}")
    return np.array([lookup[f] for f in files], dtype=object)


@dataclass(frozen=True)
class Folds:
    """The fold assignment of a run's files (arrays aligned with the labels' rows).

    `held_out[i]` is the fold whose held-out set file i is in (0: none, a crossed file);
    `speaker[i]` and `noise[i]` are the folds of its speaker and noise recording (equal to
    `held_out` when folds are grouped by speaker only).
    """

    held_out: np.ndarray
    speaker: np.ndarray
    noise: np.ndarray

    def training_part(self, fold: int) -> np.ndarray:
        """Files fold `fold`'s models may learn from: speaker and noise both outside it."""
        return (self.speaker != fold) & (self.noise != fold)

    def subset(self, keep: np.ndarray) -> Folds:
        return Folds(self.held_out[keep], self.speaker[keep], self.noise[keep])


def crossed_folds(
    labels: Sequence[str], speakers: Sequence[str], noises: Sequence[str] | None, n_folds: int, seed: int
) -> Folds:
    """Speaker folds (make_folds), and with `noises` noise-recording folds made the same way;
    a file is held out by fold k only when both are k. Every fold must hold some out."""
    speaker = make_folds(labels, speakers, n_folds, seed)
    if noises is None:
        return Folds(speaker, speaker, speaker)
    noise = make_folds(labels, noises, n_folds, seed + 1, what="noise recordings")
    held_out = np.where(speaker == noise, speaker, 0)
    empty = [k for k in range(1, n_folds + 1) if not (held_out == k).any()]
    if empty:
        raise RecommenderError(
            f"fold(s) {empty} hold out no file: no file has both its speaker and its noise "
            f"recording there ({len(labels)} files); lower --n_folds or mix more files"
        )
    return Folds(held_out, speaker, noise)


def make_folds(
    labels: Sequence[str], groups: Sequence[str], n_folds: int, seed: int, what: str = "speaker groups"
) -> np.ndarray:
    """Fold number (1..n_folds) per file: stratified by label, no group on two folds."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise RecommenderError(
            f"only {n_groups} {what} for {n_folds} folds; lower --n_folds"
        )
    folds = np.zeros(len(labels), dtype=np.int64)
    parts = _grouped_parts(labels, groups, n_folds, seed, f"{n_folds} folds (lower --n_folds)")
    for number, (_, test) in enumerate(parts, 1):
        folds[test] = number
    return folds


def _grouped_parts(
    labels: np.ndarray, groups: np.ndarray, n_parts: int, seed: int, what: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedGroupKFold's (rest, part) index pairs; RecommenderError when the files are
    too few to split that way (scikit-learn's ValueError says why)."""
    splitter = StratifiedGroupKFold(n_splits=n_parts, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes in small sets: the split is still grouped, just less even.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            return list(splitter.split(np.zeros(len(labels)), labels, groups))
        except ValueError as exc:
            counts = pd.Series(labels).value_counts()
            raise RecommenderError(
                f"too few files to split into {what}: {len(labels)} files of "
                f"{len(set(groups))} speaker groups, the most frequent label has "
                f"{int(counts.max())} ({exc}); label more files or use fewer folds"
            ) from exc


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
    noises: np.ndarray | None = None,
) -> Folds:
    """The run's fold assignment, aligned with `labels` rows.

    Made once and written to OUTPUT_DIR/folds.csv (file, fold, speaker_fold, noise_fold;
    fold 0 = held out by no fold) with folds.json (how it was made); later stages reuse
    it. An existing folds.csv made from other labels, fold
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
        saved_folds = read_folds(csv_path)
        speaker_folds = {k[1] for k in saved_folds.values()}
        if set(saved_folds) != set(labels.file):
            changed.insert(0, "its files differ from the labels file's")
        elif sorted(speaker_folds) != list(range(1, n_folds + 1)):
            changed.insert(0, f"its folds are {sorted(speaker_folds)}")
        if changed:
            raise RecommenderError(
                f"{csv_path} was made for other data ({'; '.join(changed)}): {fix}"
            )
        table = np.array([saved_folds[f] for f in labels.file], dtype=np.int64).reshape(-1, 3)
        return Folds(table[:, 0], table[:, 1], table[:, 2])
    folds = crossed_folds(labels.label.to_numpy(), groups, noises, n_folds, seed)
    write_folds(csv_path, {f: (int(h), int(s), int(n)) for f, h, s, n in
                           zip(labels.file, folds.held_out, folds.speaker, folds.noise, strict=True)})
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
    parts = _grouped_parts(labels[idx], groups[idx], min(INNER_VAL_PARTS, n_groups), seed,
                           "a fold's training part and its inner validation split")  # fmt: skip
    # The first part with two labels or more: on a small corpus a part can hold only the
    # gatekeeper's class, leaving the expert (all stages share this split) nothing to validate on.
    mixed = [val for _, val in parts if len(set(labels[idx[val]])) > 1]
    val = mixed[0] if mixed else parts[0][1]
    mask = np.zeros(len(labels), dtype=bool)
    mask[idx[val]] = True
    return mask


def run_folds(
    output_dir: Path, labels: pd.DataFrame, metadata_csv: str | os.PathLike[str] | None, n_folds: int, seed: int
) -> tuple[np.ndarray, Folds]:
    """The speaker groups and the folds of a recommender run (OUTPUT_DIR/folds.csv, made or
    reused), shared by the thesis' stages and the quality selector."""
    groups, group_by = file_groups(list(labels.file), metadata_csv)
    noises = noise_groups(list(labels.file), metadata_csv)
    if noises is not None:
        group_by += ", crossed with its noise_source"
    return groups, load_or_make_folds(output_dir, labels, groups, group_by, n_folds, seed, noises)
