"""SLPD fine-tune panel: train the region encoder on the open cohort in a background process, follow it
(loss terms, log, ETA), stop / resume it, and make its checkpoint the cohort's region encoder.

The process, its events and its checkpoints are :mod:`napari_slpd.training.run`'s; "use this
checkpoint" is :func:`napari_slpd.features.reencode.use_checkpoint` in a worker. Closing napari while a
run trains asks whether to stop it (a clean checkpoint is written first) or to leave it running (the
panel re-attaches to it when the cohort is opened again).
"""

from __future__ import annotations

import logging
import time

from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.widgets._common import TaskBar, guarded, show_info, show_warning
from napari_slpd.widgets.state import SlpdState

log = logging.getLogger(__name__)

POLL_MS = 500
TERM_LABELS = {"loss": "total", "dino_loss": "DINO", "intra_loss": "intra-slide", "inter_loss": "inter-slide"}
TERM_COLORS = {"loss": "#ffffff", "dino_loss": "#1f77b4", "intra_loss": "#ff7f0e", "inter_loss": "#2ca02c"}


class _CloseFilter(QObject):
    """Sees the main window's Close event before napari does (so a running training is dealt with)."""

    def __init__(self, panel: "FineTuneWidget"):
        super().__init__(panel)
        self.panel = panel

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close:
            return self.panel.handle_close(event)
        return False


class LossPlot(QWidget):
    """Each loss term against the training step (matplotlib, dark like napari)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.4), dpi=90, facecolor="#262930", layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(111)
        ax = self.axes
        ax.set_facecolor("#1e1f24")
        for spine in ax.spines.values():
            spine.set_color("#888888")
        ax.tick_params(colors="#cccccc", labelsize=8)
        ax.set_xlabel("step", color="#cccccc", fontsize=8)
        ax.set_ylabel("loss", color="#cccccc", fontsize=8)
        ax.grid(True, color="#444444", linewidth=0.5)
        self.lines = {term: ax.plot([], [], label=label, color=TERM_COLORS[term], linewidth=1.2)[0]
                      for term, label in TERM_LABELS.items()}
        legend = ax.legend(fontsize=7, loc="upper right", facecolor="#262930", edgecolor="#555555")
        for text in legend.get_texts():
            text.set_color("#dddddd")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(180)

    def update_curves(self, curves) -> None:
        for term, line in self.lines.items():
            steps, values = curves.get(term, ([], []))
            line.set_data(list(steps), list(values))
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()

    def points(self, term: str) -> int:
        return len(self.lines[term].get_xdata())


class FineTuneWidget(QWidget):
    """Configure, launch and follow SLPD fine-tuning of the region encoder on the open cohort."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.state = SlpdState.for_viewer(napari_viewer)
        self.setObjectName("slpd-finetune")
        self.run = None  # napari_slpd.training.run.TrainingRun
        self.stop_timeout = 300.0  # s a stop may take before SIGTERM/SIGKILL (checkpoint of a big model)

        self.preset_combo = QComboBox()
        self.preset_combo.addItems(["tiny", "nsclc", "brca"])
        self.preset_combo.setToolTip("tiny: a quick run on a CPU; nsclc (K=4) / brca (K=2): the official settings")
        self.epochs_spin = _spin(0, 10000, "preset", "Epochs (official: 100)")
        self.k_spin = _spin(0, 32, "preset", "Prototypes per slide K (official: 4 NSCLC, 2 BRCA)")
        self.batch_spin = _spin(0, 4096, "preset", "Regions per GPU and step (official: 128)")
        self.warm_spin = _spin(-1, 10000, "preset", "Epochs with the DINO loss only (official: 20)")
        self.warm_spin.setValue(-1)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.threads_spin = _spin(0, 256, "auto", "torch CPU threads per process (fewer is faster on a busy machine)")
        self.gpus_spin = QSpinBox()
        n_gpus = _cuda_count()
        self.gpus_spin.setRange(1, max(1, n_gpus))
        self.gpus_spin.setEnabled(n_gpus > 1)
        self.gpus_spin.setToolTip("Several GPUs: one process each (torchrun)" if n_gpus > 1 else "One GPU or the CPU")
        self.run_edit = QLineEdit()
        self.run_edit.setPlaceholderText("new folder under COHORT/training/")
        browse = QPushButton("Open run…")
        browse.setToolTip("Follow an existing run folder (to resume it or use its checkpoint)")
        browse.clicked.connect(guarded("Fine-tune")(lambda *_: self._choose_run()))
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_edit, 1)
        run_row.addWidget(browse)
        form = QFormLayout()
        form.addRow("Preset", self.preset_combo)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("K", self.k_spin)
        form.addRow("Batch", self.batch_spin)
        form.addRow("Warm-up epochs", self.warm_spin)
        device_row = QHBoxLayout()
        device_row.addWidget(self.device_combo, 1)
        device_row.addWidget(QLabel("GPUs"))
        device_row.addWidget(self.gpus_spin)
        device_row.addWidget(QLabel("threads"))
        device_row.addWidget(self.threads_spin)
        form.addRow("Device", device_row)
        form.addRow("Run folder", run_row)

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(guarded("Fine-tune")(lambda *_: self.start()))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step with a checkpoint")
        self.stop_button.clicked.connect(guarded("Fine-tune")(lambda *_: self.stop()))
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(guarded("Fine-tune")(lambda *_: self.resume()))
        self.use_button = QPushButton("Use checkpoint")
        self.use_button.setToolTip("Re-encode the cohort's regions with the trained encoder; refresh prototypes "
                                   "and similar slides")
        self.use_button.clicked.connect(guarded("Use checkpoint")(lambda *_: self.use_checkpoint()))
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.resume_button, self.use_button):
            buttons.addWidget(b)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.status = QLabel("No training run.")
        self.status.setWordWrap(True)
        self.plot = LossPlot()
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setMinimumHeight(80)
        self.task_bar = TaskBar()

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot, 2)
        layout.addWidget(self.log_view, 1)
        layout.addWidget(self.task_bar)

        self._log_shown = 0
        self._points_shown = -1
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self.timer.start()
        self._close_filter = _CloseFilter(self)
        main_window = getattr(getattr(napari_viewer, "window", None), "_qt_window", None)
        if main_window is not None:  # the filter is a child of this panel: removed when the panel goes
            main_window.installEventFilter(self._close_filter)
        self.destroyed.connect(lambda *_: self._detach_quietly())
        self.state.cohort_changed.connect(self._on_cohort_changed)
        if self.state.session is not None:
            self._on_cohort_changed(self.state.session)
        self._update_buttons()

    # -- settings --------------------------------------------------------------------------------------
    def settings(self):
        """TrainingSettings from the form (None fields: the preset's values)."""
        from napari_slpd.training import TrainingSettings, default_run_dir

        session = self.state.require_session()
        preset = self.preset_combo.currentText()
        run_dir = self.run_edit.text().strip() or str(default_run_dir(session.root, preset))
        return TrainingSettings(
            cohort=str(session.root),
            run_dir=run_dir,
            preset=preset,
            epochs=self.epochs_spin.value() or None,
            num_clusters=self.k_spin.value() or None,
            batch_size=self.batch_spin.value() or None,
            warm_epoch=None if self.warm_spin.value() < 0 else self.warm_spin.value(),
            device=self.device_combo.currentText(),
            gpus=self.gpus_spin.value(),
            threads=self.threads_spin.value() or None,
        )

    # -- following a run -------------------------------------------------------------------------------
    def _on_cohort_changed(self, session) -> None:
        from napari_slpd.training.run import TrainingRun, find_runs, running_runs

        if self.run is not None and self.run.is_running:
            return  # keep following the run we started
        self._follow(None)
        if session is None:
            return
        alive = running_runs(session.root)
        runs = alive or find_runs(session.root)
        if runs:
            try:
                run = TrainingRun.attach(runs[0])
            except Exception as exc:  # an unreadable run folder must not block the panel
                log.warning("cannot follow %s: %s", runs[0], exc)
                return
            self._follow(run)
            if alive:
                show_info(f"following the training run still going in {run.run_dir} (pid {run.pid})")

    def _choose_run(self) -> None:
        from napari_slpd.training.run import TrainingRun

        folder = QFileDialog.getExistingDirectory(self, "Training run folder")
        if folder:
            self._follow(TrainingRun.attach(folder))

    def _follow(self, run) -> None:
        self.run = run
        self._log_shown = 0
        self._points_shown = -1
        self.log_view.clear()
        self.plot.update_curves({})
        if run is not None:
            self.run_edit.setText(str(run.run_dir))
            self.poll()
        else:
            self.status.setText("No training run.")
            self.progress.setValue(0)
        self._update_buttons()

    def poll(self) -> None:
        """Timer tick: new events -> plot, log, progress, ETA; button states."""
        run = self.run
        if run is None:
            return
        try:
            run.poll()
        except Exception as exc:  # reading events must never raise into the Qt timer
            log.warning("training run %s: %s", run.run_dir, exc)
            return
        progress = run.progress
        n_points = len(progress.curves["loss"][0])
        if n_points != self._points_shown:
            self.plot.update_curves(progress.curves)
            self._points_shown = n_points
        for line in progress.log[self._log_shown:]:
            self.log_view.appendPlainText(line)
        self._log_shown = len(progress.log)
        self.progress.setValue(int(1000 * progress.fraction))
        state = run.state
        text = progress.summary()
        if state == "failed" and progress.error:
            text = f"failed: {progress.error.splitlines()[-1] if progress.error else ''}"
        self.status.setText(f"{state}: {text}" if state not in ("running",) else text)
        self._update_buttons()

    def _update_buttons(self) -> None:
        run = self.run
        running = run is not None and run.is_running
        busy = self.task_bar.busy
        self.start_button.setEnabled(not running and not busy)
        self.stop_button.setEnabled(running and run.state != "stopping")
        self.resume_button.setEnabled(run is not None and run.can_resume and run.state != "done" and not busy)
        self.use_button.setEnabled(run is not None and not running and run.exported_checkpoint() is not None
                                   and not busy)
        for w in (self.preset_combo, self.epochs_spin, self.k_spin, self.batch_spin, self.warm_spin,
                  self.device_combo, self.threads_spin, self.run_edit):
            w.setEnabled(not running)
        self.gpus_spin.setEnabled(not running and _cuda_count() > 1)

    # -- actions ---------------------------------------------------------------------------------------
    def start(self):
        from napari_slpd.errors import SlpdError
        from napari_slpd.training.run import TrainingRun

        if self.run is not None and self.run.is_running:
            raise SlpdError("a training run is going; stop it first")
        if self.run is not None and self.run_edit.text().strip() == str(self.run.run_dir):
            self.run_edit.clear()  # Start means a new run: a new folder, never the followed run's
        settings = self.settings()
        run = TrainingRun.start(settings)
        run.stop_timeout = self.stop_timeout
        self._follow(run)
        self.status.setText(f"started in {run.run_dir}")
        return run

    def stop(self) -> None:
        if self.run is not None and self.run.is_running:
            self.run.stop_timeout = self.stop_timeout
            self.run.request_stop()
            self.poll()

    def resume(self):
        from napari_slpd.errors import SlpdError

        if self.run is None:
            raise SlpdError("no training run to resume; open its run folder first")
        self.run.resume()
        self.run.stop_timeout = self.stop_timeout
        self.poll()
        return self.run

    def use_checkpoint(self):
        """Re-encode the cohort's regions with the run's exported teacher; refresh prototypes and index."""
        from napari_slpd.errors import SlpdError
        from napari_slpd.features.reencode import use_checkpoint

        session = self.state.require_session()
        checkpoint = self.run.exported_checkpoint() if self.run is not None else None
        if checkpoint is None:
            raise SlpdError("this run has exported no checkpoint yet (it is written when a run ends or stops)")

        def work(progress, cancel):
            return use_checkpoint(session, checkpoint, progress=progress, cancel=cancel)

        task = self.task_bar.run(work, f"Using {checkpoint.name}", on_result=self._on_checkpoint_used)
        self._update_buttons()
        return task

    def _on_checkpoint_used(self, report) -> None:
        from napari_slpd.widgets._layers import refresh_regions, show_prototypes

        self.state.update_settings(features=self.state.session.settings.features)
        opened = self.state.current
        if opened is not None and not report.cancelled:
            refresh_regions(self.state)
            try:
                protos = self.state.session.prototypes(opened.slide_id, compute=False)
            except Exception as exc:  # this slide may have too few regions for K
                show_warning(f"{opened.slide_id}: {exc}")
            else:
                show_prototypes(self.state, protos)
        self.state.features_updated.emit("")
        self.state.prototypes_updated.emit("")
        self.task_bar.status.setText(report.summary())
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {report.summary()}")
        show_info(report.summary())
        self._update_buttons()

    # -- closing napari --------------------------------------------------------------------------------
    def ask_on_close(self) -> str:
        """'stop', 'leave' or 'cancel' (tests replace this method)."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("SLPD training is running")
        box.setText(f"A fine-tune run is still training in\n{self.run.run_dir}.")
        box.setInformativeText("Stop it (after a checkpoint, so it can be resumed), or leave it running in the "
                               "background (reopen this panel on the cohort to follow it again)?")
        stop = box.addButton("Stop training", QMessageBox.ButtonRole.DestructiveRole)
        leave = box.addButton("Leave running", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        clicked = box.clickedButton()
        return "stop" if clicked is stop else "leave" if clicked is leave else "cancel"

    def handle_close(self, event) -> bool:
        """The main window is closing: True swallows the event (closing cancelled)."""
        run = self.run
        if run is None or not run.is_running:
            return False
        choice = self.ask_on_close()
        if choice == "cancel":
            event.ignore()
            return True
        if choice == "leave":
            run.detach()
            log.info("training left running in %s (pid %s)", run.run_dir, run.pid)
            self.status.setText(f"left running in {run.run_dir} (pid {run.pid})")
            return False
        self._stop_and_wait(run)
        return False

    def _stop_and_wait(self, run) -> None:
        """Stop with a checkpoint and wait for the process to end, keeping the window responsive."""
        run.stop_timeout = self.stop_timeout
        run.request_stop()
        self.status.setText("stopping: finishing the step and writing a checkpoint…")
        deadline = time.monotonic() + 3 * self.stop_timeout + 10
        while run.is_running and time.monotonic() < deadline:
            run.poll()  # escalates to SIGTERM / SIGKILL when the stop takes too long
            QApplication.processEvents()
            time.sleep(0.05)
        self.poll()

    def _detach_quietly(self) -> None:
        # The panel went away without napari closing (dock removed): the run goes on, re-attachable.
        run = self.run
        if run is not None and run.is_running:
            run.detach()


def _spin(lo: int, hi: int, special: str, tip: str) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(lo, hi)
    spin.setValue(lo)
    spin.setSpecialValueText(special)
    spin.setToolTip(tip)
    return spin


def _cuda_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # no torch build with CUDA
        return 0
