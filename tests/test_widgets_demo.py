"""`slpd demo`: its viewer set-up and screenshots, driven on the small processed cohort of the GUI tests."""

from __future__ import annotations

import os
import shutil

import pytest

from widgets_support import build_processed_cohort

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_processed_cohort(tmp_path_factory.getbasetemp() / "slpd-widgets-cohort")


def test_demo_viewer_lists_similar_slides_and_writes_screenshots(make_napari_viewer, qtbot, cohort, tmp_path,
                                                                 artifacts_dir):
    from PIL import Image

    from napari_slpd.cli.demo import (dock_panels, save_neighbour_screenshot, save_screenshots,
                                      save_small_copies, show_demo)

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    panels = dock_panels(viewer)
    try:
        show_demo(viewer, cohort, "cmu_small_region", panels, timeout_s=120)
        state = panels["Cohort"].state
        # Everything the demo promises is on screen: slide, tissue, grid, prototypes, a ranked list, the map.
        assert {"image", "tissue", "regions", "prototypes", "selection"} <= set(state.slide_layers())
        results = panels["Similar slides"].results()
        assert results and results[0].slide_id == "dicom-cmu-1-small-region-ybrfix"
        assert panels["Embedding map"].map is not None and len(panels["Embedding map"].highlighted) > 0
        assert [r.status for r in panels["Features"].last_results] == ["skipped"] * len(cohort.slide_ids())

        folder = artifacts_dir / "screenshots" / "demo"
        paths = save_screenshots(viewer, panels, folder)
        paths.append(save_neighbour_screenshot(viewer, panels, folder))
        assert state.current_slide_id == results[0].slide_id
        names = {p.name for p in paths}
        assert {"viewer.png", "viewer-neighbour.png", "panel-cohort.png", "panel-similar-slides.png",
                "panel-embedding-map.png"} <= names
        for path in paths:
            with Image.open(path) as im:
                assert im.width > 200 and im.height > 150, path
                colors = im.convert("RGB").getcolors(4096)  # None: more than 4096 colours
                assert colors is None or len(colors) > 50, f"{path} looks blank"
        small = save_small_copies(paths, tmp_path / "docs")
        for path in small:
            with Image.open(path) as im:
                assert im.width <= 1200
            assert path.stat().st_size < 200_000, path
    finally:
        qtbot.waitUntil(lambda: not any(p.task_bar.busy for p in panels.values()), timeout=60_000)


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs the Xvfb binary")
def test_virtual_display_starts_and_restores_display():
    from napari_slpd.cli.demo import _XvfbProcess

    before = os.environ.get("DISPLAY")
    display = _XvfbProcess.start()
    assert display is not None
    try:
        assert os.environ["DISPLAY"] == f":{display.number}"
        assert display.process.poll() is None
    finally:
        display.stop()
    assert os.environ.get("DISPLAY") == before
    assert display.process.poll() is not None
