"""Segmentation evaluation (issue 25): the cohort's label maps (unsupervised prototypes mapped to classes
on training folds, ProAlign zero-shot labels, named prototypes) scored against annotated tissue regions
(QuPath GeoJSON or label masks): per-class and mean Dice, IoU and pixel accuracy, per slide and pooled
with case-bootstrap CIs, at region and at patch resolution. Qt-free.

Modules: annotations (reading and rasterising GeoJSON / masks, writing GeoJSON), scores (figures from
confusion matrices, bootstrap), engine (the run), report (files and the overlay figure).
"""

from napari_slpd.evaluation.segmentation.engine import (
    METHODS,
    SegmentationConfig,
    SegmentationResult,
    evaluate_segmentation,
)

__all__ = ["METHODS", "SegmentationConfig", "SegmentationResult", "evaluate_segmentation"]
