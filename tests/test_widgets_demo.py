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

    from napari_slpd.session.demo_cohort import name_prototypes_from_design
    from napari_slpd.widgets.demo import (
        dock_panels,
        save_in_use_screenshots,
        save_neighbour_screenshot,
        save_screenshots,
        save_small_copies,
        show_demo,
    )
    from napari_slpd.samples.synthetic import TISSUE_CLASSES

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
        # Part 2 is docked too: a real slide keeps "prototype k" (no model names it), the fine-tune form is
        # set up for the demo's tiny run without starting it.
        labeling, finetune = panels["Prototype labeling"], panels["SLPD fine-tune"]
        assert labeling.rows and all(r.name == f"prototype {r.proto_idx}" and not r.named for r in labeling.rows)
        assert finetune.run is None or not finetune.run.is_running
        assert finetune.preset_combo.currentText() == "tiny" and finetune.threads_spin.value() == 1
        # A synthetic slide's prototypes are named after the tissue classes it was painted with.
        annotations = labeling.annotations
        try:
            names = name_prototypes_from_design(cohort, "synthetic-7", annotations)
            protos = cohort.prototypes("synthetic-7", compute=False)
            assert sorted(names) == list(range(protos.k))
            assert all(name.split(" + ")[0].split(",")[0].split(" (")[0] in TISSUE_CLASSES[1:]
                       for name in names.values()), names
            stored = annotations.labels("synthetic-7", protos)
            assert {k: label.name for k, label in stored.items()} == names
            assert name_prototypes_from_design(cohort, "synthetic-7", annotations) == {}  # named already: kept
        finally:
            annotations.clear("synthetic-7")  # the cohort is shared with other test modules

        folder = artifacts_dir / "screenshots" / "demo"
        paths = save_screenshots(viewer, panels, folder)
        paths += save_in_use_screenshots(viewer, panels, folder)
        assert labeling.plan and labeling.preview.rowCount() == len(labeling.plan)  # the propagation preview
        paths.append(save_neighbour_screenshot(viewer, panels, folder))
        assert state.current_slide_id == results[0].slide_id
        names = {p.name for p in paths}
        assert {"viewer.png", "viewer-neighbour.png", "panel-cohort.png", "panel-similar-slides.png",
                "panel-embedding-map.png", "panel-prototype-labeling.png", "panel-slpd-fine-tune.png",
                "labeling.png", "finetune.png"} <= names
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


def test_tissue_class_shares_count_the_painted_classes_of_each_prototype():
    from types import SimpleNamespace

    import numpy as np

    from napari_slpd.session.demo_cohort import names_from_shares, tissue_class_shares
    from napari_slpd.samples.synthetic import TISSUE_CLASSES

    stroma, tumour, fat = (TISSUE_CLASSES.index(n) for n in ("stroma", "tumour", "fat"))
    classes = np.zeros((8, 8), np.uint8)  # 8 level-0 px per class-map px: a 64-px region is 8 x 8 cells
    classes[:4, :4] = stroma
    classes[:4, 4:] = tumour
    classes[4:, :4] = fat
    classes[4:, 4:6] = tumour  # the last region: half tumour, half background
    design = SimpleNamespace(class_px=8, classes=classes)
    coords = np.array([[0, 0], [32, 0], [0, 32], [32, 32]])  # four 32-px regions of 4 x 4 cells
    shares = tissue_class_shares(design, coords, 32.0, np.array([0, 1, 0, 2]), k=3)
    columns = list(TISSUE_CLASSES[1:])
    expected = np.zeros((3, len(columns)))
    expected[0, columns.index("stroma")] = expected[0, columns.index("fat")] = 0.5
    expected[1, columns.index("tumour")] = 1.0
    expected[2, columns.index("tumour")] = 1.0  # background is no tissue class
    np.testing.assert_allclose(shares, expected)
    assert names_from_shares(shares) == ["stroma + fat", "tumour", "tumour (2)"]
    assert names_from_shares([[0.8, 0.2, 0, 0, 0], [0, 0, 0, 0, 0]]) == ["stroma, some tumour", "no tissue"]


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs the Xvfb binary")
def test_virtual_display_starts_and_restores_display():
    from napari_slpd.testing.xvfb import XvfbProcess as _XvfbProcess

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
