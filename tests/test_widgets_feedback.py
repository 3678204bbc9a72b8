"""What the panels tell a person (issue 26), in a real viewer under Xvfb: one message per failure and none
for a cancel; files that are not slides listed with their reason; the legend equal to the layer after a
recolour; a recolour that keeps the default name; another K tried on one slide until applied to the
cohort. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest

from widgets_support import K, build_processed_cohort

pytestmark = pytest.mark.gui

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_processed_cohort(tmp_path_factory.getbasetemp() / "slpd-widgets-cohort")


@pytest.fixture
def screenshots(artifacts_dir):
    folder = artifacts_dir / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _dock(viewer, *names) -> dict:
    """What Plugins > SLPD slide prototypes > <panel> does, for each panel in turn."""
    return {name: viewer.window.add_plugin_dock_widget("napari-slpd", name)[1] for name in names}


def _idle(qtbot, panels) -> None:
    qtbot.waitUntil(lambda: not any(p.task_bar.busy or getattr(p, "_thumb_worker", None) is not None
                                    for p in panels), timeout=WAIT_MS)


def _wait(qtbot, task_bar) -> str:
    qtbot.waitUntil(lambda: task_bar.task is not None, timeout=5_000)
    qtbot.waitUntil(lambda: not task_bar.busy, timeout=WAIT_MS)
    return task_bar.task.outcome


def _notifications_since(start: int, severity: str) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    wanted = NotificationSeverity(severity)
    return [str(n.message) for n in notification_manager.records[start:] if n.severity == wanted]


def _n_notifications() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


# -- 1. one toast per failure, none on cancel ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["fails", "cancelled", "cancelled-raising", "cancelled-elsewhere"])
def test_one_message_per_failure_and_none_for_a_cancel(make_napari_viewer, qtbot, how):
    from napari_slpd.errors import SlpdError
    from napari_slpd.utils.progress import Cancelled
    from napari_slpd.widgets._common import TaskBar

    make_napari_viewer()  # napari's notification manager and exception hooks, as in the app
    bar = TaskBar()
    qtbot.addWidget(bar)
    go = threading.Event()

    def work(progress, cancel):
        progress(1, 4)
        go.wait(10)
        if how == "fails":
            raise SlpdError("the labels file has no column 'slide_id'")
        if how in ("cancelled-raising", "cancelled-elsewhere"):
            raise Cancelled("computing PANTHER embeddings was cancelled")
        return "stopped early"

    start = _n_notifications()
    with qtbot.capture_exceptions() as raised:  # what superqt re-raised in the GUI thread (napari's 2nd toast)
        bar.run(work, "Evaluation")
        qtbot.waitUntil(lambda: bar.progress_bar.maximum() == 4, timeout=10_000)
        if how in ("cancelled", "cancelled-raising"):
            bar.cancel_button.click()
        go.set()
        qtbot.waitUntil(lambda: not bar.busy, timeout=10_000)
        qtbot.wait(50)  # anything queued behind the end
    assert not raised, [str(e[1]) for e in raised]
    errors = _notifications_since(start, "error")
    if how == "fails":
        assert errors == ["Evaluation: the labels file has no column 'slide_id'"]
        assert bar.end_state == "failed" and "no column 'slide_id'" in bar.status.text()
    else:
        assert errors == []
        assert bar.end_state == "cancelled" and bar.status.text() == "Evaluation: cancelled"


# -- 2. files that are not slides are listed, with their reason -----------------------------------------------


def test_files_that_are_not_slides_are_listed_with_their_reason(make_napari_viewer, qtbot, tmp_path, screenshots):
    from napari_slpd.samples.synthetic import write_synthetic_slide
    from napari_slpd.session import Session
    from napari_slpd.widgets.cohort import COL_SLIDE

    root = tmp_path / "cohort"
    root.mkdir()
    write_synthetic_slide(root / "good.svs", width=1024, height=768, seed=1)
    data = (root / "good.svs").read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 3])
    (root / "noise.svs").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    (root / "notes.tiff").write_text("a text file, not an image\n" * 20)
    other = tmp_path / "other"
    other.mkdir()
    write_synthetic_slide(other / "good.svs", width=1024, height=768, seed=2)  # the same slide id

    viewer = make_napari_viewer(show=True)
    panel = _dock(viewer, "Cohort")["Cohort"]
    try:
        start = _n_notifications()
        panel.open_cohort(root)
        assert panel.slide_ids() == ["good"]
        listed = {sk.path.name: sk for sk in panel.skipped_files()}
        assert set(listed) == {"truncated.svs", "noise.svs", "notes.tiff"}
        assert all(sk.state == "unreadable" for sk in listed.values())
        assert "is truncated" in listed["truncated.svs"].reason and "bytes" in listed["truncated.svs"].reason
        assert "a text file" in listed["notes.tiff"].reason
        table = panel.table
        texts = [table.text(r, COL_SLIDE) for r in range(table.model().rowCount())]
        assert texts[0] == "good" and "truncated.svs (unreadable)" in texts
        row = texts.index("truncated.svs (unreadable)")
        assert "is truncated" in table.tooltip(row, COL_SLIDE)
        assert "3 file(s) not added" in panel.summary.text() and "1 slides" in panel.summary.text()
        warnings = _notifications_since(start, "warning")
        assert len(warnings) == 1 and "3 unreadable file(s)" in warnings[0], warnings

        table.selectRow(row)  # the reason under the list, without hovering
        assert panel.pixel_note.isVisibleTo(panel), (panel.table.currentRow(), row, panel.pixel_note.text())
        assert "is truncated" in panel.pixel_note.text()
        assert panel.selected_slide_id() is None
        start = _n_notifications()
        panel.open_slide_button.click()  # not a slide: a warning with the reason, nothing opened
        assert panel.state.current is None
        assert any("is truncated" in w for w in _notifications_since(start, "warning"))

        # Another folder with a file of the same slide id: said as such, not "not a slide".
        start = _n_notifications()
        assert panel.add_slides(other) == []
        status = panel.task_bar.status.text()
        assert "1 file(s) whose slide id another file has" in status and "not slides" not in status
        assert _notifications_since(start, "warning") == [status] and not _notifications_since(start, "info")
        duplicate = [sk for sk in panel.skipped_files() if sk.state == "duplicate id"]
        assert len(duplicate) == 1 and duplicate[0].path == (other / "good.svs").resolve()
        assert "already used in this cohort" in duplicate[0].reason
        panel.select_slide("good")
        assert not panel.pixel_note.isVisibleTo(panel) or "not added" not in panel.pixel_note.text()
        texts = [table.text(r, COL_SLIDE) for r in range(table.model().rowCount())]
        table.selectRow(texts.index("good.svs (duplicate id)"))
        assert "already used in this cohort" in panel.pixel_note.text()
        from qtpy.QtWidgets import QWidget

        qtbot.wait(100)  # the layout settles
        inner = panel.scroll_area.widget()
        widest = sorted(((w.width(), w.minimumWidth(), w.minimumSizeHint().width(), type(w).__name__)
                         for w in inner.findChildren(QWidget) if w.isVisibleTo(inner)), reverse=True)[:4]
        assert panel.scroll_area.horizontalScrollBar().maximum() == 0, (
            inner.width(), inner.minimumWidth(), inner.sizeHint().width(), inner.minimumSizeHint().width(),
            panel.scroll_area.viewport().width(), widest)
        _grab(panel, screenshots / "cohort-files-not-added.png")

        # Kept in the cohort: a new session lists them too; a file fixed since is a slide again.
        (root / "truncated.svs").write_bytes(data)
        again = Session.open(root)
        assert "truncated" in again.slide_ids()
        names = sorted(sk.path.name for sk in again.cohort.skipped_files())
        assert names == ["good.svs", "noise.svs", "notes.tiff"]
    finally:
        _idle(qtbot, [panel])


def _grab(widget, path) -> None:
    from qtpy.QtWidgets import QApplication

    QApplication.instance().processEvents()
    assert widget.grab().save(str(path)), f"could not write {path}"


# -- 4 and 5. a recolour: the legend follows, the default name stays ------------------------------------------


def _layer_rgb(state, k) -> tuple:
    layer = state.layer("prototypes")
    protos = state.current.extras["prototypes"]
    region = int(np.flatnonzero(np.asarray(protos.assignments) == k)[0])
    return tuple(np.round(np.asarray(layer.colormap.map(np.array([region + 1]))[0][:3]), 3))


def _legend_rgb(panel, k) -> tuple:
    color = panel.legend.item(k, 0).background().color()
    return tuple(np.round([color.redF(), color.greenF(), color.blueF()], 3))


def test_recolour_keeps_the_default_name_and_the_legend_follows_the_layer(make_napari_viewer, qtbot, cohort,
                                                                           screenshots):
    from napari_slpd.labeling import PrototypeAnnotations

    query = "cmu_small_region"
    viewer = make_napari_viewer(show=True)
    # The Prototypes panel exists before any slide opens: its legend listens before the layer is drawn.
    panels = _dock(viewer, "Cohort", "Prototypes", "Prototype labeling")
    cohort_panel, protos_panel, labeling = panels["Cohort"], panels["Prototypes"], panels["Prototype labeling"]
    state = cohort_panel.state
    try:
        cohort_panel.open_cohort(cohort.root)
        cohort_panel.open_slide(query, detect_tissue=False)
        qtbot.waitUntil(lambda: state.layer("prototypes") is not None and protos_panel.legend.rowCount() == K,
                        timeout=WAIT_MS)
        for color in ("#ffff00", "#00ffff"):  # twice: the legend is never one edit behind
            labeling.set_color(0, color)
            assert _layer_rgb(state, 0) == _legend_rgb(protos_panel, 0) == \
                tuple(round(int(color[i:i + 2], 16) / 255, 3) for i in (1, 3, 5))
        assert protos_panel.legend_rows()[0][0] == "prototype 0"
        row = labeling.rows[0]
        assert (row.name, row.named, row.source) == ("prototype 0", False, "")
        assert "0 named" in labeling.title.text()
        label = PrototypeAnnotations.load(cohort.cohort, cohort).labels(query)[0]
        assert label.source == "default" and label.color == "#00ffff" and not label.named
        _grab(protos_panel, screenshots / "prototypes-legend-after-recolour.png")

        # Recomputed prototypes (what "Use checkpoint" leads to): the colour moves with the regions, the
        # name is the default of the prototype's new index, never "prototype 0" on prototype K-1.
        path = cohort.cohort.annotations_path
        data = json.loads(path.read_text())
        record = data["slides"][query]["prototypes"]
        record["identity"] = "an-older-prototype-set"
        record["assignments"] = [(a + 1) % K for a in record["assignments"]]  # old k = new k + 1
        path.write_text(json.dumps(data))
        annotations = PrototypeAnnotations.load(cohort.cohort, cohort)
        report = annotations.carry_over()
        assert report == {query: "1 name(s) carried over"}
        names, colors = annotations.styles(query)
        assert names == {k: f"prototype {k}" for k in range(K)} and colors[K - 1] == "#00ffff"
        assert annotations.labels(query)[K - 1].source == "default"

        # A names file written before colour-only labels: a "user" name equal to the default is a default.
        data = json.loads(path.read_text())
        data["slides"][query]["labels"][str(K - 1)]["source"] = "user"
        path.write_text(json.dumps(data))
        assert PrototypeAnnotations.load(cohort.cohort, cohort).labels(query)[K - 1].source == "default"
    finally:
        PrototypeAnnotations.load(cohort.cohort, cohort).clear(query)  # the cohort is shared with other modules
        _idle(qtbot, panels.values())


# -- 6. another K on one slide leaves the cohort as it is until applied ---------------------------------------


def test_another_k_is_tried_on_the_open_slide_until_applied_to_the_cohort(make_napari_viewer, qtbot, cohort,
                                                                           tmp_path, screenshots):
    from napari_slpd.session import Session

    root = tmp_path / "copy"
    shutil.copytree(cohort.root, root, ignore=shutil.ignore_patterns("index", "thumbnails"))
    viewer = make_napari_viewer(show=True)
    panels = _dock(viewer, "Cohort", "Prototypes")
    cohort_panel, protos = panels["Cohort"], panels["Prototypes"]
    state = cohort_panel.state
    query = "cmu_small_region"
    try:
        cohort_panel.open_cohort(root)
        session = state.session
        others = [sid for sid in session.slide_ids() if sid != query]
        assert all(session.prototypes_current(sid) for sid in session.slide_ids())
        cohort_panel.open_slide(query, detect_tissue=False)
        qtbot.waitUntil(lambda: protos.legend.rowCount() == K, timeout=WAIT_MS)
        stamps = {sid: session.cohort.prototypes_path(sid).stat().st_mtime_ns for sid in session.slide_ids()}

        protos.k_spin.setValue(K - 1)  # trying another K: the cohort keeps its own
        assert state.settings.prototypes.k == K
        assert json.loads((root / "cohort.json").read_text())["settings"]["prototypes"]["k"] == K
        assert protos.trial_note.isVisibleTo(protos) and f"K={K - 1}" in protos.trial_note.text()
        assert protos.compute_all_button.text() == "Apply to all slides"
        protos.compute_button.click()
        assert _wait(qtbot, protos.task_bar) == "done", protos.task_bar.status.text()
        assert protos.legend.rowCount() == K - 1 and "on this slide only" in protos.title.text()
        assert state.current.extras["prototypes"].k == K - 1
        assert len(set(state.layer("prototypes").features["prototype"])) <= K - 1
        assert all(session.prototypes_current(sid) for sid in session.slide_ids())  # nothing became stale
        assert {sid: session.cohort.prototypes_path(sid).stat().st_mtime_ns for sid in stamps} == stamps
        assert all(cohort_panel.cell_text(sid, 4) == "✓" for sid in others)
        _grab(protos, screenshots / "prototypes-k-on-one-slide.png")

        # Applied to the cohort: the cohort's K, saved, and every slide recomputed with it.
        protos.compute_all_button.click()
        assert _wait(qtbot, protos.task_bar) == "done", protos.task_bar.status.text()
        assert state.settings.prototypes.k == K - 1 and not protos.trial_note.isVisibleTo(protos)
        assert json.loads((root / "cohort.json").read_text())["settings"]["prototypes"]["k"] == K - 1
        assert protos.compute_all_button.text() == "All slides"
        fresh = Session.open(root, slides=[])  # what another napari session reads
        assert fresh.settings.prototypes.k == K - 1
        assert all(fresh.prototypes_current(sid) for sid in fresh.slide_ids())
        assert "on this slide only" not in protos.title.text()
    finally:
        _idle(qtbot, panels.values())


# -- 3. every panel fits its dock's width, the window its screen -----------------------------------------------

ALL_PANELS = ("Cohort", "Features", "Prototypes", "Similar slides", "Embedding map", "Prototype labeling",
              "SLPD fine-tune", "Evaluation")


def _raise(panel) -> None:
    from qtpy.QtWidgets import QApplication

    from napari_slpd.widgets._panels import _dock_of

    dock = _dock_of(panel)
    dock.show()
    dock.raise_()
    QApplication.instance().processEvents()


def test_every_panel_fits_its_dock_and_the_window_its_screen(make_napari_viewer, qtbot, cohort, artifacts_dir,
                                                              screenshots):
    from qtpy.QtWidgets import QAbstractButton, QApplication, QTabBar, QWidget

    from napari_slpd.widgets._panels import _dock_of

    screen = QApplication.primaryScreen().availableGeometry()
    assert (screen.width(), screen.height()) == (1920, 1080)
    viewer = make_napari_viewer(show=True)
    panels = _dock(viewer, *ALL_PANELS)  # all at once, as a person clicking through the Plugins menu
    window = panels["Cohort"].window()
    window.setGeometry(screen)
    try:
        panels["Cohort"].open_cohort(cohort.root)
        panels["Cohort"].open_slide("cmu_small_region", detect_tissue=False)
        qtbot.waitUntil(lambda: panels["Prototypes"].legend.rowCount() == K, timeout=WAIT_MS)
        _idle(qtbot, panels.values())
        qtbot.wait(300)  # the docks' layout settles after the panels' first show
        from qtpy.QtWidgets import QDockWidget

        assert window.frameGeometry().height() <= screen.height(), (
            window.frameGeometry().height(), window.height(), window.minimumSizeHint().height(),
            [(d.windowTitle(), int(window.dockWidgetArea(d).value), d.isHidden(), d.height(), d.minimumSizeHint().height(),
              len(window.tabifiedDockWidgets(d))) for d in window.findChildren(QDockWidget)])

        measured = {}
        for name, panel in panels.items():
            _raise(panel)
            qtbot.wait(100)  # a tab shown for the first time lays itself out
            area = panel.scroll_area
            inner, visible = area.widget(), area.viewport().width()
            wider = [f"{type(b).__name__} '{b.text()}' ends at {b.mapTo(inner, b.rect().topRight()).x()} px"
                     for b in inner.findChildren(QAbstractButton)
                     if b.isVisibleTo(inner) and b.mapTo(inner, b.rect().topRight()).x() > visible]
            measured[name] = {"content_min": inner.minimumSizeHint().width(), "visible": visible,
                              "dock": _dock_of(panel).width()}
            widest = sorted(((w.minimumSizeHint().width(), type(w).__name__, w.objectName())
                             for w in inner.findChildren(QWidget) if w.isVisibleTo(inner)), reverse=True)[:4]
            assert inner.minimumSizeHint().width() <= visible, (name, measured[name], widest)
            assert area.horizontalScrollBar().maximum() == 0 and not wider, (name, wider)
            assert "(" not in _dock_of(panel).windowTitle()  # the tab shows the panel's name, not napari's suffix
            _grab(panel, screenshots / f"panel-{name.lower().replace(' ', '-')}.png")
        tabs = {}
        for bar in window.findChildren(QTabBar):
            texts = [bar.tabText(i) for i in range(bar.count())]
            if not any(t in texts for t in ("Cohort", "Evaluation", "Features")):
                continue
            fm = bar.fontMetrics()
            for i, text in enumerate(texts):
                assert bar.tabRect(i).width() >= fm.horizontalAdvance(text), (text, bar.tabRect(i).width())
            tabs[", ".join(texts)] = [bar.tabRect(i).width() for i in range(bar.count())]
        assert tabs
        _raise(panels["Cohort"])
        viewer.screenshot(str(screenshots / "window-all-eight-panels.png"), canvas_only=False)
        report = artifacts_dir / "panel-widths.json"
        report.write_text(json.dumps({"window_height": window.frameGeometry().height(), "panels": measured,
                                      "tabs": tabs}, indent=2))
    finally:
        _idle(qtbot, panels.values())


# -- 7. smaller things ---------------------------------------------------------------------------------------


def test_core_advice_is_said_for_the_gui():
    from napari_slpd.errors import FeatureStoreError
    from napari_slpd.widgets._common import error_message

    text = error_message(FeatureStoreError("feature file x.h5 does not exist; run `slpd extract` for this slide "
                                           "first"), "Prototypes")
    assert text == "Prototypes: feature file x.h5 does not exist; compute the features in the Features panel for " \
                   "this slide first"
    again = error_message(FeatureStoreError("x.h5 is an unfinished extraction; run `slpd extract` again with the "
                                            "same settings to finish it"))
    assert "compute the features again in the Features panel" in again and "slpd" not in again


def test_a_mistyped_folder_is_not_created_and_the_previous_slide_goes(make_napari_viewer, qtbot, cohort, tmp_path):
    viewer = make_napari_viewer(show=True)
    panel = _dock(viewer, "Cohort")["Cohort"]
    state = panel.state
    try:
        panel.open_cohort(cohort.root)
        panel.open_slide("cmu_small_region", detect_tissue=False)
        assert state.slpd_layers()
        asked = []
        panel.confirm = lambda title, text, yes: asked.append(text) or False
        typo = tmp_path / "cohrot"
        panel.folder_edit.setText(str(typo))
        panel.open_button.click()
        assert asked and str(typo) in asked[0] and not typo.exists()
        assert "nothing was created" in panel.task_bar.status.text()
        assert state.session.root == cohort.root and state.slpd_layers()  # the open cohort stays as it was

        panel.confirm = lambda title, text, yes: True
        new = tmp_path / "new-cohort"
        panel.folder_edit.setText(str(new))
        panel.open_button.click()
        assert new.is_dir() and state.session.root == new.resolve()
        assert state.slpd_layers() == [] and state.current is None  # the other cohort's slide is gone
    finally:
        _idle(qtbot, [panel])
