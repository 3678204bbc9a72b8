"""Fault 5: non-finite or degenerate features imported from other tools (NaN/Inf rows, constant embeddings,
a slide with one region, K larger than the regions): each gets a message, never a crash or a silent NaN
distance, and the rest of the cohort goes on."""

from __future__ import annotations

import numpy as np
import pytest

from faults.faults_support import embedding_cohort

pytestmark = pytest.mark.faults


def _add_slide(cohort, slide_id: str, embeddings: np.ndarray) -> None:
    from napari_slpd.features.store import RegionChunk, StoreLayout, write_store
    from napari_slpd.utils.files import atomic_write_json

    m, e = embeddings.shape
    layout = StoreLayout(m, 8, 2, e, token_dtype="float32", patch_features=False)
    coords = np.stack([np.arange(m) % 8 * 256, np.arange(m) // 8 * 256], 1).astype(np.int64)
    chunk = RegionChunk(np.zeros((m, 8, 2, 2), np.float32), embeddings.astype(np.float32), coords,
                        np.ones(m, np.float32))
    write_store(cohort.features_path(slide_id), layout, {"synthetic": True, "seed": 0}, chunk,
                attrs={"slide_id": slide_id, "region_size_level0": 256.0, "region_encoder": "synthetic"})
    registry = cohort._load_registry()
    registry["slides"][slide_id] = {"path": f"slides/{slide_id}.svs"}
    atomic_write_json(cohort.registry_path, registry)


def test_degenerate_slides_get_messages_and_the_cohort_goes_on(tmp_path):
    from napari_slpd.prototypes.cache import compute_cohort_prototypes
    from napari_slpd.similarity.index import CohortIndex
    from napari_slpd.similarity.embedding_map import project_2d, UmapParams
    from napari_slpd.errors import SlpdError

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=6, k=4, prototypes=False)
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 16)).astype(np.float32)
    nan, inf = base.copy(), base.copy()
    nan[3, 2] = np.nan
    inf[7] = np.inf
    _add_slide(cohort, "nan", nan)
    _add_slide(cohort, "inf", inf)
    _add_slide(cohort, "constant", np.ones((20, 16), np.float32))
    _add_slide(cohort, "single", base[:1])
    _add_slide(cohort, "few", base[:2])

    report = {r.slide_id: r for r in compute_cohort_prototypes(cohort, k=4, device="cpu").results}
    for bad in ("nan", "inf"):
        assert report[bad].status == "failed" and "NaN or infinite" in report[bad].message, report[bad]
    assert report["constant"].status == "computed" and "distinct" in report["constant"].message
    assert report["single"].status == "computed" and "capped from 4 to 1" in report["single"].message
    assert report["few"].status == "computed" and "capped from 4 to 2" in report["few"].message
    assert all(report[s].status == "computed" for s in cohort.slide_ids() if s.startswith("slide_"))

    index = CohortIndex.open(cohort)
    assert "nan" in index.skipped and "inf" in index.skipped
    for query in ("slide_00000", "constant", "single", "few"):
        hits = index.query(query, n=20)
        assert hits and all(np.isfinite(h.distance) and np.isfinite(h.similarity) for h in hits), query
        assert {h.slide_id for h in hits}.isdisjoint({"nan", "inf"})

    # A NaN prototype set given directly (e.g. from a notebook) is refused with a message, not a NaN distance.
    bad = np.full((4, 16), np.nan, np.float32)
    with pytest.raises(SlpdError, match="NaN"):
        index.query(bad, n=3)
    # The embedding map refuses NaN; constant embeddings still give a finite map.
    with pytest.raises(SlpdError, match="NaN"):
        project_2d(nan, UmapParams())
    xy, _ = project_2d(np.ones((6, 16), np.float32), UmapParams())
    assert np.isfinite(xy).all()


def test_region_search_skips_or_refuses_non_finite_regions(tmp_path):
    from napari_slpd.errors import SlpdError
    from napari_slpd.similarity.regions import RegionIndex

    cohort = embedding_cohort(tmp_path / "cohort", n_slides=4, k=3, prototypes=False)
    base = np.random.default_rng(2).normal(size=(12, 16)).astype(np.float32)
    base[4, 0] = np.nan
    _add_slide(cohort, "nan", base)
    try:
        rindex = RegionIndex.open(cohort)
    except SlpdError as exc:  # refusing the cohort is fine when it names the slide
        assert "nan" in str(exc)
        return
    hits = rindex.query("slide_00000", 0, n=50)
    assert hits and all(np.isfinite(h.similarity) for h in hits)
    with pytest.raises(SlpdError):
        rindex.query("nan", 4, n=5)
