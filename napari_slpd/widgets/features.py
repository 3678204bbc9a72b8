"""Features panel: encoders, checkpoints, device and region settings; extract for one slide or the cohort.

Extraction runs in a worker with progress and Cancel. Slides whose features are already cached with the
same settings are skipped at once; a cancelled slide keeps its finished chunks in ``<id>.h5.partial``
(resumed by the next run) and never gets a final-named file until it is complete.
"""

from __future__ import annotations

import logging
from collections import Counter

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QMessageBox,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.models.presets import PRESETS
from napari_slpd.slides.pixel_size import MPP_FALLBACKS
from napari_slpd.utils.device import DEVICE_CHOICES
from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import guarded, show_info, show_warning
from napari_slpd.widgets._panels import panel_layout

log = logging.getLogger(__name__)

# the presets (published foundation models, `slpd encoders`), then the open-ended kinds as examples
PATCH_ENCODERS = (*PRESETS, "timm:vit_large_patch16_224", "open_clip:ViT-B-16")
REGION_ENCODERS = ("hipt_vit4k", "mean")
# ExtractionResult.status in the words a user reads.
STATUS_WORDS = {
    "extracted": "computed",
    "skipped": "already cached",
    "empty": "without regions",
    "cancelled": "cancelled (resumable)",
    "error": "failed",
}


def _path_row(edit: QLineEdit, title: str, parent: QWidget) -> QHBoxLayout:
    button = QPushButton("…")
    button.setFixedWidth(28)

    def choose():
        path, _ = QFileDialog.getOpenFileName(parent, title, edit.text(), "Checkpoints (*.pth *.pt *.bin *.safetensors);;All files (*)")
        if path:
            edit.setText(path)

    button.clicked.connect(choose)
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    row.addWidget(button)
    return row


def confirm_dialog(parent: QWidget, title: str, text: str, yes: str) -> bool:
    """A question whose default answer is No; True when the person chose ``yes``."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle(title)
    box.setText(text)
    box.setTextFormat(Qt.TextFormat.PlainText)
    accept = box.addButton(yes, QMessageBox.ButtonRole.AcceptRole)
    cancel = box.addButton("Keep them", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(cancel)
    box.exec()
    return box.clickedButton() is accept


class FeaturesWidget(SlpdPanel):
    """Choose how regions are encoded and compute their features."""

    OBJECT_NAME = "slpd-features"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        fs = self.state.settings.features

        self.patch_encoder = QComboBox()
        self.patch_encoder.setEditable(True)
        self.patch_encoder.addItems(PATCH_ENCODERS)
        self.patch_encoder.setToolTip("A preset (UNI, Virchow2, Phikon-v2, ...: its checkpoint is the file or folder "
                                      "as published), timm:<model name> or open_clip:<model name>")
        self.patch_checkpoint = QLineEdit()
        self.patch_checkpoint.setPlaceholderText("none: random initialisation")
        self.input_px = QSpinBox()
        self.input_px.setRange(0, 1024)
        self.input_px.setSpecialValueText("model default")
        self.input_px.setToolTip("Side of the images the patch encoder sees (0: the model's own)")
        self.region_encoder = QComboBox()
        self.region_encoder.addItems(REGION_ENCODERS)
        self.region_checkpoint = QLineEdit()
        self.region_checkpoint.setPlaceholderText("none: random initialisation")
        self.device = QComboBox()
        self.device.addItems(list(DEVICE_CHOICES))
        self.region_px = QSpinBox()
        self.region_px.setRange(32, 16384)
        self.region_px.setSingleStep(256)
        self.patch_px = QSpinBox()
        self.patch_px.setRange(8, 2048)
        self.patch_px.setSingleStep(16)
        self.target_mpp = QDoubleSpinBox()
        self.target_mpp.setRange(0.1, 16.0)
        self.target_mpp.setDecimals(3)
        self.target_mpp.setSingleStep(0.25)
        self.target_mpp.setSuffix(" µm/px")
        self.min_tissue = QDoubleSpinBox()
        self.min_tissue.setRange(0.0, 1.0)
        self.min_tissue.setSingleStep(0.05)
        self.mpp_fallback = QComboBox()
        self.mpp_fallback.addItems(list(MPP_FALLBACKS))
        self.mpp_fallback.setToolTip(
            "For slides whose file states no plausible pixel size: none = refuse (set it in the Cohort panel), "
            "objective = 10 / objective power, level0 = assume 0.5 µm/px"
        )
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.overwrite = QCheckBox("Replace features made with other settings")

        form = QFormLayout()
        form.addRow("Patch encoder", self.patch_encoder)
        form.addRow("Checkpoint", _path_row(self.patch_checkpoint, "Patch encoder checkpoint", self))
        form.addRow("Input size", self.input_px)
        form.addRow("Region encoder", self.region_encoder)
        form.addRow("Checkpoint", _path_row(self.region_checkpoint, "Region encoder checkpoint", self))
        form.addRow("Device", self.device)
        form.addRow("Region size (px)", self.region_px)
        form.addRow("Patch size (px)", self.patch_px)
        form.addRow("Resolution", self.target_mpp)
        form.addRow("Min. tissue", self.min_tissue)
        form.addRow("Unknown pixel size", self.mpp_fallback)
        form.addRow("Batch (patches)", self.batch_size)
        form.addRow(self.overwrite)

        self.init_note = QLabel()
        self.init_note.setWordWrap(True)
        # Features cached with other settings: a choice, never a trap.
        self.choice_label = QLabel("")
        self.choice_label.setWordWrap(True)
        self.choice_label.setTextFormat(Qt.TextFormat.PlainText)
        self.choice_label.setStyleSheet("color: #f0a030;")
        self.use_made_button = QPushButton("Use the features' settings")
        self.use_made_button.setToolTip("Put the settings the cached features were made with back into this form")
        self.use_made_button.clicked.connect(guarded("Features")(lambda *_: self.use_features_settings()))
        self.recompute_button = QPushButton("Recompute with these")
        self.recompute_button.setToolTip("Compute the features of those slides again with the settings of this form")
        self.recompute_button.clicked.connect(guarded("Features")(lambda *_: self.recompute_other()))
        choice_buttons = QHBoxLayout()
        choice_buttons.addWidget(self.use_made_button)
        choice_buttons.addWidget(self.recompute_button)
        self.choice_box = QWidget()
        choice_layout = QVBoxLayout(self.choice_box)
        choice_layout.setContentsMargins(0, 0, 0, 0)
        choice_layout.addWidget(self.choice_label)
        choice_layout.addLayout(choice_buttons)
        self.choice_box.setVisible(False)
        # No region fits some slides: say so with their size, offer the largest region size that fits.
        self.fit_label = QLabel("")
        self.fit_label.setWordWrap(True)
        self.fit_label.setTextFormat(Qt.TextFormat.PlainText)
        self.fit_label.setStyleSheet("color: #f0a030;")
        self.fit_button = QPushButton("")
        self.fit_button.clicked.connect(guarded("Features")(lambda *_: self.use_fitting_region_size()))
        self.fit_box = QWidget()
        fit_layout = QVBoxLayout(self.fit_box)
        fit_layout.setContentsMargins(0, 0, 0, 0)
        fit_layout.addWidget(self.fit_label)
        fit_layout.addWidget(self.fit_button)
        self.fit_box.setVisible(False)
        self.fitting_region_px: int | None = None
        self.confirm = lambda title, text, yes: confirm_dialog(self, title, text, yes)
        self.current_button = QPushButton("Compute for current slide")
        self.current_button.clicked.connect(guarded("Features")(lambda: self.compute("current")))
        self.cohort_button = QPushButton("Compute for whole cohort")
        self.cohort_button.clicked.connect(guarded("Features")(lambda: self.compute("cohort")))
        buttons = QHBoxLayout()
        buttons.addWidget(self.current_button)
        buttons.addWidget(self.cohort_button)
        self.last_results: list = []

        layout = panel_layout(self)
        layout.addLayout(form)
        layout.addWidget(self.init_note)
        layout.addWidget(self.choice_box)
        layout.addWidget(self.fit_box)
        layout.addLayout(buttons)
        layout.addWidget(self.task_bar)
        layout.addStretch(1)

        self.load_settings(fs)
        for edit in (self.patch_checkpoint, self.region_checkpoint):
            edit.textChanged.connect(self._update_note)
        self.patch_encoder.currentTextChanged.connect(self._update_note)
        self.region_encoder.currentTextChanged.connect(self._update_note)
        # Every edit becomes the cohort's setting (saved in its folder) a moment after the last keystroke.
        self._apply_timer = QTimer(self)
        self._apply_timer.setSingleShot(True)
        self._apply_timer.setInterval(400)
        self._apply_timer.timeout.connect(self._apply_quietly)
        for spin in (self.input_px, self.region_px, self.patch_px, self.target_mpp, self.min_tissue, self.batch_size):
            spin.valueChanged.connect(self._schedule_apply)
        for combo in (self.patch_encoder, self.region_encoder, self.device, self.mpp_fallback):
            combo.currentTextChanged.connect(self._schedule_apply)
        for edit in (self.patch_checkpoint, self.region_checkpoint):
            edit.editingFinished.connect(self._schedule_apply)
        self.state.settings_changed.connect(self._on_settings_changed)
        self.state.cohort_changed.connect(lambda _s: self.update_choice())
        self.state.features_updated.connect(lambda _s: self.update_choice())

    # -- settings <-> form -----------------------------------------------------------------------------
    def load_settings(self, fs) -> None:
        self._loading = True
        try:
            self._load_settings(fs)
        finally:
            self._loading = False

    def _schedule_apply(self, *_):
        if not getattr(self, "_loading", False):
            self._apply_timer.start()

    def _apply_quietly(self) -> None:
        """Apply the form when its values are valid (an unfinished edit waits for the next one)."""
        from napari_slpd.errors import SlpdError

        try:
            self.apply()
        except SlpdError:
            return

    def _load_settings(self, fs) -> None:
        self._shown = fs
        self.patch_encoder.setCurrentText(fs.patch_encoder)
        self.patch_checkpoint.setText(fs.patch_checkpoint or "")
        self.input_px.setValue(int(fs.patch_input_px or 0))
        self.region_encoder.setCurrentText(fs.region_encoder)
        self.region_checkpoint.setText(fs.region_checkpoint or "")
        self.device.setCurrentText(fs.device)
        self.region_px.setValue(int(fs.region_px))
        self.patch_px.setValue(int(fs.patch_px))
        self.target_mpp.setValue(float(fs.target_mpp))
        self.min_tissue.setValue(float(fs.min_tissue))
        self.mpp_fallback.setCurrentText(fs.mpp_fallback)
        self.batch_size.setValue(int(fs.batch_size))
        self.overwrite.setChecked(bool(fs.overwrite))
        self._update_note()

    def _on_settings_changed(self, settings) -> None:
        # Only a change of the feature settings made elsewhere (a cohort opened with its own settings, a
        # fine-tuned checkpoint) reloads the form; other settings must not discard what is being typed.
        if settings.features != self._shown:
            self._apply_timer.stop()
            self.load_settings(settings.features)
        self.update_choice()

    def form_settings(self, validate: bool = True):
        """The FeatureSettings the form shows (validated: bad values raise SlpdError with the reason)."""
        from dataclasses import replace

        from napari_slpd.session import FeatureSettings

        values = dict(
            patch_encoder=self.patch_encoder.currentText().strip(),
            patch_checkpoint=self.patch_checkpoint.text().strip() or None,
            patch_input_px=self.input_px.value() or None,
            region_encoder=self.region_encoder.currentText(),
            region_checkpoint=self.region_checkpoint.text().strip() or None,
            device=self.device.currentText(),
            region_px=self.region_px.value(),
            patch_px=self.patch_px.value(),
            target_mpp=self.target_mpp.value(),
            min_tissue=self.min_tissue.value(),
            mpp_fallback=self.mpp_fallback.currentText(),
            batch_size=self.batch_size.value(),
            overwrite=self.overwrite.isChecked(),
        )
        current = self.state.settings.features
        if not validate:
            return replace(current, **values) if _valid(values) else current
        return replace(FeatureSettings(**values), num_workers=current.num_workers, token_dtype=current.token_dtype)

    def apply(self):
        """Validate the form and make it the shared feature settings (saved in the open cohort)."""
        from dataclasses import replace

        settings = self.form_settings()
        self._shown = settings
        current = self.state.settings.features
        if replace(settings, overwrite=False) != replace(current, overwrite=False) or settings.overwrite != current.overwrite:
            self.state.update_settings(features=settings)
        return settings

    # -- features made with other settings: a choice -------------------------------------------------
    def other_settings_slides(self) -> list:
        session = self.state.session
        if session is None:
            return []
        return [st for st in session.statuses() if st.features == "other-settings"]

    def update_choice(self) -> None:
        """Show the choice when cached features were made with settings other than the form's."""
        others = self.other_settings_slides()
        if not others:
            self.choice_box.setVisible(False)
            return
        detail = others[0].detail
        n_all = len(self.state.session.slide_ids())
        self.choice_label.setText(
            f"The features of {len(others)} of {n_all} slides were made with other settings ({detail}). Use the "
            "settings they were made with, or recompute them with the settings above."
        )
        self.use_made_button.setEnabled(self.state.session.features_made_with() is not None)
        self.choice_box.setVisible(True)

    def use_features_settings(self):
        """Put the settings the cached features were made with into the form (and the cohort)."""
        from dataclasses import replace

        from napari_slpd.errors import SlpdError

        session = self.state.require_session()
        made = session.features_made_with()
        if made is None:
            raise SlpdError("the cohort has no features yet")
        made = replace(made, device=self.state.settings.features.device, overwrite=False)
        self.load_settings(made)
        self.state.update_settings(features=made)
        self.update_choice()
        self.task_bar.status.setText("Features: using the settings the cached features were made with")
        return made

    def recompute_other(self):
        """Compute the features made with other settings again, with the form's settings (asks first when
        that would replace features made with a checkpoint by random-init ones)."""
        return self.compute("cohort", replace_other=True)

    # -- no region fits: offer the largest region size that fits ----------------------------------------
    def use_fitting_region_size(self):
        if not self.fitting_region_px:
            return None
        self.region_px.setValue(int(self.fitting_region_px))
        self.apply()
        self.fit_box.setVisible(False)
        return self.compute("cohort")

    @staticmethod
    def _gui_words(result) -> str:
        return _gui_words_of(result.message or result.status)

    def _offer_fitting_size(self, empty: list) -> None:
        """When no region fits some slides, say so with their size and offer the largest size that fits."""
        session = self.state.session
        if not empty or session is None:
            self.fit_box.setVisible(False)
            return
        ids = [r.slide_id for r in empty]
        fs = self.state.settings.features
        try:
            size = session.largest_region_px(ids)
            sizes = "; ".join(f"{sid}: {session.slide_size_text(sid)}" for sid in ids[:3])
        except Exception as exc:  # the offer is help, not a requirement
            log.warning("no region size to offer: %s", exc)
            return
        k = self.state.settings.prototypes.k
        text = (f"No {fs.region_px}-px region (at {fs.target_mpp:g} µm/px, {fs.region_px * fs.target_mpp / 1000:.2f} mm) "
                f"fits {len(ids)} slide(s): {sizes}.")
        self.fitting_region_px = size if size and size < fs.region_px else None
        if self.fitting_region_px:
            text += f" The largest region size that fits {k} regions (K) on each is {size} px."
            self.fit_button.setText(f"Use {size}-px regions and compute")
            self.fit_button.setVisible(True)
        else:
            text += " Even the smallest region does not fit (or a pixel size is unknown)."
            self.fit_button.setVisible(False)
        self.fit_label.setText(text)
        self.fit_box.setVisible(True)

    def _update_note(self, *_):
        patch_random = not self.patch_checkpoint.text().strip()  # every patch encoder is random without weights
        region_random = not self.region_checkpoint.text().strip() and self.region_encoder.currentText() == "hipt_vit4k"
        which = [n for n, r in (("patch", patch_random), ("region", region_random)) if r]
        if which:
            self.init_note.setText(
                f"⚠ The {' and '.join(which)} encoder{'s are' if len(which) == 2 else ' is'} randomly initialised: "
                "prototypes then reflect colour and texture statistics only. Give a checkpoint for meaningful features."
            )
        else:
            self.init_note.setText("")

    # -- computing -------------------------------------------------------------------------------------
    def compute(self, scope: str = "current", replace_other: bool = False):
        """Extract features of the current slide (``"current"``) or of every slide (``"cohort"``).

        Slides whose features were made with other settings are left alone (the panel offers the choice)
        unless ``replace_other`` or the 'Replace' box; replacing features made with a checkpoint by those
        of a randomly initialised encoder needs a confirmation that says so."""
        from napari_slpd.errors import SlpdError

        session = self.state.require_session()
        self._apply_timer.stop()
        self.apply()
        if scope == "current":
            slide_ids = [self.state.require_current().slide_id]
        elif scope == "cohort":
            slide_ids = session.slide_ids()
        else:
            raise SlpdError(f"scope must be 'current' or 'cohort', not {scope!r}")
        if not slide_ids:
            raise SlpdError("the cohort has no slides")
        replace_other = replace_other or self.overwrite.isChecked()
        kept = []
        if not replace_other:
            other = {st.slide_id for st in self.other_settings_slides()}
            kept = [s for s in slide_ids if s in other]
            slide_ids = [s for s in slide_ids if s not in other]
        replace_checkpoint = False
        if replace_other:
            at_risk = session.checkpoint_features_at_risk(slide_ids)
            if at_risk:
                fs = self.state.settings.features
                which = [n for n, random in (("patch", fs.patch_checkpoint is None),
                                             ("region", fs.region_checkpoint is None and fs.region_encoder == "hipt_vit4k"))
                         if random]
                replace_checkpoint = self.confirm(
                    "Replace checkpoint features?",
                    f"The features of {len(at_risk)} slide(s) ({', '.join(at_risk[:3])}{'…' if len(at_risk) > 3 else ''}) "
                    f"were made with a checkpoint (e.g. a fine-tuned encoder). These settings have no checkpoint "
                    f"for the {' and '.join(which)} encoder: recomputing replaces them with features of a RANDOMLY "
                    "INITIALISED encoder, which carry no learned morphology.\n\nReplace them with random-init "
                    "features?",
                    "Replace with random-init features",
                )
                if not replace_checkpoint:
                    slide_ids = [s for s in slide_ids if s not in set(at_risk)]
                    kept += at_risk
        if not slide_ids:
            self.task_bar.status.setText(
                f"Features: nothing computed; {len(kept)} slide(s) keep their features (made with other settings)")
            return None
        overwrite = bool(replace_other)

        def work(progress, cancel):
            return session.extract(slide_ids, progress=progress, cancel=cancel, overwrite=overwrite,
                                   replace_checkpoint_features=replace_checkpoint)

        self._kept = kept
        what = slide_ids[0] if len(slide_ids) == 1 else f"{len(slide_ids)} slides"
        return self.run_task(
            work,
            f"Features of {what}",
            on_result=self._on_results,
            on_cancelled=lambda: self._on_results(self.task_bar.task.result or [], cancelled=True),
        )

    def _on_results(self, results, cancelled: bool = False) -> None:
        from napari_slpd.widgets._layers import refresh_regions

        self.last_results = list(results)
        counts = Counter(STATUS_WORDS.get(r.status, r.status) for r in results)
        kept = getattr(self, "_kept", [])
        if kept:
            counts["kept (other settings: see above)"] += len(kept)
        parts = [f"{n} {status}" for status, n in sorted(counts.items())]
        summary = ", ".join(parts) if parts else "nothing done"
        problems = [f"{r.slide_id}: {self._gui_words(r)}" for r in results if r.status in ("error", "empty")]
        status = ("Cancelled: " if cancelled else "Features: ") + summary
        if problems:
            status += "\n" + "\n".join(problems[:4]) + ("\n…" if len(problems) > 4 else "")
        self.task_bar.status.setText(status)
        if not cancelled:
            failed = sum(r.status == "error" for r in results)
            done = [r for r in results if r.status not in ("error", "cancelled")]
            if failed and not done:
                self.task_bar.finish("failed", status)
            elif failed:
                self.task_bar.finish("partial", status, label=f"done · {failed} failed")
            elif done and all(r.status == "skipped" for r in done):
                self.task_bar.finish("cached", status)
            else:
                self.task_bar.finish("done", status)
            for problem in problems[:3]:
                show_warning(problem)
            show_info(f"features: {summary}")
        self._offer_fitting_size([r for r in results if r.status == "empty"])
        self.update_choice()
        changed = [r.slide_id for r in results if r.status in ("extracted", "skipped", "empty")]
        current = self.state.current_slide_id
        if current in changed:
            refresh_regions(self.state)
        if changed:
            # One signal: the current slide's id when it is among them (its overlays follow), else "".
            self.state.features_updated.emit(current if current in changed else "")


def _valid(values: dict) -> bool:
    from napari_slpd.errors import SlpdError
    from napari_slpd.session import FeatureSettings

    try:
        FeatureSettings(**values)
    except SlpdError:
        return False
    return True


_PIXEL_FIX = ("in the Cohort panel select it, enter its pixel size and press 'Set pixel size' (or choose 'objective' "
              "or 'level0' for 'Unknown pixel size' in this panel)")


def _gui_words_of(message: str) -> str:
    """The core's message with command-line hints replaced by the controls of the panels."""
    if "pixel size" in message and ("--mpp" in message or "mpp=" in message):
        head = message.split("; give it")[0]
        return f"{head}; {_PIXEL_FIX}"
    if "smaller than one region" in message or "use a smaller region size" in message:
        return message.replace("use a smaller region size", "use a smaller 'Region size' in this panel")
    return message.replace("pass --overwrite (overwrite=True)", "use 'Recompute with these' in this panel")
