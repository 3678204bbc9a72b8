"""The napari experience of issue 12, under Xvfb at 1920 x 1080 (pytest.ini): settings the cohort keeps,
panels that fit the screen, colours that match across slides without the labeling panel, progress bars
that end as the work ended, and a pixel size that redraws the open slide.

Numbers a person may want (window heights, rows shown) are written to test-artifacts/experience.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from widgets_support import K, build_processed_cohort, tiny_settings

pytestmark = pytest.mark.gui

WAIT_MS = 120_000
SCREEN = (1920, 1080)
PANELS = ("Cohort", "Features", "Prototypes", "Similar slides", "Embedding map", "Prototype labeling",
          "SLPD fine-tune")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_processed_cohort(tmp_path_factory.getbasetemp() / "slpd-widgets-cohort")


def _report(key: str, value) -> None:
    from conftest import ARTIFACTS_DIR

    ARTIFACTS_DIR.mkdir(exist_ok=True)
    path = ARTIFACTS_DIR / "experience.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


def _wait(qtbot, task_bar, timeout=WAIT_MS) -> str:
    qtbot.waitUntil(lambda: task_bar.task is not None, timeout=5_000)
    qtbot.waitUntil(lambda: not task_bar.busy, timeout=timeout)
    return task_bar.task.outcome


def _idle(qtbot, panels) -> None:
    qtbot.waitUntil(lambda: not any(p.task_bar.busy or getattr(p, "_thumb_worker", None) is not None
                                    for p in panels), timeout=WAIT_MS)


def _dock_from_plugin_menu(viewer, names=PANELS) -> dict:
    """What Plugins > SLPD slide prototypes > <panel> does, for each panel in turn."""
    panels = {}
    for name in names:
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-slpd", name)
        panels[name] = widget
    return panels


def _main_window(panel):
    """The QMainWindow around a docked panel (public Qt API: QWidget.window())."""
    return panel.window()


def _fill_screen(window) -> None:
    from qtpy.QtWidgets import QApplication

    available = QApplication.primaryScreen().availableGeometry()
    window.setGeometry(available)
    QApplication.instance().processEvents()


def _raise(panel) -> None:
    from qtpy.QtWidgets import QApplication, QDockWidget

    parent = panel.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    if parent is not None:
        parent.show()
        parent.raise_()
    QApplication.instance().processEvents()


def _shows_whole_rows(panel, table) -> int:
    """Rows of ``table`` a person sees: the table's viewport rows, if the table itself is fully inside the
    panel's visible scroll area (else the rows of the part that is visible)."""
    from napari_slpd.widgets._panels import visible_rows

    per_row = max(1, table.verticalHeader().defaultSectionSize())
    visible = table.visibleRegion().boundingRect().height()
    if visible <= 0:
        return 0
    header = table.horizontalHeader().height()
    return min(visible_rows(table), int(max(0, visible - header) // per_row))


# -- the cohort keeps its settings -----------------------------------------------------------------------


def _small_cohort(tmp_path):
    from napari_slpd.samples.synthetic import write_synthetic_slide

    for seed in (3, 4):
        write_synthetic_slide(tmp_path / f"synthetic-{seed}.svs", width=2048, height=1536, seed=seed)
    return tmp_path


def test_reopened_cohort_brings_back_every_setting_and_status(make_napari_viewer, qtbot, tmp_path):
    """Set up a cohort in one viewer; a fresh viewer that opens it shows the same settings and statuses;
    a form that differs from the cached features offers a choice; features made with a checkpoint are
    never replaced by random-init ones without a confirmation that says so."""
    import torch

    from napari_slpd.models.checkpoints import save_dino_checkpoint
    from napari_slpd.models.vit import vit4k_xs

    root = _small_cohort(tmp_path / "cohort")
    checkpoint = tmp_path / "vit4k.pth"
    torch.manual_seed(1)
    save_dino_checkpoint(vit4k_xs(), checkpoint)

    viewer = make_napari_viewer(show=True)
    panels = _dock_from_plugin_menu(viewer, ("Cohort", "Features", "Prototypes", "Similar slides"))
    cohort_panel, features, protos, similar = (panels[n] for n in ("Cohort", "Features", "Prototypes",
                                                                   "Similar slides"))
    try:
        cohort_panel.open_cohort(root)
        tiny = tiny_settings().features  # a dozen regions per synthetic slide: seconds on a CPU
        features.load_settings(tiny)
        features.region_checkpoint.setText(str(checkpoint))
        features.apply()
        protos.k_spin.setValue(K)
        similar.top_k.setValue(7)
        features.compute("cohort")
        assert _wait(qtbot, features.task_bar) == "done"
        assert [r.status for r in features.last_results] == ["extracted", "extracted"], features.task_bar.status.text()
        assert features.task_bar.end_state == "done" and features.task_bar.progress_bar.format() == "done"
        cohort_panel.open_slide("synthetic-3", detect_tissue=False)
        qtbot.waitUntil(lambda: "prototypes" in cohort_panel.state.current.extras, timeout=WAIT_MS)
        _idle(qtbot, panels.values())
        saved = json.loads((root / "cohort.json").read_text())["settings"]
        assert saved["features"]["region_px"] == tiny.region_px and saved["prototypes"]["k"] == K
        assert saved["top_k"] == 7 and saved["features"]["region_checkpoint"] == str(checkpoint)
        before = {sid: (st.features, st.prototypes) for sid, st in cohort_panel.statuses.items()}
        assert before == {"synthetic-3": ("done", "done"), "synthetic-4": ("done", "missing")}
    finally:
        _idle(qtbot, panels.values())

    # A new napari session: the panels come back with the cohort's settings, not the defaults.
    viewer2 = make_napari_viewer(show=True)
    panels = _dock_from_plugin_menu(viewer2, ("Cohort", "Features", "Prototypes", "Similar slides"))
    cohort_panel, features, protos, similar = (panels[n] for n in ("Cohort", "Features", "Prototypes",
                                                                   "Similar slides"))
    try:
        assert features.region_px.value() == 4096  # the defaults, until the cohort is opened
        cohort_panel.open_cohort(root)
        assert features.region_px.value() == tiny.region_px and features.patch_px.value() == tiny.patch_px
        assert features.input_px.value() == tiny.patch_input_px and features.target_mpp.value() == tiny.target_mpp
        assert features.region_checkpoint.text() == str(checkpoint) and features.device.currentText() == "cpu"
        assert protos.k_spin.value() == K and similar.top_k.value() == 7
        after = {sid: (st.features, st.prototypes) for sid, st in cohort_panel.statuses.items()}
        assert after == before
        assert cohort_panel.cell_text("synthetic-3", 3) == "✓" and cohort_panel.cell_text("synthetic-3", 4) == "✓"
        assert "features 2/2" in cohort_panel.summary.text()
        assert not features.choice_box.isVisible() and not features.choice_box.isVisibleTo(features)

        # Another region size in the form: a choice, not a trap.
        features.region_px.setValue(tiny.region_px * 2)
        features.apply()
        assert features.choice_box.isVisibleTo(features)
        assert "made with other settings" in features.choice_label.text()
        assert cohort_panel.cell_text("synthetic-3", 3) == "other"
        features.use_features_settings()
        assert features.region_px.value() == tiny.region_px and not features.choice_box.isVisibleTo(features)
        assert cohort_panel.cell_text("synthetic-3", 3) == "✓"

        # No checkpoint in the form: recomputing would replace checkpoint features by random-init ones.
        store = root / "features" / "synthetic-3.h5"
        stamp = store.stat().st_mtime_ns
        features.region_checkpoint.setText("")
        features.apply()
        assert features.choice_box.isVisibleTo(features) and "random init" in features.choice_label.text()
        asked = []
        features.confirm = lambda title, text, yes: asked.append(text) or False
        features.recompute_other()
        assert asked and "RANDOMLY INITIALISED" in asked[0] and "checkpoint" in asked[0]
        assert features.task_bar.task is None or not features.task_bar.busy
        assert store.stat().st_mtime_ns == stamp  # kept
        assert "keep their features" in features.task_bar.status.text()
        features.region_checkpoint.setText(str(checkpoint))
        features.apply()
        assert not features.choice_box.isVisibleTo(features)
    finally:
        _idle(qtbot, panels.values())


# -- panels that fit the screen ----------------------------------------------------------------------------


def test_all_panels_from_the_plugin_menu_fit_a_1080_screen(make_napari_viewer, qtbot, cohort, artifacts_dir):
    from qtpy.QtWidgets import QApplication

    screen = QApplication.primaryScreen().availableGeometry()
    assert (screen.width(), screen.height()) == SCREEN
    viewer = make_napari_viewer(show=True)
    panels = _dock_from_plugin_menu(viewer)
    window = _main_window(panels["Cohort"])
    _fill_screen(window)
    try:
        state = panels["Cohort"].state
        panels["Cohort"].open_cohort(cohort.root)
        assert state.settings.features == cohort.settings.features  # the cohort's own settings
        panels["Cohort"].open_slide("cmu_small_region")
        qtbot.waitUntil(lambda: state.layer("prototypes") is not None, timeout=WAIT_MS)
        panels["Similar slides"].query_whole_slide()
        assert _wait(qtbot, panels["Similar slides"].task_bar) == "done"
        _idle(qtbot, panels.values())
        QApplication.instance().processEvents()

        min_height = window.minimumSizeHint().height()
        _report("window_min_height_all_panels", min_height)
        _report("window_height", window.frameGeometry().height())
        assert min_height <= SCREEN[1], f"the window needs {min_height} px: {_dock_report(window)}"
        assert window.frameGeometry().height() <= SCREEN[1]

        tables = {"Cohort": panels["Cohort"].table, "Similar slides": panels["Similar slides"].table,
                  "Prototypes": panels["Prototypes"].legend, "Prototype labeling": panels["Prototype labeling"].table}
        rows = {}
        for name, table in tables.items():
            _raise(panels[name])
            rows[name] = _shows_whole_rows(panels[name], table)
        _report("table_rows_shown", rows)
        _raise(panels["Cohort"])
        (artifacts_dir / "screenshots").mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(artifacts_dir / "screenshots" / "window-all-panels.png"), canvas_only=False)
        if os.environ.get("SLPD_DOCS_SCREENSHOTS"):
            _save_docs_screenshot(viewer, os.environ["SLPD_DOCS_SCREENSHOTS"])
        heights = {name: (t.height(), t.viewport().height(), t.verticalHeader().defaultSectionSize(),
                          t.visibleRegion().boundingRect().height(), t.minimumHeight()) for name, t in tables.items()}
        assert all(n >= 5 for n in rows.values()), (rows, heights, _dock_report(window))

        # Long names are elided in the middle, whole in the tooltip; columns stretch to the panel.
        _raise(panels["Similar slides"])
        similar = panels["Similar slides"].table
        assert similar.textElideMode().name == "ElideMiddle"
        assert similar.tooltip(0, 1) == panels["Similar slides"].results()[0].slide_id
        widths = [similar.columnWidth(c) for c in range(4)]
        _report("similar_column_widths", widths)
        assert widths[1] >= 150, widths  # the slide name has room
        assert "mean" in similar.text(0, 3) and "↔" in similar.tooltip(0, 3)
        assert "↔" in panels["Similar slides"].detail.text()

    finally:
        _idle(qtbot, panels.values())


def _dock_report(window) -> list:
    from qtpy.QtWidgets import QDockWidget

    return [(d.objectName()[:24], int(window.dockWidgetArea(d).value), d.isHidden(), d.minimumSizeHint().height(),
             d.height(), len(window.tabifiedDockWidgets(d))) for d in window.findChildren(QDockWidget)]


def _save_docs_screenshot(viewer, path: str) -> None:
    from PIL import Image

    full = path + ".full.png"
    viewer.screenshot(full, canvas_only=False)
    with Image.open(full) as im:
        im = im.convert("RGB")
        im.thumbnail((1280, 1280))
        im.save(path, optimize=True)
    os.remove(full)


# -- one colour authority ------------------------------------------------------------------------------------


def test_names_and_colours_without_the_labeling_panel_and_neighbours_in_query_colours(make_napari_viewer, qtbot,
                                                                                     cohort):
    from napari_slpd.labeling import PrototypeAnnotations

    annotations = PrototypeAnnotations.load(cohort.cohort, cohort)
    query = "cmu_small_region"
    protos = cohort.prototypes(query, compute=False)
    annotations.rename(query, 0, "tumour")
    annotations.recolor(query, 0, "#ff0000")
    try:
        viewer = make_napari_viewer(show=True)
        panels = _dock_from_plugin_menu(viewer, ("Cohort", "Prototypes", "Similar slides"))
        state = panels["Cohort"].state
        panels["Cohort"].open_cohort(cohort.root)
        opened = panels["Cohort"].open_slide(query, detect_tissue=False)
        layer = state.layer("prototypes")
        assert layer is not None
        region0 = int(np.flatnonzero(protos.assignments == 0)[0])
        assert np.allclose(layer.colormap.map(np.array([region0 + 1]))[0][:3], (1.0, 0.0, 0.0), atol=1e-3)
        assert layer.features["name"][region0] == "tumour"  # napari's status bar on hover
        qtbot.waitUntil(lambda: panels["Prototypes"].legend.rowCount() == protos.k, timeout=10_000)
        assert panels["Prototypes"].legend_rows()[0][0] == "tumour"
        world = opened.geometry.level0_to_world(*(opened.regions.coords[region0] + opened.regions.size / 2))
        assert "tumour" in panels["Prototypes"].describe_position(world)
        _, export_colors = annotations.styles(query, protos)
        assert export_colors[0] == "#ff0000"  # export takes the same colours
        query_colors = {k: state.prototype_hex(k) for k in range(protos.k)}
        assert len(set(query_colors.values())) == protos.k

        similar = panels["Similar slides"]
        similar.query_whole_slide()
        assert _wait(qtbot, similar.task_bar) == "done"
        assert "tumour" in similar.detail.text()
        res = similar.results()[0]
        similar.open_result(0)
        neighbour = state.current
        n_protos = neighbour.extras["prototypes"]
        layer = state.layer("prototypes")
        matched = {l: k for k, l in res.pairs}
        for l, k in matched.items():
            regions = np.flatnonzero(n_protos.assignments == l)
            colors = layer.colormap.map(regions + 1)[:, :3]
            from napari_slpd.labeling import color_to_rgba

            assert np.allclose(colors, np.asarray(color_to_rgba(query_colors[k])[:3])[None], atol=1e-3), (l, k)
        shown = [state.prototype_hex(l) for l in range(n_protos.k)]
        assert len(set(shown)) == len(shown)  # unique within the neighbour
        legend = [name for name, _ in panels["Prototypes"].legend_rows()]
        assert any("≙ tumour" in name for name in legend)
    finally:
        annotations.clear(query)  # the cohort is shared with other test modules


# -- progress bars end as the work ended ---------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["done", "cached", "cancelled", "failed", "raised"])
def test_task_bar_end_states(qtbot, outcome):
    import threading

    from napari_slpd.errors import SlpdError
    from napari_slpd.widgets._common import TaskBar

    bar = TaskBar()
    qtbot.addWidget(bar)
    go = threading.Event()

    def work(progress, cancel):
        progress(3, 10)
        go.wait(10)
        if outcome == "raised":
            raise SlpdError("the slide file is damaged")
        progress(7, 10)  # the last report is not the end state
        return outcome

    def on_result(result):
        if result == "cached":
            bar.finish("cached", "6 already cached")
        elif result == "failed":
            bar.finish("failed", "Features: 1 failed\nslide-a: no pixel size")
        else:
            bar.finish("done")

    with qtbot.capture_exceptions() as raised:  # nothing may be re-raised in the GUI thread (a second toast)
        bar.run(work, "Work", on_result=on_result)
        qtbot.waitUntil(lambda: bar.progress_bar.maximum() == 10, timeout=10_000)
        if outcome == "cancelled":
            bar.cancel()
        go.set()
        qtbot.waitUntil(lambda: not bar.busy, timeout=10_000)
    assert not raised, raised
    fmt, full = bar.progress_bar.format(), bar.progress_bar.value() == bar.progress_bar.maximum()
    expected = {"done": ("done", True), "cached": ("cached", True), "cancelled": ("cancelled", False),
                "failed": ("failed", False), "raised": ("failed", False)}[outcome]
    assert (fmt, full) == expected
    if outcome == "failed":
        assert "no pixel size" in bar.status.text()
    if outcome == "raised":
        assert "the slide file is damaged" in bar.status.text()  # the reason in the panel, not only a toast
    if outcome == "cancelled":
        assert "cancelled" in bar.status.text()


def test_panels_end_states_on_a_cached_cohort(make_napari_viewer, qtbot, cohort):
    """Real panels: cached features and prototypes say "cached" with the bar full; a query says "done"."""
    viewer = make_napari_viewer(show=True)
    panels = _dock_from_plugin_menu(viewer, ("Cohort", "Features", "Prototypes", "Similar slides"))
    try:
        panels["Cohort"].open_cohort(cohort.root)
        panels["Cohort"].open_slide("cmu_small_region", detect_tissue=False)
        features = panels["Features"]
        features.compute("cohort")
        assert _wait(qtbot, features.task_bar) == "done"
        bar = features.task_bar.progress_bar
        assert features.task_bar.end_state == "cached" and bar.format() == "cached" and bar.value() == bar.maximum()
        _idle(qtbot, panels.values())
        protos = panels["Prototypes"]
        protos.compute(all_slides=True)
        assert _wait(qtbot, protos.task_bar) == "done"
        assert protos.task_bar.end_state == "cached"
        similar = panels["Similar slides"]
        similar.query_whole_slide()
        assert _wait(qtbot, similar.task_bar) == "done"
        bar = similar.task_bar.progress_bar
        assert bar.format() == "done" and bar.value() == bar.maximum()
    finally:
        _idle(qtbot, panels.values())


# -- pixel size ----------------------------------------------------------------------------------------------


def test_pixel_size_shown_and_setting_it_redraws_the_open_slide(make_napari_viewer, qtbot, tmp_path):
    from conftest import real_slide

    tcga, breast = real_slide("tcga_jp2k_svs"), real_slide("breast_tiff")
    viewer = make_napari_viewer(show=True)
    panels = _dock_from_plugin_menu(viewer, ("Cohort",))
    cohort_panel = panels["Cohort"]
    try:
        cohort_panel.open_cohort(tmp_path / "c", slides=[tcga, breast])
        qtbot.waitUntil(lambda: len(cohort_panel.file_pixel_sizes) == 2, timeout=WAIT_MS)
        assert cohort_panel.cell_text("tcga-cr-7395-01a-01-ts1", 2) == "unknown"
        assert cohort_panel.cell_text("CropBreastSlide", 2) == "implausible (264.58)"
        assert "'Set pixel size'" in cohort_panel.pixel_note.text()
        cohort_panel.select_slide("CropBreastSlide")
        assert "CropBreastSlide" in cohort_panel.pixel_note.text()

        opened = cohort_panel.open_slide("tcga-cr-7395-01a-01-ts1", detect_tissue=False)
        image = cohort_panel.state.layer("image")
        assert tuple(image.scale) == (1.0, 1.0) and opened.geometry.unit == "px"
        cohort_panel.select_slide("tcga-cr-7395-01a-01-ts1")
        cohort_panel.mpp_spin.setValue(0.25)
        cohort_panel.set_mpp_button.click()
        image = cohort_panel.state.layer("image")
        assert tuple(image.scale) == (0.25, 0.25)  # redrawn in µm without reopening
        assert cohort_panel.state.current.geometry.unit == "um"
        assert cohort_panel.cell_text("tcga-cr-7395-01a-01-ts1", 2) == "0.25 (set)"
        assert "redrawn" in cohort_panel.task_bar.status.text()
    finally:
        _idle(qtbot, panels.values())


# -- add slides, first-run defaults ------------------------------------------------------------------------


def test_add_slides_counts_only_new_ones_and_loads_thumbnails(make_napari_viewer, qtbot, tmp_path):
    from napari_slpd.samples.synthetic import write_synthetic_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    for seed in (5, 6):
        write_synthetic_slide(slides / f"a-very-long-slide-name-from-the-scanner-{seed}.svs", width=1024,
                              height=768, seed=seed)
    viewer = make_napari_viewer(show=True)
    panels = _dock_from_plugin_menu(viewer, ("Cohort", "Features"))
    cohort_panel, features = panels["Cohort"], panels["Features"]
    try:
        cohort_panel.open_cohort(tmp_path / "cohort")
        assert cohort_panel.add_slides(slides) == [p.stem for p in sorted(slides.glob("*.svs"))]
        assert "added 2 new slide(s)" in cohort_panel.task_bar.status.text()
        qtbot.waitUntil(lambda: all(cohort_panel.table.model().cell(r, 0).icon is not None for r in range(2)),
                        timeout=WAIT_MS)  # without reopening or Refresh
        assert cohort_panel.add_slides(slides) == []
        assert "added 0 new slide(s) to the cohort (2 already in it)" in cohort_panel.task_bar.status.text()
        table = cohort_panel.table
        assert table.tooltip(0, 1).endswith(".svs")  # the whole path where the name is cut

        # First run with the default 4096-px regions: no region fits these small slides; the panel says
        # so with the slide size and offers the largest region size that fits.
        features.device.setCurrentText("cpu")
        features.compute("cohort")
        assert _wait(qtbot, features.task_bar) == "done"
        assert {r.status for r in features.last_results} == {"empty"}
        assert features.fit_box.isVisibleTo(features)
        text = features.fit_label.text()
        assert "No 4096-px region" in text and "1024 x 768 px" in text
        assert features.fitting_region_px is not None and features.fitting_region_px < 4096
        assert f"Use {features.fitting_region_px}-px regions" in features.fit_button.text()
        _report("first_run_offer", text)
    finally:
        _idle(qtbot, panels.values())
