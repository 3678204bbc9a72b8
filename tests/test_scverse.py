"""The scverse way in and out, with the real libraries (spatialdata, anndata, wsidata, lazyslide).

A slide exported with ``slpd export-spatialdata`` opens with wsidata as its own: its tiles, tile spec and
features equal ours, at a pyramid level above 0 and with non-square pixels; tiles read by wsidata at its
tile spec are the pixels we read. Features that LazySlide wrote import with ``slpd import-spatialdata`` and
give the same prototypes as the same arrays given directly. Without the libraries the commands say how to
install them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import real_slide

SCVERSE = ("spatialdata", "anndata", "geopandas", "wsidata")


def need_scverse(*extra):
    for name in (*SCVERSE, *extra):
        pytest.importorskip(name, reason=f"{name} is not installed: the scverse extra (pip install "
                                         "'napari-slpd[scverse]') is needed for this test")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MPP_X, MPP_Y = 0.25, 0.30  # non-square pixels


def write_pyramid(path: Path, source: Path, width=1536, height=1280) -> Path:
    """A two-level tiled TIFF of real tissue whose pixels are 0.25 x 0.30 um (deflate: exact reads)."""
    import tifffile

    from napari_slpd.slides.slide import open_slide

    with open_slide(source) as src:
        level0 = src.read_region((300, 600), 0, (width, height))
    level1 = level0.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for k, image in enumerate((level0, level1)):
            tif.write(image, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None,
                      resolution=(1e4 / MPP_X / 2 ** k, 1e4 / MPP_Y / 2 ** k), resolutionunit="CENTIMETER",
                      subfiletype=1 if k else 0)
    return path


def write_clam(path: Path, features, coords, **attrs) -> Path:
    import h5py

    with h5py.File(path, "w") as fh:
        fh["features"] = features
        ds = fh.create_dataset("coords", data=coords)
        for key, value in attrs.items():
            ds.attrs[key] = value
    return path


def write_proalign_result(cohort, slide_id: str, patch_coords: np.ndarray) -> np.ndarray:
    """A ProAlign result (zero-shot patch labels) on the slide's patches, as `slpd proalign` caches it."""
    from napari_slpd.proalign.cache import ProAlignResult, write_proalign

    n, k, d = len(patch_coords), 3, 4
    labels = (np.arange(n) * 7 % k).astype(np.int32)
    zeros = np.zeros((k, d), np.float32)
    result = ProAlignResult(
        slide_id=slide_id, names=["tumour", "stroma", "necrosis"], colors=["#ff0000", "#00ff00", "#0000ff"],
        slide_embedding=np.zeros(k * d, np.float32), slide_embedding_mean=np.zeros(d, np.float32),
        prototype_embeddings=zeros, visual_prototypes=zeros, text_prototypes=zeros,
        patch_coords=patch_coords, patch_labels=labels, patch_confidence=np.full(n, 0.9, np.float32),
        patch_similarity=np.full(n, 0.3, np.float32), attrs={"patch_size_level0": 256.0},
    )
    write_proalign(cohort.proalign_path(slide_id), result)
    return labels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A cohort of one pyramid slide whose patches were cut at level 1 (128 px = 256 level-0 px), its
    prototypes, and its export (``slpd export-spatialdata``)."""
    need_scverse()
    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort

    tmp = tmp_path_factory.mktemp("scverse")
    slide = write_pyramid(tmp / "pyramid.tiff", real_slide("cmu_svs"))
    xs, ys = np.meshgrid(np.arange(0, 1536 - 255, 256), np.arange(0, 1280 - 255, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    rng = np.random.default_rng(3)
    features = rng.normal(size=(len(coords), 12)).astype(np.float32)
    h5 = tmp / "h5"
    h5.mkdir()
    write_clam(h5 / "pyramid.h5", features, coords, patch_size=128, patch_level=1)
    cohort_dir = tmp / "cohort"
    assert main(["import-features", str(h5), "--out", str(cohort_dir), "--slides", str(slide),
                 "--patches-per-region", "2", "--encoder-name", "uni", "--quiet"]) == 0
    assert main(["prototypes", str(cohort_dir), "-k", "3", "--device", "cpu", "--quiet", "--no-index"]) == 0
    write_proalign_result(Cohort(cohort_dir), "pyramid", coords)
    out = tmp / "export"
    assert main(["export-spatialdata", str(cohort_dir), "--out", str(out), "--quiet"]) == 0
    return {"slide": slide, "cohort": Cohort(cohort_dir), "coords": coords, "features": features,
            "zarr": out / "pyramid.zarr", "h5ad": out / "cohort.h5ad"}


def test_slide_pixels_are_non_square_and_pyramidal(exported):
    from napari_slpd.slides.slide import open_slide

    with open_slide(exported["slide"]) as slide:
        assert slide.level_count == 2 and slide.level_downsamples[1] == pytest.approx(2.0)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP_X)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP_Y)


def test_wsidata_opens_the_export_with_our_tiles_and_features(exported):
    import wsidata

    wsi = wsidata.open_wsi(exported["slide"], store=str(exported["zarr"]))
    try:
        adata = wsi.fetch.features_anndata("uni", tile_key="tiles")
        np.testing.assert_array_equal(adata.X, exported["features"])
        np.testing.assert_array_equal(adata.obsm["spatial"], exported["coords"])
        spec = wsi.tile_spec("tiles")
        # cut at level 1 as 128-px patches: 256 level-0 px, read 128 px from level 1 without resizing
        assert (spec.width, spec.ops_level, spec.ops_width, spec.base_width) == (128, 1, 128, 256)
        bounds = wsi.shapes["tiles"].bounds.to_numpy()
        np.testing.assert_array_equal(bounds[:, 2:] - bounds[:, :2], 256)
        # wsidata reads each tile where we read it: the same pixels at level 1
        from wsidata._model.tile import shapes2tiles

        from napari_slpd.slides.slide import open_slide

        requests = shapes2tiles(wsi, "tiles")
        with open_slide(exported["slide"]) as slide:
            for req in requests[:: max(1, len(requests) // 5)]:
                assert (req.level, req.width, req.height, req.dsize) == (1, 128, 128, None)
                theirs = np.asarray(wsi.reader.get_region(req.x, req.y, req.width, req.height, level=req.level))
                ours = slide.read_region((req.x, req.y), 1, (128, 128))
                np.testing.assert_array_equal(theirs[..., :3], ours)
        # regions: the region encoder's table keyed as LazySlide keys it, with the prototypes in obs
        regions = wsi.tables["uni_mean_regions"]
        from napari_slpd.features.store import FeatureStore
        from napari_slpd.labeling.palette import default_name
        from napari_slpd.prototypes.cache import load_prototypes

        with FeatureStore.open(exported["cohort"].features_path("pyramid")) as store:
            np.testing.assert_allclose(regions.X, store.region_embeddings)
            region_coords = store.region_coords
        protos = load_prototypes(exported["cohort"], "pyramid")
        np.testing.assert_array_equal(regions.obs["prototype"].cat.codes.to_numpy(), protos.assignments)
        assert list(regions.obs["prototype_name"].cat.categories) == [default_name(k) for k in range(protos.k)]
        np.testing.assert_allclose(regions.varm["agg_prototype"].T, protos.centroids)
        np.testing.assert_array_equal(wsi.shapes["regions"].bounds[["minx", "miny"]].to_numpy(), region_coords)
        assert len(wsi.shapes["tissues"]) >= 1
    finally:
        wsi.close()


@pytest.mark.parametrize("patch_features", [True, False], ids=["patch-features", "token-grids-only"])
def test_extracted_features_export_at_their_read_level(exported, tmp_path, patch_features):
    """`slpd extract` at 0.55 um/px reads the 0.275 um/px slide at level 1 without resizing: wsidata's
    tile spec says so and its tiles are the pixels the patch encoder saw; without stored patch features
    the token grids are the tiles' features."""
    import wsidata

    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.store import FeatureStore

    cohort_dir = tmp_path / "cohort"
    args = [str(exported["slide"]), "--out", str(cohort_dir), "--region-px", "256", "--patch-px", "128",
            "--target-mpp", "0.55", "--input-size", "32", "--device", "cpu", "--workers", "1", "--threads", "1",
            "--quiet"]
    assert main(["extract", *args, *([] if patch_features else ["--no-patch-features"])]) == 0
    out = tmp_path / "export"
    assert main(["export-spatialdata", str(cohort_dir), "--out", str(out), "--no-cohort", "--quiet"]) == 0
    with FeatureStore.open(Cohort(cohort_dir).features_path("pyramid")) as store:
        assert store.attrs["read_level"] == 1 and store.attrs["region_size_level0"] == 512
        tokens = store.tokens()  # [M, D, 2, 2]
        expected = tokens.transpose(0, 2, 3, 1).reshape(-1, tokens.shape[1])
        region_coords = store.region_coords
    wsi = wsidata.open_wsi(exported["slide"], store=str(out / "pyramid.zarr"))
    try:
        key = next(k for k in wsi.tables if k.endswith("_tiles"))
        adata = wsi.fetch.features_anndata(key)
        np.testing.assert_allclose(adata.X, expected, rtol=1e-3, atol=1e-3)  # tokens are stored as float16
        spec = wsi.tile_spec("tiles")
        assert (spec.width, spec.ops_level, spec.ops_width, spec.base_width, spec.mpp) == (128, 1, 128, 256, 0.55)
        corners = adata.obsm["spatial"].reshape(len(region_coords), 4, 2)
        np.testing.assert_array_equal(corners[:, 0], region_coords)  # region-major, row-major patches
        np.testing.assert_array_equal(corners[:, 3] - corners[:, 0], [[256, 256]] * len(region_coords))
        regions = wsi.tile_spec("regions")
        assert (regions.width, regions.ops_level, regions.base_width) == (256, 1, 512)
    finally:
        wsi.close()


def test_coordinate_systems_and_label_map_placement(exported):
    from spatialdata import read_zarr, transform
    from spatialdata.transformations import get_transformation

    sdata = read_zarr(exported["zarr"])
    tiles_um = transform(sdata.shapes["tiles"], to_coordinate_system="um").bounds.to_numpy()
    np.testing.assert_allclose(tiles_um[:, 0], exported["coords"][:, 0] * MPP_X)
    np.testing.assert_allclose(tiles_um[:, 1], exported["coords"][:, 1] * MPP_Y)
    np.testing.assert_allclose(tiles_um[:, 2] - tiles_um[:, 0], 256 * MPP_X)
    np.testing.assert_allclose(tiles_um[:, 3] - tiles_um[:, 1], 256 * MPP_Y)
    # the label map: each region's centre, mapped into the raster, carries its prototype + 1
    labels = sdata.labels["prototypes"]
    matrix = get_transformation(labels, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
    inverse = np.linalg.inv(np.asarray(matrix))
    regions = sdata.tables["uni_mean_regions"]
    shapes = sdata.shapes["regions"].bounds.to_numpy()
    centres = np.c_[(shapes[:, 0] + shapes[:, 2]) / 2, (shapes[:, 1] + shapes[:, 3]) / 2, np.ones(len(shapes))]
    pixel = np.floor(centres @ inverse.T)[:, :2].astype(int)
    data = np.asarray(labels.data)
    np.testing.assert_array_equal(data[pixel[:, 1], pixel[:, 0]], regions.obs["prototype"].cat.codes.to_numpy() + 1)
    # ProAlign's zero-shot labels: in the patch table's obs and as a label map on the patch lattice
    tiles = sdata.tables["uni_tiles"]
    proalign = tiles.obs["proalign_label"]
    assert list(proalign.cat.categories) == ["tumour", "stroma", "necrosis"]
    expected = (np.arange(len(exported["coords"])) * 7 % 3)
    np.testing.assert_array_equal(proalign.cat.codes.to_numpy(), expected)
    patch_map = sdata.labels["proalign_patches"]
    matrix = get_transformation(patch_map, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
    centres = np.c_[exported["coords"] + 128.0, np.ones(len(exported["coords"]))]
    pixel = np.floor(centres @ np.linalg.inv(np.asarray(matrix)).T)[:, :2].astype(int)
    np.testing.assert_array_equal(np.asarray(patch_map.data)[pixel[:, 1], pixel[:, 0]], expected + 1)
    meaning = sdata.attrs["napari_slpd"]["labels"]["proalign_patches"]
    assert meaning["values"]["1"] == "tumour" and meaning["colors"]["3"] == "#0000ff"
    thumb = sdata.images["wsi_thumbnail"]
    corner = get_transformation(thumb, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.asarray(corner) @ [thumb.shape[2], thumb.shape[1], 1], [1536, 1280, 1])


def test_cohort_anndata_for_scanpy(exported):
    import anndata

    adata = anndata.read_h5ad(exported["h5ad"])
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(exported["cohort"].features_path("pyramid")) as store:
        emb = store.region_embeddings
    assert list(adata.obs_names) == ["pyramid"]
    np.testing.assert_allclose(adata.X[0], emb.mean(axis=0), rtol=1e-5, atol=1e-6)
    # the same vector as the slide store's whole-slide aggregate, which wsidata.agg_wsi collects
    import pandas as pd
    from wsidata.io import agg_wsi

    table = pd.DataFrame({"store": [str(exported["zarr"])]})
    collected = agg_wsi(table, "uni_mean", tile_key="regions", agg_key="agg_slide", store_col="store")
    np.testing.assert_allclose(collected.X[0], adata.X[0], rtol=1e-6)
    assert adata.obs["store"].iloc[0].endswith("pyramid.zarr") and adata.obs["n_prototypes"].iloc[0] == 3
    assert adata.uns["prototypes"]["pyramid"]["centroids"].shape == (3, 12)


def test_lazyslide_features_import_to_the_same_prototypes(tmp_path):
    need_scverse("lazyslide")
    import pandas as pd
    import wsidata
    from lazyslide import pp
    from lazyslide._const import Key
    from wsidata.io import add_features

    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort
    from napari_slpd.prototypes import compute_prototypes
    from napari_slpd.prototypes.cache import compute_slide_prototypes

    slide = real_slide("cmu_svs")
    store = tmp_path / "cmu_small_region.zarr"
    wsi = wsidata.open_wsi(slide, store=str(store))
    pp.find_tissues(wsi)
    pp.tile_tissues(wsi, 224, mpp=0.5)  # LazySlide's own tiles and tile spec
    n = len(wsi.shapes[Key.tiles])
    features = np.random.default_rng(5).normal(size=(n, 20)).astype(np.float32)
    # anndata <= 0.12.6 (the last for Python 3.11) cannot write pandas 3's Arrow strings
    with pd.option_context("future.infer_string", False):
        add_features(wsi, Key.feature("resnet50"), Key.tiles, features)  # as zs.tl.feature_extraction does
        wsi.write()
    wsi.close()
    cohort_dir = tmp_path / "cohort"
    assert main(["import-spatialdata", str(store), "--out", str(cohort_dir), "--slides", str(slide),
                 "--patches-per-region", "2", "--quiet"]) == 0
    cohort = Cohort(cohort_dir)
    assert cohort.slide_ids() == ["cmu_small_region"]
    ours = compute_slide_prototypes(cohort, "cmu_small_region", k=4, source="features", device="cpu", save=False)
    direct = compute_prototypes(features, k=4, device="cpu")
    np.testing.assert_allclose(ours.centroids, direct.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.assignments, direct.assignments)
    # the regions are those the same arrays give through the CLAM/TRIDENT import
    reopened = wsidata.open_wsi(slide, store=str(store))
    try:
        coords = reopened.shapes["tiles"].bounds[["minx", "miny"]].to_numpy().astype(np.int64)
        spec = reopened.tile_spec("tiles")
    finally:
        reopened.close()
    write_clam(tmp_path / "cmu_small_region.h5", features, coords, patch_size=spec.width, patch_level=0,
               patch_size_level0=float(spec.width * spec.base_downsample))
    other = tmp_path / "clam"
    assert main(["import-features", str(tmp_path / "cmu_small_region.h5"), "--out", str(other), "--slides",
                 str(slide), "--patches-per-region", "2", "--quiet"]) == 0
    a = compute_slide_prototypes(cohort, "cmu_small_region", k=3, device="cpu", save=False)
    b = compute_slide_prototypes(Cohort(other), "cmu_small_region", k=3, device="cpu", save=False)
    np.testing.assert_allclose(a.centroids, b.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.coords, b.coords)


def test_our_export_imports_back_and_the_table_must_be_named(exported, tmp_path, capsys):
    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.store import FeatureStore

    store = exported["zarr"]  # two feature tables: uni_tiles and uni_mean_regions
    cohort_dir = tmp_path / "back"
    args = ["import-spatialdata", str(store), "--out", str(cohort_dir), "--slides", str(exported["slide"]),
            "--patches-per-region", "2", "--quiet"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "2 feature tables" in out and "uni_tiles (tiles tiles)" in out and "uni_mean_regions" in out
    assert main([*args, "--feature-key", "uni"]) == 0
    with FeatureStore.open(Cohort(cohort_dir).features_path("pyramid")) as back, \
            FeatureStore.open(exported["cohort"].features_path("pyramid")) as ours:
        np.testing.assert_array_equal(back.features[()], ours.features[()])
        np.testing.assert_array_equal(back.coords, ours.coords)
        np.testing.assert_array_equal(back.region_coords, ours.region_coords)
        np.testing.assert_allclose(back.region_embeddings, ours.region_embeddings, rtol=1e-6)
        assert back.attrs["patch_size_level0"] == 256 and back.coords_attrs["patch_level"] == 1
        assert back.attrs["patch_encoder"] == "uni" and back.attrs["source"] == "imported from pyramid.zarr"
    assert main([*args, "--feature-key", "uni"]) == 0  # same features again: kept, not redone
    assert "skipped" in capsys.readouterr().out
    bogus = tmp_path / "empty.zarr"
    bogus.mkdir()
    assert main(["import-spatialdata", str(bogus), "--out", str(cohort_dir), "--quiet"]) == 1
    assert "not a readable SpatialData zarr store" in capsys.readouterr().out


def test_commands_say_how_to_install_without_the_libraries(tmp_path, monkeypatch, capsys):
    from napari_slpd.cli import main

    for name in ("spatialdata", "anndata", "geopandas"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as when not installed
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cohort.json").write_text('{"slides": {}}')
    assert main(["export-spatialdata", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'spatialdata'" in err and 'pip install "napari-slpd[scverse]"' in err
    assert main(["import-spatialdata", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "napari-slpd[scverse]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

