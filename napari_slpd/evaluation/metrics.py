"""Metrics of every protocol, their bootstrap confidence intervals and paired comparisons.

Classification (scikit-learn): ``auc`` = ROC AUC, one-vs-rest macro for more than two classes (classes
absent from a test fold's truth are left out of the macro mean), ``balanced_accuracy``, ``weighted_f1``,
and ``quadratic_kappa`` for ordinal labels; the predicted class is the argmax of the probabilities.
Survival: ``c_index`` = Harrell's concordance index from scikit-survival.
Retrieval (Patho-Bench's definitions, ``RetrievalMixin``): for retrieved labels ``r[1..k]`` of a query
with label ``y``: ``top{k}_acc`` = 1 if any r[j] == y; ``mv@{k}_acc`` = 1 if y is one of the most
frequent labels among r[1..k] (ties count as correct); ``mAP@{k}`` = (sum over hits j of precision@j) / k.

Bootstrap: the test predictions pooled over folds are resampled by case (all slides of a case together),
``n`` times, seeded; the 95% CI is the 2.5 and 97.5 percentiles of the metric. Paired comparison: the
same resamples applied to two representations' predictions of the same slides; the p-value is two-sided,
2 * min(P(diff <= 0), P(diff >= 0)) over the resamples (at least 1 / n).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CI_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 1000


# -- classification -------------------------------------------------------------------------------------------


def macro_ovr_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC: binary (column 1) for two classes, else one-vs-rest macro over classes present in ``y``
    (with at least one negative); NaN when no class can be scored."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    proba = np.asarray(proba, np.float64)
    n_classes = proba.shape[1]
    if n_classes == 2:
        if np.unique(y).size < 2:
            return float("nan")
        return float(roc_auc_score(y, proba[:, 1]))
    scores = []
    for c in range(n_classes):
        positive = y == c
        if positive.any() and (~positive).any():
            scores.append(roc_auc_score(positive.astype(int), proba[:, c]))
    return float(np.mean(scores)) if scores else float("nan")


def classification_metrics(y: np.ndarray, proba: np.ndarray, ordinal: bool = False) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score

    y = np.asarray(y)
    pred = np.argmax(proba, axis=1)
    out = {
        "auc": macro_ovr_auc(y, proba),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if y.size else float("nan"),
        "weighted_f1": float(f1_score(y, pred, average="weighted", zero_division=0)) if y.size else float("nan"),
    }
    if ordinal:
        labels = np.arange(proba.shape[1])
        if np.unique(np.concatenate([y, pred])).size < 2:
            out["quadratic_kappa"] = float("nan")
        else:
            out["quadratic_kappa"] = float(cohen_kappa_score(y, pred, weights="quadratic", labels=labels))
    return out


# -- survival ---------------------------------------------------------------------------------------------------


def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index (scikit-survival), NaN when no pair is comparable."""
    from sksurv.metrics import concordance_index_censored

    event = np.asarray(event, bool)
    if not event.any():
        return float("nan")
    try:
        return float(concordance_index_censored(event, np.asarray(time, np.float64), np.asarray(risk, np.float64))[0])
    except ValueError:  # no comparable pair
        return float("nan")


# -- retrieval (Patho-Bench) --------------------------------------------------------------------------------------


def retrieval_per_query(retrieved: np.ndarray, y: np.ndarray, ks=(1, 3, 5)) -> dict[str, np.ndarray]:
    """Per-query values [n] of top{k}_acc, mv@{k}_acc and mAP@{k} for retrieved labels [n, max_k]
    (-1 = nothing retrieved at that rank; never a hit). Their means are Patho-Bench's figures."""
    retrieved = np.asarray(retrieved)
    y = np.asarray(y)
    n = y.size
    out: dict[str, np.ndarray] = {}
    for k in ks:
        top = retrieved[:, :k]
        hits = top == y[:, None]
        out[f"top{k}_acc"] = hits.any(axis=1).astype(np.float64)
        mv = np.zeros(n)
        for i in range(n):
            row = top[i][top[i] >= 0]
            if row.size == 0:
                continue
            labels, counts = np.unique(row, return_counts=True)
            mv[i] = float(y[i] in labels[counts == counts.max()])
        out[f"mv@{k}_acc"] = mv
        cumulative = np.cumsum(hits, axis=1)
        precision = cumulative / np.arange(1, k + 1)[None, :]
        out[f"mAP@{k}"] = (precision * hits).sum(axis=1) / k
    return out


# -- bootstrap ------------------------------------------------------------------------------------------------


def case_resamples(cases: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` index arrays, each a resample (with replacement) of the cases, expanded to their rows."""
    cases = np.asarray(cases, dtype=object)
    unique, inverse = np.unique(cases.astype(str), return_inverse=True)
    rows_of = [np.flatnonzero(inverse == g) for g in range(unique.size)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(n)):
        picked = rng.integers(0, unique.size, unique.size)
        out.append(np.concatenate([rows_of[g] for g in picked]))
    return out


def bootstrap_ci(metric: Callable[[np.ndarray], float], resamples: list[np.ndarray],
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of ``metric(rows)`` over ``resamples`` (NaN values skipped)."""
    values = np.array([metric(rows) for rows in resamples], np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def paired_bootstrap(metric_a: Callable[[np.ndarray], float], metric_b: Callable[[np.ndarray], float],
                     resamples: list[np.ndarray], level: float = CI_LEVEL) -> dict[str, float]:
    """Difference a - b of a metric on the same rows: its point value (all rows), CI and two-sided p."""
    diffs = []
    for rows in resamples:
        d = metric_a(rows) - metric_b(rows)
        if np.isfinite(d):
            diffs.append(d)
    diffs = np.asarray(diffs)
    if diffs.size == 0:
        return {"difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                "n_resamples": 0}
    tail = 100 * (1 - level) / 2
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {
        "difference": float(diffs.mean()),
        "ci_low": float(np.percentile(diffs, tail)),
        "ci_high": float(np.percentile(diffs, 100 - tail)),
        "p_value": float(min(1.0, max(p, 1.0 / diffs.size))),
        "n_resamples": int(diffs.size),
    }


def summarize(fold_values: list[float]) -> tuple[float, float]:
    """(mean, std) over folds, NaN folds left out (std with ddof=0, as np.std; 0 for one fold)."""
    values = np.asarray(fold_values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())
