"""The SLPD panels driven like a user would, on real slides, under Xvfb (pytest-xvfb).

Each test docks real panels in a real viewer and waits (qtbot.waitUntil) for their thread workers. The
cohort of real slides is processed once per session (tests/widgets_support.py) with tiny settings;
screenshots of every panel in use go to test-artifacts/screenshots/ for a person to look at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from widgets_support import K, build_processed_cohort, tiny_settings

pytestmark = pytest.mark.gui

WAIT_MS = 120_000
import os
SHOW = os.environ.get("SHOW", "1") == "1"


@dataclass
class FakeMouseEvent:
    """What napari hands a viewer's mouse callbacks (the fields our callbacks read)."""

    type: str
    position: tuple
    button: int = 1
    modifiers: tuple = ()
    is_dragging: bool = False
    view_direction: tuple | None = None
    dims_displayed: tuple = (0)
    handled: bool = False


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_processed_cohort(tmp_path_factory.getbasetemp() / "slpd-widgets-cohort")


@pytest.fixture
def screenshots(artifacts_dir) -> Path:
    folder = artifacts_dir / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _viewer(make_napari_viewer, *names):
    """A shown viewer with the named panels docked; returns (viewer, {name: widget})."""
    from napari_slpd.widgets import (CohortWidget, EmbeddingMapWidget, FeaturesWidget, PrototypesWidget,
                                     SimilarSlidesWidget)

    classes = {"cohort": CohortWidget, "features": FeaturesWidget, "prototypes": PrototypesWidget,
               "similar": SimilarSlidesWidget, "embedding": EmbeddingMapWidget}
    viewer = make_napari_viewer(show=SHOW)
    panels = {}
    for name in names:
        widget = classes[name](viewer)
        viewer.window.add_dock_widget(widget, name=name, area="left" if name in ("features", "embedding") else "right")
        panels[name] = widget
    if panels:  # the main window, through a docked panel (public Qt API, not Window._qt_window)
        next(iter(panels.values())).window().resize(1600, 1000)
    _OPEN_PANELS.extend(panels.values())
    return viewer, panels


_OPEN_PANELS: list = []


@pytest.fixture(autouse=True)
def _workers_finish(qtbot, make_napari_viewer):
    """No test may leave a worker thread running past its viewer (requesting make_napari_viewer makes this
    run before napari closes the viewer)."""
    yield

    def idle():
        for panel in _OPEN_PANELS:
            if panel.task_bar.busy or getattr(panel, "_thumb_worker", None) is not None:
                return False
        return True

    try:
        qtbot.waitUntil(idle, timeout=WAIT_MS)
    finally:
        _OPEN_PANELS.clear()


def _wait(qtbot, task_bar, timeout=WAIT_MS) -> str:
    qtbot.waitUntil(lambda: task_bar.task is not None, timeout=5_000)  # the task started at all
    qtbot.waitUntil(lambda: not task_bar.busy, timeout=timeout)
    return task_bar.task.outcome


def _grab(widget, path: Path) -> None:
    from qtpy.QtWidgets import QApplication

    QApplication.instance().processEvents()
    assert widget.grab().save(str(path)), f"could not write {path}"


def _open(qtbot, panels, slide_id: str):
    """Open a slide from the cohort panel and wait for its tissue outline and prototypes."""
    cohort_panel = panels["cohort"]
    opened = cohort_panel.open_slide(slide_id)
    _wait(qtbot, cohort_panel.task_bar)
    if "prototypes" in panels and opened.regions is not None:
        # Cached prototypes are drawn at once; otherwise the Prototypes panel computes them in a worker.
        bar = panels["prototypes"].task_bar
        qtbot.waitUntil(lambda: "prototypes" in opened.extras or (bar.task is not None and not bar.busy),
                        timeout=WAIT_MS)
        assert "prototypes" in opened.extras, bar.status.text()
        qtbot.waitUntil(lambda: not bar.busy, timeout=WAIT_MS)
    return opened


def _click(qtbot, button) -> None:
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _last_notifications(n=5) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(r.message) for r in notification_manager.records[-n:]]


# -- open a cohort, compute features, see the prototypes aligned with the tissue ---------------------------


def test_open_cohort_compute_features_and_prototypes_align_with_the_slide(make_napari_viewer, qtbot, tmp_path,
                                                                         screenshots):
    from conftest import real_slide

    slide_path = real_slide("cmu_svs")
    viewer, panels = _viewer(make_napari_viewer, "cohort", "features", "prototypes")
    cohort_panel, features, protos = panels["cohort"], panels["features"], panels["prototypes"]
    # The features form, set as a user would (tiny settings so the CPU run takes seconds).
    features.region_px.setValue(256)
    features.patch_px.setValue(64)
    features.input_px.setValue(16)
    features.target_mpp.setValue(1.0)
    features.device.setCurrentText("cpu")
    protos.k_spin.setValue(K)

    cohort_panel.open_cohort(tmp_path, slides=[slide_path])
    assert cohort_panel.slide_ids() == ["cmu_small_region"]
    assert cohort_panel.table.text(0, 3) == "–"  # no features yet
    cohort_panel.table.selectRow(0)
    _click(qtbot, cohort_panel.open_slide_button)
    _wait(qtbot, cohort_panel.task_bar)
    state = cohort_panel.state
    image = state.layer("image")
    assert image is not None and image.multiscale
    assert tuple(image.scale) == pytest.approx((0.499, 0.499), abs=1e-3)  # physical units (um)
    assert state.layer("tissue") is not None

    _click(qtbot, features.current_button)
    assert _wait(qtbot, features.task_bar) == "done"
    assert [r.status for r in features.last_results] == ["extracted"]
    assert _wait(qtbot, protos.task_bar) == "done"  # shown automatically once the slide has features
    opened = state.current
    layer = state.layer("prototypes")
    M = len(opened.regions)
    assert M >= K

    # Alignment in physical units: at the world position of every region's centre, the image layer is
    # at that level-0 pixel and the prototypes layer holds that region; just outside a region's top-left
    # corner the layer holds another value.
    protos_obj = opened.extras["prototypes"]
    for i, (x0, y0) in enumerate(opened.regions.coords):
        centre = opened.geometry.level0_to_world(x0 + opened.regions.size / 2, y0 + opened.regions.size / 2)
        data_yx = image.world_to_data(centre)
        assert data_yx[1] == pytest.approx(x0 + opened.regions.size / 2 - 0.5, abs=1e-6)
        assert layer.get_value(centre, world=True) == i + 1
        inside = opened.geometry.level0_to_world(x0 + 0.6, y0 + 0.6)
        outside = opened.geometry.level0_to_world(x0 - 0.6, y0 + 0.6)
        assert layer.get_value(inside, world=True) == i + 1
        assert layer.get_value(outside, world=True) != i + 1
        # One colour per prototype: the region's label colour is its prototype's colour.
        color = layer.colormap.map(np.array([i + 1]))[0]
        assert np.allclose(color[:3], state.prototype_color(protos_obj.assignments[i])[:3], atol=1e-3)
    assert layer.units[0] == image.units[0]

    # Hovering: napari's status bar and the panel name the region's prototype and distance.
    i = int(np.argmax(protos_obj.similarity < 1.0))
    x0, y0 = opened.regions.coords[i]
    centre = opened.geometry.level0_to_world(x0 + opened.regions.size / 2, y0 + opened.regions.size / 2)
    status = layer.get_status(centre, world=True)["coordinates"]
    k = int(protos_obj.assignments[i])
    assert f"region: {i}" in status and f"prototype: {k}" in status and "distance: " in status
    protos._on_mouse_move(viewer, FakeMouseEvent("mouse_move", centre))
    assert protos.hover.text().startswith(f"region {i} · prototype {k} · distance to prototype")

    # The legend: one row per prototype with its size; the sizes add up to the regions.
    rows = protos.legend_rows()
    assert len(rows) == protos_obj.k and sum(size for _, size in rows) == M
    assert [size for _, size in rows] == np.bincount(protos_obj.assignments, minlength=protos_obj.k).tolist()
    protos.legend.selectRow(0)
    assert state.selection.regions == tuple(np.flatnonzero(protos_obj.assignments == 0))
    assert len(state.layer("selection").data) == len(state.selection.regions)

    # The cohort list shows the slide's new status; computing again loads from the cache.
    qtbot.waitUntil(lambda: cohort_panel.table.text(0, 4) == "✓", timeout=10_000)
    assert cohort_panel.table.text(0, 3) == "✓"
    _click(qtbot, features.cohort_button)
    assert _wait(qtbot, features.task_bar) == "done"
    assert [r.status for r in features.last_results] == ["skipped"]
    assert "already cached" in features.task_bar.status.text()

    viewer.screenshot(str(screenshots / "features-prototypes-viewer.png"), canvas_only=False)
    _grab(cohort_panel, screenshots / "panel-cohort.png")
    _grab(features, screenshots / "panel-features.png")
    _grab(protos, screenshots / "panel-prototypes.png")


# -- click a region, get a ranked list, open a neighbour ----------------------------------------------------


def test_click_a_region_lists_similar_slides_and_opens_a_neighbour(make_napari_viewer, qtbot, cohort, screenshots):
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    from napari_slpd.widgets.similar import MODE_REGIONS, MODE_SLIDES

    viewer, panels = _viewer(make_napari_viewer, "cohort", "prototypes", "similar")
    cohort_panel, similar = panels["cohort"], panels["similar"]
    state = cohort_panel.state
    state.update_settings(features=cohort.settings.features, prototypes=cohort.settings.prototypes)
    cohort_panel.open_cohort(cohort.root)
    opened = _open(qtbot, panels, "cmu_small_region")
    protos = opened.extras["prototypes"]
    region = int(np.argmax(protos.similarity))
    x0, y0 = opened.regions.coords[region]
    world = opened.geometry.level0_to_world(x0 + opened.regions.size / 3, y0 + opened.regions.size / 3)

    # napari updates the pressed event in place as the mouse moves and is released; so does this test.
    # A drag (pan) must not query.
    press = FakeMouseEvent("mouse_press", world)
    mouse_press_callbacks(viewer, press)
    press.type = "mouse_move"
    mouse_move_callbacks(viewer, FakeMouseEvent("mouse_move", world, is_dragging=True))
    press.type = "mouse_release"
    mouse_release_callbacks(viewer, FakeMouseEvent("mouse_release", world))
    assert similar.task_bar.task is None

    # A click on a region queries the cohort with it: the slides, ranked by prototype set distance.
    press = FakeMouseEvent("mouse_press", world)
    mouse_press_callbacks(viewer, press)
    press.type = "mouse_release"
    mouse_release_callbacks(viewer, FakeMouseEvent("mouse_release", world))
    assert _wait(qtbot, similar.task_bar) == "done"
    query = similar.query
    assert query.region == region and query.prototype == int(protos.assignments[region])
    results = similar.results()
    assert len(results) == len(cohort.slide_ids()) - 1
    assert [r.distance for r in results] == sorted(r.distance for r in results)
    assert results[0].slide_id == "dicom-cmu-1-small-region-ybrfix"  # the same tissue, read through DICOM
    assert similar.table.rowCount() == len(results)
    assert similar.table.text(0, 1) == results[0].slide_id
    # thumbnails fill in after the rows are listed (read in the background)
    qtbot.waitUntil(lambda: similar.table.model().cell(0, 0).icon is not None, timeout=30_000)
    # The title says what was ranked: the clicked region's pattern (its prototype), not the whole slide.
    assert f"best match to '{query.names[query.prototype]}'" in similar.title.text()
    assert f"region {region}" in similar.title.text()
    query_colors = {k: state.prototype_color(k) for k in range(protos.k)}
    assert state.selection.regions == (region,) and state.layer("selection") is not None
    _grab(similar, screenshots / "panel-similar-slides.png")

    # Double-click the best match: it opens with its prototypes coloured like the matched query prototypes,
    # and the regions of the prototype matched to the clicked region's are outlined.
    similar.table.cellDoubleClicked.emit(0, 1)
    qtbot.waitUntil(lambda: state.current_slide_id == results[0].slide_id, timeout=10_000)
    neighbour = state.current
    assert state.layer("image").name == results[0].slide_id
    assert [l.name for l in viewer.layers if "cmu_small_region" in l.name and "dicom" not in l.name] == []
    partner = dict(results[0].pairs)[query.prototype]
    n_protos = neighbour.extras["prototypes"]
    expected = np.flatnonzero(n_protos.assignments == partner)
    assert neighbour.extras["matched_regions"] == expected.tolist()
    assert len(state.layer("matches").data) == len(expected)
    layer = state.layer("prototypes")
    for i in expected[:3]:  # matched regions carry the colour of the query prototype they match
        assert np.allclose(layer.colormap.map(np.array([i + 1]))[0][:3], query_colors[query.prototype][:3],
                           atol=1e-3)
    viewer.screenshot(str(screenshots / "similar-neighbour-viewer.png"), canvas_only=False)

    # Back, then region mode through the widget's world-coordinate method: nearest regions across the cohort.
    _click(qtbot, similar.back_button)
    assert state.current_slide_id == "cmu_small_region"
    similar.mode.setCurrentText(MODE_REGIONS)
    similar.query_at(world)
    assert _wait(qtbot, similar.task_bar) == "done"
    hits = similar.results()
    assert hits and all(h.slide_id != "cmu_small_region" for h in hits)
    assert hits[0].slide_id == "dicom-cmu-1-small-region-ybrfix"
    assert similar.table.model().headers[2] == "Region"
    similar.open_result(0)
    assert state.current_slide_id == hits[0].slide_id
    assert [int(r) for r in state.layer("matches").features["region"]] == [hits[0].region]
    # A click outside every region does nothing.
    similar.mode.setCurrentText(MODE_SLIDES)
    assert similar.query_at(state.current.geometry.level0_to_world(-500, -500)) is None


# -- the embedding map ---------------------------------------------------------------------------------------


def test_embedding_map_selects_regions_and_regions_select_points(make_napari_viewer, qtbot, cohort, screenshots):
    viewer, panels = _viewer(make_napari_viewer, "cohort", "prototypes", "embedding")
    cohort_panel, emb, protos = panels["cohort"], panels["embedding"], panels["prototypes"]
    state = cohort_panel.state
    state.update_settings(features=cohort.settings.features, prototypes=cohort.settings.prototypes)
    cohort_panel.open_cohort(cohort.root)
    opened = _open(qtbot, panels, "cmu_small_region")
    M = len(opened.regions)

    _click(qtbot, emb.compute_button)
    assert _wait(qtbot, emb.task_bar) == "done"
    emap = emb.map
    assert emap.method == "umap" and len(emap) == M
    assert (Path(cohort.root) / "embedding" / "cmu_small_region_umap.npz").exists()
    # Points are coloured by prototype.
    colors = emb.point_colors()
    assignments = opened.extras["prototypes"].assignments
    for row in range(M):
        assert np.allclose(colors[row][:3], state.prototype_color(assignments[emap.region_index[row]])[:3])

    # Select the points in a rectangle over the left half of the map: exactly their regions are selected.
    xs = emap.xy[:, 0]
    cut = float(np.median(xs))
    emb.select_in_rectangle(xs.min() - 1, emap.xy[:, 1].min() - 1, cut, emap.xy[:, 1].max() + 1)
    chosen = np.flatnonzero(xs <= cut)
    assert state.selection.source == "map"
    assert state.selection.regions == tuple(sorted(emap.region_index[chosen].tolist()))
    assert len(state.layer("selection").data) == len(chosen)
    # A lasso around everything selects every region.
    lo, hi = emap.xy.min(axis=0) - 1, emap.xy.max(axis=0) + 1
    emb._on_lasso([(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1])])
    assert state.selection.regions == tuple(range(M))
    _grab(emb, screenshots / "panel-embedding-map.png")

    # Selecting a prototype in the legend highlights its points on the map.
    protos.legend.selectRow(1)
    expected = np.flatnonzero(assignments[emap.region_index] == 1)
    assert sorted(emb.highlighted.tolist()) == expected.tolist()

    # The map is cached: computing again loads it.
    _click(qtbot, emb.compute_button)
    assert _wait(qtbot, emb.task_bar) == "done"
    assert "from the cache" in emb.info.text()
    viewer.screenshot(str(screenshots / "embedding-viewer.png"), canvas_only=False)


# -- cancelling ---------------------------------------------------------------------------------------------


def test_cancel_extraction_leaves_nothing_half_written(make_napari_viewer, qtbot, tmp_path):
    from napari_slpd.features.store import FeatureStore, partial_path_for
    from napari_slpd.errors import FeatureStoreError
    from napari_slpd.samples.synthetic import write_synthetic_slide

    for seed in (3, 4):
        write_synthetic_slide(tmp_path / f"synthetic-{seed}.svs", width=2048, height=1536, seed=seed)
    viewer, panels = _viewer(make_napari_viewer, "cohort", "features")
    cohort_panel, features = panels["cohort"], panels["features"]
    cohort_panel.state.update_settings(features=tiny_settings(target_mpp=0.5).features)
    features.load_settings(cohort_panel.state.settings.features)
    cohort_panel.open_cohort(tmp_path)
    assert len(cohort_panel.slide_ids()) == 2

    _click(qtbot, features.cohort_button)
    bar = features.task_bar
    # Cancel once the first slide is well under way (past its first chunk of 16 regions).
    qtbot.waitUntil(lambda: bar.progress_bar.maximum() == 2000 and bar.progress_bar.value() >= 600, timeout=WAIT_MS)
    _click(qtbot, bar.cancel_button)
    assert _wait(qtbot, bar) == "cancelled"
    assert "Cancelled" in bar.status.text()

    session = cohort_panel.state.session
    statuses = {s.slide_id: s for s in session.statuses()}
    finished = [s for s in statuses.values() if s.features_done]
    unfinished = [s for s in statuses.values() if not s.features_done]
    assert unfinished, "the cancel came too late to test anything"
    for st in unfinished:
        final = session.cohort.features_path(st.slide_id)
        assert not final.exists(), f"{final} carries a final name but is unfinished"
        with pytest.raises(FeatureStoreError, match="did not finish|does not exist"):
            FeatureStore.open(final)
        assert st.features in ("partial", "missing")
    for st in finished:
        with FeatureStore.open(session.cohort.features_path(st.slide_id)) as store:
            assert store.n_regions == st.n_regions
    # Only final files and the resumable partial file: no stray temporaries.
    allowed = {session.cohort.features_path(s).name for s in statuses}
    allowed |= {partial_path_for(session.cohort.features_path(s)).name for s in statuses}
    assert {p.name for p in (session.root / "features").iterdir()} <= allowed

    # Running again finishes the job, resuming the interrupted slide after its finished chunks.
    first = unfinished[0].slide_id
    done_before = 0
    partial = partial_path_for(session.cohort.features_path(first))
    if partial.exists():
        import h5py

        with h5py.File(partial, "r") as fh:
            done_before = int(fh.attrs["n_regions_done"])
    _click(qtbot, features.cohort_button)
    assert _wait(qtbot, bar) == "done"
    assert all(s.features_done for s in session.statuses())
    interrupted = [r for r in features.last_results if r.slide_id == first][0]
    assert interrupted.status == "extracted" and interrupted.resumed_from == done_before
    assert not any(p.name.endswith(".partial") for p in (session.root / "features").iterdir())


# -- slides without a pixel size, and errors --------------------------------------------------------------


def test_slide_without_pixel_size_is_shown_in_pixels_with_a_warning(make_napari_viewer, qtbot, tmp_path):
    from conftest import real_slide

    viewer, panels = _viewer(make_napari_viewer, "cohort", "features")
    cohort_panel, features = panels["cohort"], panels["features"]
    cohort_panel.state.update_settings(features=tiny_settings().features)
    features.load_settings(cohort_panel.state.settings.features)
    cohort_panel.open_cohort(tmp_path, slides=[real_slide("tcga_jp2k_svs")])
    opened = cohort_panel.open_slide("tcga-cr-7395-01a-01-ts1")
    _wait(qtbot, cohort_panel.task_bar)
    assert any("pixel size unknown" in m for m in _last_notifications())
    image, tissue = cohort_panel.state.layer("image"), cohort_panel.state.layer("tissue")
    assert tuple(image.scale) == (1.0, 1.0) and opened.geometry.unit == "px"
    # The tissue mask is placed in the same pixel frame: a mask pixel spans `downsample` level-0 px.
    sy, sx = tissue.scale
    assert tissue.translate[1] == pytest.approx(sx / 2 - 0.5)
    assert sx == pytest.approx(image.data[0].shape[1] / tissue.data.shape[1], rel=1e-6)

    # Features need a pixel size: the failure is a notification naming the fix, and the panel stays usable.
    _click(qtbot, features.current_button)
    assert _wait(qtbot, features.task_bar) == "done"
    assert [r.status for r in features.last_results] == ["error"]
    # ... and the panel itself says why, in GUI words that name the control to use (not CLI flags).
    assert features.task_bar.end_state == "failed" and features.task_bar.progress_bar.format() == "failed"
    reason = features.task_bar.status.text()
    assert "pixel size" in reason and "'Set pixel size'" in reason and "--mpp" not in reason
    assert any("'Set pixel size'" in m for m in _last_notifications())
    assert cohort_panel.cell_text("tcga-cr-7395-01a-01-ts1", 2) == "unknown"
    # With a pixel size set by the user, the slide is shown in micrometres and gets regions.
    cohort_panel.table.selectRow(0)
    cohort_panel.mpp_spin.setValue(0.25)  # (a 40x scan: few regions at 1 um/px keep this test fast)
    cohort_panel._set_mpp_of_selected()
    _click(qtbot, features.current_button)
    assert _wait(qtbot, features.task_bar) == "done"
    assert [r.status for r in features.last_results] == ["extracted"]
    cohort_panel.open_slide("tcga-cr-7395-01a-01-ts1", detect_tissue=False)
    assert tuple(cohort_panel.state.layer("image").scale) == (0.25, 0.25)
    assert cohort_panel.state.current.regions is not None


def test_removed_layers_free_their_gl_objects_in_the_canvas_context(make_napari_viewer, qtbot):
    """napari deletes a removed layer's GL objects at once, in whatever GL context is current: after a panel
    repainted itself that was Qt's compositing context, and llvmpipe crashed at the next draw (the slide
    redrawn by 'Set pixel size', above). With SLPD panels docked, every removal runs in the canvas's context."""
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext
    from qtpy.QtOpenGLWidgets import QOpenGLWidget

    viewer, panels = _viewer(make_napari_viewer, "cohort")
    layer = viewer.add_image(np.zeros((64, 64), np.uint8))
    qtbot.wait(50)  # drawn: the layer's texture exists
    canvas = panels["cohort"].window().centralWidget().findChildren(QOpenGLWidget)[0]
    if not canvas.isValid():
        pytest.skip("the canvas has no GL context (viewer not shown)")
    surface, other = QOffscreenSurface(), QOpenGLContext()
    surface.create()
    assert other.create() and other.makeCurrent(surface)  # as Qt's compositor leaves it after a repaint
    assert QOpenGLContext.currentContext() == other
    viewer.layers.remove(layer)
    assert QOpenGLContext.currentContext() == canvas.context()
    other.deleteLater()
    qtbot.wait(50)  # and the canvas still draws


def test_errors_become_notifications_not_crashes(make_napari_viewer, qtbot, tmp_path):
    viewer, panels = _viewer(make_napari_viewer, "cohort", "features", "prototypes", "similar", "embedding")
    _click(qtbot, panels["features"].current_button)
    assert "Features: no cohort is open; choose a cohort folder in the Cohort panel first" in _last_notifications()
    _click(qtbot, panels["prototypes"].compute_button)
    assert any("no cohort is open" in m for m in _last_notifications(1))
    _click(qtbot, panels["similar"].whole_button)
    assert any("no slide is open" in m for m in _last_notifications(1))
    a_file = tmp_path / "not-a-folder.txt"
    a_file.write_text("x")
    panels["cohort"].folder_edit.setText(str(a_file))
    _click(qtbot, panels["cohort"].open_button)
    assert any("is a file, not a folder" in m for m in _last_notifications(1))
    # A bad value in the features form is refused with the grid's own message.
    features = panels["features"]
    features.region_px.setValue(250)
    panels["cohort"].open_cohort(tmp_path / "cohort")
    _click(qtbot, features.cohort_button)
    assert any("whole multiple" in m for m in _last_notifications(1))
    assert features.task_bar.task is None


def test_panels_open_from_the_plugins_menu_and_share_one_state(make_napari_viewer, qtbot, cohort):
    """The napari.yaml contributions build the panels, and all of a viewer's panels share one state."""
    viewer = make_napari_viewer(show=SHOW)
    widgets = []
    for name in ("Cohort", "Features", "Prototypes", "Similar slides", "Embedding map"):
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-slpd", name)
        widgets.append(widget)
    _OPEN_PANELS.extend(widgets)
    states = {id(w.state) for w in widgets}
    assert len(states) == 1
    # Opening a cohort in one panel reaches the others.
    cohort_panel, features = widgets[0], widgets[1]
    cohort_panel.state.update_settings(features=cohort.settings.features, prototypes=cohort.settings.prototypes)
    features.load_settings(cohort.settings.features)
    cohort_panel.open_cohort(cohort.root)
    assert widgets[3].state.session is cohort_panel.state.session
    _open(qtbot, {"cohort": cohort_panel, "prototypes": widgets[2]}, "CropBreastSlide")
    assert widgets[2].legend.rowCount() == widgets[2].state.current.extras["prototypes"].k
    assert tuple(cohort_panel.state.layer("image").scale) == (0.5, 0.5)  # the user's pixel size, not 264.58
