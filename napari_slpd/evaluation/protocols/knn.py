"""KNN (SPEC section 6, HIPT's unsupervised protocol): k nearest training slides vote, k = 5.

Vectors: scikit-learn ``KNeighborsClassifier(n_neighbors=k)`` (Euclidean, uniform weights) on the raw
slide embeddings; the class probabilities are the neighbours' vote shares. Prototype sets: the same vote
over the k training slides nearest by the prototype set distance (through the cohort's similarity
engine, evaluation.set_distance). Neighbours come from the fold's training slides only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_slpd.evaluation.protocols.common import Predictions, TaskData, blas_threads_for, full_proba
from napari_slpd.utils.progress import raise_if_cancelled


QUERY_BATCH = 256  # prototype-set queries per engine call (cancel is checked between batches)


@dataclass
class KnnConfig:
    k: int = 5


def knn_vectors(data: TaskData, X: np.ndarray, config, cancel=None) -> Predictions:
    with blas_threads_for(X):
        return _knn_vectors(data, X, config, cancel)


def _knn_vectors(data: TaskData, X: np.ndarray, config: KnnConfig, cancel=None) -> Predictions:
    from sklearn.neighbors import KNeighborsClassifier

    parts = []
    for fold in data.folds:
        raise_if_cancelled(cancel, "KNN")
        y_train = data.y[fold.train]
        model = KNeighborsClassifier(n_neighbors=min(config.k, fold.train.size))
        model.fit(X[fold.train], y_train)
        proba = full_proba(model.predict_proba(X[fold.test]), model.classes_, data.n_classes)
        parts.append(Predictions(np.full(fold.test.size, fold.index), fold.test, proba=proba))
    return Predictions.concat(parts)


def knn_sets(data: TaskData, sets: list[np.ndarray], config: KnnConfig, cancel=None) -> Predictions:
    from napari_slpd.evaluation.set_distance import build_set_index, nearest_sets_many

    index = build_set_index(data.slide_ids, sets)
    position = {s: i for i, s in enumerate(data.slide_ids)}
    parts = []
    for fold in data.folds:
        train = set(fold.train.tolist())
        exclude = [s for i, s in enumerate(data.slide_ids) if i not in train]
        k = min(config.k, fold.train.size)
        proba = np.zeros((fold.test.size, data.n_classes))
        for start in range(0, fold.test.size, QUERY_BATCH):
            raise_if_cancelled(cancel, "KNN")
            batch = fold.test[start : start + QUERY_BATCH]
            answers = nearest_sets_many(index, [data.slide_ids[i] for i in batch], k, [exclude] * batch.size)
            for row, hits in enumerate(answers, start=start):
                for slide_id, _ in hits:
                    proba[row, data.y[position[slide_id]]] += 1.0 / k
        parts.append(Predictions(np.full(fold.test.size, fold.index), fold.test, proba=proba))
    return Predictions.concat(parts)
