"""Segmentation figures from confusion matrices: per-class Dice and IoU, their means, pixel accuracy;
per slide, pooled over slides, and a bootstrap 95% CI of the pooled figures that resamples cases.

Only annotated units count (truth >= 0). A unit the method left without a class (prediction -1) is a
miss of its true class. Dice_c = 2 TP / (2 TP + FP + FN), IoU_c = TP / (TP + FP + FN) (scikit-learn's
f1_score / jaccard_score with ``average=None`` on the same units); a class absent from both truth and
prediction has no figure (NaN) and is left out of the means. Pixel accuracy = correct / annotated units.

```python
from napari_slpd.evaluation.segmentation.scores import confusion, figures, pooled_with_ci
cm = confusion(truth, pred, n_classes)                      # [C, C + 1]: last column = no prediction
figures(cm)        # {"dice": [C], "iou": [C], "mean_dice", "mean_iou", "pixel_accuracy", "n_units"}
pooled_with_ci([cm_slide1, ...], cases, n_bootstrap=1000, seed=0)
```
"""

from __future__ import annotations

import numpy as np

from napari_slpd.evaluation.metrics import case_resamples


def confusion(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C + 1] counts of (true class, predicted class) over annotated units; column C: no prediction."""
    truth = np.asarray(truth, np.int64).ravel()
    pred = np.asarray(pred, np.int64).ravel()
    keep = truth >= 0
    t, p = truth[keep], pred[keep]
    p = np.where((p < 0) | (p >= n_classes), n_classes, p)
    return np.bincount(t * (n_classes + 1) + p, minlength=n_classes * (n_classes + 1)).reshape(n_classes,
                                                                                                 n_classes + 1)


def figures(cm: np.ndarray) -> dict:
    """Per-class Dice and IoU, their means over the classes with a figure, pixel accuracy."""
    cm = np.asarray(cm, np.float64)
    n = cm.shape[0]
    tp = np.diag(cm[:, :n])
    fn = cm.sum(axis=1) - tp
    fp = cm[:, :n].sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    total = cm.sum()
    return {
        "dice": dice.tolist(), "iou": iou.tolist(),
        "mean_dice": float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan"),
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "n_units": int(total),
    }


SCALARS = ("mean_dice", "mean_iou", "pixel_accuracy")


def pooled_with_ci(cms: list[np.ndarray], cases, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Figures of the summed confusion of all slides, with percentile CIs over case resamples of slides:
    {"figures": figures(sum), "ci": {"mean_dice": (lo, hi), ..., "dice": [(lo, hi)] per class, "iou": ...}}."""
    stack = np.stack([np.asarray(c, np.float64) for c in cms])
    point = figures(stack.sum(axis=0))
    n_classes = stack.shape[1]
    samples = {k: [] for k in SCALARS}
    per_class = {"dice": [], "iou": []}
    for rows in case_resamples(np.asarray(cases, dtype=object), n_bootstrap, seed):
        f = figures(stack[rows].sum(axis=0))
        for k in SCALARS:
            samples[k].append(f[k])
        for k in per_class:
            per_class[k].append(f[k])
    tail = 100 * (1 - level) / 2

    def interval(values) -> tuple[float, float]:
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return float("nan"), float("nan")
        return float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))

    ci = {k: interval(samples[k]) for k in SCALARS}
    for k, values in per_class.items():
        arr = np.asarray(values, np.float64).reshape(-1, n_classes)
        ci[k] = [interval(arr[:, c]) for c in range(n_classes)]
    return {"figures": point, "ci": ci}
