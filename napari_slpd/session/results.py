"""What a session answers with: a slide's status, the in-memory part of its feature file, a region match;
a similar-slide hit is :class:`napari_slpd.similarity.slide_search.SlideMatch` (one type for the CLI and the
panels)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_slpd.similarity.slide_search import SlideMatch

__all__ = ["RegionData", "RegionMatch", "SlideMatch", "SlideStatus", "describe_features"]


@dataclass
class SlideStatus:
    slide_id: str
    path: Path
    exists: bool
    features: str  # "done" | "missing" | "partial" | "other-settings" | "damaged"
    prototypes: str  # "done" | "missing" | "stale"
    n_regions: int | None = None
    detail: str = ""
    mpp: float | None = None  # pixel size recorded in the cohort (user value), None: the file's own
    mpp_source: str | None = None

    @property
    def features_done(self) -> bool:
        return self.features == "done"

    @property
    def prototypes_done(self) -> bool:
        return self.prototypes == "done"


@dataclass
class RegionData:
    """The small, in-memory part of a slide's feature file."""

    slide_id: str
    embeddings: np.ndarray  # [M, E] float32
    coords: np.ndarray  # [M, 2] int64 level-0 top-left
    size: float  # level-0 px per region side
    settings_key: str
    attrs: dict

    def __len__(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class RegionMatch:
    slide_id: str
    region: int
    distance: float  # cosine distance 1 - cos
    prototype: int | None = None  # the matched region's prototype on its own slide


def describe_features(attrs: dict) -> str:
    return (
        f"{attrs.get('n_regions', '?')} regions of {attrs.get('region_px', '?')} px at "
        f"{attrs.get('target_mpp', '?')} um/px; {attrs.get('patch_encoder', '?')} + {attrs.get('region_encoder', '?')}"
    )
