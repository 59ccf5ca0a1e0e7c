"""The two-stage rule, in one place for training, cross-validation and inference: which classes
the gatekeeper and the expert learn, and how their outputs become one recommendation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from serec.recommender.errors import RecommenderError

STAGES = ("gatekeeper", "expert", "single")
DEFAULT_THRESHOLD = 0.5


def most_frequent_label(labels: Sequence[str]) -> str:
    """The most frequent label (ties: alphabetically first): the thesis' dominant model, which
    the gatekeeper learns by default and the majority baseline always predicts."""
    counts = pd.Series(list(labels), dtype=object).value_counts()
    top = counts[counts == counts.max()].index
    return str(sorted(top)[0])


def gatekeeper_rest_name(gatekeeper_class: str) -> str:
    """The gatekeeper's second class: every file whose label is not the gatekeeper class."""
    return f"not_{gatekeeper_class}"


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


def route_two_stage(
    p_gatekeeper: np.ndarray,
    expert_proba: np.ndarray,
    gatekeeper_class: str,
    expert_classes: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> np.ndarray:
    """The pipeline's label: the gatekeeper class when p >= threshold, else the expert's pick."""
    expert_pick = np.asarray(expert_classes, dtype=object)[expert_proba.argmax(axis=1)]
    return np.where(p_gatekeeper >= threshold, gatekeeper_class, expert_pick)


def two_stage_proba(p_gatekeeper: np.ndarray, expert_proba: np.ndarray) -> np.ndarray:
    """Joint class probabilities [gatekeeper class, expert classes...]: every expert class c
    gets P(not gatekeeper) * P_expert(c), so each row sums to 1."""
    rest = (1.0 - p_gatekeeper)[:, None] * expert_proba
    return np.concatenate([p_gatekeeper[:, None], rest], axis=1).astype(np.float32)


def pair_problems(
    gatekeeper_classes: Sequence[str], expert_classes: Sequence[str], gatekeeper_class: str
) -> list[str]:
    """Why a gatekeeper and an expert with these classes cannot form one pipeline (empty: they can)."""
    problems = []
    wanted = [gatekeeper_class, gatekeeper_rest_name(gatekeeper_class)]
    if list(gatekeeper_classes) != wanted:
        problems.append(
            f"the gatekeeper's classes {list(gatekeeper_classes)} are not {wanted}"
        )
    experts = list(expert_classes)
    if gatekeeper_class in experts or len(set(experts)) != len(experts) or not experts:
        problems.append(
            f"the classes do not partition: gatekeeper class {gatekeeper_class!r}, expert "
            f"classes {experts}"
        )
    return problems
