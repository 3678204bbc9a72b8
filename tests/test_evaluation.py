"""Slide-level evaluation: protocols reach what separable data allows, chance on shuffled labels, figures
equal a direct scikit-learn / scikit-survival computation on the exported embeddings and folds."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from napari_slpd.evaluation import metrics as M
from napari_slpd.evaluation.engine import EvaluationConfig, evaluate
from napari_slpd.evaluation.errors import RepresentationError
from napari_slpd.evaluation.labels import Task
from napari_slpd.evaluation.protocols import AbmilConfig, KnnConfig, LinearConfig, TaskData, knn_vectors, linear_probe
from napari_slpd.evaluation.report import write_report
from napari_slpd.evaluation.splits import make_folds
from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    root = tmp_path_factory.mktemp("separable")
    spec = SyntheticCohortSpec(n_slides=60, n_classes=3, separation=3.0, noise=0.3, seed=1, hazard_scale=10.0)
    return write_embedding_cohort(root / "cohort", spec)


@pytest.fixture(scope="module")
def separable_result(separable, tmp_path_factory):
    cohort, labels = separable
    config = EvaluationConfig(n_folds=5, n_bootstrap=100, representations=["region_mean", "prototype_set"], seed=0)
    result = evaluate(cohort, labels, config)
    out = write_report(result, tmp_path_factory.mktemp("report") / "out", cohort=cohort)
    return result, out


def test_separable_cohort_every_protocol(separable_result):
    result, _ = separable_result
    got = {(r.representation, r.protocol): r for r in result.results}
    for key in [("region_mean", "knn"), ("region_mean", "linear"), ("region_mean", "abmil"),
                ("prototype_set", "knn")]:
        assert got[key].summary["auc"]["mean"] >= 0.95, (key, got[key].summary["auc"])
        assert got[key].summary["auc"]["ci_low"] <= got[key].summary["auc"]["pooled"] <= got[key].summary["auc"]["ci_high"]
    assert got[("region_mean", "retrieval")].summary["top1_acc"]["mean"] >= 0.95
    assert got[("prototype_set", "retrieval")].summary["top5_acc"]["mean"] >= 0.95
    assert got[("region_mean", "cox")].summary["c_index"]["mean"] >= 0.75
    assert len(got[("region_mean", "knn")].folds) == 5
    # every pair of representations compared on the primary metric of each protocol they share
    pairs = {(c.protocol, c.a, c.b) for c in result.comparisons}
    assert ("knn", "region_mean", "prototype_set") in pairs and ("retrieval", "region_mean", "prototype_set") in pairs


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_knn_and_linear_equal_direct_sklearn_on_exported_data(separable_result):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, out = separable_result
    results = json.loads((out / "results.json").read_text())
    emb = np.load(out / "embeddings" / "region_mean.npz")
    ids = [str(s) for s in emb["slide_ids"]]
    X = emb["vectors"]
    labels = {row["slide_id"]: row["class"] for row in _read_csv(separable_result[0].labels_path)}
    classes = results["tasks"]["class"]["classes"]
    y = np.array([classes.index(labels[s]) for s in ids])
    folds = {}
    for row in _read_csv(out / "folds.csv"):
        if row["task"] == "class":
            folds.setdefault(int(row["fold"]), {"train": [], "test": []}).setdefault(row["role"], []).append(
                ids.index(row["slide_id"]))
    models = {"knn": lambda: KNeighborsClassifier(n_neighbors=5),
              "linear": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))}
    checked = 0
    for protocol, build in models.items():
        entry = next(r for r in results["results"]
                     if r["task"] == "class" and r["representation"] == "region_mean" and r["protocol"] == protocol)
        for fold in entry["folds"]:
            train, test = np.array(folds[fold["index"]]["train"]), np.array(folds[fold["index"]]["test"])
            model = build().fit(X[train], y[train])
            proba = model.predict_proba(X[test])
            pred = model.predict(X[test])
            expected = {
                "auc": roc_auc_score(y[test], proba, multi_class="ovr", average="macro"),
                "balanced_accuracy": balanced_accuracy_score(y[test], pred),
                "weighted_f1": f1_score(y[test], pred, average="weighted"),
            }
            for name, value in expected.items():
                assert fold["metrics"][name] == pytest.approx(value, abs=1e-6), (protocol, fold["index"], name)
                checked += 1
    assert checked == 2 * 5 * 3


def test_c_index_equals_scikit_survival(separable_result):
    from sksurv.metrics import concordance_index_censored

    result, out = separable_result
    results = json.loads((out / "results.json").read_text())
    truth = {row["slide_id"]: row for row in _read_csv(result.labels_path)}
    rows = [r for r in _read_csv(out / "predictions.csv") if r["protocol"] == "cox" and r["representation"] == "region_mean"]
    entry = next(r for r in results["results"] if r["protocol"] == "cox" and r["representation"] == "region_mean")
    for fold in entry["folds"]:
        mine = [r for r in rows if int(r["fold"]) == fold["index"]]
        event = np.array([truth[r["slide_id"]]["event"] == "1" for r in mine])
        time = np.array([float(truth[r["slide_id"]]["time"]) for r in mine])
        risk = np.array([float(r["prediction"]) for r in mine])
        assert fold["metrics"]["c_index"] == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-6)


def test_report_folder_contents(separable_result):
    _, out = separable_result
    names = {p.name for p in (out / "plots").iterdir()}
    assert {"roc_class_knn.png", "confusion_class_linear.png", "km_survival_cox.png",
            "retrieval_class_prototype_set.png"} <= names
    html = (out / "report.html").read_text()
    assert "Paired comparisons" in html and "plots/roc_class_knn.png" in html
    proto = np.load(out / "embeddings" / "prototype_set.npz")
    assert proto["counts"].sum() == proto["prototypes"].shape[0]
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_shuffled_labels_give_chance_auc():
    """20 label shuffles: the mean KNN and linear AUC is chance (0.5 +/- 0.05)."""
    rng = np.random.default_rng(0)
    n = 80
    X = rng.normal(size=(n, 8)) + np.repeat(rng.normal(size=(4, 8)) * 2, n // 4, axis=0)  # structure, no signal
    cases = np.array([f"P{i // 2}" for i in range(n)], dtype=object)
    case_labels = np.arange(n // 2) % 2
    knn_aucs, linear_aucs = [], []
    for seed in range(20):
        y = np.repeat(np.random.default_rng(seed).permutation(case_labels), 2)
        data = TaskData(Task("shuffled", "classification", ["a", "b"]), [str(i) for i in range(n)], cases,
                        make_folds(y, cases, 10, seed=seed), y=y, seed=seed)
        for fn, config, store in ((knn_vectors, KnnConfig(), knn_aucs), (linear_probe, LinearConfig(), linear_aucs)):
            preds = fn(data, X, config)
            store.append(np.mean([M.macro_ovr_auc(y[preds.index[preds.fold == f]], preds.proba[preds.fold == f])
                                  for f in range(10)]))
    assert abs(np.mean(knn_aucs) - 0.5) <= 0.05, np.mean(knn_aucs)
    assert abs(np.mean(linear_aucs) - 0.5) <= 0.05, np.mean(linear_aucs)


def test_never_computed_representation_says_how(tmp_path):
    cohort, labels = write_embedding_cohort(tmp_path / "c", SyntheticCohortSpec(n_slides=12, n_classes=2),
                                            prototypes=False)
    with pytest.raises(RepresentationError, match=r"never computed.*run `slpd prototypes"):
        evaluate(cohort, labels, EvaluationConfig(representations=["prototype_set"], n_folds=2, n_bootstrap=10))
    with pytest.raises(RepresentationError, match=r"never computed.*`slpd proalign"):
        evaluate(cohort, labels, EvaluationConfig(representations=["proalign_concat"], n_folds=2, n_bootstrap=10))
    with pytest.raises(RepresentationError, match="unknown representation 'umap'.*region_mean"):
        evaluate(cohort, labels, EvaluationConfig(representations=["umap"], n_folds=2, n_bootstrap=10))


def test_metrics_equal_sklearn():
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

    rng = np.random.default_rng(3)
    for n_classes in (2, 4):
        y = rng.integers(0, n_classes, 80)
        proba = rng.dirichlet(np.ones(n_classes), 80)
        proba[:10] = proba[10:20]  # ties
        pred = proba.argmax(1)
        got = M.classification_metrics(y, proba, ordinal=True)
        auc = roc_auc_score(y, proba[:, 1]) if n_classes == 2 else roc_auc_score(y, proba, multi_class="ovr")
        assert got["auc"] == pytest.approx(auc, abs=1e-12)
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
        assert got["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-12)
        assert got["quadratic_kappa"] == pytest.approx(
            cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(n_classes)), abs=1e-12)


def test_retrieval_metrics_follow_patho_bench():
    # Query label 1; retrieved labels [1, 0, 1, 0, 0]: top1 hit; mv@3 = 1 (two of three); mv@5 = 0;
    # mAP@3 = (1/1 + 2/3) / 3; mAP@5 = (1/1 + 2/3) / 5 (Patho-Bench divides by k).
    got = M.retrieval_per_query(np.array([[1, 0, 1, 0, 0], [0, 1, 0, 1, 2]]), np.array([1, 2]), ks=(1, 3, 5))
    assert got["top1_acc"].tolist() == [1, 0] and got["top5_acc"].tolist() == [1, 1]
    assert got["mv@3_acc"].tolist() == [1, 0] and got["mv@5_acc"].tolist() == [0, 0]
    assert got["mAP@3"][0] == pytest.approx((1 + 2 / 3) / 3) and got["mAP@5"][0] == pytest.approx((1 + 2 / 3) / 5)
    assert got["mAP@5"][1] == pytest.approx((1 / 5) / 5)
    tie = M.retrieval_per_query(np.array([[0, 1, 2]]), np.array([2]), ks=(3,))  # three modes: a tie counts
    assert tie["mv@3_acc"].tolist() == [1]


def test_evaluation_is_reproducible(separable):
    cohort, labels = separable
    config = EvaluationConfig(n_folds=3, n_bootstrap=30, representations=["region_mean"], protocols=["knn", "abmil"],
                              abmil=AbmilConfig(epochs=3))
    a, b = evaluate(cohort, labels, config), evaluate(cohort, labels, config)
    for ra, rb in zip(a.results, b.results):
        assert ra.summary == rb.summary
