"""Run an evaluation: labels -> slides -> representations -> folds -> protocols -> figures and comparisons.

```python
from napari_slpd.evaluation.engine import EvaluationConfig, evaluate
result = evaluate(cohort, "labels.csv", EvaluationConfig(representations=["region_mean", "prototype_set"],
                  protocols=["knn", "linear"], n_folds=10, seed=0), progress=fn(done, total), cancel=event)
result.results        # [ProtocolResult]: task, representation, protocol, folds (per-fold metrics), summary
result.comparisons    # [Comparison]: paired bootstrap of the primary metric between two representations
result.report         # LabelsReport: slides used / unknown / without features / without a representation
result.to_dict()      # what results.json holds
```

Which slides: the labelled slides that are in the cohort, have features, and have every representation
asked for (so that all representations are compared on the same slides and folds); each left-out slide
is listed in ``result.report`` with the reason. A representation that was never computed for any slide
raises RepresentationError. A task that cannot be evaluated (a class with one case, one class left, a
bad given fold) is skipped with its reason (``result.report.skipped_tasks``) unless it is the only task
asked for; folds are chosen from the data unless ``n_folds`` is given (the notice is in
``result.report.notes``). Every figure: mean and std over folds, the value on the test predictions
pooled over folds, and a bootstrap 95% CI of that pooled value (resampling cases). Reproducible: folds,
bootstrap and ABMIL are seeded with ``seed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np

from napari_slpd.evaluation import metrics as M
from napari_slpd.evaluation.errors import EvaluationError, LabelsError, RepresentationError
from napari_slpd.evaluation.labels import (
    LabelsConfig,
    LabelsReport,
    LabelTable,
    drop_unusable_tasks,
    match_cohort,
    read_labels,
)
from napari_slpd.evaluation.protocols import (
    PROTOCOLS,
    SPECS,
    AbmilConfig,
    CoxConfig,
    KnnConfig,
    LinearConfig,
    Predictions,
    RetrievalConfig,
    TaskData,
    abmil,
    cox,
    knn_sets,
    knn_vectors,
    linear_probe,
    retrieval_sets,
    retrieval_vectors,
)
from napari_slpd.evaluation.representations import (
    LoadedRepresentation,
    available_representations,
    load_representation,
)
from napari_slpd.evaluation.splits import choose_folds, given_folds, make_folds
from napari_slpd.utils.progress import raise_if_cancelled

log = logging.getLogger(__name__)

DEFAULT_PROTOCOLS = PROTOCOLS  # every protocol, in the report's order


@dataclass
class EvaluationConfig:
    """What to evaluate and how. ``representations``/``protocols``/``tasks`` None: everything available
    and applicable. ``n_folds`` None: chosen from the data per task (at most 10, at most the fewest cases of
    a class; splits.choose_folds). ``allow_unknown``: labelled slide ids that are not in the cohort are
    skipped and counted (False: an error)."""

    tasks: list[str] | None = None
    representations: list[str] | None = None
    protocols: list[str] | None = None
    n_folds: int | None = None
    seed: int = 0
    n_bootstrap: int = M.DEFAULT_BOOTSTRAP
    allow_unknown: bool = True
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    abmil: AbmilConfig = field(default_factory=AbmilConfig)
    cox: CoxConfig = field(default_factory=CoxConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldMetrics:
    index: int
    name: str
    n_train: int
    n_test: int
    metrics: dict[str, float]
    extra: dict = field(default_factory=dict)


@dataclass
class ProtocolResult:
    """One (task, representation, protocol): per-fold metrics, their summary and the test predictions."""

    task: str
    representation: str
    protocol: str
    primary: str
    folds: list[FoldMetrics]
    summary: dict[str, dict[str, float]]  # metric -> mean, std, pooled, ci_low, ci_high
    predictions: Predictions
    kind_used: str = "vector"

    def figure(self, metric: str | None = None) -> dict[str, float]:
        return self.summary[metric or self.primary]

    def to_dict(self) -> dict:
        return {
            "task": self.task, "representation": self.representation, "protocol": self.protocol,
            "primary_metric": self.primary, "representation_kind": self.kind_used, "summary": self.summary,
            "folds": [asdict(f) for f in self.folds],
        }


@dataclass
class Comparison:
    task: str
    protocol: str
    metric: str
    a: str
    b: str
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    n_resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TaskInfo:
    name: str
    kind: str
    classes: list[str]
    ordinal: bool
    data: TaskData
    folds_given: bool

    def to_dict(self) -> dict:
        counts = {}
        if self.kind == "classification":
            counts = {c: int((self.data.y == i).sum()) for i, c in enumerate(self.classes)}
        else:
            counts = {"events": int(self.data.event.sum()), "censored": int((~self.data.event).sum())}
        return {"name": self.name, "kind": self.kind, "classes": self.classes, "ordinal": self.ordinal,
                "n_slides": len(self.data.slide_ids), "n_cases": len(set(self.data.cases.tolist())),
                "counts": counts, "folds_given": self.folds_given, "folds": [f.to_dict() for f in self.data.folds]}


@dataclass
class EvaluationResult:
    cohort: str
    labels_path: str
    config: EvaluationConfig
    report: LabelsReport
    tasks: dict[str, TaskInfo]
    representations: dict[str, LoadedRepresentation]
    results: list[ProtocolResult]
    comparisons: list[Comparison]
    skipped: list[str]  # (representation, protocol, task) combinations that do not apply, with why
    seconds: float = 0.0

    def result(self, task: str, representation: str, protocol: str) -> ProtocolResult:
        for r in self.results:
            if (r.task, r.representation, r.protocol) == (task, representation, protocol):
                return r
        raise KeyError((task, representation, protocol))

    def to_dict(self) -> dict:
        from napari_slpd import __version__

        return {
            "format": "napari-slpd-evaluation", "format_version": 1, "code_version": __version__,
            "cohort": self.cohort, "labels": self.labels_path, "config": self.config.to_dict(),
            "slides": self.report.to_dict(), "tasks": {n: t.to_dict() for n, t in self.tasks.items()},
            "representations": {n: {"n_slides": len(r.slide_ids), "kinds": list(r.kinds),
                                    "description": r.description,
                                    "dim": None if r.vectors is None else int(r.vectors.shape[1])}
                                for n, r in self.representations.items()},
            "results": [r.to_dict() for r in self.results],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "skipped": self.skipped, "seconds": round(self.seconds, 2),
        }


# -- metrics of predictions -------------------------------------------------------------------------------------


def _primary(protocol: str, config: EvaluationConfig) -> str:
    if protocol == "cox":
        return "c_index"
    if protocol == "retrieval":
        return f"mAP@{max(config.retrieval.ks)}"
    return "auc"


def _metric_fn(info: TaskInfo, protocol: str, preds: Predictions, config: EvaluationConfig, only=None):
    """rows -> {metric: value} on those prediction rows (``only``: that metric alone)."""
    data = info.data
    if protocol == "cox":
        return lambda rows: {"c_index": M.c_index(data.time[preds.index[rows]], data.event[preds.index[rows]],
                                                  preds.risk[rows])}
    if protocol == "retrieval":
        labels = np.where(preds.retrieved >= 0, data.y[np.maximum(preds.retrieved, 0)], -1)
        per_query = M.retrieval_per_query(labels, data.y[preds.index], config.retrieval.ks)
        return lambda rows: {k: float(v[rows].mean()) if len(rows) else float("nan") for k, v in per_query.items()}
    return lambda rows: M.classification_metrics(data.y[preds.index[rows]], preds.proba[rows], info.ordinal, only)


def _score(info: TaskInfo, representation: str, protocol: str, preds: Predictions, config: EvaluationConfig,
           kind_used: str) -> ProtocolResult:
    data = info.data
    fn = _metric_fn(info, protocol, preds, config)
    fold_metrics = []
    for fold in data.folds:
        rows = preds.rows_of_fold(fold.index)
        if rows.size == 0:
            continue
        fold_metrics.append(FoldMetrics(fold.index, fold.name, int(fold.train.size), int(rows.size), fn(rows),
                                        preds.extra.get(fold.name, {})))
    all_rows = np.arange(preds.index.size)
    pooled = fn(all_rows)
    resamples = M.case_resamples(data.cases[preds.index], config.n_bootstrap, config.seed)
    boot = {name: [] for name in pooled}
    for rows in resamples:
        values = fn(rows)
        for name in pooled:
            boot[name].append(values[name])
    summary = {}
    for name, value in pooled.items():
        mean, std = M.summarize([f.metrics[name] for f in fold_metrics])
        b = np.asarray(boot[name], np.float64)
        b = b[np.isfinite(b)]
        lo, hi = (np.percentile(b, [2.5, 97.5]) if b.size else (np.nan, np.nan))
        summary[name] = {"mean": mean, "std": std, "pooled": float(value), "ci_low": float(lo), "ci_high": float(hi)}
    return ProtocolResult(info.name, representation, protocol, _primary(protocol, config), fold_metrics, summary,
                          preds, kind_used)


def compare(result_a: ProtocolResult, result_b: ProtocolResult, info: TaskInfo, config: EvaluationConfig
            ) -> Comparison:
    """Paired bootstrap of the primary metric difference a - b on the same test predictions."""
    pa, pb = result_a.predictions, result_b.predictions
    key_a = pa.fold.astype(np.int64) * (len(info.data.slide_ids) + 1) + pa.index
    key_b = pb.fold.astype(np.int64) * (len(info.data.slide_ids) + 1) + pb.index
    order_a, order_b = np.argsort(key_a), np.argsort(key_b)
    if not np.array_equal(key_a[order_a], key_b[order_b]):
        raise EvaluationError(f"{result_a.representation} and {result_b.representation} were tested on different slides")
    metric = result_a.primary
    fa = _metric_fn(info, result_a.protocol, pa, config, only=metric)
    fb = _metric_fn(info, result_b.protocol, pb, config, only=metric)
    resamples = M.case_resamples(info.data.cases[pa.index[order_a]], config.n_bootstrap, config.seed + 1)
    stats = M.paired_bootstrap(lambda rows: fa(order_a[rows])[metric], lambda rows: fb(order_b[rows])[metric],
                               resamples, all_rows=np.arange(order_a.size))
    return Comparison(info.name, result_a.protocol, metric, result_a.representation, result_b.representation,
                      stats["difference"], stats["ci_low"], stats["ci_high"], stats["p_value"], stats["n_resamples"])


# -- setting up tasks ---------------------------------------------------------------------------------------------


def _task_infos(table: LabelTable, config: EvaluationConfig, report: LabelsReport) -> dict[str, TaskInfo]:
    """Each task's slides, labels and folds. A task that cannot be evaluated (too few cases of a class for
    cross-validation, a bad given fold, ...) goes into ``report.skipped_tasks`` with its reason, unless it
    is the only task asked for (then its LabelsError is raised); fold notices go into ``report.notes``."""
    infos = {}
    for name, task in table.tasks.items():
        try:
            infos[name] = _task_info(table, name, task, config, report)
        except LabelsError as exc:
            if config.tasks is not None and len(config.tasks) == 1:
                raise
            why = str(exc)
            report.skipped_tasks[name] = why[len(f"task {name!r}: "):] if why.startswith(f"task {name!r}: ") else why
            log.debug("task %s skipped: %s", name, exc)
    if not infos:
        raise LabelsError("no task can be evaluated: " + "; ".join(f"{n}: {why}" for n, why in
                                                                      report.skipped_tasks.items()))
    return infos


def _task_info(table: LabelTable, name: str, task, config: EvaluationConfig, report: LabelsReport) -> TaskInfo:
    cases_all = np.asarray(table.case_ids, dtype=object)
    if task.kind == "classification":
        mask, y = table.task_values(name)
        stratify = y
    else:
        mask, time_, event = table.survival_values()
        stratify = event.astype(np.int64)
    idx = np.flatnonzero(mask)
    if idx.size < mask.size:
        report.without_label[name] = int(mask.size - idx.size)
    ids = [table.slide_ids[i] for i in idx]
    cases = cases_all[idx]
    class_names = task.classes if task.kind == "classification" else ["censored", "with an event"]
    if task.kind == "classification":
        present = np.unique(y[idx])
        if present.size < 2:
            raise LabelsError(f"label column {name!r} has one class only among the slides with a value")
    if table.given_folds is not None:
        folds = given_folds([f.roles[idx] for f in table.given_folds], cases,
                            [f.name for f in table.given_folds], task=name)
    else:
        n_folds, notice = choose_folds(stratify[idx], cases, config.n_folds, class_names=class_names, task=name)
        if notice:
            report.notes.append(notice)
            log.debug(notice)
        folds = make_folds(stratify[idx], cases, n_folds, config.seed, class_names=class_names, task=name)
    data = TaskData(task, ids, cases, folds, seed=config.seed)
    if task.kind == "classification":
        data.y = y[idx]
    else:
        data.time, data.event = time_[idx], event[idx]
    return TaskInfo(name, task.kind, list(task.classes), task.ordinal, data, table.given_folds is not None)


def _run_protocol(protocol: str, info: TaskInfo, rep: LoadedRepresentation, config: EvaluationConfig, cancel
                  ) -> tuple[Predictions, str]:
    data = info.data
    rep = rep.take(data.slide_ids)
    if protocol == "knn":
        if rep.vectors is not None:
            return knn_vectors(data, rep.vectors, config.knn, cancel), "vector"
        return knn_sets(data, rep.sets, config.knn, cancel), "set"
    if protocol == "linear":
        return linear_probe(data, rep.vectors, config.linear, cancel), "vector"
    if protocol == "abmil":
        return abmil(data, rep.bags, config.abmil, cancel), "bag"
    if protocol == "cox":
        return cox(data, rep.vectors, config.cox, cancel), "vector"
    if protocol == "retrieval":
        if rep.vectors is not None:
            return retrieval_vectors(data, rep.vectors, config.retrieval, cancel), "vector"
        return retrieval_sets(data, rep.sets, config.retrieval, cancel), "set"
    raise EvaluationError(f"unknown protocol {protocol!r}; choose from {', '.join(SPECS)}")


def _applies(protocol: str, info: TaskInfo, rep: LoadedRepresentation) -> str | None:
    """None when ``protocol`` can run on this task and representation, else why not."""
    spec = SPECS[protocol]
    if spec.task_kind != info.kind:
        return f"{protocol} is for {spec.task_kind} tasks"
    if not set(spec.needs) & set(rep.kinds):
        return f"{protocol} needs a {' or '.join(spec.needs)} representation; {rep.name} is a {'/'.join(rep.kinds)}"
    return None


# -- the whole run -------------------------------------------------------------------------------------------------


def prepare_labels(cohort, labels, config: EvaluationConfig) -> tuple[LabelTable, LabelsReport]:
    """Read the labels (a path or a LabelTable) and keep the slides of the cohort that have features."""
    table = labels if isinstance(labels, LabelTable) else read_labels(
        labels, LabelsConfig(**{**asdict(config.labels), "tasks": config.tasks or config.labels.tasks}))
    with_features = [s for s in cohort.slide_ids() if cohort.features_path(s).exists()]
    return match_cohort(table, cohort.slide_ids(), with_features, allow_unknown=config.allow_unknown)


def evaluate(cohort, labels, config: EvaluationConfig | None = None, progress=None, cancel=None) -> EvaluationResult:
    """Evaluate the representations of ``cohort`` on the tasks of ``labels`` (see the module docstring)."""
    config = config or EvaluationConfig()
    t0 = time.perf_counter()
    protocols = list(config.protocols or DEFAULT_PROTOCOLS)
    unknown = [p for p in protocols if p not in SPECS]
    if unknown:
        raise EvaluationError(f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")
    table, report = prepare_labels(cohort, labels, config)
    names = list(config.representations or available_representations(cohort))
    if not names:
        raise RepresentationError(
            f"cohort {cohort.root} has no slide representation yet: run `slpd extract` (and `slpd prototypes`) first"
        )
    total = len(names) + 1  # loading, then one unit per run (grown once known)
    done = 0

    def step(n=1):
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    reps: dict[str, LoadedRepresentation] = {}
    for name in names:
        raise_if_cancelled(cancel, "the evaluation")
        rep = load_representation(cohort, name, table.slide_ids, cancel=cancel, seed=config.seed)
        if rep.missing:
            report.missing[name] = sorted(rep.missing)
        reps[name] = rep
        step()
    keep_ids = set(table.slide_ids)
    for rep in reps.values():
        keep_ids &= set(rep.slide_ids)
    if len(keep_ids) < len(table.slide_ids):
        table = table.subset(np.array([s in keep_ids for s in table.slide_ids]))
        report.used = list(table.slide_ids)
        table = drop_unusable_tasks(table, report)
    tasks = _task_infos(table, config, report)
    step()

    plan, skipped = [], []
    for info in tasks.values():
        for protocol in protocols:
            for name, rep in reps.items():
                why = _applies(protocol, info, rep)
                if why is None:
                    plan.append((info, name, protocol))
                else:
                    skipped.append(f"{info.name} / {name} / {protocol}: {why}")
    if not plan:
        raise EvaluationError(
            "nothing to evaluate: no protocol applies to these tasks and representations (" + "; ".join(skipped[:4])
            + ")"
        )
    total += len(plan)
    results = []
    for info, name, protocol in plan:
        raise_if_cancelled(cancel, "the evaluation")
        preds, kind_used = _run_protocol(protocol, info, reps[name], config, cancel)
        results.append(_score(info, name, protocol, preds, config, kind_used))
        step()

    comparisons = []
    for info in tasks.values():
        for protocol in protocols:
            group = [r for r in results if r.task == info.name and r.protocol == protocol]
            for ra, rb in combinations(group, 2):
                raise_if_cancelled(cancel, "the evaluation")
                comparisons.append(compare(ra, rb, info, config))
    return EvaluationResult(str(cohort.root), str(table.path), config, report, tasks, reps, results, comparisons,
                            skipped, time.perf_counter() - t0)
