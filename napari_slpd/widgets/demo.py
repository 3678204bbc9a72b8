"""The GUI side of ``slpd demo``: dock every SLPD panel, drive them on the processed demo cohort (open the
slide, similar slides, embedding map, prototype names, fine-tune form), run the short fine-tune, take the
screenshots. The cohort itself is built Qt-free by :mod:`napari_slpd.session.demo_cohort`.

napari has no public handle on its main window: ``viewer.window._qt_window`` (the QMainWindow) is used to
size the window and its docks for the screenshots, ``viewer.window._qt_viewer`` to fold the layer
controls away.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from napari_slpd.errors import SlpdError
from napari_slpd.session.demo_cohort import name_prototypes_from_design

WINDOW_SIZE = (1800, 1150)
# The demo's fine-tune run: the tiny preset, short enough for a CPU (about half a minute on one thread).
FINETUNE_EPOCHS = 2
FINETUNE_BATCH = 32
FINETUNE_THREADS = 1


def wait_until(predicate: Callable[[], bool], timeout_s: float = 300.0, what: str = "the viewer") -> None:
    """Process Qt events until ``predicate()`` holds (the GUI stays live meanwhile)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout_s:
            raise SlpdError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def dock_panels(viewer) -> dict:
    """Dock every SLPD panel: Cohort, Prototypes and Similar slides on the right; Features, Embedding map,
    Prototype labeling, SLPD fine-tune and Evaluation as tabs on the left (the slide keeps the middle)."""
    from napari_slpd.widgets.cohort import CohortWidget
    from napari_slpd.widgets.embedding import EmbeddingMapWidget
    from napari_slpd.widgets.evaluation import EvaluationWidget
    from napari_slpd.widgets.features import FeaturesWidget
    from napari_slpd.widgets.finetune import FineTuneWidget
    from napari_slpd.widgets.labeling import LabelingWidget
    from napari_slpd.widgets.prototypes import PrototypesWidget
    from napari_slpd.widgets.similar import SimilarSlidesWidget

    panels = {}
    layout = (
        ("Cohort", CohortWidget, "right", False),
        ("Prototypes", PrototypesWidget, "right", False),
        ("Similar slides", SimilarSlidesWidget, "right", False),
        ("Features", FeaturesWidget, "left", False),
        ("Embedding map", EmbeddingMapWidget, "left", True),
        ("Prototype labeling", LabelingWidget, "left", True),
        ("SLPD fine-tune", FineTuneWidget, "left", True),
        ("Evaluation", EvaluationWidget, "left", True),
    )
    for name, cls, area, tabify in layout:
        widget = cls(viewer)
        widget.slpd_dock = viewer.window.add_dock_widget(widget, name=name, area=area, tabify=tabify)
        panels[name] = widget
    return panels


def show_demo(viewer, session, slide_id: str, panels: dict | None = None, timeout_s: float = 300.0,
              say: Callable[[str], None] = print, device: str = "auto", labels: Path | None = None,
              evaluation=None) -> dict:
    """Drive the panels: open the cohort and ``slide_id``, list similar slides, draw the embedding map, name
    the prototypes of a synthetic slide after its painted tissue, set the fine-tune panel up (with the
    sample labels for its KNN monitor) and show the evaluation of the cohort (``evaluation``, an
    EvaluationResult computed by the demo, or run in the panel when only ``labels`` is given)."""
    panels = panels or dock_panels(viewer)
    cohort, protos = panels["Cohort"], panels["Prototypes"]
    similar, embedding = panels["Similar slides"], panels["Embedding map"]
    state = cohort.state
    state.update_settings(features=session.settings.features, prototypes=session.settings.prototypes)
    state.set_session(session)
    cohort.open_slide(slide_id)
    wait_until(lambda: cohort.task_bar.task is not None and not cohort.task_bar.busy, timeout_s, "the tissue outline")
    wait_until(lambda: state.layer("prototypes") is not None and not protos.task_bar.busy, timeout_s, "the prototypes")
    similar.query_whole_slide()
    wait_until(lambda: not similar.task_bar.busy, timeout_s, "the similar slides")
    # The features are cached: asking for them again is instant and shows that they load from the cache.
    features = panels["Features"]
    features.load_settings(session.settings.features)
    features.compute("cohort")
    wait_until(lambda: not features.task_bar.busy, timeout_s, "the cached features")
    embedding.compute()
    wait_until(lambda: not embedding.task_bar.busy, timeout_s, "the embedding map")
    if embedding.map is not None and len(embedding.rows):
        # Show the linking: select the points of the largest prototype; their regions light up on the slide.
        opened = state.current
        assignments = opened.extras["prototypes"].assignments
        largest = int(max(range(opened.extras["prototypes"].k), key=lambda k: int((assignments == k).sum())))
        regions = [int(i) for i in range(len(assignments)) if assignments[i] == largest]
        embedding.select_rows(embedding.map.rows_of(opened.slide_id, regions))
    labeling = panels.get("Prototype labeling")
    if labeling is not None and labeling.annotations is not None:
        names = name_prototypes_from_design(session, slide_id, labeling.annotations)
        if names:
            say(f"  prototypes of {slide_id} named after the tissue it was painted with: "
                + ", ".join(names.values()))
        labeling.refresh()
    if "SLPD fine-tune" in panels:
        setup_finetune(panels["SLPD fine-tune"], device, labels)
    if "Evaluation" in panels and labels is not None:
        show_evaluation(panels["Evaluation"], labels, evaluation, timeout_s)
    arrange_docks(viewer, panels)
    viewer.reset_view()
    return panels


def show_evaluation(panel, labels: Path, evaluation=None, timeout_s: float = 300.0) -> None:
    """Fill the Evaluation panel with the demo's labels and settings and show ``evaluation`` (or run it)."""
    from napari_slpd.session.demo_cohort import demo_evaluation_config

    config = demo_evaluation_config(labels)
    panel.labels_edit.setText(str(labels))
    panel.load_tasks()
    panel.task_combo.setCurrentText(config.tasks[0])
    panel.folds_spin.setValue(config.n_folds)
    for name, box in panel.protocol_boxes.items():
        box.setChecked(name in config.protocols)
    panel.refresh_representations()
    if evaluation is not None:
        panel.show_result(evaluation)
        bar = panel.task_bar  # the demo ran it before the window opened: the bar says so, full
        bar.progress_bar.setRange(0, 1)
        bar.progress_bar.setValue(1)
        bar.progress_bar.setFormat("done")
        bar.status.setText("evaluated by slpd demo; the report is in the cohort's evaluation folder")
    else:
        panel.run_evaluation()
        wait_until(lambda: not panel.task_bar.busy, timeout_s, "the evaluation")


def setup_finetune(panel, device: str = "auto", labels: Path | None = None) -> None:
    """Fill the fine-tune form for the demo's short run: the tiny preset with bigger batches, one thread,
    and the sample labels for the KNN monitor."""
    if labels is not None:
        panel.labels_edit.setText(str(labels))
        panel._load_tasks(quiet=True)
        panel.task_combo.setCurrentText("class")
    panel.preset_combo.setCurrentText("tiny")
    panel.epochs_spin.setValue(0)  # the preset's
    panel.batch_spin.setValue(FINETUNE_BATCH)
    panel.device_combo.setCurrentText(device)
    panel.threads_spin.setValue(FINETUNE_THREADS)


def run_finetune(panel, timeout_s: float = 600.0, say: Callable[[str], None] = print) -> str:
    """Train the demo's tiny run from the panel (as its Start button does) and follow it to the end; a
    finished run found in the cohort (an earlier demo) is shown again instead. Returns the run's state."""
    run = panel.run
    if run is not None and run.state == "done":
        say(f"  fine-tune: showing the finished run in {run.run_dir}")
        return run.state
    t0 = time.perf_counter()
    run = panel.start()
    say(f"  fine-tune: tiny SLPD run in {run.run_dir}")
    try:
        wait_until(lambda: not run.is_running, timeout_s, "the fine-tune run")
    except SlpdError:
        run.stop(timeout=60)
        raise
    panel.poll()
    if run.state != "done":
        say(f"  fine-tune ended {run.state}: {run.log_tail(5)}")
    else:
        say(f"  fine-tune: {run.progress.summary()} ({time.perf_counter() - t0:.0f} s)")
    return run.state


def arrange_docks(viewer, panels: dict) -> None:
    """Give the list panels room (Cohort and Similar slides taller than Prototypes); show the embedding map
    of the left tabs."""
    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    embedding_dock = getattr(panels.get("Embedding map"), "slpd_dock", None)
    if embedding_dock is not None:
        embedding_dock.raise_()
    docks = [getattr(panels[name], "slpd_dock", None) for name in ("Cohort", "Prototypes", "Similar slides")]
    docks = [d for d in docks if d is not None]
    if len(docks) == 3:
        height = window.height()
        window.resizeDocks(docks, [int(height * 0.34), int(height * 0.28), int(height * 0.38)],
                           Qt.Orientation.Vertical)


def save_screenshots(viewer, panels: dict, folder: Path) -> list[Path]:
    """The whole window and each panel as PNG files in ``folder``."""
    from qtpy.QtWidgets import QApplication

    folder.mkdir(parents=True, exist_ok=True)
    QApplication.instance().processEvents()
    paths = [folder / "viewer.png"]
    viewer.screenshot(str(paths[0]), canvas_only=False)
    for name, widget in panels.items():
        path = folder / f"panel-{name.lower().replace(' ', '-')}.png"
        dock = getattr(widget, "slpd_dock", None)
        # Show tabbed-away panels before grabbing them (a hidden widget grabs as an empty image).
        if dock is not None:
            dock.raise_()
        QApplication.instance().processEvents()
        widget.grab().save(str(path))
        paths.append(path)
    return paths


def _close_notifications(viewer) -> None:
    """Close napari's notification toasts (one would cover the slide in a screenshot)."""
    try:
        # Private napari import: napari has no public API to find or close the toast widgets it shows
        # (napari.utils.notifications manages the messages, not their Qt widgets). Widgets only.
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # napari moved it: a toast in the picture is no error
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def _window_with_panel(viewer, panels: dict, name: str, path: Path, width: int = 760) -> Path:
    """The window with panel ``name`` raised in its tab, given the left column (``width`` px wide, the
    layer controls folded away for the screenshot)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    dock = panels[name].slpd_dock
    window = viewer.window._qt_window
    controls = getattr(getattr(viewer.window, "_qt_viewer", None), "dockLayerControls", None)
    before = dock.width()
    dock.raise_()
    if controls is not None:
        controls.hide()
    window.resizeDocks([dock], [width], Qt.Orientation.Horizontal)
    layer_list = getattr(viewer.window._qt_viewer, "dockLayerList", None)
    if layer_list is not None:
        window.resizeDocks([layer_list, dock], [150, window.height()], Qt.Orientation.Vertical)
    _close_notifications(viewer)
    QApplication.instance().processEvents()
    viewer.reset_view()
    viewer.screenshot(str(path), canvas_only=False)
    if controls is not None:
        controls.show()
    window.resizeDocks([dock], [before], Qt.Orientation.Horizontal)
    return path


def save_in_use_screenshots(viewer, panels: dict, folder: Path, timeout_s: float = 120.0) -> list[Path]:
    """The window with the labeling panel in use (the largest prototype's name previewed on the similar
    slides) as ``labeling.png``, with the fine-tune panel as ``finetune.png`` and with the evaluation
    results as ``evaluation-demo.png``; the embedding map's
    selection is cleared and its tab shown again afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    # The map's selection outlines would hide which prototype each region has.
    panels["Cohort"].state.clear_selection()
    labeling = panels.get("Prototype labeling")
    if labeling is not None and labeling.rows:
        largest = max(labeling.rows, key=lambda r: r.regions)
        labeling.proto_combo.setCurrentIndex(labeling.rows.index(largest))
        labeling.neighbours_spin.setValue(3)
        labeling.preview_propagation()
        wait_until(lambda: not labeling.task_bar.busy, timeout_s, "the propagation preview")
        paths.append(_window_with_panel(viewer, panels, "Prototype labeling", folder / "labeling.png"))
    if "SLPD fine-tune" in panels:
        paths.append(_window_with_panel(viewer, panels, "SLPD fine-tune", folder / "finetune.png"))
    evaluation = panels.get("Evaluation")
    if evaluation is not None and evaluation.result is not None:
        paths.append(_window_with_panel(viewer, panels, "Evaluation", folder / "evaluation-demo.png", width=900))
    arrange_docks(viewer, panels)
    return paths


def save_neighbour_screenshot(viewer, panels: dict, folder: Path) -> Path | None:
    """Open the most similar slide (as a double-click on the list does) and take the window."""
    similar = panels["Similar slides"]
    if not similar.results():
        return None
    similar.table.cellDoubleClicked.emit(0, 1)
    viewer.reset_view()
    path = folder / "viewer-neighbour.png"
    viewer.screenshot(str(path), canvas_only=False)
    return path


def save_small_copies(paths: list[Path], folder: Path, max_width: int = 1200) -> list[Path]:
    """Copies for the documentation: at most ``max_width`` px wide, 256-colour PNG (about 150 KB)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        small = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
        target = folder / path.name
        small.save(target, optimize=True)
        out.append(target)
    return out


def open_demo_viewer(session, slide_id: str, say: Callable[[str], None] = print, device: str = "auto",
                     labels: Path | None = None, evaluation=None):
    """A napari window with every panel docked and driven on ``slide_id``; returns (viewer, panels)."""
    import napari

    from napari_slpd.viewer.gl_compat import preload_triton

    preload_triton()
    viewer = napari.Viewer(title="napari-slpd demo", show=True)
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    panels = dock_panels(viewer)
    show_demo(viewer, session, slide_id, panels, say=say, device=device, labels=labels, evaluation=evaluation)
    return viewer, panels


def write_demo_screenshots(viewer, panels: dict, folder: Path, finetune: bool = True,
                           docs_folder: Path | None = None, say: Callable[[str], None] = print) -> list[Path]:
    """Run the short fine-tune (unless ``finetune`` is False), then write the window, each panel, the
    panels in use and the neighbour view to ``folder`` (small copies to ``docs_folder`` when given)."""
    if finetune:
        run_finetune(panels["SLPD fine-tune"], say=say)
    paths = save_screenshots(viewer, panels, folder)
    paths += save_in_use_screenshots(viewer, panels, folder)
    neighbour = save_neighbour_screenshot(viewer, panels, folder)
    if neighbour is not None:
        paths.append(neighbour)
    for path in paths:
        say(f"  screenshot: {path}")
    if docs_folder is not None:
        for path in save_small_copies(paths, Path(docs_folder)):
            say(f"  small copy: {path} ({path.stat().st_size // 1024} KB)")
    return paths
