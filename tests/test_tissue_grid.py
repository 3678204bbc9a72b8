"""Tissue masks and region grids on the real slides and on synthetic slides with a known layout."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL_SLIDES, real_slide
from napari_slpd.errors import PixelSizeError, SlpdError
from napari_slpd.slides.grid import GridConfig, RegionGrid, build_region_grid
from napari_slpd.slides.slide import open_slide
from napari_slpd.slides.tissue import TissueMask, TissueParams, detect_tissue, tissue_from_rgb

# Tissue fraction ranges checked by eye on the thumbnails: CMU is a strip of skin on glass, the TCGA
# slide a large piece with a white rim, the breast crop all tissue.
TISSUE_RANGE = {
    "cmu_svs": (0.25, 0.55),
    "tcga_jp2k_svs": (0.45, 0.80),
    "breast_tiff": (0.85, 1.0),
    "dicom_pyramid": (0.25, 0.55),
    "dicom_single": (0.25, 0.55),
}
SMALL = GridConfig(region_px=512, patch_px=64, target_mpp=0.5, min_tissue=0.25)


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_tissue_found_on_real_slides(name):
    with open_slide(real_slide(name), mpp_fallback="level0") as slide:
        mask = detect_tissue(slide)
        lo, hi = TISSUE_RANGE[name]
        assert lo <= mask.fraction <= hi
        W, H = slide.dimensions
        # About 8 um per mask pixel (16 level-0 px at 0.5 um/px).
        assert mask.downsample == pytest.approx(W / mask.mask.shape[1])
        assert 14 <= mask.downsample <= 18
        assert mask.coverage(0, 0, max(W, H)) == pytest.approx(mask.fraction * W * H / max(W, H) ** 2, rel=0.02)


def test_glass_corner_is_not_tissue_and_centre_is():
    with open_slide(real_slide("tcga_jp2k_svs")) as slide:
        mask = detect_tissue(slide, TissueParams())
        assert mask.coverage(0, 0, 200) == 0.0  # top-left corner is glass
        assert mask.coverage(2000, 1600, 400) > 0.9  # middle of the tissue piece


def test_mask_matches_synthetic_ground_truth(tmp_path):
    from napari_slpd.samples.synthetic import write_synthetic_slide

    path = tmp_path / "syn.svs"
    design = write_synthetic_slide(path, width=2048, height=1536, seed=4)
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
    truth = design.classes > 0  # class map at 4 um/px; mask at 8 um/px
    truth = truth[: truth.shape[0] // 2 * 2, : truth.shape[1] // 2 * 2]
    truth = truth.reshape(truth.shape[0] // 2, 2, truth.shape[1] // 2, 2).mean(axis=(1, 3)) > 0.5
    h, w = min(truth.shape[0], mask.mask.shape[0]), min(truth.shape[1], mask.mask.shape[1])
    pred, truth = mask.mask[:h, :w], truth[:h, :w]
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.85, iou


def test_params_change_the_mask():
    rng = np.random.default_rng(0)
    rgb = np.full((200, 200, 3), 240, np.uint8)
    rgb[50:150, 50:150] = (200, 120, 180)  # a pink square of "tissue"
    rgb[10:13, 10:13] = (90, 60, 140)  # a speck of dust (3 x 3 px at 8 um = 576 um^2)
    rgb = np.clip(rgb + rng.normal(0, 2, rgb.shape), 0, 255).astype(np.uint8)
    mask, threshold = tissue_from_rgb(rgb, 8.0, TissueParams())
    assert TissueParams().min_threshold <= threshold <= TissueParams().max_threshold
    assert mask[60:140, 60:140].all() and not mask[:40, :40].any()  # speck removed
    keep_specks, _ = tissue_from_rgb(rgb, 8.0, TissueParams(min_object_um2=100, opening_um=0))
    assert keep_specks[11, 11]
    all_glass, _ = tissue_from_rgb(np.full((64, 64, 3), 245, np.uint8), 8.0)
    assert not all_glass.any()


def test_coverage_is_area_weighted():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    mask = TissueMask(mask=m, downsample=10.0, slide_dimensions=(40, 40))
    assert mask.fraction == 0.25
    assert mask.coverage(10, 10, 20) == pytest.approx(1.0)
    assert mask.coverage(0, 0, 20) == pytest.approx(0.25)
    assert mask.coverage(5, 5, 10) == pytest.approx(0.25)  # a quarter of a mask pixel is tissue
    assert mask.coverage(15, 15, 10) == pytest.approx(1.0)
    assert mask.coverage(35, 35, 10) == pytest.approx(0.0)  # partly outside the slide
    many = mask.coverage_many(np.array([[10, 10], [0, 0], [5, 5]]), 20)
    np.testing.assert_allclose(many, [1.0, 0.25, 15 * 15 / 400])  # tissue [10, 30)^2 vs box [5, 25)^2


# Region counts with 512-px regions of 64-px patches at 0.5 um/px (level-0 assumed for the slides
# without a usable pixel size), at least 25 % tissue.
GRID_COUNTS = {
    "cmu_svs": (8, 14),
    "tcga_jp2k_svs": (30, 48),
    "breast_tiff": (6, 6),
    "dicom_pyramid": (8, 14),
    "dicom_single": (8, 14),
}


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_region_grid_on_real_slides(name):
    with open_slide(real_slide(name), mpp_fallback="level0") as slide:
        mask = detect_tissue(slide)
        grid = build_region_grid(slide, mask, SMALL)
        lo, hi = GRID_COUNTS[name]
        assert lo <= len(grid) <= hi, grid.summary()
        W, H = slide.dimensions
        size = grid.region_size_level0
        assert size == round(512 * 0.5 / slide.mpp)
        assert (grid.coords >= 0).all()
        assert (grid.coords[:, 0] + size <= W).all() and (grid.coords[:, 1] + size <= H).all()
        assert (grid.tissue_fraction >= 0.25).all()
        # Non-overlapping, on a regular lattice.
        assert len({tuple(c) for c in grid.coords}) == len(grid)
        assert (np.diff(np.unique(grid.coords[:, 0])) % size == 0).all()
        assert grid.patches_per_side == 8 and grid.patch_size_level0 == pytest.approx(size / 8)
        patches = grid.patch_coords()
        assert patches.shape == (len(grid) * 64, 2)
        np.testing.assert_array_equal(patches[0], grid.coords[0])
        np.testing.assert_allclose(patches[1] - patches[0], [size / 8, 0], atol=1)  # row-major: x first
        np.testing.assert_allclose(patches[8] - patches[0], [0, size / 8], atol=1)
        assert grid.mpp_source == slide.pixel_size.source
        assert grid.read_level == 0 and grid.resize_factor == pytest.approx(512 / size)


def test_default_grid_on_small_slide_is_empty_with_reason():
    with open_slide(real_slide("cmu_svs")) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), GridConfig())
        assert len(grid) == 0 and grid.is_empty
        assert grid.coords.shape == (0, 2) and grid.patch_coords().shape == (0, 2)
        assert "smaller than one region" in grid.reason and "4096" in grid.reason


def test_no_tissue_gives_reason():
    with open_slide(real_slide("cmu_svs")) as slide:
        empty = TissueMask(mask=np.zeros((185, 138), bool), downsample=16.09, slide_dimensions=slide.dimensions)
        grid = build_region_grid(slide, empty, SMALL)
        assert len(grid) == 0 and "no tissue" in grid.reason
        stripes = np.zeros((185, 138), bool)
        stripes[:, ::2] = True  # half of every region is tissue
        half = TissueMask(mask=stripes, downsample=16.09, slide_dimensions=slide.dimensions)
        strict = build_region_grid(slide, half, GridConfig(512, 64, 0.5, min_tissue=0.75))
        assert len(strict) == 0 and "at least 75% tissue" in strict.reason and "best 5" in strict.reason
        assert len(build_region_grid(slide, half, GridConfig(512, 64, 0.5, min_tissue=0.4))) == 20


def test_unknown_pixel_size_needs_a_choice_and_records_it():
    path = real_slide("tcga_jp2k_svs")
    with open_slide(path) as slide:
        with pytest.raises(PixelSizeError, match="unknown.*--mpp"):
            build_region_grid(slide, detect_tissue(slide), SMALL)
    with open_slide(path, mpp=0.25) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), SMALL)
        assert grid.mpp_source == "user" and grid.region_size_level0 == 1024
    with open_slide(path, mpp_fallback="level0") as slide:
        grid = build_region_grid(slide, detect_tissue(slide), SMALL)
        assert grid.mpp_source == "level0-assumed" and grid.mpp == 0.5
    with open_slide(real_slide("breast_tiff"), mpp_fallback="objective") as slide:
        assert slide.mpp is None  # bogus 264.58 um/px and no objective power: still unknown
        with pytest.raises(PixelSizeError, match="implausible"):
            build_region_grid(slide, None, SMALL)


def test_read_level_for_coarser_target():
    # 2 um/px regions of 512 px on the 12-level DICOM pyramid read level 2 (downsample 4) over ~512 px.
    with open_slide(real_slide("dicom_pyramid")) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), GridConfig(512, 64, target_mpp=2.0, min_tissue=0.1))
        assert grid.region_size_level0 == round(512 * 2.0 / 0.499)
        assert grid.read_level == 2
        assert grid.read_size == round(grid.region_size_level0 / slide.level_downsamples[2])
        assert grid.resize_factor == pytest.approx(512 / grid.read_size)
        assert len(grid) >= 1


def test_attrs_round_trip():
    with open_slide(real_slide("cmu_svs")) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), SMALL)
    attrs = grid.to_attrs()
    assert all(isinstance(v, (int, float, str)) for v in attrs.values())
    back = RegionGrid.from_attrs(attrs, grid.coords, grid.tissue_fraction)
    assert back.to_attrs() == attrs
    np.testing.assert_array_equal(back.patch_coords(), grid.patch_coords())
    assert back.config == grid.config


def test_grid_config_validation():
    with pytest.raises(SlpdError, match="whole multiple"):
        GridConfig(region_px=500, patch_px=256)
    with pytest.raises(SlpdError, match="min_tissue"):
        GridConfig(min_tissue=1.5)
    assert GridConfig().patches_per_side == 16
