"""The napari reader contribution and the layer helpers, without a viewer (no Qt needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.viewer import reader as _reader
from napari_slpd.errors import SlpdError
from napari_slpd.slides.grid import GridConfig, build_region_grid
from napari_slpd.viewer.layers import region_grid_layer, region_labels_layer, tissue_mask_layer
from napari_slpd.slides.slide import open_slide
from napari_slpd.slides.tissue import detect_tissue


@pytest.fixture
def warnings_seen(monkeypatch):
    seen = []
    monkeypatch.setattr(_reader, "_warn_visible", seen.append)
    return seen


def test_reader_gives_physical_multiscale_layer(warnings_seen):
    path = real_slide("cmu_svs")
    reader = _reader.get_reader(str(path))
    assert callable(reader)
    layers = reader(str(path))
    data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs["rgb"] and kwargs["multiscale"]
    assert [a.shape for a in data] == [(2967, 2220, 3), (1483, 1110, 3), (741, 555, 3)]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499)) and kwargs["units"] == ("um", "um")
    meta = kwargs["metadata"]
    assert meta["mpp_source"] == "metadata" and meta["objective_power"] == 20.0
    assert meta["properties"]["aperio.AppMag"] == "20"
    assert meta["slpd_slide_path"] == str(Path(path).resolve())
    # Associated images come as hidden extra layers placed beside the slide.
    extra = {k["name"]: (d, k) for d, k, t in layers[1:]}
    assert set(extra) == {"cmu_small_region label", "cmu_small_region macro", "cmu_small_region thumbnail"}
    for image, k in extra.values():
        assert image.ndim == 3 and not k["visible"]
        # Inside the slide frame (so "reset view" still fits the slide).
        assert k["translate"][0] + image.shape[0] * k["scale"][0] <= 2967 * 0.499
        assert image.shape[1] * k["scale"][1] <= 2220 * 0.499 / 4 + 1e-6
    assert not warnings_seen


@pytest.mark.parametrize("name", ["tcga_jp2k_svs", "breast_tiff"])
def test_unknown_pixel_size_shows_pixels_and_a_warning(name, warnings_seen):
    path = real_slide(name)
    data, kwargs, _ = _reader.get_reader(str(path))(str(path))[0]
    assert kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs
    assert "pixel size unknown" in kwargs["name"]
    assert len(warnings_seen) == 1 and path.name in warnings_seen[0]
    assert ("implausible 264.583" if name == "breast_tiff" else "not in the file") in warnings_seen[0]


def test_reader_accepts_dicom_folder_and_file(warnings_seen):
    folder = real_slide("dicom_pyramid").parent
    layers = _reader.get_reader(str(folder))(str(folder))
    assert len(layers[0][0]) == 12 and layers[0][1]["name"] == folder.name
    single = real_slide("dicom_single")
    assert _reader.get_reader([str(single)]) is not None
    assert _reader.get_reader([str(single), str(single)]) is None


def test_reader_declines_what_is_not_a_slide(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    assert _reader.get_reader(str(text)) is None
    assert _reader.get_reader(str(tmp_path)) is None  # folder without .dcm
    assert _reader.get_reader(str(tmp_path / "missing.svs")) is None
    # A plain (striped, single-page) TIFF is an ordinary image: left to napari's own reader.
    import tifffile

    plain = tmp_path / "photo.tif"
    tifffile.imwrite(plain, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    assert _reader.get_reader(str(plain)) is None


def test_overlay_layers_align_with_the_image():
    with open_slide(real_slide("cmu_svs")) as slide:
        mask = detect_tissue(slide)
        grid = build_region_grid(slide, mask, GridConfig(512, 64, 0.5, 0.25))
        mpp = slide.mpp
        labels, lk, lt = tissue_mask_layer(slide, mask)
        assert lt == "labels" and labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
        sx, sy = mask.scale_xy
        assert lk["scale"] == pytest.approx((sy * mpp, sx * mpp)) and lk["units"] == ("um", "um")
        # The mask's first pixel covers level-0 px [0, s): its centre sits at world (s/2 - 0.5) * mpp.
        assert lk["translate"] == pytest.approx(((sy / 2 - 0.5) * mpp, (sx / 2 - 0.5) * mpp))
        # Mask extent (edge to edge) equals the image extent.
        h, w = labels.shape
        top = lk["translate"][0] - lk["scale"][0] / 2
        bottom = top + h * lk["scale"][0]
        assert top == pytest.approx(-0.5 * mpp) and bottom == pytest.approx((slide.dimensions[1] - 0.5) * mpp)

        shapes, sk, st = region_grid_layer(slide, grid)
        assert st == "shapes" and len(shapes) == len(grid) and sk["shape_type"] == "rectangle"
        assert sk["scale"] == pytest.approx((mpp, mpp))
        x0, y0 = grid.coords[0]
        np.testing.assert_allclose(shapes[0].min(axis=0), [y0 - 0.5, x0 - 0.5])
        np.testing.assert_allclose(shapes[0].max(axis=0), [y0 + grid.region_size_level0 - 0.5,
                                                            x0 + grid.region_size_level0 - 0.5])
        np.testing.assert_allclose(sk["features"]["tissue_fraction"], grid.tissue_fraction)

        assignments = np.arange(len(grid)) % 3
        image, rk, rt = region_labels_layer(slide, grid, assignments)
        size = grid.region_size_level0
        for (x, y), a in zip(grid.coords, assignments):
            # World centre of the region -> its cell in the label image holds its label + 1.
            wy, wx = (y + size / 2 - 0.5) * mpp, (x + size / 2 - 0.5) * mpp
            r = round((wy - rk["translate"][0]) / rk["scale"][0])
            c = round((wx - rk["translate"][1]) / rk["scale"][1])
            assert image[r, c] == a + 1
        assert (image > 0).sum() == len(grid)


def test_sample_data(monkeypatch, tmp_path, warnings_seen):
    from napari_slpd.samples import synthetic
    from napari_slpd.viewer import sample_data

    monkeypatch.setattr(synthetic, "SYNTHETIC_SAMPLE_SIZE", (1024, 768))
    monkeypatch.setattr(synthetic.tempfile, "gettempdir", lambda: str(tmp_path))
    layers = sample_data.synthetic_slide_sample()
    data, kwargs, kind = layers[0]
    assert kind == "image" and data[0].shape == (768, 1024, 3) and kwargs["scale"] == (0.5, 0.5)
    assert (tmp_path / "napari-slpd" / "napari-slpd-synthetic-seed0-1024x768-v1.svs").exists()
    assert len(layers) == 4  # + label, macro, thumbnail


def test_real_sample_data(monkeypatch, tmp_path, slides_dir, warnings_seen):
    from napari_slpd.viewer import sample_data

    monkeypatch.setenv("SLPD_SLIDES_DIR", str(slides_dir))
    assert sample_data.cmu_small_region_sample()[0][0][0].shape == (2967, 2220, 3)
    assert sample_data.tcga_jpeg2000_sample()[0][1]["scale"] == (1.0, 1.0)
    assert sample_data.breast_tiff_sample()[0][0][0].shape == (1525, 2033, 3)
    monkeypatch.setenv("SLPD_SLIDES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SlpdError, match="real sample slides folder .*nowhere does not exist"):
        sample_data.cmu_small_region_sample()


def test_npe2_manifest_routes_slides_to_this_reader():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManager.instance()
    pm.discover()
    layers = npe2.read([str(real_slide("breast_tiff"))], plugin_name="napari-slpd", stack=False)
    assert layers[0][0][0].shape == (1525, 2033, 3)
