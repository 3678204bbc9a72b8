"""Slide prototypes and similar slides (SPEC sections 2-3): K-means prototypes per slide, label maps,
the prototype set distance, the cohort index and region retrieval. No Qt, no napari."""

from napari_slpd.prototypes.cache import (
    PrototypesReport,
    compute_cohort_prototypes,
    compute_slide_prototypes,
    load_prototypes,
    save_prototypes,
)
from napari_slpd.prototypes.index import CohortIndex, IndexConfig, SimilarSlide
from napari_slpd.prototypes.kmeans import SlidePrototypes, compute_prototypes
from napari_slpd.prototypes.label_map import LabelMap, label_map
from napari_slpd.prototypes.matching import (
    PrototypePair,
    batch_set_similarity,
    brute_force_set_similarity,
    cross_assignment,
    match_prototypes,
    prototype_set_distance,
    prototype_set_similarity,
)
from napari_slpd.prototypes.regions import RegionHit, RegionIndex

__all__ = [
    "CohortIndex",
    "IndexConfig",
    "LabelMap",
    "PrototypePair",
    "PrototypesReport",
    "RegionHit",
    "RegionIndex",
    "SimilarSlide",
    "SlidePrototypes",
    "batch_set_similarity",
    "brute_force_set_similarity",
    "compute_cohort_prototypes",
    "compute_prototypes",
    "compute_slide_prototypes",
    "cross_assignment",
    "label_map",
    "load_prototypes",
    "match_prototypes",
    "prototype_set_distance",
    "prototype_set_similarity",
    "save_prototypes",
]
