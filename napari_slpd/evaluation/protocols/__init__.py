"""Evaluation protocols (SPEC section 6). Each takes a task's slides, labels and folds (TaskData) and a
representation's data and returns test predictions (Predictions); metrics are computed from those by the
engine, so every protocol reports the same way.

| protocol    | task           | needs          | module       |
|-------------|----------------|----------------|--------------|
| ``knn``       | classification | vector or set  | knn.py       |
| ``linear``    | classification | vector         | linear.py    |
| ``abmil``     | classification | bag            | abmil.py     |
| ``cox``       | survival       | vector         | survival.py  |
| ``retrieval`` | classification | vector or set  | retrieval.py |
"""

from __future__ import annotations

from dataclasses import dataclass

from napari_slpd.evaluation.protocol_names import PROTOCOLS  # noqa: F401 (re-exported)
from napari_slpd.evaluation.protocols.abmil import AbmilConfig, abmil
from napari_slpd.evaluation.protocols.common import Predictions, TaskData
from napari_slpd.evaluation.protocols.knn import KnnConfig, knn_sets, knn_vectors
from napari_slpd.evaluation.protocols.linear import LinearConfig, linear_model, linear_probe
from napari_slpd.evaluation.protocols.retrieval import RetrievalConfig, retrieval_sets, retrieval_vectors
from napari_slpd.evaluation.protocols.survival import CoxConfig, cox, cox_model



@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    task_kind: str  # "classification" or "survival"
    needs: tuple[str, ...]  # representation kinds it can use, preferred first
    description: str


SPECS = {
    "knn": ProtocolSpec("knn", "classification", ("vector", "set"), "k nearest neighbours (k=5), 10-fold CV"),
    "linear": ProtocolSpec("linear", "classification", ("vector",), "logistic regression on slide embeddings"),
    "abmil": ProtocolSpec("abmil", "classification", ("bag",), "gated attention MIL on region embeddings"),
    "cox": ProtocolSpec("cox", "survival", ("vector",), "Cox model on slide embeddings, c-index"),
    "retrieval": ProtocolSpec("retrieval", "classification", ("vector", "set"),
                              "leave-one-case-out retrieval: top-k, majority vote, mAP@k"),
}

__all__ = [
    "PROTOCOLS", "SPECS", "ProtocolSpec", "Predictions", "TaskData", "AbmilConfig", "KnnConfig", "LinearConfig",
    "CoxConfig", "RetrievalConfig", "abmil", "knn_sets", "knn_vectors", "linear_probe", "linear_model",
    "retrieval_sets", "retrieval_vectors", "cox", "cox_model",
]
