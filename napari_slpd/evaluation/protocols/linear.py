"""Linear probe: scikit-learn logistic regression on standardized slide embeddings, on the KNN's folds.

``make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))`` fit on each fold's training
slides (lbfgs, multinomial for more than two classes, L2 penalty): deterministic, so a direct scikit-learn
run on the exported embeddings and folds gives the same numbers. (PANTHER trains one linear layer with
AdamW; a converged L2 logistic regression is the same model without its optimisation noise.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_slpd.evaluation.protocols.common import Predictions, TaskData, blas_threads_for, full_proba
from napari_slpd.utils.progress import raise_if_cancelled


@dataclass
class LinearConfig:
    C: float = 1.0
    max_iter: int = 5000


def linear_model(config: LinearConfig):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=config.C, max_iter=config.max_iter))


def linear_probe(data: TaskData, X: np.ndarray, config, cancel=None) -> Predictions:
    with blas_threads_for(X):
        return _linear_probe(data, X, config, cancel)


def _linear_probe(data: TaskData, X: np.ndarray, config: LinearConfig, cancel=None) -> Predictions:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    parts = []
    for fold in data.folds:
        raise_if_cancelled(cancel, "linear probe")
        model = linear_model(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X[fold.train], data.y[fold.train])
        proba = full_proba(model.predict_proba(X[fold.test]), model.classes_, data.n_classes)
        parts.append(Predictions(np.full(fold.test.size, fold.index), fold.test, proba=proba))
    return Predictions.concat(parts)
