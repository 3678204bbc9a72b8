"""The Qt-free parts behind the GUI: geometry, shared state, the session orchestration, embedding maps."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_slpd.similarity.embedding_map import (
    MapCancelled,
    UmapParams,
    cache_path,
    load_or_compute_map,
    project_2d,
)
from napari_slpd.errors import FeatureStoreError, PrototypeError, SlpdError
from widgets_support import K, build_processed_cohort, tiny_settings


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return build_processed_cohort(tmp_path_factory.getbasetemp() / "slpd-widgets-cohort")


# -- geometry ---------------------------------------------------------------------------------------------


def test_world_level0_round_trip_and_pixel_centres():
    from napari_slpd.widgets.state import SlideGeometry

    geo = SlideGeometry((2000, 1000), 0.25)
    # napari puts pixel centres on integer data coordinates: level-0 pixel 10 is centred at world 10 * mpp.
    assert geo.world_to_level0((10 * 0.25, 20 * 0.25)) == pytest.approx((20.5, 10.5))
    for x, y in [(0.0, 0.0), (123.25, 7.5), (1999.9, 999.9)]:
        assert geo.world_to_level0(geo.level0_to_world(x, y)) == pytest.approx((x, y))
    assert geo.unit == "um" and SlideGeometry((10, 10), None).unit == "px"
    assert SlideGeometry((10, 10), None).image_scale == (1.0, 1.0)


def test_raster_transform_matches_the_label_map_and_layers_conventions():
    """The prototypes layer, prototypes.label_map and layers.region_labels_layer place pixels alike."""
    from napari_slpd.prototypes.label_map import label_map
    from napari_slpd.widgets.state import RegionLayout, SlideGeometry

    coords = np.array([[300, 100], [812, 100], [300, 612], [1324, 1124]])
    size = 512
    layout = RegionLayout(coords, size)
    raster, origin, step = layout.region_raster()
    geo = SlideGeometry((4000, 3000), 0.5)
    scale, translate = geo.raster_transform(origin, step)
    lm = label_map(np.array([0, 1, 2, 0]), coords, size)
    kwargs = lm.to_layer_kwargs(mpp=0.5)
    assert scale == pytest.approx(kwargs["scale"])
    assert translate == pytest.approx(kwargs["translate"])
    # Region i occupies raster value i + 1 where the label map has its prototype.
    assert raster.shape == lm.data.shape
    assert np.array_equal(raster > 0, lm.data > 0)
    assert set(np.unique(raster)) == {0, 1, 2, 3, 4}


def test_region_at_edges_and_non_lattice_fallback():
    from napari_slpd.widgets.state import RegionLayout

    layout = RegionLayout(np.array([[100, 200], [164, 200]]), 64)
    assert layout.region_at(100.0, 200.0) == 0
    assert layout.region_at(163.99, 263.99) == 0
    assert layout.region_at(164.0, 230.0) == 1
    assert layout.region_at(99.9, 230.0) is None
    assert layout.region_at(150.0, 264.0) is None
    assert layout.lattice() is not None
    # Overlapping regions (stride below the size) are not a lattice: painted at an eighth of their size.
    shifted = RegionLayout(np.array([[0, 0], [32, 0]]), 64)
    assert shifted.lattice() is None
    raster, origin, step = shifted.region_raster()
    assert step == 8 and origin == (0.0, 0.0)
    assert raster.shape == (8, 12)
    assert (raster[:, :4] == 1).all() and (raster[:, 4:] == 2).all()


# -- the shared state -------------------------------------------------------------------------------------


def test_state_signals_selection_and_one_state_per_viewer():
    from napari_slpd.widgets.state import RegionSelection, SlpdState

    class FakeViewer:
        layers = []

    viewer, other = FakeViewer(), FakeViewer()
    state = SlpdState.for_viewer(viewer)
    assert SlpdState.for_viewer(viewer) is state
    assert SlpdState.for_viewer(other) is not state
    seen = []
    state.selection_changed.connect(seen.append)
    state.prototype_style_changed.connect(lambda sid: seen.append(("style", sid)))
    selection = state.select_regions("slide", [5, 2, 2, 9], source="map")
    assert selection == RegionSelection("slide", (2, 5, 9), "map")
    state.clear_selection()
    state.set_prototype_style(names={1: "tumour"}, colors={1: (1.0, 0.0, 0.0)})
    assert seen == [selection, None, ("style", "")]
    assert state.prototype_name(1) == "tumour" and state.prototype_name(0) == "prototype 0"
    assert state.prototype_color(1) == (1.0, 0.0, 0.0, 1.0)
    assert len({state.prototype_color(k) for k in range(32)}) == 32  # distinguishable up to K = 32
    with pytest.raises(SlpdError, match="no cohort is open"):
        state.require_session()
    with pytest.raises(SlpdError, match="no slide is open"):
        state.require_current()
    with pytest.raises(AttributeError, match="no field"):
        state.update_settings(not_a_setting=1)


def test_settings_validation_messages():
    from napari_slpd.session import FeatureSettings, PrototypeSettings

    with pytest.raises(SlpdError, match="whole multiple"):
        FeatureSettings(region_px=250, patch_px=64)
    with pytest.raises(SlpdError, match="device"):
        FeatureSettings(device="tpu")
    with pytest.raises(SlpdError, match="between 1 and 32"):
        PrototypeSettings(k=0)


# -- the session ------------------------------------------------------------------------------------------


def test_statuses_and_cached_features_are_skipped(session):
    statuses = {s.slide_id: s for s in session.statuses()}
    assert all(s.features_done and s.prototypes_done for s in statuses.values()), statuses
    assert statuses["cmu_small_region"].n_regions >= 6
    results = session.extract(["cmu_small_region"])
    assert [r.status for r in results] == ["skipped"]
    # Other feature settings: the cached file is reported, never silently reused.
    other = tiny_settings(region_px=128)
    from napari_slpd.session import Session

    view = Session(session.root, settings=other)
    assert view.status("cmu_small_region").features == "other-settings"
    assert "region_px 256 (settings: 128)" in view.status("cmu_small_region").detail
    # K changed: prototypes are stale until recomputed, and computing them caches the new K.
    view_k = Session(session.root, settings=tiny_settings())
    view_k.settings.prototypes.k = 2
    assert view_k.status("cmu_small_region").prototypes == "stale"
    with pytest.raises(PrototypeError, match="K=2"):
        view_k.prototypes("cmu_small_region", compute=False)


def test_same_tissue_through_two_readers_is_the_nearest_slide(session):
    matches = session.similar_slides("cmu_small_region")
    assert matches[0].slide_id == "dicom-cmu-1-small-region-ybrfix", [(m.slide_id, m.distance) for m in matches]
    distances = [m.distance for m in matches]
    assert distances == sorted(distances)
    assert matches[0].distance < 0.05 * K
    assert "cmu_small_region" not in [m.slide_id for m in matches]
    # Pairs form a one-to-one matching whose cosines sum to S.
    best = matches[0]
    assert sorted(k for k, _ in best.pairs) == list(range(K))
    assert sum(best.pair_similarities) == pytest.approx(best.similarity, abs=1e-4)
    assert best.distance == pytest.approx(K - best.similarity, abs=1e-4)


def test_similar_regions_exclude_the_query_slide(session):
    data = session.region_data("cmu_small_region")
    hits = session.similar_regions("cmu_small_region", 0, top_k=4)
    assert 0 < len(hits) <= 4
    assert all(h.slide_id != "cmu_small_region" for h in hits)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    # The DICOM copy holds the same tissue: its region at (almost) the same place is the nearest (its grid
    # may sit a few pixels off, as its tissue mask comes from another pyramid level).
    assert hits[0].slide_id == "dicom-cmu-1-small-region-ybrfix"
    dicom = session.region_data("dicom-cmu-1-small-region-ybrfix")
    offset = np.abs(dicom.coords[hits[0].region] - data.coords[0])
    assert (offset < data.size / 8).all(), offset
    assert hits[0].prototype is not None
    with pytest.raises(SlpdError, match="no region"):
        session.similar_regions("cmu_small_region", len(data))


def test_thumbnails_are_cached_as_png(session):
    image = session.thumbnail("cmu_small_region", max_px=128)
    assert image.dtype == np.uint8 and max(image.shape[:2]) == 128
    path = session.cohort.thumbnail_path("cmu_small_region")
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    assert np.array_equal(session.thumbnail("cmu_small_region", max_px=128), image)
    assert path.stat().st_mtime_ns == mtime


def test_missing_features_raise_a_clear_error(tmp_path):
    from napari_slpd.session import Session

    from conftest import real_slide

    session = Session.open(tmp_path, slides=[real_slide("cmu_svs")], settings=tiny_settings())
    assert session.status("cmu_small_region").features == "missing"
    with pytest.raises(FeatureStoreError, match="slpd extract"):
        session.prototypes("cmu_small_region")


# -- embedding maps ---------------------------------------------------------------------------------------


def test_small_maps_fall_back_without_umap():
    xy, method = project_2d(np.random.default_rng(0).normal(size=(5, 8)))
    assert method == "pca" and xy.shape == (5, 2)
    xy, method = project_2d(np.ones((2, 8)))
    assert method == "trivial" and xy.shape == (2, 2)
    with pytest.raises(SlpdError, match="NaN"):
        project_2d(np.full((10, 4), np.nan))


def test_map_cache_is_keyed_by_features_and_params(tmp_path):
    # Few points (a PCA map) keep this test free of numba's compile time; the GUI test runs UMAP itself.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 16)).astype(np.float32)
    b = rng.normal(size=(3, 16)).astype(np.float32)
    slides = [("a", "key-a", a), ("b", "key-b", b)]
    params = UmapParams(n_neighbors=10)
    emap, cached = load_or_compute_map(tmp_path, "cohort", slides, params)
    assert not cached and emap.method == "pca" and emap.xy.shape == (7, 2)
    assert list(emap.rows_of("b", [0, 2])) == [4, 6]
    assert list(emap.rows_of("a")) == [0, 1, 2, 3]
    again, cached = load_or_compute_map(tmp_path, "cohort", slides, params)
    assert cached and np.array_equal(again.xy, emap.xy)
    # New features for one slide, or other UMAP parameters: recomputed, never the stale map.
    _, cached = load_or_compute_map(tmp_path, "cohort", [("a", "key-a2", a), ("b", "key-b", b)], params)
    assert not cached
    _, cached = load_or_compute_map(tmp_path, "cohort", slides, UmapParams(n_neighbors=5))
    assert not cached
    assert [p.name for p in (tmp_path / "embedding").iterdir()] == ["cohort_umap.npz"]


def test_cancelled_map_writes_nothing(tmp_path):
    cancel = threading.Event()
    cancel.set()
    slides = [("a", "k", np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32))]
    with pytest.raises(MapCancelled):
        load_or_compute_map(tmp_path, "a", slides, cancel=cancel)
    assert not cache_path(tmp_path, "a").exists()
    with pytest.raises(SlpdError, match="different sizes"):
        load_or_compute_map(tmp_path, "x", [("a", "k", np.ones((5, 8))), ("b", "k", np.ones((5, 4)))])


@pytest.mark.cuda
def test_session_runs_the_models_on_cuda(tmp_path):
    """device="cuda" reaches the encoders; GPU features (bf16 autocast) agree with the CPU's."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from conftest import real_slide

    from napari_slpd.session import Session

    slide = real_slide("cmu_svs")
    gpu = Session.open(tmp_path / "gpu", slides=[slide], settings=tiny_settings(device="cuda"))
    assert [r.status for r in gpu.extract()] == ["extracted"]
    patch, region = gpu.encoders()
    assert patch.device.type == "cuda" and region.device.type == "cuda"
    cpu = Session.open(tmp_path / "cpu", slides=[slide], settings=tiny_settings(device="cpu"))
    assert [r.status for r in cpu.extract()] == ["extracted"]
    a = gpu.region_data("cmu_small_region").embeddings
    b = cpu.region_data("cmu_small_region").embeddings
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.98, cos.min()
    assert gpu.prototypes("cmu_small_region").k == K
