"""The reader in a real napari viewer (under Xvfb): slide, tissue mask and region grid, screenshot."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import real_slide

pytestmark = pytest.mark.gui


def _add(viewer, layer_tuple):
    data, kwargs, kind = layer_tuple
    return getattr(viewer, f"add_{kind}")(data, **kwargs)


def test_slide_with_tissue_and_grid_overlays(make_napari_viewer, artifacts_dir, qtbot):
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.viewer.layers import region_grid_layer, tissue_mask_layer
    from napari_slpd.slides.slide import open_slide
    from napari_slpd.slides.tissue import detect_tissue

    viewer = make_napari_viewer(show=True)  # a hidden canvas renders black under Xvfb
    path = real_slide("cmu_svs")
    layers = viewer.open(str(path), plugin="napari-slpd")
    image = layers[0]
    assert image.multiscale and image.rgb and len(image.data) == 3
    assert image.units[0] == image.units[1] and str(image.units[0]) == "micrometer"
    assert image.scale[0] == pytest.approx(0.499)
    assert image.metadata["slide_id"] == "cmu_small_region"
    assert all(not layer.visible for layer in layers[1:])  # associated images hidden
    viewer.reset_view()
    qtbot.wait(300)  # let the multiscale image load its chunks and draw
    plain = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    pink = (plain[..., 0] > 120) & (plain[..., 1] < plain[..., 0] - 30) & (plain[..., 2] > plain[..., 1])
    assert pink.mean() > 0.05  # H&E tissue drawn
    assert (plain.sum(axis=-1) > 30).mean() > 0.3  # the slide fills the view (hidden extras do not shrink it)

    with open_slide(path) as slide:
        mask = detect_tissue(slide)
        grid = build_region_grid(slide, mask, GridConfig(region_px=512, patch_px=64))
        labels = _add(viewer, tissue_mask_layer(slide, mask))
        shapes = _add(viewer, region_grid_layer(slide, grid))
    assert len(shapes.data) == len(grid) >= 8
    # Same physical frame: the mask covers exactly the image (within half a level-0 pixel).
    img_extent = np.asarray(image.extent.world)
    lab_extent = np.asarray(labels.extent.world)
    np.testing.assert_allclose(lab_extent, img_extent, atol=0.6 * 0.499 + labels.scale[0] / 2)
    assert (np.asarray(shapes.extent.world)[0] >= img_extent[0] - 1).all()
    assert (np.asarray(shapes.extent.world)[1] <= img_extent[1] + 1).all()

    qtbot.wait(300)
    out = artifacts_dir / "napari_reader_cmu_tissue_grid.png"
    shot = viewer.screenshot(path=str(out), canvas_only=True, flash=False)
    assert out.exists() and out.stat().st_size > 10_000
    rgb = shot[..., :3].astype(int)
    cyan = (rgb[..., 0] < 80) & (rgb[..., 1] > 180) & (rgb[..., 2] > 180)  # region grid edges
    green = (rgb[..., 1] > rgb[..., 0] + 20) & (rgb[..., 1] > rgb[..., 2] + 20)  # tissue overlay tint
    assert cyan.mean() > 0.001 and green.mean() > 0.05
    # The green tint lies where the tissue was drawn, not on the glass.
    assert (green & pink).sum() > 0.5 * (green & ~pink).sum()


def test_unknown_pixel_size_slide_in_pixels(make_napari_viewer, artifacts_dir, qtbot):
    viewer = make_napari_viewer(show=True)
    path = real_slide("tcga_jp2k_svs")
    layer = viewer.open(str(path), plugin="napari-slpd")[0]
    assert tuple(layer.scale) == (1.0, 1.0)
    assert "pixel size unknown" in layer.name
    assert str(layer.units[0]) == "pixel"
    viewer.reset_view()
    qtbot.wait(300)
    shot = viewer.screenshot(path=str(artifacts_dir / "napari_reader_tcga_pixels.png"), canvas_only=True,
                             flash=False)
    assert shot[..., :3].std() > 20  # the slide was drawn
