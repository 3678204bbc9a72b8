"""Similar slides and regions (SPEC section 3): the prototype set distance (optimal matching of two
slides' prototypes), the cohort index that ranks slides by it, and region retrieval. No Qt, no napari."""

from napari_slpd.similarity.index import CohortIndex, IndexConfig, SimilarSlide
from napari_slpd.similarity.matching import (
    PrototypePair,
    batch_set_similarity,
    brute_force_set_similarity,
    cross_assignment,
    match_prototypes,
    prototype_set_distance,
    prototype_set_similarity,
)
from napari_slpd.similarity.regions import RegionHit, RegionIndex
from napari_slpd.similarity.slide_search import SlideMatch, rank_by_prototype, search_slides

__all__ = [
    "CohortIndex",
    "IndexConfig",
    "PrototypePair",
    "RegionHit",
    "RegionIndex",
    "SimilarSlide",
    "SlideMatch",
    "batch_set_similarity",
    "brute_force_set_similarity",
    "cross_assignment",
    "match_prototypes",
    "prototype_set_distance",
    "prototype_set_similarity",
    "rank_by_prototype",
    "search_slides",
]
