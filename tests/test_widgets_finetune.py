"""The SLPD fine-tune panel in a real napari viewer (under Xvfb): a tiny real src_training run started
from the panel, stopped with a checkpoint and resumed to the end while the loss plot and the log follow
it, then "Use checkpoint" re-encodes the cohort and the prototypes on the slide refresh; closing napari
while a run trains asks to stop it or leave it running; a screenshot of the panel in use."""

from __future__ import annotations

import json
import sys

import pytest

from test_annotations import TYPE_NAMES, build_labeled_cohort, type_of_prototypes
from test_widgets_labeling import _open, _screenshot

pytestmark = pytest.mark.gui


def test_tiny_finetune_from_the_panel(make_napari_viewer, qtbot, tmp_path, artifacts_dir):
    from napari_slpd.labeling import PrototypeAnnotations
    from napari_slpd.features.store import read_store_attrs
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.finetune import FineTuneWidget
    from napari_slpd.widgets.labeling import LabelingWidget
    from napari_slpd.widgets.state import ROLE_PROTOTYPES

    lab = build_labeled_cohort(tmp_path / "cohort", rows=2, cols=3)  # 6 regions a slide
    sid = lab.slide_ids[0]
    viewer = make_napari_viewer(show=True)
    state = _open(viewer, lab.cohort.root, sid)
    labeling = LabelingWidget(viewer)
    before = state.current.extras["prototypes"]
    for k, t in type_of_prototypes(lab, sid, before).items():
        labeling.rename(k, TYPE_NAMES[t])
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SLPD fine-tune", area="right")
    assert widget.run is None and not widget.use_button.isEnabled() and not widget.stop_button.isEnabled()
    widget.preset_combo.setCurrentText("tiny")
    widget.epochs_spin.setValue(3)
    widget.batch_spin.setValue(6)  # three steps an epoch on the 18 regions
    widget.warm_spin.setValue(0)  # prototype losses from the second epoch on
    widget.device_combo.setCurrentText("cpu")
    widget.threads_spin.setValue(1)  # the CI machine is small and shared

    widget.start_button.click()
    run = widget.run
    assert run is not None and run.is_running and not widget.start_button.isEnabled()
    assert str(run.run_dir).startswith(str(lab.cohort.root / "training"))
    qtbot.waitUntil(lambda: run.progress.global_step >= 1, timeout=150_000)
    qtbot.waitUntil(lambda: widget.plot.points("loss") >= 1, timeout=5_000)  # the plot follows the events
    widget.stop_button.click()
    qtbot.waitUntil(lambda: not run.is_running, timeout=150_000)
    widget.poll()
    assert run.state == "stopped", run.log_tail()
    assert run.checkpoint_path.exists() and widget.resume_button.isEnabled()
    assert "stopped" in widget.status.text()

    widget.resume_button.click()
    assert run.is_running
    qtbot.waitUntil(lambda: not run.is_running, timeout=180_000)
    widget.poll()
    assert run.state == "done", run.log_tail()
    assert widget.plot.points("loss") == 9 and widget.plot.points("intra_loss") == 9
    assert run.progress.curves["loss"][0] == list(range(9))  # the resumed run continued the curve
    assert run.progress.curves["intra_loss"][1][-1] > 0 and run.progress.curves["inter_loss"][1][-1] > 0
    log_text = widget.log_view.toPlainText()
    assert "stopped" in log_text and "resumed from" in log_text and "finished" in log_text
    assert widget.progress.value() == 1000 and widget.use_button.isEnabled()

    key_before = read_store_attrs(lab.cohort.features_path(sid))["settings_key"]
    updated = []
    state.prototypes_updated.connect(updated.append)
    widget.use_button.click()
    assert wait_for(widget.task_bar, qtbot, 120_000) == "done", widget.task_bar.status.text()
    key_after = read_store_attrs(lab.cohort.features_path(sid))["settings_key"]
    assert key_after != key_before and updated
    refreshed = state.current.extras["prototypes"]
    assert refreshed is not before and refreshed.features_settings_key == key_after
    assert state.settings.features.region_checkpoint == str(run.exported_checkpoint().resolve())
    layer = state.layer(ROLE_PROTOTYPES)
    assert list(layer.features["prototype"]) == list(refreshed.assignments)
    names = PrototypeAnnotations.load(lab.cohort, state.session).labels(sid)  # carried to the new prototypes
    truth = type_of_prototypes(lab, sid, refreshed)
    assert {k: label.name for k, label in names.items()} == {k: TYPE_NAMES[t] for k, t in truth.items()}
    assert [r.name for r in labeling.rows] == [TYPE_NAMES[truth[k]] for k in range(3)]
    assert "re-encoded" in widget.log_view.toPlainText()
    _screenshot(viewer, qtbot, artifacts_dir / "finetune_panel.png")


def _stub_runs(monkeypatch, tmp_path):
    """Launch the trainer stand-in of test_training_runner instead of src_training (fast, same protocol)."""
    import napari_slpd.training.run as tr
    from test_training_runner import GRACEFUL

    stub = tmp_path / "graceful.py"
    stub.write_text(GRACEFUL)
    real = tr.build_command
    monkeypatch.setattr(tr, "build_command", lambda settings, resume=False, python=None:
                        [sys.executable, str(stub)] + real(settings, resume=resume, python=python)[3:])


def test_closing_napari_while_training_asks_to_stop_or_leave(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from qtpy.QtGui import QCloseEvent
    from qtpy.QtWidgets import QApplication

    from napari_slpd.session import Session
    from napari_slpd.training.run import TrainingRun
    from napari_slpd.widgets.finetune import FineTuneWidget
    from napari_slpd.widgets.state import SlpdState

    _stub_runs(monkeypatch, tmp_path)
    viewer = make_napari_viewer()
    state = SlpdState.for_viewer(viewer)
    session = Session(tmp_path / "cohort")
    session.cohort.registry_path.write_text('{"slides": {}}')  # the stand-in trainer reads no slide
    state.set_session(session)
    widget = FineTuneWidget(viewer)
    qtbot.addWidget(widget)
    widget.epochs_spin.setValue(500)
    asked = []

    def answer(choice):
        def ask():
            asked.append(choice)
            return choice
        return ask

    # Cancel: the close event is swallowed, napari stays open, the run goes on.
    widget.start_button.click()
    run = widget.run
    qtbot.waitUntil(lambda: run.progress.global_step >= 1, timeout=30_000)
    monkeypatch.setattr(widget, "ask_on_close", answer("cancel"))
    event = QCloseEvent()
    QApplication.sendEvent(viewer.window._qt_window, event)
    assert asked == ["cancel"] and not event.isAccepted() and run.is_running

    # Stop: a clean stop with a checkpoint before napari goes away; nothing half-written is left.
    monkeypatch.setattr(widget, "ask_on_close", answer("stop"))
    assert widget.handle_close(QCloseEvent()) is False  # napari may close now
    assert not run.is_running and run.state == "stopped"
    assert run.checkpoint_path.exists() and not list(run.run_dir.glob(".*.partial"))

    # Leave running: detached, recorded, and a new panel (napari restarted) follows it again.
    widget.start_button.click()
    second = widget.run
    assert second.run_dir != run.run_dir  # Start means a new run folder
    qtbot.waitUntil(lambda: second.progress.global_step >= 1, timeout=30_000)
    monkeypatch.setattr(widget, "ask_on_close", answer("leave"))
    assert widget.handle_close(QCloseEvent()) is False
    pid = second.pid
    assert json.loads(second.run_file.read_text())["detached"]
    widget.run = None  # this panel is gone with napari
    assert TrainingRun.attach(second.run_dir).is_running
    panel = FineTuneWidget(viewer)  # a restarted napari opening the cohort
    qtbot.addWidget(panel)
    assert panel.run is not None and panel.run.pid == pid and panel.run.is_running
    assert panel.stop_button.isEnabled() and not panel.start_button.isEnabled()
    panel.stop_button.click()
    qtbot.waitUntil(lambda: not panel.run.is_running, timeout=30_000)
    assert panel.run.state == "stopped"
    assert asked == ["cancel", "stop", "leave"]
    # With nothing running, closing asks nothing.
    assert panel.handle_close(QCloseEvent()) is False and asked == ["cancel", "stop", "leave"]


def test_knn_monitor_before_after_table_and_switching_back(make_napari_viewer, qtbot, tmp_path, artifacts_dir):
    """A labelled cohort: the panel defaults to tiny for its small token grids (and says why), a real tiny run
    with the labels file plots the KNN AUC per epoch beside the loss curves (warm-up end marked), "Use
    checkpoint" shows the before/after table, and switching back restores the earlier region embeddings."""
    from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort
    from napari_slpd.features.store import load_region_embeddings
    from napari_slpd.session import FeatureSettings, PrototypeSettings, Session, SessionSettings
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.finetune import FineTuneWidget
    from napari_slpd.widgets.state import SlpdState

    cohort, labels = write_embedding_cohort(
        tmp_path / "cohort", SyntheticCohortSpec(n_slides=16, n_classes=2, regions=(6, 10), token_dim=8, grid=4,
                                                 embed_dim=16, k=2, seed=1, separation=2.0))
    viewer = make_napari_viewer()
    state = SlpdState.for_viewer(viewer)
    state.set_session(Session(cohort.root, SessionSettings(
        features=FeatureSettings(region_encoder="synthetic", device="cpu"), prototypes=PrototypeSettings(k=2))))
    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="SLPD fine-tune", area="right")
    assert widget.preset_combo.currentText() == "tiny"  # 4 x 4 grids cannot take the official 14 x 14 crops
    widget.preset_combo.setCurrentText("nsclc")
    assert "too small" in widget.preset_note.text()
    widget.preset_combo.setCurrentText("tiny")
    assert "quick check" in widget.preset_note.text()
    assert widget.encoder_combo.count() == 1 and not widget.switch_button.isEnabled()
    widget.labels_edit.setText(str(labels))
    assert widget._load_tasks() == ["class"]
    widget.epochs_spin.setValue(3)
    widget.batch_spin.setValue(32)
    widget.warm_spin.setValue(0)
    widget.device_combo.setCurrentText("cpu")
    widget.threads_spin.setValue(1)
    assert widget.settings().extra_args == ["--labels", str(labels), "--task", "class"]

    widget.start_button.click()
    run = widget.run
    qtbot.waitUntil(lambda: not run.is_running, timeout=240_000)
    widget.poll()
    assert run.state == "done", run.log_tail(30)
    assert [m["epoch"] for m in run.progress.monitor] == [-1, 0, 1, 2]
    assert widget.plot.monitor_points() == 4 and widget.plot.warmup_line.get_visible()
    assert run.progress.warmup_end_step == run.progress.steps_per_epoch
    assert "KNN AUC" in widget.log_view.toPlainText()

    path = cohort.features_path(cohort.slide_ids()[0])
    before = load_region_embeddings(path)
    widget.use_button.click()
    assert wait_for(widget.task_bar, qtbot, 120_000) == "done", widget.task_bar.status.text()
    qtbot.waitUntil(lambda: widget.comparison_table.comparison is not None or widget.task_bar.status.text().startswith(
        "Before / after evaluation:"), timeout=120_000)
    assert widget.comparison_table.comparison is not None, (widget.task_bar.status.text(), widget.comparison_label.text())
    assert not widget.comparison_table.isHidden()
    table = widget.comparison_table
    cells = [[table.cell_text(r, c) for c in range(table.columnCount())] for r in range(table.rowCount())]
    assert ["knn", "auc"] == cells[0][:2] and any(row[0] == "linear" for row in cells)
    comparison = table.comparison
    assert comparison.before == "synthetic" and comparison.n_slides == 16
    assert widget.encoder_combo.count() == 2 and widget.switch_button.isEnabled()
    _screenshot(viewer, qtbot, artifacts_dir / "finetune_monitor.png")

    widget.encoder_combo.setCurrentIndex([widget.encoder_combo.itemData(i) for i in range(2)].index("synthetic"))
    widget.switch_button.click()
    assert wait_for(widget.task_bar, qtbot, 60_000) == "done", widget.task_bar.status.text()
    assert load_region_embeddings(path).tobytes() == before.tobytes()
    assert state.session.settings.features.region_checkpoint is None
    assert "synthetic" in widget.encoder_combo.currentText() and "[selected]" in widget.encoder_combo.currentText()
