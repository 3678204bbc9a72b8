"""KNN monitor: after every epoch, how well the teacher's region embeddings separate labelled slides.

DINO-style trainers show a kNN accuracy on a labelled set while they train; here the unit is the slide:
the teacher ViT-4K encodes every region on its whole token grid (as ``Use checkpoint`` will), the slide
vector is the mean of its region embeddings (SPEC section 6: HIPT/SLPD's unsupervised baseline), and the
evaluation engine's KNN protocol (``napari_slpd.evaluation``, k = 5) gives the one-vs-rest macro AUC and
the balanced accuracy over folds that are frozen for the whole run (stratified, grouped by case, seeded),
so a change of the figure between epochs is a change of the representation, not of the split. One
``monitor`` event per epoch, and one with ``epoch`` -1 before the first step (the starting point).

Labels: the evaluation engine's format (CSV/TSV with ``slide_id``, a task column, optional ``case_id``);
slides of the run without a label are left out of the monitor (counted in the event), never out of
training. Folds: ``folds`` (10), fewer when a class has fewer cases (at least 2 per class are needed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_slpd.errors import SlpdError
from napari_slpd.utils.files import atomic_write_text
from src_training import distributed

log = logging.getLogger(__name__)

FOLDS_NAME = "monitor_folds.json"


class MonitorError(SlpdError):
    """The labels given for the KNN monitor cannot be used."""


@dataclass
class MonitorSetup:
    task: str
    classes: list[str]
    slide_rows: np.ndarray  # [n] index of each monitored slide in the run's TokenGridIndex
    slide_ids: list[str]
    y: np.ndarray  # [n] class codes
    cases: np.ndarray  # [n]
    folds: list  # napari_slpd.evaluation.splits.Fold
    k: int
    n_unlabelled: int  # run slides without a label
    n_unknown: int  # labelled slides that are not in the run

    def describe(self) -> dict:
        return {"task": self.task, "classes": self.classes, "n_slides": len(self.slide_ids),
                "n_folds": len(self.folds), "k": self.k, "n_unlabelled": self.n_unlabelled,
                "n_unknown": self.n_unknown}


def prepare_monitor(labels: str | Path, task: str | None, run_slide_ids: list[str], k: int = 5, folds: int = 10,
                    seed: int = 0) -> MonitorSetup:
    """Read the labels, keep the run's labelled slides and freeze the folds. Raises MonitorError."""
    from napari_slpd.evaluation.labels import LabelsConfig, read_labels
    from napari_slpd.evaluation.splits import make_folds

    try:
        table = read_labels(labels, LabelsConfig(tasks=[task] if task else None))
    except SlpdError as exc:
        raise MonitorError(f"KNN monitor: {exc}") from exc
    classification = [name for name, t in table.tasks.items() if t.kind == "classification"]
    if task is None:
        if not classification:
            raise MonitorError(f"KNN monitor: {labels} has no classification column")
        task = classification[0]
    if task not in classification:
        raise MonitorError(f"KNN monitor: {labels} has no classification column {task!r} "
                           f"(columns: {', '.join(classification) or 'none'})")
    mask, y_all = table.task_values(task)
    position = {s: i for i, s in enumerate(run_slide_ids)}
    rows, ids, y, cases = [], [], [], []
    for i, sid in enumerate(table.slide_ids):
        if mask[i] and sid in position:
            rows.append(position[sid])
            ids.append(sid)
            y.append(int(y_all[i]))
            cases.append(table.case_ids[i])
    n_unknown = sum(1 for s in table.slide_ids if s not in position)
    y_arr, case_arr = np.asarray(y, np.int64), np.asarray(cases, dtype=object)
    present = sorted(set(y))
    if len(present) < 2:
        raise MonitorError(
            f"KNN monitor: only {len(ids)} slide(s) of this run carry a {task!r} label, of "
            f"{len(present)} class(es); it needs two classes")
    # Remap to the classes present (a class with no slide in the run cannot be scored).
    classes_all = table.tasks[task].classes
    remap = {c: j for j, c in enumerate(present)}
    y_arr = np.asarray([remap[v] for v in y_arr], np.int64)
    classes = [classes_all[c] for c in present]
    per_class = [len(set(case_arr[y_arr == c].tolist())) for c in range(len(classes))]
    n_folds = min(int(folds), min(per_class))
    if n_folds < 2:
        raise MonitorError(
            f"KNN monitor: class {classes[int(np.argmin(per_class))]!r} has {min(per_class)} case(s) among the "
            "run's slides; each class needs at least 2 for a fold split")
    if n_folds < folds:
        log.info("KNN monitor: %d folds (a class has only %d cases)", n_folds, min(per_class))
    fold_list = make_folds(y_arr, case_arr, n_folds=n_folds, seed=seed, class_names=classes, task=task)
    return MonitorSetup(task, classes, np.asarray(rows, np.int64), ids, y_arr, case_arr, fold_list, int(k),
                        len(run_slide_ids) - len(ids), n_unknown)


def knn_scores(setup: MonitorSetup, X: np.ndarray) -> dict:
    """KNN (the evaluation engine's protocol) on slide vectors ``X`` [n, E] of the monitored slides."""
    from napari_slpd.evaluation import metrics as M
    from napari_slpd.evaluation.labels import Task
    from napari_slpd.evaluation.protocols import KnnConfig, TaskData, knn_vectors

    data = TaskData(Task(setup.task, "classification", list(setup.classes)), list(setup.slide_ids),
                    setup.cases, setup.folds, y=setup.y)
    preds = knn_vectors(data, np.asarray(X, np.float64), KnnConfig(k=setup.k))
    per_fold = []
    for fold in setup.folds:
        rows = preds.rows_of_fold(fold.index)
        per_fold.append(M.classification_metrics(setup.y[preds.index[rows]], preds.proba[rows]))
    aucs = [f["auc"] for f in per_fold if np.isfinite(f["auc"])]
    pooled = M.classification_metrics(setup.y[preds.index], preds.proba)
    return {
        "knn_auc": float(np.mean(aucs)) if aucs else pooled["auc"],
        "knn_auc_std": float(np.std(aucs)) if aucs else None,
        "knn_auc_pooled": pooled["auc"],
        "balanced_accuracy": float(np.mean([f["balanced_accuracy"] for f in per_fold])),
        "n_folds_scored": len(aucs),
    }


@torch.no_grad()
def slide_embeddings(backbone, loader, index, device, embed_dim: int) -> np.ndarray:
    """[S, E] mean of the backbone's region embeddings (whole token grids) per slide of ``index``,
    regions split across processes (``loader`` yields this process's share) and summed."""
    was_training = backbone.training
    backbone.eval()
    sums = torch.zeros(index.n_slides, embed_dim, dtype=torch.float64, device=device)
    try:
        for grids, slides, _items in loader:
            emb = backbone(grids.to(device, non_blocking=True)).double()
            sums.index_add_(0, slides.to(device), emb)
    finally:
        backbone.train(was_training)
    distributed.all_reduce_sum(sums)
    counts = torch.as_tensor(np.asarray(index.counts), dtype=torch.float64, device=device).clamp(min=1)
    return (sums / counts[:, None]).float().cpu().numpy()


class KnnMonitor:
    """Holds the frozen folds; :meth:`measure` embeds, scores and returns the ``monitor`` event's fields."""

    def __init__(self, setup: MonitorSetup, loader, index, device, embed_dim: int, run_dir: Path | None = None):
        self.setup, self.loader, self.index, self.device, self.embed_dim = setup, loader, index, device, embed_dim
        if run_dir is not None and distributed.rank() == 0:
            folds = {sid: int(f.index) for f in setup.folds for sid in np.asarray(setup.slide_ids)[f.test]}
            atomic_write_text(Path(run_dir) / FOLDS_NAME, json.dumps(
                {"task": setup.task, "classes": setup.classes, "fold_of_slide": folds}, indent=1, sort_keys=True))

    def measure(self, backbone, epoch: int) -> dict:
        started = time.perf_counter()
        X_all = slide_embeddings(backbone, self.loader, self.index, self.device, self.embed_dim)
        scores = knn_scores(self.setup, X_all[self.setup.slide_rows])
        return {"epoch": int(epoch), **scores, **self.setup.describe(), "representation": "region_mean",
                "seconds": round(time.perf_counter() - started, 3)}
