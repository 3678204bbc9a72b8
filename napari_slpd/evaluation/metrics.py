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
same resamples applied to two representations' predictions of the same slides; the difference reported
is the point difference on all test predictions (not the mean of the resampled differences), its CI the
percentiles of the resampled differences; the p-value is two-sided,
2 * min(P(diff <= 0), P(diff >= 0)) over the resamples (at least 1 / n).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CI_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 1000


# -- classification -------------------------------------------------------------------------------------------


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the boolean ``positive``: the Mann-Whitney statistic with mid-ranks for
    ties, which equals scikit-learn's trapezoidal ``roc_auc_score`` (and is much cheaper to bootstrap)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_ovr_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC: binary (column 1) for two classes, else one-vs-rest macro over the classes present in
    ``y`` (with at least one negative), as scikit-learn's ``roc_auc_score(multi_class="ovr")`` when every
    class is present; NaN when no class can be scored."""
    y = np.asarray(y)
    proba = np.asarray(proba, np.float64)
    if proba.shape[1] == 2:
        return binary_auc(y == 1, proba[:, 1])
    scores = [binary_auc(y == c, proba[:, c]) for c in range(proba.shape[1])]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in the truth (scikit-learn's balanced_accuracy_score)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float((np.diag(cm)[present] / support[present]).mean())


def weighted_f1(cm: np.ndarray) -> float:
    """Support-weighted F1 over classes (scikit-learn's f1_score(average="weighted", zero_division=0))."""
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float((f1 * support).sum() / support.sum()) if support.sum() else float("nan")


def quadratic_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights over all classes (scikit-learn's cohen_kappa_score)."""
    n_classes = cm.shape[0]
    cm = cm.astype(np.float64)
    n = cm.sum()
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    i, j = np.meshgrid(np.arange(n_classes), np.arange(n_classes), indexing="ij")
    w = (i - j) ** 2
    denom = (w * expected).sum()
    return float(1 - (w * cm).sum() / denom) if denom > 0 else float("nan")


def classification_metrics(y: np.ndarray, proba: np.ndarray, ordinal: bool = False,
                           only: str | None = None) -> dict[str, float]:
    """auc, balanced_accuracy, weighted_f1 (and quadratic_kappa when ``ordinal``) of class probabilities
    ``proba`` [n, C] against codes ``y`` [n]; ``only``: just that metric (bootstrap of one figure)."""
    y = np.asarray(y, np.int64)
    proba = np.asarray(proba, np.float64)
    if only == "auc":
        return {"auc": macro_ovr_auc(y, proba)}
    if y.size == 0:
        keys = ["auc", "balanced_accuracy", "weighted_f1"] + (["quadratic_kappa"] if ordinal else [])
        return {k: float("nan") for k in keys}
    n_classes = proba.shape[1]
    cm = _confusion(y, np.argmax(proba, axis=1), n_classes)
    out = {"auc": macro_ovr_auc(y, proba), "balanced_accuracy": balanced_accuracy(cm), "weighted_f1": weighted_f1(cm)}
    if ordinal:
        out["quadratic_kappa"] = quadratic_kappa(cm)
    if only is not None:
        return {only: out[only]}
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
                     resamples: list[np.ndarray], all_rows: np.ndarray, level: float = CI_LEVEL) -> dict[str, float]:
    """Difference a - b of a metric on the same rows: its point value on ``all_rows``, the percentile CI of
    the differences over ``resamples`` and the two-sided p-value."""
    point = float(metric_a(all_rows) - metric_b(all_rows))
    diffs = []
    for rows in resamples:
        d = metric_a(rows) - metric_b(rows)
        if np.isfinite(d):
            diffs.append(d)
    diffs = np.asarray(diffs)
    if diffs.size == 0:
        return {"difference": point, "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                "n_resamples": 0}
    tail = 100 * (1 - level) / 2
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {
        "difference": point,
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
