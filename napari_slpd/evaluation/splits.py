"""Train/test folds for evaluation: stratified by label, grouped by case, seeded; or given by the labels file.

Cross-validation folds come from scikit-learn's ``StratifiedGroupKFold(shuffle=True, random_state=seed)``:
all slides of a case fall into one fold (no patient is in train and test), and class proportions are
kept as well as the grouping allows. The number of folds is chosen from the data unless asked for: at
most 10, at most the number of cases of the smallest class (so every test fold holds every class) and of
cases overall; a class with fewer than 2 cases makes the task impossible to cross-validate. Survival tasks are stratified by event. Folds given by the labels
file (a ``split`` column or Patho-Bench's ``fold_i`` columns) are used as they are; a case that the
given folds put on both sides of a fold is an error.

```python
from napari_slpd.evaluation.splits import choose_folds, make_folds, given_folds, inner_validation_split
n, why = choose_folds(y, cases, requested=None)   # None: from the data (at most 10), why: the notice or None
folds = make_folds(y, cases, n_folds=n, seed=0, class_names=["LUAD", "LUSC"])   # list[Fold]
fold.train, fold.test, fold.val      # int index arrays into y / cases
fit, val = inner_validation_split(fold.train, y, cases, seed=0)                 # ABMIL early stopping
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_slpd.evaluation.errors import LabelsError

DEFAULT_FOLDS = 10
INNER_VALIDATION_FRACTION = 0.2


@dataclass
class Fold:
    """One train/test split; ``val`` holds given validation slides (Patho-Bench), usually empty."""

    index: int
    name: str
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "n_train": int(self.train.size),
                "n_test": int(self.test.size), "n_val": int(self.val.size)}


def _members_per_class(y: np.ndarray, cases: np.ndarray) -> dict[int, tuple[int, int]]:
    """class -> (number of cases, number of slides)."""
    out = {}
    for c in np.unique(y):
        sel = y == c
        out[int(c)] = (len(set(cases[sel].tolist())), int(sel.sum()))
    return out


def choose_folds(y, cases, requested: int | None = None, class_names=None, task: str = "task"
                 ) -> tuple[int, str | None]:
    """(number of folds, notice or None). ``requested`` None: at most DEFAULT_FOLDS, at most the fewest cases
    of a class; the notice says why fewer than DEFAULT_FOLDS. ``requested``: that
    number, checked by make_folds. Raises LabelsError when no 2-fold cross-validation is possible."""
    if requested is not None:
        return int(requested), None
    y = np.asarray(y)
    cases = np.asarray(cases, dtype=object)
    members = _members_per_class(y, cases)
    names = class_names if class_names is not None else [str(c) for c in range(max(members) + 1)]
    smallest_class = min(members, key=lambda c: members[c][0])
    fewest = members[smallest_class][0]  # never more than the cases in all
    n = min(DEFAULT_FOLDS, fewest)
    if n < 2:
        raise LabelsError(
            f"task {task!r}: class {names[smallest_class]!r} has {fewest} case(s) "
            f"({members[smallest_class][1]} slide(s)); cross-validation needs at least 2 cases of every class: "
            "label more cases of that class or leave it out of the labels"
        )
    if n == DEFAULT_FOLDS:
        return n, None
    return n, (f"task {task!r}: {n} folds instead of {DEFAULT_FOLDS} ({names[smallest_class]!r} has {fewest} "
               "case(s); every test fold holds some of each)")


def make_folds(y, cases, n_folds: int = DEFAULT_FOLDS, seed: int = 0, class_names=None,
               task: str = "task") -> list[Fold]:
    """``n_folds`` stratified folds grouped by case (see the module docstring).

    Raises LabelsError when a class has fewer cases than folds (a fold would lack it), naming the class
    and how many folds would work.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y)
    cases = np.asarray(cases, dtype=object)
    n_folds = int(n_folds)
    if n_folds < 2:
        raise LabelsError(f"cross-validation needs at least 2 folds, not {n_folds}")
    members = _members_per_class(y, cases)
    short = [(c, n_cases, n_slides) for c, (n_cases, n_slides) in members.items() if n_cases < n_folds]
    if short:
        names = class_names if class_names is not None else [str(c) for c in range(max(members) + 1)]
        parts = "; ".join(
            f"class {names[c]!r} has {n_cases} case(s) ({n_slides} slide(s))" for c, n_cases, n_slides in short
        )
        smallest = min(n for _, n, _ in short)
        raise LabelsError(
            f"task {task!r}: {parts}, fewer than the {n_folds} folds, so some test folds would lack the class. "
            f"Use --folds {max(2, smallest)} or fewer, or label more cases of that class"
            if smallest >= 2 else
            f"task {task!r}: {parts}, fewer than the {n_folds} folds; a class needs at least 2 cases to be "
            "evaluated: label more cases of that class or leave it out of the labels"
        )
    n_cases = len(set(cases.tolist()))
    if n_cases < n_folds:
        raise LabelsError(f"task {task!r}: {n_cases} cases cannot fill {n_folds} folds; use --folds {n_cases}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    folds = []
    for i, (train, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups=cases)):
        folds.append(Fold(i, f"fold_{i}", np.sort(train), np.sort(test), np.empty(0, np.int64)))
    return folds


def given_folds(roles_per_fold, cases, names=None, task: str = "task") -> list[Fold]:
    """Folds from per-slide roles ("train"/"test"/"val"/""), one array per fold, as a labels file gave them."""
    cases = np.asarray(cases, dtype=object)
    folds = []
    for i, roles in enumerate(roles_per_fold):
        roles = np.asarray(roles, dtype=object)
        name = names[i] if names is not None else f"fold_{i}"
        train, test, val = (np.flatnonzero(roles == r) for r in ("train", "test", "val"))
        if test.size == 0 or train.size == 0:
            raise LabelsError(
                f"task {task!r}: given fold {name} has {train.size} train and {test.size} test slides among the "
                "slides that can be evaluated; it needs both"
            )
        both = sorted(set(cases[train].tolist()) & set(cases[test].tolist()))
        if both:
            raise LabelsError(
                f"given fold {name} puts case(s) {', '.join(map(str, both[:5]))} in both train and test; "
                "fix the split file (all slides of a case belong to one side)"
            )
        folds.append(Fold(i, name, train, test, val))
    return folds


def inner_validation_split(train, y, cases, seed: int = 0, fraction: float = INNER_VALIDATION_FRACTION):
    """(fit, val) index arrays inside ``train``: about ``fraction`` of its cases for early stopping,
    stratified and grouped by case when the classes allow it, grouped only otherwise."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    train = np.asarray(train)
    y_train = np.asarray(y)[train]
    groups = np.asarray(cases, dtype=object)[train]
    n_splits = max(2, int(round(1.0 / fraction)))
    members = _members_per_class(y_train, groups)
    if all(n_cases >= n_splits for n_cases, _ in members.values()):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
        fit, val = next(splitter.split(np.zeros(train.size), y_train, groups=groups))
    elif len(set(groups.tolist())) >= 2:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=int(seed))
        fit, val = next(splitter.split(np.zeros(train.size), y_train, groups=groups))
    else:
        return train, train[:0]
    return train[np.sort(fit)], train[np.sort(val)]


def test_rows(folds: list[Fold]) -> tuple[np.ndarray, np.ndarray]:
    """(fold index [R], slide index [R]): one row per (fold, test slide). A slide tested by several folds
    (Monte-Carlo splits) has one row per fold; a slide no fold tests (training only) has none."""
    if not folds:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    fold = np.concatenate([np.full(f.test.size, f.index, np.int64) for f in folds])
    index = np.concatenate([np.asarray(f.test, np.int64) for f in folds])
    return fold, index
