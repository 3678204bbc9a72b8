"""SLPD fine-tune panel: train the region encoder on the open cohort in a background process, follow it
(loss terms with the end of the DINO-only warm-up marked, the KNN monitor when a labels file is given, log,
ETA), stop / resume it, make its checkpoint the cohort's region encoder (with a before/after evaluation
table when a labels file is given) and switch between the region encoders the cohort holds. The plots
are in :mod:`.finetune_plots`, the question asked when napari closes during a run in :mod:`.finetune_close`.

The default preset is the official SLPD recipe (``nsclc``) when the cohort's token grids take the official
crops (14 x 14 global, 6 x 6 local: grids of 14 x 14 or more, 16 x 16 for 4096-px regions of 256-px
patches); ``tiny`` is for small grids and quick checks, and says so.

The process, its events and its checkpoints are :mod:`napari_slpd.training.run`'s; "use this
checkpoint" is :meth:`napari_slpd.session.Session.use_checkpoint` in a worker. Closing napari while a
run trains asks whether to stop it (a clean checkpoint is written first) or to leave it running (the
panel re-attaches to it when the cohort is opened again).
"""

from __future__ import annotations

import logging
import time

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
)

from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import (choose_labels_file, fill_label_tasks, guarded, main_window,
                                         show_info, show_warning)
from napari_slpd.widgets._panels import compact_form, panel_layout
from napari_slpd.widgets.finetune_close import MainWindowCloseFilter, ask_stop_or_leave, stop_and_wait
from napari_slpd.widgets.finetune_plots import BeforeAfterTable, LossPlot

log = logging.getLogger(__name__)

POLL_MS = 500


class FineTuneWidget(SlpdPanel):
    """Configure, launch and follow SLPD fine-tuning of the region encoder on the open cohort."""

    OBJECT_NAME = "slpd-finetune"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.run = None  # napari_slpd.training.run.TrainingRun
        self.stop_timeout = 300.0  # s a stop may take before SIGTERM/SIGKILL (checkpoint of a big model)

        from src_training.config import PRESET_LABELS

        self.preset_combo = QComboBox()
        self.preset_combo.addItems(["nsclc", "brca", "tiny"])
        for i in range(self.preset_combo.count()):
            self.preset_combo.setItemData(i, PRESET_LABELS[self.preset_combo.itemText(i)], Qt.ItemDataRole.ToolTipRole)
        self.preset_combo.setToolTip("nsclc (K=4) / brca (K=2): the official SLPD recipe (needs token grids of at "
                                     "least 14 x 14); tiny: small grids and quick checks, not the official recipe")
        self.preset_note = QLabel()
        self.preset_note.setWordWrap(True)
        self.preset_note.setStyleSheet("color: #aaaaaa;")
        self._preset_chosen = False  # the user picked a preset: opening a cohort no longer changes it
        self.preset_combo.currentTextChanged.connect(self._on_preset_changed)
        self.preset_combo.activated.connect(lambda *_: setattr(self, "_preset_chosen", True))
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
        self.labels_edit = QLineEdit()
        self.labels_edit.setPlaceholderText("optional: labels CSV for the KNN monitor")
        self.labels_edit.setToolTip("CSV/TSV with slide_id, a class column and optionally case_id (the format of "
                                    "`slpd evaluate`): after every epoch the KNN AUC of the teacher's slide "
                                    "embeddings on frozen folds; 'Use checkpoint' then evaluates before vs after")
        self.labels_edit.editingFinished.connect(lambda: self._load_tasks(quiet=True))
        labels_browse = QPushButton("…")
        labels_browse.setMaximumWidth(32)
        labels_browse.clicked.connect(guarded("Labels")(lambda *_: self._choose_labels()))
        self.task_combo = QComboBox()
        self.task_combo.setEditable(True)
        self.task_combo.setToolTip("the class column of the labels file")
        labels_row = QHBoxLayout()
        labels_row.addWidget(self.labels_edit, 1)
        labels_row.addWidget(labels_browse)
        labels_row.addWidget(self.task_combo)

        self.encoder_combo = QComboBox()
        self.encoder_combo.setToolTip("Region embeddings the cohort holds, one set per region encoder; switching "
                                      "is instant (nothing is recomputed) and prototypes and similar slides follow")
        self.switch_button = QPushButton("Switch")
        self.switch_button.setToolTip("Make these region embeddings the cohort's (prototypes and index follow)")
        self.switch_button.clicked.connect(guarded("Switch region encoder")(lambda *_: self.switch_encoder()))
        encoder_row = QHBoxLayout()
        encoder_row.addWidget(self.encoder_combo, 1)
        encoder_row.addWidget(self.switch_button)

        form = compact_form(QFormLayout())
        form.addRow("Preset", self.preset_combo)
        form.addRow("", self.preset_note)
        form.addRow("Epochs", self.epochs_spin)
        form.addRow("K", self.k_spin)
        form.addRow("Batch", self.batch_spin)
        form.addRow("Warm-up epochs", self.warm_spin)
        device_row = QHBoxLayout()
        device_row.addWidget(self.device_combo, 1)
        device_row.addWidget(QLabel("GPUs"))
        device_row.addWidget(self.gpus_spin)
        form.addRow("Device", device_row)
        form.addRow("CPU threads", self.threads_spin)
        form.addRow("Run folder", run_row)
        form.addRow("Labels", labels_row)

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
        self.comparison_label = QLabel("")
        self.comparison_label.setWordWrap(True)
        self.comparison_table = BeforeAfterTable()
        self.comparison_table.setVisible(False)
        self.comparison_table.setMinimumHeight(120)
        encoders_form = compact_form(QFormLayout())
        encoders_form.addRow("Region encoder", encoder_row)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        self.log_view.setMinimumHeight(80)
        self.task_bar.task_finished.connect(lambda *_: self._update_buttons())

        layout = panel_layout(self)  # scrolls instead of pushing napari's window past the screen
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plot, 3)
        layout.addLayout(encoders_form)
        layout.addWidget(self.comparison_label)
        layout.addWidget(self.comparison_table, 1)
        layout.addWidget(self.log_view, 1)
        layout.addWidget(self.task_bar)

        self._log_shown = 0
        self._points_shown = -1
        self._monitor_shown = -1
        self._on_preset_changed(self.preset_combo.currentText())
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self.timer.start()
        self._close_filter = MainWindowCloseFilter(self)
        window = main_window(napari_viewer)
        if window is not None:  # the filter is a child of this panel: removed when the panel goes
            window.installEventFilter(self._close_filter)
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
        extra = []
        labels = self.labels_edit.text().strip()
        if labels:
            extra += ["--labels", labels]
            task = self.task_combo.currentText().strip()
            if task:
                extra += ["--task", task]
        return TrainingSettings(
            cohort=str(session.root),
            run_dir=run_dir,
            preset=preset,
            extra_args=extra,
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

        self.refresh_encoders()
        if session is not None and not self._preset_chosen:
            from src_training.config import default_preset

            self.preset_combo.setCurrentText(default_preset(_cohort_grid(session)))
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
        self._monitor_shown = -1
        self.log_view.clear()
        self.plot.update_curves({})
        self.plot.update_monitor([], labelled=bool(self.labels_edit.text().strip()))
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
            self.plot.update_curves(progress.curves, progress.warmup_end_step, progress.entropy_curves)
            self._points_shown = n_points
        if len(progress.monitor) != self._monitor_shown:
            labelled = bool(self.labels_edit.text().strip())
            self.plot.update_monitor(progress.monitor, progress.warm_epoch, labelled=labelled)
            self._monitor_shown = len(progress.monitor)
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
                  self.device_combo, self.threads_spin, self.run_edit, self.labels_edit, self.task_combo):
            w.setEnabled(not running)
        self.switch_button.setEnabled(not busy and self.encoder_combo.count() > 1)
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

        session = self.state.require_session()
        checkpoint = self.run.exported_checkpoint() if self.run is not None else None
        if checkpoint is None:
            raise SlpdError("this run has exported no checkpoint yet (it is written when a run ends or stops)")

        def work(progress, cancel):
            return session.use_checkpoint(checkpoint, progress=progress, cancel=cancel)

        task = self.run_task(work, f"Using {checkpoint.name}", on_result=self._on_checkpoint_used)
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
        self.refresh_encoders()
        self._update_buttons()
        labels = self.labels_edit.text().strip()
        if labels and not report.cancelled and report.previous_version and report.previous_version != report.version:
            # The task bar runs one task at a time: start the evaluation once this task has finished.
            self._after_task(lambda: self.compare_versions(report.previous_version, report.version))
        elif not labels:
            self.comparison_label.setText("Give a labels file to see the previous and the new region embeddings "
                                          "evaluated side by side.")

    def _after_task(self, fn) -> None:
        def once(*_):
            self.task_bar.task_finished.disconnect(once)
            guarded("Fine-tune")(fn)()

        self.task_bar.task_finished.connect(once)

    # -- before / after and region encoders ------------------------------------------------------------
    def compare_versions(self, before: str, after: str):
        """Evaluate two region-embedding versions on the labels file (KNN and linear probe, same folds)."""
        from napari_slpd.errors import SlpdError

        session = self.state.require_session()
        labels = self.labels_edit.text().strip()
        if not labels:
            raise SlpdError("give a labels file to compare region encoders")
        task = self.task_combo.currentText().strip() or None

        def work(progress, cancel):
            return session.compare_region_encoders(labels, before, after, task=task, progress=progress,
                                                   cancel=cancel)

        self.comparison_label.setText(f"evaluating {before} (before) and {after} (after)…")
        task_handle = self.run_task(work, "Before / after evaluation", on_result=self._on_compared)
        self._update_buttons()
        return task_handle

    def _on_compared(self, comparison) -> None:
        self.comparison_table.show_comparison(comparison)
        self.comparison_table.setVisible(True)
        self.comparison_label.setText(
            f"Before ({comparison.before}) / after ({comparison.after}), task {comparison.task}: "
            f"{comparison.n_slides} slides, {comparison.n_folds} folds (mean ± std over folds)")
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  before/after evaluation:\n{comparison.table()}")
        self._update_buttons()

    def refresh_encoders(self) -> None:
        """List the region encoders the cohort holds embeddings of (the selected one first chosen)."""
        self.encoder_combo.clear()
        session = self.state.session
        if session is None:
            self._update_switch()
            return
        try:
            encoders = session.region_encoders()
        except Exception as exc:  # an unreadable cohort must not block the panel
            log.warning("cannot list the region encoders: %s", exc)
            encoders = []
        for e in encoders:
            self.encoder_combo.addItem(e.describe(), e.key)
            if e.selected:
                self.encoder_combo.setCurrentIndex(self.encoder_combo.count() - 1)
        self._update_switch()

    def _update_switch(self) -> None:
        self.switch_button.setEnabled(self.encoder_combo.count() > 1 and not self.task_bar.busy)

    def switch_encoder(self, key: str | None = None):
        """Make the chosen region encoder's embeddings the cohort's (instant; prototypes and index follow)."""
        session = self.state.require_session()
        key = key or self.encoder_combo.currentData()
        if not key:
            return None

        def work(progress, cancel):
            return session.use_region_encoder(key, progress=progress, cancel=cancel)

        task = self.run_task(work, f"Region encoder {key}", on_result=self._on_switched)
        self._update_buttons()
        return task

    def _on_switched(self, report) -> None:
        from napari_slpd.widgets._layers import refresh_regions, show_prototypes

        self.state.update_settings(features=self.state.session.settings.features)
        opened = self.state.current
        if opened is not None and not report.cancelled:
            refresh_regions(self.state)
            try:
                show_prototypes(self.state, self.state.session.prototypes(opened.slide_id, compute=False))
            except Exception as exc:  # this slide may have too few regions for K
                show_warning(f"{opened.slide_id}: {exc}")
        self.state.features_updated.emit("")
        self.state.prototypes_updated.emit("")
        self.task_bar.status.setText(report.summary())
        self.log_view.appendPlainText(f"{time.strftime('%H:%M:%S')}  {report.summary()}")
        self.refresh_encoders()
        self._update_buttons()

    # -- presets and labels ----------------------------------------------------------------------------
    def set_preset(self, name: str) -> None:
        self.preset_combo.setCurrentText(name)
        self._preset_chosen = True

    def _on_preset_changed(self, name: str) -> None:
        from src_training.config import PRESET_LABELS

        note = PRESET_LABELS.get(name, "")
        session = self.state.session if hasattr(self, "state") else None
        grid = _cohort_grid(session) if session is not None else None
        if grid and name != "tiny":
            from src_training.config import official_preset_fits

            if not official_preset_fits(grid):
                note += f" — the cohort's {grid} x {grid} token grids are too small for it: use tiny"
        self.preset_note.setText(note)

    def _choose_labels(self) -> None:
        if choose_labels_file(self, self.labels_edit):
            self._load_tasks()

    def _load_tasks(self, quiet: bool = False) -> list[str]:
        """Fill the task list with the labels file's class columns (the KNN monitor classifies)."""
        return fill_label_tasks(self.labels_edit, self.task_combo, quiet,
                                keep=lambda task: task.kind == "classification")

    # -- closing napari --------------------------------------------------------------------------------
    def ask_on_close(self) -> str:
        """'stop', 'leave' or 'cancel' (tests replace this method)."""
        return ask_stop_or_leave(self, self.run.run_dir)

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
        self.status.setText("stopping: finishing the step and writing a checkpoint…")
        stop_and_wait(run, self.stop_timeout)
        self.poll()

    def _detach_quietly(self) -> None:
        # The panel went away without napari closing (dock removed): the run goes on, re-attachable.
        run = self.run
        if run is not None and run.is_running:
            run.detach()


def _cohort_grid(session) -> int | None:
    """The token grid side of the cohort's feature files (the first readable one), None without features."""
    from napari_slpd.features.store import FeatureStore

    if session is None:
        return None
    for sid in session.cohort.slide_ids():
        path = session.cohort.features_path(sid)
        if path.exists():
            try:
                with FeatureStore.open(path) as store:
                    return int(store.grid_size)
            except Exception:  # noqa: BLE001 - a damaged file: try the next
                continue
    return None


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
