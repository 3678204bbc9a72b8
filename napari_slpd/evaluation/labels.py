"""Slide labels for evaluation: a CSV/TSV labels file, or a Patho-Bench split file as it is.

A labels file has one row per slide::

    slide_id,case_id,subtype,grade,time,event,split
    S1,P1,LUAD,2,31.5,1,train
    ...

- ``slide_id`` (required): the cohort's slide ids (``slpd extract`` names slides by file stem).
- ``case_id`` (optional): slides of one patient never straddle train and test. Without it every slide
  is its own case.
- task columns: every other column (or the ones asked for) is a classification task; values are class
  names (text or numbers). Integer-valued columns with 3+ levels are treated as ordinal (grading:
  quadratic kappa is reported); ``LabelsConfig.ordinal`` forces it for other columns.
- survival: a ``time`` and an ``event`` column (names configurable) make a task named ``survival``;
  ``event`` is 1/0, true/false, yes/no, dead/alive.
- ``split`` (optional): ``train``/``test``(/``val``) gives one fixed fold, integers give the test fold of
  each slide (k-fold with given folds).
- Patho-Bench split files (``k=all.tsv``: ``case_id``, ``slide_id``, label columns, ``fold_0`` ... ``fold_N``
  with train/test/val) are read as they are: each ``fold_i`` column is one fold.

Empty cells (or NA, NaN, None) leave that slide out of that task only (counted in the report). With a
``case_id`` column, every slide of a case must carry the same label of a classification task (Patho-Bench
asserts this too); two labels for one case are an error naming the cases. Bad input raises
:class:`~napari_slpd.evaluation.errors.LabelsError` with the rows or values at fault.

```python
from napari_slpd.evaluation.labels import LabelsConfig, read_labels, match_cohort
table = read_labels("labels.csv", LabelsConfig(tasks=["subtype"]))
table, report = match_cohort(table, cohort_ids, ids_with_features)   # unknown ids skipped and counted
table.tasks["subtype"].classes; table.task_values("subtype") -> (mask [N] bool, y [N] int codes)
report.unknown, report.without_features      # lists of slide ids (skipped slides are never silent)
```
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_slpd.evaluation.errors import LabelsError

MISSING = {"", "na", "nan", "none", "null", "n/a"}
_EVENT_TRUE = {"1", "1.0", "true", "yes", "y", "dead", "deceased", "event"}
_EVENT_FALSE = {"0", "0.0", "false", "no", "n", "alive", "censored"}
FOLD_COLUMN = re.compile(r"^fold_(\d+)$")
ROLES = ("train", "test", "val")
SURVIVAL_TASK = "survival"
_LIST_MAX = 10  # ids named in one message


def _listing(items, limit: int = _LIST_MAX) -> str:
    items = list(items)
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass
class LabelsConfig:
    """Column names and task choices. ``tasks=None``: every column that is not an id, split, fold or
    survival column. ``time_col``/``event_col`` name the survival pair (a task named ``survival``)."""

    slide_col: str = "slide_id"
    case_col: str = "case_id"
    split_col: str = "split"
    time_col: str = "time"
    event_col: str = "event"
    tasks: list[str] | None = None
    ordinal: list[str] = field(default_factory=list)
    ignore_columns: list[str] = field(default_factory=list)


@dataclass
class Task:
    """One task of a labels table. ``kind``: "classification" or "survival". Classification: ``classes``
    (sorted; numeric order for numbers) and ``ordinal``."""

    name: str
    kind: str
    classes: list[str] = field(default_factory=list)
    ordinal: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class GivenFold:
    """A fold given by the labels file: the role ("train", "test", "val" or "" = unused) of every slide."""

    name: str
    roles: np.ndarray  # [N] object


@dataclass
class LabelTable:
    """Parsed labels, one row per slide (``slide_ids`` unique, in file order)."""

    path: str
    slide_ids: list[str]
    case_ids: list[str]
    tasks: dict[str, Task]
    columns: dict[str, np.ndarray]  # task name -> [N] raw text (classification) ...
    survival: tuple[np.ndarray, np.ndarray] | None = None  # (time [N] float, nan = missing; event [N] float)
    given_folds: list[GivenFold] | None = None
    has_case_ids: bool = False
    source: str = "labels"  # "labels" or "patho-bench"

    def __len__(self) -> int:
        return len(self.slide_ids)

    def task_values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(mask [N] bool: slide has a value, y [N] int64 class codes, -1 where missing)."""
        task = self.tasks[name]
        if task.kind != "classification":
            raise LabelsError(f"task {name!r} is a {task.kind} task, not a classification task")
        raw = self.columns[name]
        index = {c: i for i, c in enumerate(task.classes)}
        y = np.array([index.get(v, -1) for v in raw], np.int64)
        return y >= 0, y

    def survival_values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask [N] bool, time [N] float, event [N] bool)."""
        if self.survival is None:
            raise LabelsError("the labels file has no survival columns")
        time, event = self.survival
        mask = np.isfinite(time) & np.isfinite(event)
        return mask, np.where(mask, time, 0.0), event > 0.5

    def subset(self, keep: np.ndarray) -> "LabelTable":
        """The rows where ``keep`` (bool [N]) is True, tasks re-validated on the rest."""
        keep = np.asarray(keep, bool)
        ids = [s for s, k in zip(self.slide_ids, keep) if k]
        cases = [c for c, k in zip(self.case_ids, keep) if k]
        columns = {name: values[keep] for name, values in self.columns.items()}
        survival = None if self.survival is None else (self.survival[0][keep], self.survival[1][keep])
        folds = None
        if self.given_folds is not None:
            folds = [GivenFold(f.name, f.roles[keep]) for f in self.given_folds]
        tasks = {}
        for name, task in self.tasks.items():
            if task.kind == "classification":
                present = [c for c in task.classes if np.any(columns[name] == c)]
                tasks[name] = Task(name, task.kind, present, task.ordinal)
            else:
                tasks[name] = task
        return LabelTable(self.path, ids, cases, tasks, columns, survival, folds, self.has_case_ids, self.source)


# -- reading ------------------------------------------------------------------------------------------------


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.exists():
        raise LabelsError(f"labels file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelsError(f"labels file {path} is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise LabelsError(f"labels file {path} is empty")
    first = text.splitlines()[0]
    if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first):
        delimiter = "\t"
    elif ";" in first and "," not in first:
        delimiter = ";"
    else:
        delimiter = ","
    rows = [row for row in csv.reader(text.splitlines(), delimiter=delimiter) if any(c.strip() for c in row)]
    header = [h.strip() for h in rows[0]]
    if header and header[0] == "":
        header[0] = "_index"  # a pandas index column ("Unnamed: 0"), as Patho-Bench drops it
    body = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise LabelsError(
                f"{path}, line {number}: {len(row)} fields where the header has {len(header)}; "
                "check the separator and quoting"
            )
        body.append([c.strip() for c in row])
    if not body:
        raise LabelsError(f"labels file {path} has a header but no rows")
    return header, body


def _is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


def _as_float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _sorted_classes(values: list[str]) -> tuple[list[str], bool]:
    """Class names in a stable order (numeric order when all are numbers) and whether all are integers."""
    unique = sorted(set(values))
    numbers = [_as_float(v) for v in unique]
    if unique and all(n is not None for n in numbers):
        order = sorted(range(len(unique)), key=lambda i: numbers[i])
        integers = all(float(numbers[i]).is_integer() for i in order)
        return [unique[i] for i in order], integers
    return unique, False


def read_labels(path: str | os.PathLike, config: LabelsConfig | None = None) -> LabelTable:
    """Parse a labels CSV/TSV or a Patho-Bench split file (see the module docstring)."""
    config = config or LabelsConfig()
    path = Path(path).expanduser()
    header, body = _read_rows(path)
    col = {name: i for i, name in enumerate(header)}
    if len(col) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise LabelsError(f"{path}: column(s) {', '.join(dupes)} appear more than once in the header")
    if config.slide_col not in col:
        raise LabelsError(
            f"{path} has no {config.slide_col!r} column (columns: {', '.join(header)}); the first line must be a "
            f"header naming the slide id column {config.slide_col!r}"
        )
    fold_cols = sorted((c for c in header if FOLD_COLUMN.match(c)), key=lambda c: int(FOLD_COLUMN.match(c)[1]))
    survival_cols = [c for c in (config.time_col, config.event_col) if c in col]
    if len(survival_cols) == 1:
        missing = ({config.time_col, config.event_col} - set(survival_cols)).pop()
        raise LabelsError(
            f"{path} has a {survival_cols[0]!r} column but no {missing!r} column; survival needs both "
            "(set their names with --time-col / --event-col)"
        )
    reserved = {config.slide_col, config.case_col, config.split_col, "_index", *fold_cols, *survival_cols,
                *config.ignore_columns}
    if config.tasks is None:
        task_cols = [c for c in header if c not in reserved]
    else:
        task_cols = [t for t in config.tasks if t != SURVIVAL_TASK]
        unknown = [t for t in task_cols if t not in col]
        if unknown:
            raise LabelsError(
                f"{path} has no column {', '.join(repr(t) for t in unknown)} (columns: {', '.join(header)})"
            )
        if SURVIVAL_TASK in config.tasks and not survival_cols:
            raise LabelsError(
                f"task 'survival' needs columns {config.time_col!r} and {config.event_col!r} in {path} "
                "(or name them with --time-col / --event-col)"
            )

    # One row per slide; repeated rows must agree (Patho-Bench lists a slide once per sample row).
    first_row: dict[str, list[str]] = {}
    order: list[str] = []
    for number, row in enumerate(body, start=2):
        slide = row[col[config.slide_col]]
        if _is_missing(slide):
            raise LabelsError(f"{path}, line {number}: empty {config.slide_col}")
        if slide in first_row:
            if first_row[slide] != row:
                raise LabelsError(
                    f"{path}: slide {slide!r} appears on several lines with different values (line {number}); "
                    "keep one line per slide"
                )
            continue
        first_row[slide] = row
        order.append(slide)
    rows = [first_row[s] for s in order]
    has_cases = config.case_col in col
    cases = [r[col[config.case_col]] if has_cases and not _is_missing(r[col[config.case_col]]) else s
             for r, s in zip(rows, order)]

    tasks: dict[str, Task] = {}
    columns: dict[str, np.ndarray] = {}
    for name in task_cols:
        raw = np.array(["" if _is_missing(r[col[name]]) else r[col[name]] for r in rows], dtype=object)
        present = [v for v in raw if v != ""]
        if not present:
            raise LabelsError(f"{path}: column {name!r} has no values")
        if has_cases:
            _check_one_label_per_case(path, name, raw, cases)
        classes, integers = _sorted_classes(present)
        ordinal = name in config.ordinal or (integers and len(classes) >= 3)
        tasks[name] = Task(name, "classification", classes, ordinal)
        columns[name] = raw
    survival = None
    if survival_cols and (config.tasks is None or SURVIVAL_TASK in config.tasks):
        survival = _parse_survival(path, rows, order, col[config.time_col], col[config.event_col], config)
        tasks[SURVIVAL_TASK] = Task(SURVIVAL_TASK, "survival")
    if not tasks:
        raise LabelsError(
            f"{path} has no task column: add a label column next to {config.slide_col!r} (or time/event columns "
            "for survival)"
        )
    given = _given_folds(path, rows, order, col, config, fold_cols)
    for name, task in tasks.items():
        if task.kind == "classification" and task.n_classes < 2:
            raise LabelsError(
                f"{path}: label column {name!r} has one class only ({task.classes[0]!r}); a task needs at "
                "least two classes"
            )
    return LabelTable(str(path), order, cases, tasks, columns, survival, given, has_cases,
                      "patho-bench" if fold_cols else "labels")


def _check_one_label_per_case(path, name: str, raw: np.ndarray, cases: list[str]) -> None:
    seen: dict[str, set] = {}
    for value, case in zip(raw, cases):
        if value != "":
            seen.setdefault(case, set()).add(value)
    mixed = {c: sorted(v) for c, v in seen.items() if len(v) > 1}
    if mixed:
        raise LabelsError(
            f"{path}: column {name!r} gives {len(mixed)} case(s) more than one label: "
            + _listing(f"{c} ({' / '.join(v)})" for c, v in mixed.items())
            + ". Slides of a case share its label (the case is what is split into train and test); fix the "
            "labels, or give each slide its own case_id if the slides really are independent"
        )


def _parse_survival(path, rows, order, time_i, event_i, config) -> tuple[np.ndarray, np.ndarray]:
    times = np.full(len(rows), np.nan)
    events = np.full(len(rows), np.nan)
    bad_time, bad_event, negative = [], [], []
    for i, (row, slide) in enumerate(zip(rows, order)):
        t, e = row[time_i], row[event_i]
        if not _is_missing(t):
            value = _as_float(t)
            if value is None:
                bad_time.append(f"{slide}: {t!r}")
            elif value < 0:
                negative.append(f"{slide}: {t}")
            else:
                times[i] = value
        if not _is_missing(e):
            key = e.strip().lower()
            if key in _EVENT_TRUE:
                events[i] = 1.0
            elif key in _EVENT_FALSE:
                events[i] = 0.0
            else:
                bad_event.append(f"{slide}: {e!r}")
    if bad_time:
        raise LabelsError(
            f"{path}: survival times in column {config.time_col!r} must be numbers; not numeric: {_listing(bad_time)}"
        )
    if negative:
        raise LabelsError(f"{path}: survival times must not be negative: {_listing(negative)}")
    if bad_event:
        raise LabelsError(
            f"{path}: events in column {config.event_col!r} must be 1/0 (or true/false, dead/alive); "
            f"not understood: {_listing(bad_event)}"
        )
    return times, events


def _given_folds(path, rows, order, col, config, fold_cols) -> list[GivenFold] | None:
    if fold_cols:
        folds = []
        for name in fold_cols:
            roles = np.array([r[col[name]].strip().lower() for r in rows], dtype=object)
            bad = sorted({v for v in roles if v not in ROLES and v not in MISSING})
            if bad:
                raise LabelsError(f"{path}: column {name} must hold train/test/val, found {', '.join(bad)}")
            roles = np.array(["" if v in MISSING else v for v in roles], dtype=object)
            if not np.any(roles == "test"):
                raise LabelsError(f"{path}: column {name} has no test slide")
            folds.append(GivenFold(name, roles))
        return folds
    if config.split_col not in col:
        return None
    values = [r[col[config.split_col]].strip().lower() for r in rows]
    present = {v for v in values if v not in MISSING}
    if present <= set(ROLES):
        roles = np.array(["" if v in MISSING else v for v in values], dtype=object)
        if not np.any(roles == "test") or not np.any(roles == "train"):
            raise LabelsError(f"{path}: column {config.split_col!r} needs both train and test slides")
        return [GivenFold(config.split_col, roles)]
    numbers = {v: _as_float(v) for v in present}
    if all(n is not None and float(n).is_integer() for n in numbers.values()):
        fold_ids = sorted({int(n) for n in numbers.values()})
        if len(fold_ids) < 2:
            raise LabelsError(f"{path}: column {config.split_col!r} names one fold only; k-fold needs at least 2")
        folds = []
        for f in fold_ids:
            roles = np.array(["" if v in MISSING else ("test" if int(float(v)) == f else "train") for v in values],
                             dtype=object)
            folds.append(GivenFold(f"{config.split_col}={f}", roles))
        return folds
    bad = sorted(v for v, n in numbers.items() if n is None)
    raise LabelsError(
        f"{path}: column {config.split_col!r} must hold train/test(/val) or fold numbers, found {', '.join(bad[:5])}"
    )


# -- matching a cohort ------------------------------------------------------------------------------------


@dataclass
class LabelsReport:
    """What happened to the labelled slides: used, not in the cohort, or without features (skipped)."""

    n_rows: int
    used: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # not in the cohort (only when allowed)
    without_features: list[str] = field(default_factory=list)  # in the cohort, no features: skipped
    missing: dict[str, list[str]] = field(default_factory=dict)  # representation -> slides without it
    without_label: dict[str, int] = field(default_factory=dict)  # task -> used slides with no value for it
    skipped_tasks: dict[str, str] = field(default_factory=dict)  # task -> why it cannot be evaluated
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{len(self.used)} of {self.n_rows} labelled slides used"]
        for task, n in self.without_label.items():
            out.append(f"task {task}: {n} of these slides have no value (empty/NaN), left out of that task")
        if self.unknown:
            out.append(f"{len(self.unknown)} not in the cohort, skipped: {_listing(self.unknown)}")
        if self.without_features:
            out.append(
                f"{len(self.without_features)} without features, skipped (run `slpd extract`): "
                f"{_listing(self.without_features)}"
            )
        for name, ids in self.missing.items():
            out.append(f"{len(ids)} without {name}, skipped: {_listing(ids)}")
        for task, why in self.skipped_tasks.items():
            out.append(f"task {task} skipped: {why}")
        return out + list(self.notes)

    def to_dict(self) -> dict:
        return {"n_rows": self.n_rows, "used": len(self.used), "unknown": self.unknown,
                "without_features": self.without_features, "missing": self.missing,
                "without_label": self.without_label, "skipped_tasks": self.skipped_tasks, "notes": self.notes}


def match_cohort(table: LabelTable, cohort_ids, ids_with_features, allow_unknown: bool = True
                 ) -> tuple[LabelTable, LabelsReport]:
    """Keep the labelled slides that are in the cohort and have features.

    Slide ids not in the cohort are skipped and counted in the report (a study's labels usually list more
    slides than one cohort holds); ``allow_unknown=False`` makes them an error listing them. Slides without
    features are skipped and reported. A task left with one class (or no event) is dropped from the table
    and its reason recorded in ``report.skipped_tasks``; LabelsError when no task is left.
    """
    cohort_ids = set(cohort_ids)
    with_features = set(ids_with_features)
    report = LabelsReport(len(table))
    unknown = [s for s in table.slide_ids if s not in cohort_ids]
    if unknown and not allow_unknown:
        hint = ""
        close = [c for c in sorted(cohort_ids) if unknown[0].lower() in c.lower() or c.lower() in unknown[0].lower()]
        if close:
            hint = f" (did you mean {close[0]!r}?)"
        raise LabelsError(
            f"{len(unknown)} slide id(s) of {table.path} are not in the cohort: {_listing(unknown)}{hint}. Slide ids "
            "are file names without extension; fix the labels, add the slides with `slpd extract`, or leave out "
            "--require-known to skip them"
        )
    report.unknown = unknown
    report.without_features = [s for s in table.slide_ids if s in cohort_ids and s not in with_features]
    keep = np.array([s in cohort_ids and s in with_features for s in table.slide_ids])
    if not keep.any():
        hint = ""
        if unknown and len(unknown) == len(table):
            close = [c for c in sorted(cohort_ids) if unknown[0].lower() in c.lower() or c.lower() in unknown[0].lower()]
            hint = f"; e.g. {unknown[0]!r} is not a cohort slide id" + (f" (did you mean {close[0]!r}?)" if close else
                                                                          " (slide ids are file names without extension)")
        raise LabelsError(
            f"none of the {len(table)} labelled slides has extracted features in this cohort "
            f"({len(report.without_features)} without features, {len(unknown)} not in the cohort{hint}); run "
            "`slpd extract` or fix the slide ids"
        )
    sub = table.subset(keep)
    report.used = list(sub.slide_ids)
    sub = drop_unusable_tasks(sub, report)
    return sub, report


def task_problems(table: LabelTable) -> dict[str, str]:
    """task -> why it cannot be evaluated on these slides (one class only, no event); usable tasks absent."""
    out = {}
    for name, task in table.tasks.items():
        if task.kind == "classification" and task.n_classes < 2:
            only = task.classes[0] if task.classes else "none"
            out[name] = (f"label column {name!r} has one class only ({only!r}) among the slides that can be "
                         "evaluated; a task needs at least two classes")
        if task.kind == "survival":
            mask, _, event = table.survival_values()
            if not (mask & event).any():
                out[name] = "the survival task has no event (every slide is censored); the c-index is undefined"
    return out


def drop_unusable_tasks(table: LabelTable, report: LabelsReport) -> LabelTable:
    """The table without the tasks that cannot be evaluated (reasons into ``report.skipped_tasks``);
    LabelsError when none is left, or when a task the user asked for alone is unusable."""
    problems = task_problems(table)
    if not problems:
        return table
    if len(problems) == len(table.tasks):
        raise LabelsError("; ".join(problems.values()))
    report.skipped_tasks.update(problems)
    table.tasks = {n: t for n, t in table.tasks.items() if n not in problems}
    return table

