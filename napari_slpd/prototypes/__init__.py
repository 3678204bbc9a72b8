"""Slide prototypes (SPEC section 3): K-means prototypes per slide, their cache and label maps.
Matching prototype sets and searching a cohort for similar slides live in :mod:`napari_slpd.similarity`.
No Qt, no napari."""

from napari_slpd.prototypes.cache import (
    PrototypesReport,
    compute_cohort_prototypes,
    compute_slide_prototypes,
    load_prototypes,
    save_prototypes,
)
from napari_slpd.prototypes.kmeans import SlidePrototypes, compute_prototypes
from napari_slpd.prototypes.label_map import LabelMap, label_map

__all__ = [
    "LabelMap",
    "PrototypesReport",
    "SlidePrototypes",
    "compute_cohort_prototypes",
    "compute_prototypes",
    "compute_slide_prototypes",
    "label_map",
    "load_prototypes",
    "save_prototypes",
]
