"""Features panel: encoders, checkpoints, device and region settings; extract for one slide or the cohort.

Extraction runs in a worker with progress and Cancel. Slides whose features are already cached with the
same settings are skipped at once; a cancelled slide keeps its finished chunks in ``<id>.h5.partial``
(resumed by the next run) and never gets a final-named file until it is complete.
"""

from __future__ import annotations

from collections import Counter

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
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.widgets._common import TaskBar, guarded, show_info, show_warning
from napari_slpd.widgets.state import SlpdState

PATCH_ENCODERS = ("hipt_vit256", "timm:vit_large_patch16_224", "open_clip:ViT-B-16")
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


class FeaturesWidget(QWidget):
    """Choose how regions are encoded and compute their features."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.state = SlpdState.for_viewer(napari_viewer)
        self.setObjectName("slpd-features")
        fs = self.state.settings.features

        self.patch_encoder = QComboBox()
        self.patch_encoder.setEditable(True)
        self.patch_encoder.addItems(PATCH_ENCODERS)
        self.patch_encoder.setToolTip("hipt_vit256, timm:<model name> or open_clip:<model name>")
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
        self.device.addItems(["auto", "cuda", "cpu"])
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
        self.mpp_fallback.addItems(["none", "objective", "level0"])
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
        self.current_button = QPushButton("Compute for current slide")
        self.current_button.clicked.connect(guarded("Features")(lambda: self.compute("current")))
        self.cohort_button = QPushButton("Compute for whole cohort")
        self.cohort_button.clicked.connect(guarded("Features")(lambda: self.compute("cohort")))
        buttons = QHBoxLayout()
        buttons.addWidget(self.current_button)
        buttons.addWidget(self.cohort_button)
        self.task_bar = TaskBar()
        self.last_results: list = []

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.init_note)
        layout.addLayout(buttons)
        layout.addWidget(self.task_bar)
        layout.addStretch(1)

        self.load_settings(fs)
        for edit in (self.patch_checkpoint, self.region_checkpoint):
            edit.textChanged.connect(self._update_note)
        self.patch_encoder.currentTextChanged.connect(self._update_note)
        self.region_encoder.currentTextChanged.connect(self._update_note)
        self.state.settings_changed.connect(self._on_settings_changed)

    # -- settings <-> form -----------------------------------------------------------------------------
    def load_settings(self, fs) -> None:
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
        # Only a change of the feature settings made elsewhere (e.g. a fine-tuned checkpoint) reloads the
        # form; other settings changing must not discard what the user is typing here.
        if settings.features != self._shown:
            self.load_settings(settings.features)

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
        """Validate the form and make it the shared feature settings."""
        settings = self.form_settings()
        self._shown = settings
        if settings != self.state.settings.features:
            self.state.update_settings(features=settings)
        return settings

    def _update_note(self, *_):
        patch_random = not self.patch_checkpoint.text().strip() and self.patch_encoder.currentText() == "hipt_vit256"
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
    def compute(self, scope: str = "current"):
        """Extract features of the current slide (``"current"``) or of every slide (``"cohort"``)."""
        from napari_slpd.errors import SlpdError

        session = self.state.require_session()
        self.apply()
        if scope == "current":
            slide_ids = [self.state.require_current().slide_id]
        elif scope == "cohort":
            slide_ids = session.slide_ids()
        else:
            raise SlpdError(f"scope must be 'current' or 'cohort', not {scope!r}")
        if not slide_ids:
            raise SlpdError("the cohort has no slides")

        def work(progress, cancel):
            return session.extract(slide_ids, progress=progress, cancel=cancel)

        what = slide_ids[0] if len(slide_ids) == 1 else f"{len(slide_ids)} slides"
        return self.task_bar.run(
            work,
            f"Features of {what}",
            on_result=self._on_results,
            on_cancelled=lambda: self._on_results(self.task_bar.task.result or [], cancelled=True),
        )

    def _on_results(self, results, cancelled: bool = False) -> None:
        from napari_slpd.widgets._layers import refresh_regions

        self.last_results = list(results)
        counts = Counter(STATUS_WORDS.get(r.status, r.status) for r in results)
        parts = [f"{n} {status}" for status, n in sorted(counts.items())]
        summary = ", ".join(parts) if parts else "nothing done"
        self.task_bar.status.setText(("Cancelled: " if cancelled else "Features: ") + summary)
        for r in results:
            if r.status in ("error", "empty"):
                hint = ""
                if "other settings" in r.message and not self.overwrite.isChecked():
                    hint = " (in this panel: tick 'Replace features made with other settings')"
                show_warning(f"{r.slide_id}: {r.message}{hint}")
        if not cancelled:
            show_info(f"features: {summary}")
        changed = [r.slide_id for r in results if r.status in ("extracted", "skipped")]
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
