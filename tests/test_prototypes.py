"""Intra-slide prototypes (faiss K-means), label maps that overlay the slide, and the prototype cache."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.cohort import Cohort
from napari_slpd.errors import PrototypeError
from napari_slpd.prototypes import compute_cohort_prototypes, compute_prototypes, label_map, load_prototypes

# -- helpers shared with the other prototype test files ----------------------------------------------------


def clustered_embeddings(rng, n_per=(40, 30, 20, 10), dim=32, spread=0.15):
    """Well separated clusters: returns (embeddings [M, dim], true labels [M])."""
    centres = rng.standard_normal((len(n_per), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.concatenate([np.full(n, i) for i, n in enumerate(n_per)])
    x = centres[labels] + spread * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    return x.astype(np.float32), labels


def write_feature_file(path: Path, embeddings: np.ndarray, region_size: int = 512, grid: int = 2,
                       token_dim: int = 8, settings_key: str = "key-1", patch_features: bool = True,
                       origin=(100, 60), columns: int = 5, seed: int = 0) -> np.ndarray:
    """A complete FeatureStore file in the docs/ARCHITECTURE.md layout, written with h5py directly.

    Regions sit row by row on a lattice of ``region_size`` level-0 px from ``origin``; patch features
    ([M * grid^2, token_dim]) and their coords follow the CLAM/TRIDENT layout. Returns region coords.
    """
    rng = np.random.default_rng(seed)
    M = embeddings.shape[0]
    idx = np.arange(M)
    coords = np.stack([origin[0] + (idx % columns) * region_size, origin[1] + (idx // columns) * region_size], 1)
    patch = region_size // grid
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("region_tokens", data=rng.standard_normal((M, token_dim, grid, grid)).astype(np.float16))
        fh.create_dataset("region_embeddings", data=np.asarray(embeddings, np.float32))
        fh.create_dataset("region_coords", data=coords.astype(np.int64))
        fh.create_dataset("region_coverage", data=np.linspace(0.3, 1.0, M).astype(np.float32))
        if patch_features:
            offsets = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="xy"), -1).reshape(-1, 2) * patch
            pcoords = (coords[:, None, :] + offsets[None]).reshape(-1, 2)
            feats = np.repeat(np.asarray(embeddings, np.float32)[:, :token_dim], grid * grid, axis=0)
            feats += 0.01 * rng.standard_normal(feats.shape).astype(np.float32)
            fh.create_dataset("features", data=feats)
            ds = fh.create_dataset("coords", data=pcoords.astype(np.int64))
            ds.attrs["patch_size"] = patch
            ds.attrs["patch_level"] = 0
            ds.attrs["patch_size_level0"] = patch
        fh.attrs.update({"slide_id": path.stem, "slide_path": f"/slides/{path.stem}.svs", "complete": True,
                         "settings_key": settings_key, "region_size_level0": region_size, "region_px": region_size,
                         "patch_px": patch, "target_mpp": 0.5, "mpp": 0.5, "mpp_source": "metadata",
                         "n_regions": M, "code_version": "test"})
    return coords


def make_cohort(root: Path, slides: dict[str, np.ndarray], **kwargs) -> Cohort:
    """A cohort whose slides (name -> region embeddings) have feature files and registry entries."""
    cohort = Cohort(root)
    for i, (slide_id, emb) in enumerate(slides.items()):
        slide_path = root / "slides" / f"{slide_id}.svs"
        slide_path.parent.mkdir(parents=True, exist_ok=True)
        slide_path.write_bytes(b"")
        cohort.add_slide(slide_path)
        write_feature_file(cohort.features_path(slide_id), emb, seed=i, **kwargs)
    return cohort


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- K-means ---------------------------------------------------------------------------------------------


def test_kmeans_recovers_planted_clusters_with_normalized_prototypes():
    rng = np.random.default_rng(0)
    x, labels = clustered_embeddings(rng)
    x *= rng.uniform(0.5, 3.0, size=(x.shape[0], 1)).astype(np.float32)  # scale must not matter
    protos = compute_prototypes(x, k=4)
    assert protos.k == 4 and protos.k_requested == 4 and protos.note == ""
    assert (protos.seed, protos.niter, protos.nredo) == (0, 10, 5)
    assert np.allclose(np.linalg.norm(protos.centroids, axis=1), 1.0, atol=1e-5)
    # Each planted cluster is exactly one prototype; numbered by size, largest first.
    assert np.array_equal(protos.assignments, labels)
    assert np.allclose(protos.sizes, [0.4, 0.3, 0.2, 0.1]) and protos.sizes.sum() == pytest.approx(1.0)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(protos.similarity, np.sum(xn * protos.centroids[protos.assignments], axis=1), atol=1e-5)
    assert np.allclose(protos.distances, 1 - protos.similarity)
    assert protos.similarity.min() > 0.8
    # Deterministic (seed 0), and weights turn sizes into fractions of tissue.
    again = compute_prototypes(x, k=4)
    assert np.array_equal(again.centroids, protos.centroids) and np.array_equal(again.assignments, protos.assignments)
    weights = np.where(labels == 3, 4.0, 1.0)
    weighted = compute_prototypes(x, k=4, weights=weights)
    assert weighted.sizes[0] == pytest.approx(40 / 130) and sorted(weighted.sizes)[::-1] == list(weighted.sizes)


def test_kmeans_works_on_any_embedding_size_and_dtype():
    rng = np.random.default_rng(1)
    for dim in (192, 384, 1024):  # ViT-4K regions, ViT-256 patches, UNI-like patch features
        x, labels = clustered_embeddings(rng, n_per=(25, 25, 25), dim=dim)
        protos = compute_prototypes(x.astype(np.float16), k=3)
        assert protos.centroids.shape == (3, dim) and protos.centroids.dtype == np.float32
        assert len(np.unique(protos.assignments[labels == 0])) == 1


def test_k_is_capped_by_the_number_of_regions_with_a_message(caplog):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    protos = compute_prototypes(x, k=5)
    assert protos.k == 3 and protos.k_requested == 5
    assert "capped from 5 to 3" in protos.note and "only 3 regions" in protos.note
    assert "capped" in caplog.text
    assert sorted(protos.assignments.tolist()) == [0, 1, 2]
    with pytest.raises(PrototypeError, match="fewer than K = 5"):
        compute_prototypes(x, k=5, cap_k=False)
    with pytest.raises(PrototypeError, match="minimum of 32"):
        compute_prototypes(rng.standard_normal((20, 16)), k=4, min_regions=32)


def test_bad_embeddings_get_clear_messages():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    nan = x.copy()
    nan[[4, 9], 2] = np.nan
    with pytest.raises(PrototypeError, match=r"2 of 50 rows contain NaN.*rows 4, 9"):
        compute_prototypes(nan, k=4)
    zero = x.copy()
    zero[7] = 0
    with pytest.raises(PrototypeError, match="all zeros"):
        compute_prototypes(zero, k=4)
    with pytest.raises(PrototypeError, match="no regions"):
        compute_prototypes(np.zeros((0, 8)), k=4)
    with pytest.raises(PrototypeError, match="2-D"):
        compute_prototypes(x[0], k=4)
    with pytest.raises(PrototypeError, match="between 1 and 255"):
        compute_prototypes(x, k=0)


@pytest.mark.cuda
def test_kmeans_on_gpu_matches_cpu():
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("this faiss build sees no GPU (install faiss-gpu)")
    rng = np.random.default_rng(4)
    x, labels = clustered_embeddings(rng, dim=192)
    gpu = compute_prototypes(x, k=4, device="cuda")
    cpu = compute_prototypes(x, k=4, device="cpu")
    assert np.array_equal(gpu.assignments, labels) and np.array_equal(cpu.assignments, labels)
    assert np.allclose(gpu.centroids, cpu.centroids, atol=1e-4)


# -- label maps ------------------------------------------------------------------------------------------


def napari_world_to_label_pixel(kwargs, world_yx):
    """Where napari draws a world point on a labels layer with these kwargs: data index = round((w - t) / s)."""
    (sy, sx), (ty, tx) = kwargs["scale"], kwargs["translate"]
    return int(np.floor((world_yx[0] - ty) / sy + 0.5)), int(np.floor((world_yx[1] - tx) / sx + 0.5))


def check_overlay(lm, coords, size, labels, mpp):
    """Every tile's level-0 box, in world coordinates as the slide layer places it (pixel j centred at
    j * mpp), lands on label pixels of that tile, and just outside lands elsewhere."""
    kwargs = lm.to_layer_kwargs(mpp)
    for i, ((x0, y0), label) in enumerate(zip(coords, labels)):
        for px, py in ((x0, y0), (x0 + size - 1, y0 + size - 1), (x0 + size // 2, y0)):
            # The centre of level-0 pixel (px, py) is at world (py * mpp, px * mpp); its edges are 0.49 px away.
            for dx, dy in ((0, 0), (-0.49, -0.49), (0.49, 0.49)):
                r, c = napari_world_to_label_pixel(kwargs, ((py + dy) * mpp, (px + dx) * mpp))
                assert lm.tile_index[r, c] == i and lm.data[r, c] == label + 1
            assert lm.tile_at(px + 0.5, py + 0.5) == i and lm.label_at(px + 0.5, py + 0.5) == label
        r, c = napari_world_to_label_pixel(kwargs, ((y0 - 0.51) * mpp, (x0 - 0.51) * mpp))
        assert not (0 <= r < lm.data.shape[0] and 0 <= c < lm.data.shape[1]) or lm.tile_index[r, c] != i


def test_label_map_on_a_region_lattice_overlays_each_region():
    rng = np.random.default_rng(5)
    size = 1026  # e.g. 4096 px at 0.5 um/px on a 0.499 um/px scan... scaled down
    cells = [(c, r) for r in range(4) for c in range(6) if (r, c) not in {(0, 0), (2, 3)}]
    coords = np.array([(37 + c * size, 11 + r * size) for c, r in cells])
    labels = rng.integers(0, 4, len(coords))
    lm = label_map(labels, coords, size, n_labels=4)
    assert lm.exact and lm.scale == size and lm.data.dtype == np.uint8 and lm.shape == (4, 6)
    assert lm.origin == (37.0, 11.0) and lm.translate == (11 + size / 2 - 0.5, 37 + size / 2 - 0.5)
    assert lm.data[0, 0] == 0 and lm.tile_index[0, 0] == -1  # background where there is no region
    for mpp in (None, 0.499):
        check_overlay(lm, coords, size, labels, mpp or 1.0)
    kwargs = lm.to_layer_kwargs(0.499)
    assert kwargs["scale"] == pytest.approx((size * 0.499, size * 0.499)) and kwargs["units"] == ("um", "um")


def test_patch_resolution_label_maps_fractional_and_overlapping_tiles():
    # Patches of a region whose level-0 size is not a multiple of 16: integer coords, fractional size.
    size = 1026 / 16
    rows, cols = np.meshgrid(np.arange(16), np.arange(32), indexing="ij")
    coords = np.stack([np.round(500 + cols.ravel() * size), np.round(300 + rows.ravel() * size)], 1).astype(np.int64)
    labels = (rows.ravel() + cols.ravel()) % 3
    lm = label_map(labels, coords, size)
    assert not lm.exact and lm.shape == (16, 32) and lm.n_labels == 3
    assert np.array_equal(lm.data, (labels.reshape(16, 32) + 1).astype(np.uint8))
    # Overlapping patches (stride half the size): cells of half a patch, the later patch wins the overlap.
    ov = np.array([(0, 0), (64, 0), (128, 0)])
    lm = label_map(np.array([0, 1, 2]), ov, 128)
    assert lm.exact and lm.scale == 64 and lm.data.tolist() == [[1, 2, 3, 3], [1, 2, 3, 3]]
    assert lm.tile_at(100, 10) == 1 and lm.tile_at(10, 10) == 0
    with pytest.raises(PrototypeError, match="regular grid"):
        label_map(np.array([0, 1]), np.array([[0.0, 0.0], [37.5, 0.0]]), 100)
    with pytest.raises(PrototypeError, match="3 prototype assignments for 2"):
        label_map(np.array([0, 1, 2]), ov[:2], 128)
    big = label_map(np.arange(300) % 300, np.stack([np.arange(300) * 4, np.zeros(300)], 1), 4)
    assert big.data.dtype == np.uint16


def test_label_map_overlays_a_real_slide_grid_and_matches_the_region_layer():
    slide_path = real_slide("cmu_svs")
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.viewer.layers import region_labels_layer, region_rectangles
    from napari_slpd.slides.slide import open_slide
    from napari_slpd.slides.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), GridConfig(region_px=512, patch_px=64, target_mpp=0.5,
                                                                         min_tissue=0.05))
        assert len(grid) >= 6
        labels = np.arange(len(grid)) % 4
        lm = label_map(labels, grid.coords, grid.region_size_level0, n_labels=4)
        assert lm.exact
        mpp = slide.mpp
        check_overlay(lm, grid.coords, grid.region_size_level0, labels, mpp)
        # The region grid's rectangles (as the grid layer draws them) enclose exactly their label pixel.
        kwargs = lm.to_layer_kwargs(mpp)
        for i, rect in enumerate(region_rectangles(grid)):
            (y0, x0), (y1, x1) = rect[0], rect[2]
            centre = ((y0 + y1) / 2 * mpp, (x0 + x1) / 2 * mpp)
            assert lm.tile_index[napari_world_to_label_pixel(kwargs, centre)] == i
        # Same placement as the slide-layer helper of napari_slpd.viewer.layers (which pads to the slide origin).
        image, other, _ = region_labels_layer(slide, grid, labels)
        for x0, y0 in grid.coords:
            world = ((y0 + 10) * mpp, (x0 + 10) * mpp)
            a = lm.data[napari_world_to_label_pixel(kwargs, world)]
            b = image[napari_world_to_label_pixel(other, world)]
            assert a == b


def test_label_map_layer_kwargs_place_a_napari_labels_layer():
    napari_layers = pytest.importorskip("napari.layers")
    coords = np.array([(200, 100), (712, 100), (200, 612)])
    lm = label_map(np.array([0, 1, 2]), coords, 512)
    layer = napari_layers.Labels(lm.data, **{k: v for k, v in lm.to_layer_kwargs(0.25).items() if k != "units"})
    for i, (x0, y0) in enumerate(coords):
        for px, py in ((x0, y0), (x0 + 511, y0 + 511)):
            row, col = np.round(layer.world_to_data((py * 0.25, px * 0.25))).astype(int)
            assert lm.tile_index[row, col] == i


# -- the cohort cache ------------------------------------------------------------------------------------


def test_cohort_prototypes_are_cached_reused_and_detected_stale(tmp_path):
    rng = np.random.default_rng(6)
    slides = {f"s{i}": clustered_embeddings(rng, n_per=(12, 8, 6, 4), dim=16)[0] for i in range(3)}
    cohort = make_cohort(tmp_path / "cohort", slides)
    calls = []
    report = compute_cohort_prototypes(cohort, k=3, progress=lambda d, t: calls.append((d, t)))
    assert [r.status for r in report.results] == ["computed"] * 3 and calls[-1] == (3, 3)
    assert report.results[0].k == 3 and report.results[0].n_regions == 30 and report.results[0].dim == 16
    protos = load_prototypes(cohort, "s1")
    assert protos.k == 3 and protos.source == "region_embeddings" and protos.tile_size_level0 == 512
    assert protos.coords.shape == (30, 2) and protos.features_settings_key == "key-1"
    lm = protos.label_map()
    assert lm.exact and lm.shape == (6, 5) and set(np.unique(lm.data)) <= {0, 1, 2, 3}
    # Sizes are fractions of tissue: region_coverage weights.
    with h5py.File(cohort.features_path("s1"), "r") as fh:
        cov = fh["region_coverage"][()]
    assert protos.sizes == pytest.approx(np.bincount(protos.assignments, cov, 3) / cov.sum())

    digest = file_digest(cohort.prototypes_path("s0"))
    again = compute_cohort_prototypes(cohort, k=3)
    assert [r.status for r in again.results] == ["current"] * 3
    assert file_digest(cohort.prototypes_path("s0")) == digest
    # Another K recomputes; re-extracted features make the cache stale.
    assert [r.status for r in compute_cohort_prototypes(cohort, k=2).results] == ["computed"] * 3
    write_feature_file(cohort.features_path("s2"), slides["s2"], settings_key="key-2")
    with pytest.raises(PrototypeError, match="out of date.*extracted again"):
        load_prototypes(cohort, "s2")
    assert load_prototypes(cohort, "s2", check_stale=False).k == 2
    report = compute_cohort_prototypes(cohort, k=2)
    assert [r.status for r in report.results] == ["current", "current", "computed"]
    assert load_prototypes(cohort, "s2").features_settings_key == "key-2"


def test_patch_feature_prototypes_and_their_label_map(tmp_path):
    rng = np.random.default_rng(7)
    cohort = make_cohort(tmp_path / "cohort", {"a": clustered_embeddings(rng, n_per=(10, 10), dim=16)[0]})
    report = compute_cohort_prototypes(cohort, k=2, source="features")
    assert report.results[0].status == "computed" and report.results[0].n_regions == 20 * 4
    protos = load_prototypes(cohort, "a", source="features")
    assert protos.tile_size_level0 == 256 and protos.dim == 8
    lm = protos.label_map()
    assert lm.exact and lm.scale == 256 and lm.shape == (8, 10)
    # Patches of one region share its cluster here, so each 2x2 block of the map has one label.
    blocks = lm.data.reshape(4, 2, 5, 2).transpose(0, 2, 1, 3).reshape(20, 4)
    assert (blocks == blocks[:, :1]).all()
    with pytest.raises(PrototypeError, match="source was 'features', now 'region_embeddings'"):
        load_prototypes(cohort, "a", source="region_embeddings")
    no_patches = make_cohort(tmp_path / "c2", {"b": rng.standard_normal((6, 16))}, patch_features=False)
    report = compute_cohort_prototypes(no_patches, k=2, source="features")
    assert report.results[0].status == "failed" and "no patch features" in report.results[0].message


def test_bad_slides_fail_alone_and_keep_their_cached_prototypes(tmp_path):
    rng = np.random.default_rng(8)
    good = clustered_embeddings(rng, n_per=(10, 10), dim=16)[0]
    cohort = make_cohort(tmp_path / "cohort", {"good": good, "nan": good.copy(), "small": good[:3],
                                               "wide": rng.standard_normal((20, 24))})
    first = compute_cohort_prototypes(cohort, k=4)
    assert {r.slide_id: r.status for r in first.results} == {
        "good": "computed", "nan": "computed", "small": "computed", "wide": "computed"}
    assert "capped from 4 to 3" in next(r.message for r in first.results if r.slide_id == "small")
    assert first.warnings and "different sizes" in first.warnings[0] and "24-d: wide" in first.warnings[0]
    digest = file_digest(cohort.prototypes_path("nan"))
    broken = good.copy()
    broken[5, 1] = np.nan
    write_feature_file(cohort.features_path("nan"), broken, settings_key="key-2")
    report = compute_cohort_prototypes(cohort, k=4, min_regions=8)
    status = {r.slide_id: (r.status, r.message) for r in report.results}
    assert status["nan"][0] == "failed" and "NaN" in status["nan"][1]
    assert status["small"][0] == "failed" and "minimum of 8" in status["small"][1]
    assert status["good"][0] == "computed"  # min_regions is part of what makes a cache file current
    assert file_digest(cohort.prototypes_path("nan")) == digest  # the old file is kept
    assert not list(cohort.prototypes_path("nan").parent.glob("*.partial"))


def test_empty_cohorts_missing_features_and_cancel(tmp_path):
    with pytest.raises(PrototypeError, match="has no slides"):
        compute_cohort_prototypes(Cohort(tmp_path / "empty"), k=4)
    cohort = Cohort(tmp_path / "nofeat")
    (tmp_path / "x.svs").write_bytes(b"")
    cohort.add_slide(tmp_path / "x.svs")
    with pytest.raises(PrototypeError, match="none of the 1 slides.*slpd extract"):
        compute_cohort_prototypes(cohort, k=4)
    with pytest.raises(PrototypeError, match="no prototypes yet"):
        load_prototypes(cohort, "x")
    rng = np.random.default_rng(9)
    cohort = make_cohort(tmp_path / "c", {f"s{i}": rng.standard_normal((8, 16)) for i in range(4)})
    stop = threading.Event()
    report = compute_cohort_prototypes(cohort, k=2, progress=lambda d, t: stop.set() if d == 2 else None, cancel=stop)
    assert report.cancelled and [r.status for r in report.results] == ["computed", "computed"]
    with pytest.raises(PrototypeError, match="source must be one of"):
        compute_cohort_prototypes(cohort, k=2, source="tokens")


def test_missing_faiss_names_the_extra_to_install(monkeypatch):
    import sys

    from napari_slpd.prototypes.kmeans import import_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(PrototypeError, match=r"napari-slpd\[cpu\]"):
        import_faiss()
