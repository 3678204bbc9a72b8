"""Synthetic cohorts of token grids, for tests, benchmarks and for trying the trainer without slides.

Each slide mixes a few "tissue types": a region's token grid is its type's mean token plus Gaussian noise,
so that prototypes and similar slides have a ground truth (slides with the same types are similar). The
files are real FeatureStore files written through ``napari_slpd.features.store.write_store``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_synthetic_cohort(
    root: str | os.PathLike,
    regions_per_slide: list[int] | tuple[int, ...] = (12, 12, 12, 3),
    token_dim: int = 32,
    grid: int = 8,
    n_types: int = 4,
    types_per_slide: int = 2,
    noise: float = 0.5,
    seed: int = 0,
    token_dtype: str = "float16",
):
    """A Cohort at ``root`` with one feature file per slide (``slide0``, ``slide1``, ...); returns the Cohort.

    Slide s draws its regions from types {s mod n_types, ..., s + types_per_slide - 1 mod n_types}.
    """
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.store import RegionChunk, StoreLayout, write_store

    rng = np.random.default_rng(seed)
    root = Path(root)
    cohort = Cohort(root)
    means = rng.normal(size=(n_types, token_dim, 1, 1)).astype(np.float32) * 2.0
    (root / "slides").mkdir(exist_ok=True)
    for s, n_regions in enumerate(regions_per_slide):
        slide_id = f"slide{s}"
        placeholder = root / "slides" / f"{slide_id}.svs"  # registry entry only; training never opens slides
        placeholder.touch()
        cohort.add_slide(placeholder)
        kinds = (s + rng.integers(0, types_per_slide, size=n_regions)) % n_types
        tokens = means[kinds] + noise * rng.normal(size=(n_regions, token_dim, grid, grid)).astype(np.float32)
        coords = np.stack([np.arange(n_regions) * 4096, np.zeros(n_regions)], axis=1).astype(np.int64)
        chunk = RegionChunk(tokens, np.zeros((n_regions, 1), np.float32), coords, np.ones(n_regions, np.float32))
        layout = StoreLayout(n_regions, token_dim, grid, 1, token_dtype, patch_features=False)
        write_store(
            cohort.features_path(slide_id), layout, {"synthetic": True, "seed": seed, "slide": s}, chunk,
            attrs={"slide_id": slide_id, "region_px": 4096, "patch_px": 256},
        )
    return cohort
