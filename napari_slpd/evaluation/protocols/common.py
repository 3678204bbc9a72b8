"""What every protocol receives (a task's slides, labels and folds) and returns (test predictions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_slpd.evaluation.labels import Task
from napari_slpd.evaluation.splits import Fold


@dataclass
class TaskData:
    """One task restricted to its labelled slides: labels (``y`` class codes, or survival ``time`` and
    ``event``), cases and folds (index arrays into ``slide_ids``)."""

    task: Task
    slide_ids: list[str]
    cases: np.ndarray
    folds: list[Fold]
    y: np.ndarray | None = None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    seed: int = 0

    @property
    def n_classes(self) -> int:
        return self.task.n_classes


@dataclass
class Predictions:
    """Test predictions, one row per (fold, test slide). ``index``: slide index into TaskData.slide_ids.
    Classification: ``proba`` [R, C]; survival: ``risk`` [R]; retrieval: ``retrieved`` [R, max_k] slide
    indices (-1 = none) and ``distances`` [R, max_k]."""

    fold: np.ndarray
    index: np.ndarray
    proba: np.ndarray | None = None
    risk: np.ndarray | None = None
    retrieved: np.ndarray | None = None
    distances: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # per fold: training details (epochs, early stop, ...)

    def rows_of_fold(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.fold == fold)

    @classmethod
    def concat(cls, parts: list["Predictions"]) -> "Predictions":
        def cat(name):
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        extra = {}
        for p in parts:
            extra.update(p.extra)
        return cls(cat("fold"), cat("index"), cat("proba"), cat("risk"), cat("retrieved"), cat("distances"), extra)


def full_proba(partial: np.ndarray, classes_seen: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all ``n_classes`` from a model that saw only ``classes_seen`` in training."""
    out = np.zeros((partial.shape[0], n_classes), np.float64)
    out[:, np.asarray(classes_seen, np.int64)] = partial
    return out


# Below this many numbers in a design matrix, BLAS thread wake-ups cost more than the work they share
# (measured: a 72 x 12 logistic regression fit is 3x faster on one thread on a busy 2-core machine).
SMALL_PROBLEM_VALUES = 4_000_000


def blas_threads_for(X):
    """A context that runs BLAS/OpenMP on one thread for small problems, unchanged for large ones."""
    import contextlib

    if np.asarray(X).size >= SMALL_PROBLEM_VALUES:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)
