"""Slides: metadata, pixel size rules, lazy tile-aligned pyramids, thread safety, synthetic slides."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import REAL_SLIDES, real_slide
from napari_slpd.errors import PixelSizeError, SlideError, SlpdError
from napari_slpd.slides.slide import PixelSize, open_slide, resolve_pixel_size

# name -> (vendor, (width, height), level_count, mpp, mpp_source) per ../shared/data/slides/MANIFEST.md
EXPECTED = {
    "cmu_svs": ("aperio", (2220, 2967), 1, 0.499, "metadata"),
    "tcga_jp2k_svs": ("aperio", (4443, 3567), 2, None, "missing"),
    "breast_tiff": ("generic-tiff", (2033, 1525), 6, None, "implausible"),
    "dicom_pyramid": ("dicom", (2220, 2967), 12, 0.499, "metadata"),
    "dicom_single": ("dicom", (2220, 2967), 1, 0.499, "metadata"),
}


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_real_slide_metadata(name):
    vendor, dims, levels, mpp, source = EXPECTED[name]
    with open_slide(real_slide(name)) as slide:
        assert slide.vendor == vendor
        assert slide.dimensions == dims
        assert slide.level_count == levels
        assert slide.level_dimensions[0] == dims
        assert slide.pixel_size.source == source
        if mpp is None:
            assert slide.mpp is None
        else:
            assert slide.mpp == pytest.approx(mpp, abs=1e-3)
        assert slide.properties["openslide.vendor"] == vendor
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in slide.properties.items())


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_pyramid_is_lazy_tile_aligned_and_matches_read_region(name):
    with open_slide(real_slide(name)) as slide:
        pyramid = slide.pyramid()
        W, H = slide.dimensions
        assert pyramid[0].shape == (H, W, 3) and pyramid[0].dtype == np.uint8
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            assert pyramid[level].shape == (h, w, 3)
            tw, th = slide.tile_size(level)
            ch, cw = pyramid[level].chunksize[:2]
            # Chunks are whole tiles (tiny DICOM tiles are grouped), never a partial tile.
            assert (ch % th == 0 or ch == h) and (cw % tw == 0 or cw == w)
        # Smooth viewing: the coarsest level fits on a screen (virtual levels added where needed).
        assert max(pyramid[-1].shape[:2]) <= 1024
        sizes = [a.shape[0] for a in pyramid]
        assert sizes == sorted(sizes, reverse=True)
        assert slide.read_calls == 0  # building the pyramid read nothing

        # One chunk = one read_region; its pixels are those of read_region.
        chunk = pyramid[0].blocks[0, 0].compute()
        assert slide.read_calls == 1
        ch, cw = pyramid[0].chunksize[:2]
        np.testing.assert_array_equal(chunk, slide.read_region((0, 0), 0, (cw, ch)))


def test_single_level_slide_gets_virtual_levels():
    with open_slide(real_slide("cmu_svs")) as slide:
        pyramid = slide.pyramid()
        assert slide.level_count == 1 and len(pyramid) == 3
        assert pyramid[1].shape == (1483, 1110, 3) and pyramid[2].shape == (741, 555, 3)
        level0 = slide.read_region((0, 0), 0, (1110 * 2, 1483 * 2)).astype(np.float64)
        expected = level0.reshape(1483, 2, 1110, 2, 3).mean(axis=(1, 3))
        assert np.abs(pyramid[1].compute().astype(np.float64) - expected).max() <= 1.0
        np.testing.assert_allclose(slide.pyramid_downsamples(), [1.0, 2220 / 1110, 2220 / 555])


def test_concurrent_reads_use_one_handle_per_thread():
    with open_slide(real_slide("tcga_jp2k_svs"), reader="openslide") as slide:
        level0 = slide.pyramid()[0]
        reference = [level0.blocks[i, j].compute(scheduler="sync") for i in range(3) for j in range(3)]
        barrier = threading.Barrier(4)

        def work(_):
            barrier.wait()
            return [level0.blocks[i, j].compute(scheduler="sync") for i in range(3) for j in range(3)]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(work, range(4)))
        for result in results:
            for got, want in zip(result, reference):
                np.testing.assert_array_equal(got, want)
        assert len(slide._handles) >= 2  # the worker threads opened their own handles


def test_read_region_outside_the_scan_is_white():
    with open_slide(real_slide("breast_tiff")) as slide:
        W, H = slide.dimensions
        region = slide.read_region((W - 10, H - 10), 0, (40, 40))
        assert region.shape == (40, 40, 3)
        assert (region[20:, 20:] == 255).all()
        assert region[:10, :10].mean() < 250  # tissue inside the slide


def test_associated_images():
    with open_slide(real_slide("cmu_svs")) as slide:
        assert slide.associated_image_names == ["label", "macro", "thumbnail"]
        for name in slide.associated_image_names:
            image = slide.associated_image(name)
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        with pytest.raises(SlideError, match="no associated image 'overview'"):
            slide.associated_image("overview")
        assert slide.objective_power == 20.0


def test_dicom_folder_opens_and_matches_svs_colours():
    folder = real_slide("dicom_pyramid").parent
    with open_slide(folder) as dicom, open_slide(real_slide("cmu_svs")) as svs:
        assert dicom.vendor == "dicom"
        assert dicom.slide_id == folder.name
        assert dicom.level_count == 12
        a = dicom.read_region((800, 1200), 0, (256, 256)).astype(np.float64)
        b = svs.read_region((800, 1200), 0, (256, 256)).astype(np.float64)
        assert np.abs(a - b).mean() < 12  # same scan, different JPEG encodes; colours corrected


def test_thumbnail_bounded_and_block_read():
    with open_slide(real_slide("tcga_jp2k_svs")) as slide:
        thumb = slide.thumbnail(300)
        assert max(thumb.shape[:2]) == 300
        small = slide.read_downsampled(8.0, block_px=128)  # many blocks: checks block stitching
        ref = slide.read_downsampled(8.0)
        assert small.shape == ref.shape == (446, 555, 3)
        assert np.abs(small.astype(int) - ref.astype(int)).mean() < 2.0


class TestPixelSize:
    def test_missing_and_fallbacks(self):
        props = {"openslide.vendor": "aperio"}
        assert resolve_pixel_size(props) == PixelSize(None, "missing", None)
        assert resolve_pixel_size(props, mpp_fallback="level0") == PixelSize(0.5, "level0-assumed", None)
        # No objective power stated: the objective fallback cannot help, the size stays unknown.
        assert resolve_pixel_size(props, mpp_fallback="objective").mpp is None
        with_power = {**props, "openslide.objective-power": "40"}
        assert resolve_pixel_size(with_power, mpp_fallback="objective") == PixelSize(0.25, "objective-power", None)

    def test_bogus_96_dpi_is_implausible(self):
        props = {"openslide.mpp-x": "264.58333333333331", "openslide.mpp-y": "264.58333333333331"}
        size = resolve_pixel_size(props)
        assert size.mpp is None and size.source == "implausible"
        assert size.raw == pytest.approx(264.5833, abs=1e-3)
        assert "implausible" in size.describe()
        assert resolve_pixel_size(props, mpp=0.25) == PixelSize(0.25, "user", size.raw)

    def test_plausible_range_edges(self):
        assert resolve_pixel_size({"openslide.mpp-x": "0.09", "openslide.mpp-y": "0.09"}).source == "implausible"
        assert resolve_pixel_size({"openslide.mpp-x": "2.0", "openslide.mpp-y": "2.0"}).mpp == 2.0
        assert resolve_pixel_size({"openslide.mpp-x": "nan"}).source == "missing"

    def test_user_value_validated(self):
        with pytest.raises(PixelSizeError, match="outside the plausible range"):
            resolve_pixel_size({}, mpp=264.58)
        with pytest.raises(PixelSizeError, match="mpp_fallback"):
            resolve_pixel_size({}, mpp_fallback="guess")

    def test_real_slides_unknown_pixel_size_choices(self):
        path = real_slide("tcga_jp2k_svs")
        with open_slide(path, mpp_fallback="level0") as slide:
            assert slide.pixel_size == PixelSize(0.5, "level0-assumed", None)
        with open_slide(path, mpp=0.25) as slide:
            assert slide.mpp == 0.25 and slide.pixel_size.source == "user"
        with open_slide(real_slide("breast_tiff"), mpp_fallback="level0") as slide:
            assert slide.pixel_size.source == "level0-assumed"
            assert slide.pixel_size.raw == pytest.approx(264.583, abs=1e-2)


class TestSyntheticSlide:
    def test_written_slide_opens_with_metadata_and_levels(self, tmp_path):
        from napari_slpd.samples.synthetic import write_synthetic_slide

        path = tmp_path / "syn.svs"
        design = write_synthetic_slide(path, width=2304, height=1536, seed=3, min_level_px=256)
        with open_slide(path) as slide:
            assert slide.vendor == "aperio"
            assert slide.dimensions == (2304, 1536)
            assert slide.level_dimensions == ((2304, 1536), (576, 384))
            assert slide.mpp == pytest.approx(0.5) and slide.pixel_size.source == "metadata"
            assert slide.objective_power == 20.0
            assert slide.associated_image_names == ["label", "macro", "thumbnail"]
            tile = slide.read_region((1024, 768), 0, (256, 256))
            assert tile.std() > 5  # painted, not blank
        assert 0.15 < design.tissue_fraction < 0.9
        assert abs(sum(design.composition.values()) - 1.0) < 1e-6

    def test_seeds_differ_and_painting_is_seamless(self):
        from napari_slpd.samples.synthetic import design_slide, paint_block

        compositions = [design_slide(2048, 2048, seed).composition for seed in range(6)]
        dominant = {max(c, key=c.get) for c in compositions}
        assert len(dominant) >= 2  # different seeds are dominated by different tissues
        chosen = design_slide(2048, 2048, 1, composition={"tumour": 0.7, "stroma": 0.3}).composition
        assert chosen["tumour"] == pytest.approx(0.7, abs=0.05) and chosen["fat"] < 0.01
        with pytest.raises(SlpdError, match="unknown tissue classes"):
            design_slide(512, 512, 0, composition={"bone": 1.0})
        d = design_slide(1024, 1024, 5)
        whole = paint_block(d, 0, 0, 512, 512)
        halves = np.concatenate([paint_block(d, 0, 0, 256, 512), paint_block(d, 256, 0, 256, 512)], axis=1)
        np.testing.assert_array_equal(whole, halves)  # a pixel depends only on its coordinates
        np.testing.assert_array_equal(paint_block(design_slide(1024, 1024, 5), 100, 200, 64, 64),
                                      whole[200:264, 100:164])
