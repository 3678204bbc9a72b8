"""Labels files and folds for slide-level evaluation: every bad input gets its own message."""

from __future__ import annotations

import numpy as np
import pytest

from napari_slpd.errors import SlpdError
from napari_slpd.evaluation.errors import LabelsError
from napari_slpd.evaluation.labels import LabelsConfig, match_cohort, read_labels
from napari_slpd.evaluation.splits import given_folds, inner_validation_split, make_folds


def write(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_are_slpd_errors():
    assert issubclass(LabelsError, SlpdError)


def test_reads_tasks_cases_survival_and_ordinal(tmp_path):
    path = write(tmp_path, "slide_id,case_id,subtype,grade,time,event\n"
                           "a,P1,LUAD,1,10,1\nb,P4,LUAD,2,12.5,0\nc,P2,LUSC,3,3,dead\nd,P3,LUSC,,4,alive\n")
    table = read_labels(path)
    assert table.slide_ids == ["a", "b", "c", "d"]
    assert table.case_ids == ["P1", "P4", "P2", "P3"]
    assert set(table.tasks) == {"subtype", "grade", "survival"}
    assert table.tasks["subtype"].classes == ["LUAD", "LUSC"] and not table.tasks["subtype"].ordinal
    assert table.tasks["grade"].ordinal and table.tasks["grade"].classes == ["1", "2", "3"]
    mask, y = table.task_values("grade")
    assert mask.tolist() == [True, True, True, False] and y[:3].tolist() == [0, 1, 2]
    mask, time, event = table.survival_values()
    assert mask.all() and time.tolist() == [10, 12.5, 3, 4] and event.tolist() == [True, False, True, False]


def test_tsv_and_configurable_survival_names(tmp_path):
    path = write(tmp_path, "slide_id\tlabel\tOS_days\tOS_event\na\tx\t5\t1\nb\ty\t6\t0\n", "l.tsv")
    table = read_labels(path, LabelsConfig(time_col="OS_days", event_col="OS_event"))
    assert set(table.tasks) == {"label", "survival"}


def test_patho_bench_split_file(tmp_path):
    path = write(tmp_path, "case_id\tslide_id\tsubtype\tfold_0\tfold_1\n"
                           "P1\ta\tx\ttrain\ttest\nP1\tb\tx\ttrain\ttest\nP2\tc\ty\ttest\ttrain\n"
                           "P3\td\ty\tval\ttrain\nP4\te\tx\ttest\ttrain\n", "k=all.tsv")
    table = read_labels(path)
    assert table.source == "patho-bench" and [f.name for f in table.given_folds] == ["fold_0", "fold_1"]
    folds = given_folds([f.roles for f in table.given_folds], table.case_ids)
    assert folds[0].test.tolist() == [2, 4] and folds[0].val.tolist() == [3] and folds[1].test.tolist() == [0, 1]


def test_split_column_with_fold_numbers(tmp_path):
    path = write(tmp_path, "slide_id,label,split\na,x,0\nb,y,0\nc,x,1\nd,y,1\n")
    table = read_labels(path)
    assert len(table.given_folds) == 2
    assert table.given_folds[1].roles.tolist() == ["train", "train", "test", "test"]


def test_unknown_slide_ids_are_listed(tmp_path):
    path = write(tmp_path, "slide_id,label\na,x\nb,y\nghost1,x\nghost2,y\n")
    with pytest.raises(LabelsError, match=r"2 slide id\(s\).*not in the cohort: ghost1, ghost2"):
        match_cohort(read_labels(path), ["a", "b"], ["a", "b"], allow_unknown=False)
    table, report = match_cohort(read_labels(path), ["a", "b"], ["a", "b"])  # the default: skipped, counted
    assert table.slide_ids == ["a", "b"] and report.unknown == ["ghost1", "ghost2"]
    assert "2 not in the cohort, skipped: ghost1, ghost2" in report.lines()


def test_slides_without_features_are_skipped_and_counted(tmp_path):
    path = write(tmp_path, "slide_id,label\na,x\nb,y\nc,x\nd,y\n")
    table, report = match_cohort(read_labels(path), ["a", "b", "c", "d"], ["a", "b", "c"])
    assert table.slide_ids == ["a", "b", "c"]
    assert report.without_features == ["d"]
    assert any("1 without features, skipped" in line and "d" in line for line in report.lines())


def test_class_with_fewer_members_than_folds(tmp_path):
    y = np.array([0] * 20 + [1] * 3)
    cases = np.array([f"c{i}" for i in range(23)], dtype=object)
    with pytest.raises(LabelsError, match=r"class 'rare' has 3 case\(s\).*fewer than the 10 folds.*--folds 3"):
        make_folds(y, cases, n_folds=10, class_names=["common", "rare"], task="subtype")


def test_non_numeric_survival_times(tmp_path):
    path = write(tmp_path, "slide_id,time,event\na,12,1\nb,about a year,0\nc,3,1\n")
    with pytest.raises(LabelsError, match=r"must be numbers; not numeric: b: 'about a year'"):
        read_labels(path)


def test_bad_events_and_half_a_survival_pair(tmp_path):
    with pytest.raises(LabelsError, match="events in column 'event'"):
        read_labels(write(tmp_path, "slide_id,time,event\na,1,maybe\nb,2,1\n"))
    with pytest.raises(LabelsError, match="has a 'time' column but no 'event' column"):
        read_labels(write(tmp_path, "slide_id,label,time\na,x,1\nb,y,2\n"))


def test_label_column_with_one_class(tmp_path):
    with pytest.raises(LabelsError, match="label column 'label' has one class only"):
        read_labels(write(tmp_path, "slide_id,label\na,x\nb,x\n"))
    # ... also when skipping slides leaves one class.
    path = write(tmp_path, "slide_id,label\na,x\nb,x\nc,y\n")
    with pytest.raises(LabelsError, match="has one class only .* among the slides that can be evaluated"):
        match_cohort(read_labels(path), ["a", "b", "c"], ["a", "b"])


def test_other_bad_files(tmp_path):
    with pytest.raises(LabelsError, match="no 'slide_id' column"):
        read_labels(write(tmp_path, "name,label\na,x\n"))
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")
    with pytest.raises(LabelsError, match="different values"):
        read_labels(write(tmp_path, "slide_id,label\na,x\na,y\nb,y\n"))
    with pytest.raises(LabelsError, match="no column 'grade'"):
        read_labels(write(tmp_path, "slide_id,label\na,x\nb,y\n"), LabelsConfig(tasks=["grade"]))


def test_no_case_is_ever_in_two_folds():
    rng = np.random.default_rng(0)
    cases = np.array([f"P{i // 3}" for i in range(150)], dtype=object)  # 3 slides per case
    y = np.repeat(rng.integers(0, 3, 50), 3)
    for seed in range(5):
        folds = make_folds(y, cases, n_folds=10, seed=seed)
        tested = np.concatenate([f.test for f in folds])
        assert np.array_equal(np.sort(tested), np.arange(150))  # every slide tested exactly once
        for fold in folds:
            assert not set(cases[fold.train]) & set(cases[fold.test])
            fit, val = inner_validation_split(fold.train, y, cases, seed=seed)
            assert val.size and not set(cases[fit]) & set(cases[val])


def test_folds_are_seeded():
    cases = np.array([f"P{i}" for i in range(60)], dtype=object)
    y = np.arange(60) % 2
    a = make_folds(y, cases, 5, seed=3)
    b = make_folds(y, cases, 5, seed=3)
    c = make_folds(y, cases, 5, seed=4)
    assert all(np.array_equal(x.test, z.test) for x, z in zip(a, b))
    assert not all(np.array_equal(x.test, z.test) for x, z in zip(a, c))


def test_given_split_with_a_case_on_both_sides(tmp_path):
    with pytest.raises(LabelsError, match="puts case\\(s\\) P1 in both train and test"):
        given_folds([np.array(["train", "test", "train", "test"], dtype=object)], ["P1", "P1", "P2", "P3"])
