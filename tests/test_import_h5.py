"""Bring your own features: CLAM/TRIDENT patch features -> region token grids -> FeatureStore."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.errors import FeatureStoreError, SlpdError
from napari_slpd.features.import_h5 import (
    assemble_regions,
    import_patch_features,
    lattice_step,
    read_patch_features,
)
from napari_slpd.features.store import FeatureStore

STEP = 256


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small shared CI machines: one thread avoids OpenMP stalls and keeps the numbers repeatable."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lattice_coords(cols, rows, origin=(37, 11), step=STEP) -> np.ndarray:
    """Level-0 coords of patches at lattice cells (col, row) pairs."""
    return np.array([[origin[0] + c * step, origin[1] + r * step] for c, r in zip(cols, rows)], np.int64)


def coded_features(coords: np.ndarray, dim: int = 8) -> np.ndarray:
    """Features that say where their patch is: [x, y, 1, 0, ...]."""
    f = np.zeros((len(coords), dim), np.float32)
    f[:, 0], f[:, 1], f[:, 2] = coords[:, 0], coords[:, 1], 1.0
    return f


def write_clam(path, features, coords, attrs_on="coords", **attrs):
    with h5py.File(path, "w") as fh:
        fh["features"] = features
        ds = fh.create_dataset("coords", data=coords)
        target = ds if attrs_on == "coords" else fh
        for key, value in attrs.items():
            target.attrs[key] = value
    return path


def test_assemble_places_every_patch_in_its_cell():
    G = 4
    # a full 4x4 region (cells 0..3) and a sparse one to its right (cells 4..7, three patches)
    cols = [c for r in range(4) for c in range(4)] + [4, 7, 5]
    rows = [r for r in range(4) for c in range(4)] + [0, 3, 2]
    coords = lattice_coords(cols, rows)
    feats = coded_features(coords)
    regions = assemble_regions(coords, feats, G, STEP, min_coverage=0.1)
    assert regions.tokens.shape == (2, 8, G, G)
    np.testing.assert_array_equal(regions.coords, [[37, 11], [37 + 4 * STEP, 11]])
    np.testing.assert_allclose(regions.coverage, [1.0, 3 / 16])
    for m in range(2):
        for r in range(G):
            for c in range(G):
                x, y, present = regions.tokens[m, :3, r, c]
                assert bool(present) == regions.present[m, r, c]
                if present:  # token (r, c) is the patch at region origin + (c, r) steps
                    assert (x, y) == (regions.coords[m, 0] + c * STEP, regions.coords[m, 1] + r * STEP)
    assert regions.tokens[1, :, 1, 1].sum() == 0  # missing patch -> zeros
    # below min coverage the sparse region is dropped
    assert assemble_regions(coords, feats, G, STEP, min_coverage=0.25).tokens.shape[0] == 1


def test_clam_per_contour_offsets_snap_and_collisions_are_counted():
    base = lattice_coords([0, 1, 2, 3], [0, 0, 0, 0], origin=(0, 0))
    other = lattice_coords([0, 1], [2, 2], origin=(40, 30))  # a second contour's own lattice
    clash = np.array([[10, 5]], np.int64)  # claims cell (0, 0), farther than the patch at (0, 0)
    coords = np.concatenate([base, other, clash])
    feats = coded_features(coords)
    regions = assemble_regions(coords, feats, 4, STEP, min_coverage=0.0)
    assert regions.n_snapped == 3 and regions.n_collisions == 1
    assert tuple(regions.tokens[0, :2, 0, 0]) == (0, 0)  # the exact patch won its cell
    assert tuple(regions.tokens[0, :2, 2, 1]) == (40 + STEP, 30 + 2 * STEP)


def test_lattice_step_from_coords_and_overlap():
    coords = lattice_coords(range(5), [0] * 5, step=224)
    assert lattice_step(coords, None) == 224
    assert lattice_step(coords, 256.0) == 224  # overlapping patches: spacing < size everywhere
    assert lattice_step(coords[:1], 512.0) == 512


@pytest.mark.parametrize("variant", ["clam", "trident", "clam_level1", "root_attrs_3d"])
def test_import_variants_roundtrip(tmp_path, variant):
    cols = list(range(6)) * 3
    rows = [r for r in range(3) for _ in range(6)]
    size0 = STEP
    coords = lattice_coords(cols, rows)
    feats = coded_features(coords, dim=16)
    h5 = tmp_path / f"{variant}.h5"
    if variant == "clam":
        write_clam(h5, feats, coords, patch_size=256, patch_level=0)
    elif variant == "trident":
        write_clam(h5, feats, coords, patch_size=512, patch_size_level0=256, target_magnification=20)
    elif variant == "clam_level1":
        write_clam(h5, feats, coords, patch_size=64, patch_level=1, downsample=np.array([4.0, 4.0]))
    else:
        write_clam(h5, feats[None], coords, attrs_on="root", patch_size=256, patch_level=0)
    pf = read_patch_features(h5)
    assert pf.features.shape == (18, 16) and pf.patch_size_level0 == size0
    out = tmp_path / "cohort" / f"{variant}.h5"
    result = import_patch_features(h5, out, grid_size=3, min_coverage=0.5, encoder_name="uni")
    assert result.status == "imported" and result.n_regions == 2
    with FeatureStore.open(out, expect_token_dim=16, expect_embed_dim=16) as store:
        assert store.region_tokens.shape == (2, 16, 3, 3)
        np.testing.assert_array_equal(store.region_coords, [[37, 11], [37 + 3 * STEP, 11]])
        np.testing.assert_allclose(store.region_coverage, [1.0, 1.0])
        # mean pooling over present patches: [mean x, mean y, 1, ...]
        np.testing.assert_allclose(store.region_embeddings[0, :3], [37 + STEP, 11 + STEP, 1.0], rtol=1e-3)
        np.testing.assert_array_equal(store.features[()], feats)
        np.testing.assert_array_equal(store.coords, coords)
        assert store.attrs["patch_encoder"] == "uni" and store.attrs["region_encoder"] == "mean"
        assert store.region_size_level0 == 3 * STEP


def test_import_errors_are_clear(tmp_path):
    coords = lattice_coords([0, 1], [0, 0])
    with pytest.raises(FeatureStoreError, match="does not exist"):
        read_patch_features(tmp_path / "none.h5")
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as fh:
        fh["feats_wrong"] = np.zeros((2, 3))
    with pytest.raises(FeatureStoreError, match="needs 'features' and 'coords'"):
        read_patch_features(bad)
    mismatch = write_clam(tmp_path / "m.h5", np.zeros((3, 4), np.float32), coords, patch_size=256)
    with pytest.raises(FeatureStoreError, match="3 feature rows but 2 coords"):
        read_patch_features(mismatch)
    nan = write_clam(tmp_path / "n.h5", np.full((2, 4), np.nan, np.float32), coords, patch_size=256)
    with pytest.raises(FeatureStoreError, match="NaN"):
        read_patch_features(nan)
    level1 = write_clam(tmp_path / "l.h5", np.zeros((2, 4), np.float32), coords, patch_size=256, patch_level=1)
    with pytest.raises(FeatureStoreError, match="give the slide"):
        read_patch_features(level1)


def test_level_downsample_from_slide_and_warning_without_size(tmp_path, caplog):
    from napari_slpd.slides.slide import open_slide

    coords = lattice_coords(range(4), [0] * 4, origin=(0, 0), step=512)
    h5 = write_clam(tmp_path / "l1.h5", coded_features(coords), coords, patch_size=256, patch_level=1)
    with open_slide(real_slide("dicom_pyramid")) as slide:
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
        pf = read_patch_features(h5, slide)
    assert pf.patch_size_level0 == pytest.approx(512, rel=1e-3)
    plain = write_clam(tmp_path / "plain.h5", coded_features(coords), coords)
    with caplog.at_level(logging.WARNING):
        result = import_patch_features(plain, tmp_path / "p_out.h5", grid_size=2, min_coverage=0.5)
    assert "states no patch size" in caplog.text and result.n_regions == 2


def test_region_encoder_dims_skip_and_settings(tmp_path):
    from napari_slpd.models.encoders import build_region_encoder

    coords = lattice_coords(list(range(4)) * 4, [r for r in range(4) for _ in range(4)])
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(16, 32)).astype(np.float32)
    h5 = write_clam(tmp_path / "s.h5", feats, coords, patch_size=256, patch_level=0)
    vit4k = build_region_encoder("hipt_vit4k", device="cpu", in_dim=32)
    out = tmp_path / "s_out.h5"
    result = import_patch_features(h5, out, grid_size=4, region_encoder=vit4k, token_dtype="float32")
    with FeatureStore.open(out) as store:
        expected = vit4k.encode(store.tokens()).numpy()
        np.testing.assert_allclose(store.region_embeddings, expected, atol=1e-5)
        assert store.embed_dim == 192
    assert import_patch_features(h5, out, grid_size=4, region_encoder=vit4k, token_dtype="float32").status == "skipped"
    with pytest.raises(FeatureStoreError, match="other settings"):
        import_patch_features(h5, out, grid_size=2, region_encoder=vit4k)
    assert result.status == "imported"
    with pytest.raises(SlpdError, match="32-d patch features.*384-d"):
        import_patch_features(h5, tmp_path / "x.h5", region_encoder=build_region_encoder("hipt_vit4k", device="cpu"))


def test_cli_import_features_registers_slides(tmp_path, capsys):
    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort

    slide = real_slide("cmu_svs")
    folder = tmp_path / "h5"
    folder.mkdir()
    coords = lattice_coords(list(range(4)) * 4, [r for r in range(4) for _ in range(4)], origin=(0, 0))
    write_clam(folder / f"{slide.stem}.h5", coded_features(coords, 24), coords, patch_size=256, patch_level=0)
    write_clam(folder / "orphan.h5", coded_features(coords, 24), coords, patch_size=256, patch_level=0)
    code = main(["import-features", str(folder), "--out", str(tmp_path / "cohort"), "--slides", str(slide),
                 "--patches-per-region", "4", "--quiet", "--encoder-name", "uni"])
    text = capsys.readouterr().out
    assert code == 0 and "2 imported" in text and "not registered" in text
    cohort = Cohort(tmp_path / "cohort")
    assert cohort.slide_ids() == [slide.stem]
    with FeatureStore.open(cohort.features_path(slide.stem)) as store:
        assert store.attrs["mpp"] == pytest.approx(0.499, abs=1e-3) and store.n_regions == 1


def test_import_of_extracted_features_rebuilds_the_token_grids(tmp_path):
    """Extraction writes CLAM-layout patch features; importing them gives back the same token grids."""
    from napari_slpd.features.engine import ExtractionConfig, extract_slide
    from napari_slpd.slides.grid import GridConfig
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=16)
    region = build_region_encoder("mean", device="cpu")
    cfg = ExtractionConfig(grid=GridConfig(region_px=256, patch_px=64, target_mpp=2.0), token_dtype="float32",
                           mpp=0.5, num_workers=1, torch_threads=1)  # 0.5 um/px: exact 256-px level-0 patches
    extracted = tmp_path / "x.h5"
    extract_slide(real_slide("cmu_svs"), extracted, patch, region, cfg)
    result = import_patch_features(extracted, tmp_path / "y.h5", grid_size=4, min_coverage=1.0,
                                   token_dtype="float32")
    with FeatureStore.open(extracted) as a, FeatureStore.open(tmp_path / "y.h5") as b:
        assert a.n_regions >= 4
        order = np.lexsort((a.region_coords[:, 0], a.region_coords[:, 1]))
        np.testing.assert_array_equal(b.region_coords, a.region_coords[order])
        np.testing.assert_array_equal(b.tokens(), a.tokens()[order])
        np.testing.assert_allclose(b.region_embeddings, a.region_embeddings[order], atol=1e-5)
        assert result.n_regions == a.n_regions
