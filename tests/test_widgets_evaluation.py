"""The Evaluation panel in a real napari viewer (under Xvfb): on a labelled sample cohort it lists the
representations (every region-embedding version among them), runs KNN, linear probe, Cox and retrieval in
a worker, fills the results table with the engine's figures, draws ROC and Kaplan-Meier curves for the
selected row, lists retrieval examples whose click opens the slide, writes the report folder, and leaves a
screenshot (test-artifacts/evaluation.png; docs/screenshots/evaluation.png when missing or asked for with
SLPD_DOCS_SCREENSHOTS=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshots" / "evaluation.png"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort

    return write_embedding_cohort(tmp_path_factory.mktemp("evaluation") / "cohort",
                                  SyntheticCohortSpec(n_slides=30, n_classes=3, regions=(10, 16), k=3, seed=2))


def test_evaluation_panel_runs_and_shows_results(make_napari_viewer, qtbot, sample, tmp_path, artifacts_dir):
    from napari_slpd.evaluation import EvaluationConfig, evaluate
    from napari_slpd.session import FeatureSettings, PrototypeSettings, Session, SessionSettings
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.evaluation import EvaluationWidget
    from napari_slpd.widgets.state import SlpdState

    cohort, labels = sample
    viewer = make_napari_viewer(show=True)
    state = SlpdState.for_viewer(viewer)
    state.set_session(Session(cohort.root, SessionSettings(
        features=FeatureSettings(region_encoder="synthetic", device="cpu"), prototypes=PrototypeSettings(k=3))))
    panel = EvaluationWidget(viewer)
    dock = viewer.window.add_dock_widget(panel, name="Evaluation", area="right")
    names = panel.refresh_representations()
    assert "region_mean" in names and "prototype_set" in names and "panther" in names
    assert set(panel.selected_representations()) == {"region_mean", "prototype_set"}
    panel.labels_edit.setText(str(labels))
    assert panel.load_tasks() == ["class", "survival"]
    panel.task_combo.setCurrentText("(all tasks)")
    panel.folds_spin.setValue(5)
    assert panel.selected_protocols() == ["knn", "linear", "cox", "retrieval"]

    panel.run_button.click()
    assert wait_for(panel.task_bar, qtbot, 180_000) == "done", panel.task_bar.status.text()
    result = panel.result
    cells = panel.result_cells()
    combos = {(c[0], c[1], c[2]) for c in cells}
    assert ("class", "region_mean", "knn") in combos and ("class", "prototype_set", "retrieval") in combos
    assert ("survival", "region_mean", "cox") in combos and ("class", "region_mean", "linear") in combos
    # The table shows the engine's figures, which equal a direct run of the engine with the same settings.
    direct = evaluate(cohort, labels, EvaluationConfig(tasks=["class"], representations=["region_mean"],
                                                       protocols=["knn"], n_folds=5))
    row = next(c for c in cells if c[:3] == ["class", "region_mean", "knn"])
    auc = direct.result("class", "region_mean", "knn").summary["auc"]
    assert row[3] == "auc" and row[4] == f"{auc['mean']:.3f} ± {auc['std']:.3f}"
    assert auc["mean"] > 0.8  # the sample cohort's classes follow tissue composition

    def select(task, rep, protocol):
        i = next(i for i, c in enumerate(cells) if c[:3] == [task, rep, protocol])
        panel.table.selectRow(i)
        return panel.plot.kind

    assert select("survival", "region_mean", "cox") == "km"
    assert select("class", "region_mean", "linear") == "roc"
    head = panel.examples.topLevelItem(0)
    assert head is not None and head.childCount() >= 3  # queries of every class
    opened = []
    panel.open_slide = opened.append  # the sample cohort's slides are placeholders without an image
    query = head.child(0)
    panel.examples.itemClicked.emit(query.child(0), 0)
    assert opened == [query.child(0).text(0)]

    out = tmp_path / "report"
    panel.save_report(str(out))
    assert wait_for(panel.task_bar, qtbot, 120_000) == "done", panel.task_bar.status.text()
    assert (out / "results.json").exists() and (out / "report.html").exists()
    assert result is panel.result

    select("class", "region_mean", "knn")
    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    window.resize(1700, 1150)
    window.resizeDocks([dock], [820], Qt.Orientation.Horizontal)
    qtbot.wait(300)
    panel.table.resizeColumnsToContents()
    assert window.grab().toImage().save(str(artifacts_dir / "evaluation_window.png"))
    image = panel.scroll_area.widget().grab().toImage()  # the whole panel, also what is scrolled away
    assert image.save(str(artifacts_dir / "evaluation.png"))
    if os.environ.get("SLPD_DOCS_SCREENSHOTS") or not DOCS_SCREENSHOT.exists():
        assert image.scaledToWidth(min(image.width(), 760)).save(str(DOCS_SCREENSHOT))


def test_evaluation_panel_says_what_is_missing(make_napari_viewer, qtbot, sample):
    from napari_slpd.session import Session
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.evaluation import EvaluationWidget
    from napari_slpd.widgets.state import SlpdState

    cohort, labels = sample
    viewer = make_napari_viewer()
    state = SlpdState.for_viewer(viewer)
    state.set_session(Session(cohort.root))
    panel = EvaluationWidget(viewer)
    qtbot.addWidget(panel)
    assert not panel.save_button.isEnabled()
    panel.run_button.click()  # no labels file: a notification, nothing runs
    assert panel.task_bar.task is None
    panel.labels_edit.setText(str(labels))
    panel.load_tasks()
    # Default folds (auto) and a labels file listing slides of another cohort: they are skipped with a count.
    assert panel.folds_spin.text() == "auto" and panel.config().n_folds is None
    extra = Path(str(labels)).parent / "labels_with_other_slides.csv"
    extra.write_text(Path(str(labels)).read_text(encoding="utf-8"), encoding="utf-8")
    with open(labels, encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    with open(extra, "a", encoding="utf-8") as fh:
        for i in (1, 2):
            fh.write(",".join({"slide_id": f"other-cohort-{i}"}.get(h, "") for h in header) + "\n")
    panel.labels_edit.setText(str(extra))
    panel.load_tasks()
    panel.task_combo.setCurrentText("class")
    panel.set_representations(["region_mean"])
    for name, box in panel.protocol_boxes.items():
        box.setChecked(name == "knn")
    panel.run_button.click()
    assert wait_for(panel.task_bar, qtbot, 60_000) == "done", panel.task_bar.status.text()
    assert "2 labelled slide(s) not in this cohort, skipped" in panel.summary.text()
    panel.labels_edit.setText(str(labels))
    panel.load_tasks()
    for name, box in panel.protocol_boxes.items():
        box.setChecked(name in ("knn", "linear", "cox"))
    panel.set_representations(["proalign_mean"])  # never computed: the engine says which command computes it
    panel.protocol_boxes["retrieval"].setChecked(False)
    with qtbot.capture_exceptions():  # superqt re-raises the worker's error in the event loop too
        panel.run_button.click()
        assert wait_for(panel.task_bar, qtbot, 60_000) == "error"
    assert "proalign" in panel.task_bar.status.text().lower()


def test_evaluation_panel_scores_segmentation_and_shows_errors(make_napari_viewer, qtbot, sample, tmp_path):
    """An annotations folder alone: the panel shows Dice per method and adds a slide's error layer."""
    import json

    import numpy as np

    from napari_slpd.evaluation.segmentation.annotations import raster_to_shapes, shapes_to_geojson
    from napari_slpd.evaluation.segmentation.engine import paint
    from napari_slpd.prototypes.cache import load_prototypes
    from napari_slpd.session import Session
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.evaluation import EvaluationWidget
    from napari_slpd.widgets.state import SlpdState

    cohort, _ = sample
    folder = tmp_path / "annotations"
    folder.mkdir()
    for s in cohort.slide_ids()[:8]:  # each prototype's regions annotated with one of two classes
        p = load_prototypes(cohort, s, check_stale=False)
        cls = (np.arange(p.k) % 2)[p.assignments]
        shape = (int(p.coords[:, 1].max() + 256) // 8, int(p.coords[:, 0].max() + 256) // 8)
        raster = paint(p.coords, p.tile_size_level0, cls, shape, 8.0)
        (folder / f"{s}.geojson").write_text(json.dumps(shapes_to_geojson(raster_to_shapes(raster, ["a", "b"], 8.0))))
    viewer = make_napari_viewer()
    state = SlpdState.for_viewer(viewer)
    state.set_session(Session(cohort.root))
    panel = EvaluationWidget(viewer)
    qtbot.addWidget(panel)
    panel.annotations_edit.setText(str(folder))
    panel.run_button.click()
    assert wait_for(panel.task_bar, qtbot, 60_000) == "done", panel.task_bar.status.text()
    seg = panel.segmentation
    assert seg is not None and seg.methods == ["prototypes"]
    assert "prototypes @ region: mean Dice" in panel.seg_summary.text()
    assert panel.errors_button.isVisibleTo(panel) and panel.save_button.isEnabled()
    slide = next(iter(seg.truths))
    layer = panel.show_errors(slide)
    truth, pred = seg.truths[slide].raster, seg.predictions[slide]["prototypes"]
    assert layer.data.shape == truth.shape
    annotated = truth >= 0
    assert ((layer.data == 1) == (annotated & (pred == truth))).all()
    assert ((layer.data == 2) == (annotated & (pred >= 0) & (pred != truth))).all()
    out = tmp_path / "report"
    panel.save_report(str(out))
    assert wait_for(panel.task_bar, qtbot, 60_000) == "done", panel.task_bar.status.text()
    assert (out / "segmentation.json").exists()
