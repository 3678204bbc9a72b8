"""Survival: a Cox proportional-hazards model on slide embeddings (scikit-survival), c-index per fold.

Per fold: standardize, PCA to at most ``max_components`` dimensions (a slide embedding has hundreds to
thousands of dimensions and a cohort a few hundred events; fit on the training slides only), then
``sksurv.linear_model.CoxPHSurvivalAnalysis(alpha)`` (ridge-penalized partial likelihood). The risk of a
test slide is the model's linear predictor; the c-index is Harrell's (sksurv.metrics). Folds are
stratified by event.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from napari_slpd.evaluation.protocols.common import Predictions, TaskData, blas_threads_for
from napari_slpd.utils.progress import raise_if_cancelled


@dataclass
class CoxConfig:
    alpha: float = 1.0
    max_components: int = 16


def cox_model(config: CoxConfig, n_train: int, n_features: int, seed: int = 0):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    components = max(1, min(config.max_components, n_features, n_train - 2))
    return make_pipeline(StandardScaler(), PCA(n_components=components, random_state=seed),
                         CoxPHSurvivalAnalysis(alpha=config.alpha, ties="breslow"))


def structured(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, np.float64))


def cox(data: TaskData, X: np.ndarray, config, cancel=None) -> Predictions:
    with blas_threads_for(X):
        return _cox(data, X, config, cancel)


def _cox(data: TaskData, X: np.ndarray, config: CoxConfig, cancel=None) -> Predictions:
    parts = []
    for fold in data.folds:
        raise_if_cancelled(cancel, "Cox model")
        model = cox_model(config, fold.train.size, X.shape[1], data.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter of the Newton solver on tiny folds
            model.fit(X[fold.train], structured(data.event[fold.train], data.time[fold.train]))
        risk = np.asarray(model.predict(X[fold.test]), np.float64)
        train_risk = np.asarray(model.predict(X[fold.train]), np.float64)
        parts.append(Predictions(np.full(fold.test.size, fold.index), fold.test, risk=risk,
                                 extra={fold.name: {"train_median_risk": float(np.median(train_risk))}}))
    return Predictions.concat(parts)
