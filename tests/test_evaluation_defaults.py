"""Evaluation on default settings and on every kind of split file (issue 25): folds chosen from the data,
tasks that cannot be evaluated skipped with their reason, the paired difference is the point difference,
Monte-Carlo split files (overlapping test sets) and a single train/test split evaluated on each fold's own
test queries, silent drops reported, unknown slide ids skipped with a count, no library INFO lines.
Figures are checked against scikit-learn / an independent numpy computation."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from napari_slpd.evaluation.engine import EvaluationConfig, evaluate
from napari_slpd.evaluation.errors import LabelsError
from napari_slpd.evaluation.labels import read_labels
from napari_slpd.evaluation.representations import load_representation
from napari_slpd.evaluation.splits import choose_folds, make_folds
from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    spec = SyntheticCohortSpec(n_slides=36, n_classes=3, separation=1.0, noise=0.4, seed=4, regions=(10, 16), k=3)
    cohort, labels = write_embedding_cohort(root / "cohort", spec)
    with open(labels, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return cohort, labels, rows


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t" if str(path).endswith(".tsv") else ",")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _case_counts(y, cases):
    return {c: len(set(np.asarray(cases)[np.asarray(y) == c].tolist())) for c in set(np.asarray(y).tolist())}


# -- 1. folds from the data; tasks that cannot be evaluated are skipped -----------------------------------


def test_folds_are_chosen_from_the_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_cases = int(rng.integers(6, 40))
        case_y = rng.integers(0, 3, n_cases)
        case_y[:3] = [0, 1, 2]
        slides = rng.integers(1, 4, n_cases)
        cases = np.repeat([f"P{i}" for i in range(n_cases)], slides).astype(object)
        y = np.repeat(case_y, slides)
        expected = min(10, min(_case_counts(y, cases).values()))
        if expected < 2:
            with pytest.raises(LabelsError, match="needs at least 2 cases of every class"):
                choose_folds(y, cases, None, class_names=["a", "b", "c"], task="t")
            continue
        n, notice = choose_folds(y, cases, None, class_names=["a", "b", "c"], task="t")
        assert n == expected
        assert (notice is None) == (expected == 10)
        if notice:
            assert f"{expected} folds instead of 10" in notice
        folds = make_folds(y, cases, n, seed=1)
        for fold in folds:  # every test fold holds every class, no case on both sides
            assert set(y[fold.test].tolist()) == {0, 1, 2}
            assert not set(cases[fold.train].tolist()) & set(cases[fold.test].tolist())
    assert choose_folds([0, 1], ["a", "b"], requested=7) == (7, None)


def test_a_task_that_cannot_be_evaluated_is_skipped_unless_asked_alone(small, tmp_path):
    cohort, _, rows = small
    # "rare" has one case: that task cannot be cross-validated; "class" can.
    first_case = rows[0]["case_id"]
    table = [[r["slide_id"], r["case_id"], r["class"], "rare" if r["case_id"] == first_case else "common"]
             for r in rows]
    labels = _write(tmp_path / "labels.csv", ["slide_id", "case_id", "class", "subtype"], table)
    result = evaluate(cohort, labels, EvaluationConfig(representations=["region_mean"], protocols=["knn"],
                                                       n_bootstrap=10))
    assert set(result.tasks) == {"class"}
    assert "subtype" in result.report.skipped_tasks
    assert "'rare' has 1 case(s)" in result.report.skipped_tasks["subtype"]
    assert any(line.startswith("task subtype skipped:") for line in result.report.lines())
    # folds from the data: the smallest class of "class" decides
    info = result.tasks["class"]
    expected = min(10, min(_case_counts(info.data.y, info.data.cases).values()))
    assert len(info.data.folds) == expected
    assert result.to_dict()["slides"]["skipped_tasks"]["subtype"]
    with pytest.raises(LabelsError, match="'rare' has 1 case"):
        evaluate(cohort, labels, EvaluationConfig(tasks=["subtype"], representations=["region_mean"],
                                                  protocols=["knn"], n_bootstrap=10))


# -- 2. paired comparison: the point difference ------------------------------------------------------------


def test_paired_difference_is_the_point_difference(small):
    from sklearn.metrics import roc_auc_score

    cohort, labels, _ = small
    result = evaluate(cohort, labels, EvaluationConfig(tasks=["class"], representations=["region_mean", "patch_mean"],
                                                       protocols=["knn"], n_folds=4, n_bootstrap=200))
    (comp,) = result.comparisons
    y = result.tasks["class"].data.y

    def pooled_auc(name):
        p = result.result("class", name, "knn").predictions
        return roc_auc_score(y[p.index], p.proba, multi_class="ovr")

    point = pooled_auc(comp.a) - pooled_auc(comp.b)
    assert comp.difference == pytest.approx(point, abs=1e-9)
    assert comp.ci_low <= comp.ci_high


# -- 3./4. split files: each fold on its own test set; only test slides are queries ----------------------------


def _independent_retrieval(X, y, cases, queries, k=5):
    """mAP@k and top1 per query by brute force: nearest slides of other cases by Euclidean distance."""
    out = []
    for q in queries:
        d = np.sqrt(((X - X[q]) ** 2).sum(1))
        d[cases == cases[q]] = np.inf
        order = np.argsort(d, kind="stable")[:k]
        hits = (y[order] == y[q]).astype(float)
        precision = np.cumsum(hits) / np.arange(1, k + 1)
        out.append(((precision * hits).sum() / k, hits[0]))
    return np.array(out)


def test_monte_carlo_split_file_each_fold_on_its_own_test_set(small, tmp_path):
    cohort, _, rows = small
    case_ids = sorted({r["case_id"] for r in rows})
    rng = np.random.default_rng(7)
    tests = [set(rng.choice(case_ids, 5, replace=False).tolist()) for _ in range(4)]
    assert set.intersection(*[tests[0], tests[1] | tests[2] | tests[3]])  # the test sets overlap
    table = [[r["case_id"], r["slide_id"], r["class"]] + ["test" if r["case_id"] in t else "train" for t in tests]
             for r in rows]
    labels = _write(tmp_path / "k=all.tsv", ["case_id", "slide_id", "class"] + [f"fold_{i}" for i in range(4)],
                    table)
    result = evaluate(cohort, labels, EvaluationConfig(representations=["region_mean"], protocols=["retrieval", "knn"],
                                                       n_bootstrap=10))
    info = result.tasks["class"]
    ids = info.data.slide_ids
    X = load_representation(cohort, "region_mean", ids).take(ids).vectors
    y, cases = info.data.y, np.asarray(info.data.cases)
    r = result.result("class", "region_mean", "retrieval")
    assert [f.name for f in r.folds] == ["fold_0", "fold_1", "fold_2", "fold_3"]
    pooled = []
    for fold, case_set in zip(r.folds, tests):
        queries = [i for i, c in enumerate(cases) if c in case_set]
        expect = _independent_retrieval(X, y, cases, queries)
        assert fold.n_test == len(queries)
        assert fold.metrics["mAP@5"] == pytest.approx(expect[:, 0].mean(), abs=1e-12)
        assert fold.metrics["top1_acc"] == pytest.approx(expect[:, 1].mean(), abs=1e-12)
        pooled.append(expect)
    assert r.summary["mAP@5"]["pooled"] == pytest.approx(np.concatenate(pooled)[:, 0].mean(), abs=1e-12)
    # KNN on the same file: every fold's predictions are its own test slides
    knn = result.result("class", "region_mean", "knn")
    assert [f.n_test for f in knn.folds] == [f.n_test for f in r.folds]


def test_single_split_column_counts_only_test_queries(small, tmp_path):
    cohort, _, rows = small
    case_ids = sorted({r["case_id"] for r in rows})
    test_cases = set(case_ids[::3])
    table = [[r["slide_id"], r["case_id"], r["class"], "test" if r["case_id"] in test_cases else "train"]
             for r in rows]
    labels = _write(tmp_path / "labels.csv", ["slide_id", "case_id", "class", "split"], table)
    result = evaluate(cohort, labels, EvaluationConfig(representations=["region_mean"], protocols=["retrieval"],
                                                       n_bootstrap=10))
    info = result.tasks["class"]
    ids = info.data.slide_ids
    X = load_representation(cohort, "region_mean", ids).take(ids).vectors
    cases = np.asarray(info.data.cases)
    queries = [i for i, c in enumerate(cases) if c in test_cases]
    expect = _independent_retrieval(X, info.data.y, cases, queries)
    r = result.result("class", "region_mean", "retrieval")
    assert r.predictions.index.size == len(queries)
    assert r.summary["mAP@5"]["pooled"] == pytest.approx(expect[:, 0].mean(), abs=1e-12)
    assert r.summary["top1_acc"]["pooled"] == pytest.approx(expect[:, 1].mean(), abs=1e-12)


# -- 5. silent drops ---------------------------------------------------------------------------------------------


def test_missing_labels_are_counted_and_two_labels_per_case_rejected(small, tmp_path):
    cohort, _, rows = small
    table = [[r["slide_id"], r["case_id"], "" if i in (1, 5, 9) else r["class"]] for i, r in enumerate(rows)]
    labels = _write(tmp_path / "labels.csv", ["slide_id", "case_id", "class"], table)
    result = evaluate(cohort, labels, EvaluationConfig(representations=["region_mean"], protocols=["knn"],
                                                       n_bootstrap=10))
    assert result.report.without_label == {"class": 3}
    assert len(result.tasks["class"].data.slide_ids) == len(rows) - 3
    assert any("3 of these slides have no value" in line for line in result.report.lines())

    conflict = [[r["slide_id"], r["case_id"], r["class"]] for r in rows]
    i = next(j for j in range(1, len(rows)) if rows[j]["case_id"] == rows[j - 1]["case_id"])
    other = next(c for c in {r["class"] for r in rows} if c != rows[i]["class"])
    conflict[i][2] = other
    path = _write(tmp_path / "conflict.csv", ["slide_id", "case_id", "class"], conflict)
    with pytest.raises(LabelsError, match=rf"gives 1 case\(s\) more than one label: {rows[i]['case_id']}"):
        read_labels(path)


# -- 6./7. the command line: unknown ids skipped with a count; no library INFO lines ----------------------------


def test_cli_skips_unknown_ids_and_prints_no_library_info(small, tmp_path):
    cohort, _, rows = small
    table = [[r["slide_id"], r["case_id"], r["class"]] for r in rows] + [["other-study-1", "X1", "a"],
                                                                        ["other-study-2", "X2", "b"]]
    labels = _write(tmp_path / "labels.csv", ["slide_id", "case_id", "class"], table)
    base = [sys.executable, "-m", "napari_slpd", "evaluate", str(cohort.root), "--labels", str(labels),
            "--repr", "prototype_set", "--protocol", "knn", "--bootstrap", "10", "--quiet"]
    run = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "2 not in the cohort, skipped: other-study-1, other-study-2" in run.stdout
    assert not [line for line in run.stderr.splitlines() if line.startswith("INFO")], run.stderr
    strict = subprocess.run(base + ["--require-known"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 2 and "not in the cohort: other-study-1" in strict.stderr
