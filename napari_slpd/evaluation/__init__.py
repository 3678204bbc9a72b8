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

from napari_slpd.evaluation.engine import EvaluationConfig, EvaluationResult, ProtocolResult, evaluate
from napari_slpd.evaluation.errors import EvaluationError, LabelsError, RepresentationError
from napari_slpd.evaluation.labels import LabelsConfig, read_labels
from napari_slpd.evaluation.report import write_report
from napari_slpd.evaluation.representations import (
    list_representations,
    load_representation,
    region_embedding_sources,
    set_region_embedding_sources,
)

__all__ = [
    "EvaluationConfig", "EvaluationError", "EvaluationResult", "LabelsConfig", "LabelsError", "ProtocolResult",
    "RepresentationError", "evaluate", "list_representations", "load_representation", "read_labels",
    "region_embedding_sources", "set_region_embedding_sources", "write_report",
]
