"""Slide retrieval (the similar-slides feature, measured), leave one case out.

Each fold's test slides are its queries (a slide tested by several folds, as in Monte-Carlo split files,
is a query of each; a slide that only trains is never one); the keys are all slides of the other cases. Vectors are ranked by
Euclidean distance (Patho-Bench's default ``l2`` similarity, no centering); prototype sets by the
prototype set distance through the similarity engine. Equal distances keep slide order. The figures are
Patho-Bench's top-k accuracy, majority-vote accuracy and mAP@k (metrics.retrieval_per_query), reported per
fold on that fold's test queries and pooled over the (fold, query) rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_slpd.evaluation.protocols.common import Predictions, TaskData
from napari_slpd.evaluation.splits import test_rows
from napari_slpd.utils.progress import raise_if_cancelled


@dataclass
class RetrievalConfig:
    ks: tuple[int, ...] = (1, 3, 5)


def _same_case(cases: np.ndarray) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cases.tolist()):
        groups.setdefault(str(c), []).append(i)
    return [np.asarray(groups[str(c)]) for c in cases.tolist()]


def _rows(data: TaskData, retrieved: np.ndarray, distances: np.ndarray) -> Predictions:
    fold, index = test_rows(data.folds)
    return Predictions(fold, index, retrieved=retrieved[index], distances=distances[index])


def retrieval_vectors(data: TaskData, X: np.ndarray, config: RetrievalConfig, cancel=None) -> Predictions:
    from scipy.spatial.distance import cdist

    n, max_k = len(data.slide_ids), max(config.ks)
    same = _same_case(data.cases)
    retrieved = np.full((n, max_k), -1, np.int64)
    distances = np.full((n, max_k), np.nan)
    X = np.asarray(X, np.float64)
    queries = np.unique(test_rows(data.folds)[1])
    for start in range(0, queries.size, 512):
        raise_if_cancelled(cancel, "retrieval")
        batch = queries[start : start + 512]
        block = cdist(X[batch], X)
        for r, i in enumerate(batch):
            d = block[r].copy()
            d[same[i]] = np.inf
            order = np.argsort(d, kind="stable")[:max_k]
            order = order[np.isfinite(d[order])]
            retrieved[i, : order.size] = order
            distances[i, : order.size] = d[order]
    return _rows(data, retrieved, distances)


def retrieval_sets(data: TaskData, sets: list[np.ndarray], config: RetrievalConfig, cancel=None) -> Predictions:
    from napari_slpd.evaluation.set_distance import build_set_index, nearest_sets_many

    n, max_k = len(data.slide_ids), max(config.ks)
    index = build_set_index(data.slide_ids, sets)
    position = {s: i for i, s in enumerate(data.slide_ids)}
    same = _same_case(data.cases)
    retrieved = np.full((n, max_k), -1, np.int64)
    distances = np.full((n, max_k), np.nan)
    tested = np.unique(test_rows(data.folds)[1]).tolist()
    queries = [i for i in tested if n - same[i].size > 0]  # a query needs a slide of another case
    for start in range(0, len(queries), 256):
        raise_if_cancelled(cancel, "retrieval")
        batch = queries[start : start + 256]
        excludes = [[data.slide_ids[j] for j in same[i] if j != i] for i in batch]
        answers = nearest_sets_many(index, [data.slide_ids[i] for i in batch], max_k, excludes)
        for i, hits in zip(batch, answers):
            for r, (hit, dist) in enumerate(hits[:max_k]):
                retrieved[i, r] = position[hit]
                distances[i, r] = dist
    return _rows(data, retrieved, distances)
