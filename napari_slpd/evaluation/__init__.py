"""Slide-level evaluation (issue 11): what the slide representations are worth on labelled tasks, with the
HIPT / SLPD / PANTHER / Patho-Bench protocols. Qt-free; the CLI (``slpd evaluate``) and the napari
Evaluation panel call the same API.

```python
from napari_slpd.evaluation import EvaluationConfig, evaluate, write_report, list_representations
infos = list_representations(cohort)                      # what `slpd evaluate --list` prints
result = evaluate(cohort, "labels.csv", EvaluationConfig(representations=None, protocols=None, n_folds=None,
                  seed=0), progress=fn(done, total), cancel=threading.Event())   # n_folds None: from the data
result.report.lines()            # slides used / skipped (unknown ids, no features, no label), tasks skipped, notices
result.results[i].summary["auc"]  # {"mean", "std", "pooled", "ci_low", "ci_high"}; .folds: per-fold metrics
result.comparisons               # paired bootstrap of the primary metric between representations
write_report(result, "out", cohort=cohort)                # results.json, folds.csv, plots, report.html (atomic)
```
Modules: labels (labels and Patho-Bench split files), splits (folds grouped by case, stratified),
representations (named slide representations and the region-embedding versions hook), protocols (knn,
linear, abmil, cox, retrieval), metrics (figures, bootstrap, paired comparison), set_distance (the one
call site of the similarity engine), engine (the run), report (the folder); synthetic embedding cohorts are
:mod:`napari_slpd.samples.embedding_cohort`. Errors: EvaluationError, LabelsError, RepresentationError (SlpdError).
"""

from __future__ import annotations

import importlib

from napari_slpd.evaluation.protocol_names import PROTOCOLS

# Loaded on first use (PEP 562): the protocol names and the errors are needed by the CLI's parser and the
# panels at import time; the engine (its protocols and metrics) only when something is evaluated.
_EXPORTS = {
    "EvaluationConfig": "engine", "EvaluationResult": "engine", "ProtocolResult": "engine", "evaluate": "engine",
    "EvaluationError": "errors", "LabelsError": "errors", "RepresentationError": "errors",
    "LabelsConfig": "labels", "read_labels": "labels", "write_report": "report",
    "list_representations": "representations", "load_representation": "representations",
    "region_embedding_sources": "representations", "set_region_embedding_sources": "representations",
}

__all__ = ["PROTOCOLS", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
