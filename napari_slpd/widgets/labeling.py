"""Prototype labeling panel: name and colour the prototypes of the open slide, take ProAlign's zero-shot
names, carry a name to the matched prototypes of similar slides, export the named regions.

Everything it decides lives in the Qt-free core: :mod:`napari_slpd.labeling.names` (names kept in the
cohort, stale-name handling, propagation plans, ProAlign suggestions) and :mod:`napari_slpd.export`
(QuPath GeoJSON, label-map TIFF). This panel shows their results and forwards clicks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QColorDialog,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import guarded, plain_label, plain_tooltip, show_info, show_warning
from napari_slpd.widgets._panels import compact_form, keep_rows_visible, panel_layout

log = logging.getLogger(__name__)

COL_COLOR, COL_NAME, COL_REGIONS, COL_SOURCE, COL_SUGGESTION, COL_ACCEPT = range(6)


class LabelingWidget(SlpdPanel):
    """Name, colour, propagate and export the prototypes of the open slide."""

    OBJECT_NAME = "slpd-labeling"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        from napari_slpd.widgets._layers import ensure_selection_painter

        self.annotations = None
        self.rows = []
        self.suggestions = []
        self.plan = []
        self._filling = False
        self._suggestions_key = None
        self._suggestions_cache = []

        self.title = plain_label("No slide open.", word_wrap=True)  # ids and names: never HTML
        # Names given to prototypes that were recomputed since: say so, offer both ways out.
        self.stale_label = plain_label("", word_wrap=True)
        self.stale_label.setStyleSheet("color: #f0a030;")
        self.carry_button = QPushButton("Carry names over")
        self.carry_button.setToolTip("Give each old name to the new prototype covering the same regions")
        self.carry_button.clicked.connect(guarded("Labeling")(lambda *_: self.carry_over()))
        self.discard_button = QPushButton("Discard")
        self.discard_button.clicked.connect(guarded("Labeling")(lambda *_: self.discard_stale()))
        self.stale_box = QWidget()
        stale_row = QHBoxLayout(self.stale_box)
        stale_row.setContentsMargins(0, 0, 0, 0)
        stale_row.addWidget(self.stale_label, 1)
        stale_row.addWidget(self.carry_button)
        stale_row.addWidget(self.discard_button)
        self.stale_box.setVisible(False)

        self.table = QTableWidget(0, 6)
        self.table.setHorizontalHeaderLabels(["", "Name", "Regions", "Source", "Zero-shot (confidence)", ""])
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Stretch)
        for col in (COL_COLOR, COL_REGIONS, COL_SOURCE, COL_SUGGESTION, COL_ACCEPT):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setToolTip("Double-click a name to rename, a colour to recolour")
        self.table.itemChanged.connect(self._on_item_changed)
        self.table.cellDoubleClicked.connect(self._on_double_click)
        self.table.itemSelectionChanged.connect(self._on_row_selected)

        # -- zero-shot names ----------------------------------------------------------------------------
        self.vlm_edit = QLineEdit()
        self.vlm_edit.setPlaceholderText("conch_v1, plip, quiltnet, biomedclip or an open_clip model name")
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("its folder as published (e.g. CONCH: pytorch_model.bin + tokenizer file)")
        browse_ckpt = QPushButton("…")
        browse_ckpt.setMaximumWidth(28)
        browse_ckpt.clicked.connect(lambda *_: self._browse(self.checkpoint_edit, "Checkpoint"))
        ckpt_row = QHBoxLayout()
        ckpt_row.addWidget(self.checkpoint_edit, 1)
        ckpt_row.addWidget(browse_ckpt)
        self.descriptions_combo = QComboBox()
        self.descriptions_combo.setEditable(True)
        self.descriptions_combo.setToolTip("An organ's prototype descriptions, or a YAML file of your own")
        self._fill_descriptions()
        self.zero_shot_button = QPushButton("Compute zero-shot names")
        self.zero_shot_button.setToolTip("Run ProAlign on this slide (its patch features must come from the model)")
        self.zero_shot_button.clicked.connect(guarded("Zero-shot names")(lambda *_: self.compute_zero_shot()))
        self.accept_all_button = QPushButton("Accept all")
        self.accept_all_button.setToolTip("Take every zero-shot name (names you typed are kept)")
        self.accept_all_button.clicked.connect(guarded("Zero-shot names")(lambda *_: self.accept_suggestion(None)))
        zs_form = compact_form(QFormLayout())
        zs_form.addRow("Model", self.vlm_edit)
        zs_form.addRow("Checkpoint", ckpt_row)
        zs_form.addRow("Descriptions", self.descriptions_combo)
        zs_buttons = QHBoxLayout()
        zs_buttons.addWidget(self.zero_shot_button)
        zs_buttons.addWidget(self.accept_all_button)
        zs_form.addRow(zs_buttons)
        zs_box = QGroupBox("Zero-shot names (ProAlign)")
        zs_box.setLayout(zs_form)

        # -- propagation --------------------------------------------------------------------------------
        self.proto_combo = QComboBox()
        self.neighbours_spin = QSpinBox()
        self.neighbours_spin.setRange(1, 1000)
        self.neighbours_spin.setValue(3)
        self.overwrite_check = QCheckBox("replace names typed by a person")
        self.preview_button = QPushButton("Preview")
        self.preview_button.clicked.connect(guarded("Propagate")(lambda *_: self.preview_propagation()))
        self.apply_button = QPushButton("Apply checked")
        self.apply_button.setEnabled(False)
        self.apply_button.clicked.connect(guarded("Propagate")(lambda *_: self.apply_propagation()))
        self.preview = QTableWidget(0, 4)
        self.preview.setHorizontalHeaderLabels(["Slide", "Prototype", "Change", "Cosine"])
        self.preview.verticalHeader().setVisible(False)
        self.preview.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        pheader = self.preview.horizontalHeader()
        pheader.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        for col in (0, 1, 3):
            pheader.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.preview.setMaximumHeight(150)
        # Short rows: the panel fits its dock (about 420 px) without a horizontal scroll bar.
        prop_row = QHBoxLayout()
        prop_row.addWidget(QLabel("Name of"))
        prop_row.addWidget(self.proto_combo, 1)
        prop_row2 = QHBoxLayout()
        prop_row2.addWidget(QLabel("to the"))
        prop_row2.addWidget(self.neighbours_spin)
        prop_row2.addWidget(QLabel("most similar slides"), 1)
        prop_buttons = QHBoxLayout()
        prop_buttons.addWidget(self.preview_button)
        prop_buttons.addWidget(self.apply_button)
        prop_buttons.addStretch(1)
        prop_layout = QVBoxLayout()
        prop_layout.addLayout(prop_row)
        prop_layout.addLayout(prop_row2)
        prop_layout.addWidget(self.overwrite_check)
        prop_layout.addLayout(prop_buttons)
        prop_layout.addWidget(self.preview)
        prop_box = QGroupBox("Propagate to similar slides")
        prop_box.setLayout(prop_layout)

        # -- export -------------------------------------------------------------------------------------
        self.named_only = QCheckBox("named prototypes only")
        self.geojson_button = QPushButton("GeoJSON (QuPath)…")
        self.geojson_button.clicked.connect(guarded("Export")(lambda *_: self.export_geojson()))
        self.tiff_button = QPushButton("Label map TIFF…")
        self.tiff_button.clicked.connect(guarded("Export")(lambda *_: self.export_tiff()))
        export_row = QHBoxLayout()
        export_row.addWidget(self.geojson_button)
        export_row.addWidget(self.tiff_button)
        export_row.addStretch(1)
        export_layout = QVBoxLayout()
        export_layout.addLayout(export_row)
        export_layout.addWidget(self.named_only)
        export_box = QGroupBox("Export")
        export_box.setLayout(export_layout)

        self.table.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.table.setWordWrap(False)
        keep_rows_visible(self.table)
        self.preview.setMinimumHeight(110)
        layout = panel_layout(self)
        layout.addWidget(self.title)
        layout.addWidget(self.stale_box)
        layout.addWidget(self.table, 1)
        layout.addWidget(zs_box)
        layout.addWidget(prop_box)
        layout.addWidget(export_box)
        layout.addWidget(self.task_bar)

        ensure_selection_painter(self.state)
        self.state.cohort_changed.connect(self._on_cohort_changed)
        # Bound methods (psygnal holds them weakly): the shared state must not keep a closed panel alive.
        self.state.slide_opened.connect(self._on_slide_opened)
        self.state.prototypes_updated.connect(self._on_prototypes_updated)
        if self.state.session is not None:
            self._on_cohort_changed(self.state.session)

    # -- data ------------------------------------------------------------------------------------------
    def _on_cohort_changed(self, session) -> None:
        from napari_slpd.labeling import PrototypeAnnotations

        self.annotations = None
        if session is not None:
            try:
                self.annotations = PrototypeAnnotations.load(session.cohort, session)
            except Exception as exc:  # a damaged names file must not make the panel unusable
                from napari_slpd.widgets._common import show_error

                show_error(exc, "Prototype names")
        self.refresh()

    def _on_slide_opened(self, _slide_id: str) -> None:
        self.refresh()

    def _on_prototypes_updated(self, slide_id: str) -> None:
        if not slide_id or slide_id == self.state.current_slide_id:
            self.refresh()

    def _current(self):
        """(session, slide_id, prototypes) of the open slide, or Nones."""
        session, opened = self.state.session, self.state.current
        if session is None or opened is None or self.annotations is None:
            return session, None, None
        protos = opened.extras.get("prototypes")
        if protos is None or opened.extras.get("color_of") or opened.extras.get("trial_k"):  # names: cohort K
            try:
                protos = session.prototypes(opened.slide_id, compute=False)
            except Exception:  # no prototypes for the current settings yet
                protos = None
        return session, opened.slide_id, protos

    def refresh(self) -> None:
        """Reload names, suggestions and sizes of the open slide; colour its prototype layer."""
        from napari_slpd.labeling import prototype_rows

        session, slide_id, protos = self._current()
        self.plan = []
        self._fill_preview()
        if slide_id is None or protos is None:
            self.rows, self.suggestions = [], []
            self._fill_table()
            self.stale_box.setVisible(False)
            self.title.setText("Open a slide with prototypes to name them." if session else "No cohort open.")
            return
        try:
            self.annotations.reload_if_changed()
        except Exception as exc:  # a damaged file: keep what is shown, say why
            log.warning("prototype names: %s", exc)
        state = self.annotations.state(slide_id, protos)
        self.stale_box.setVisible(state.status == "stale")
        self.stale_label.setText(state.message)
        self.suggestions = self._suggestions_for(session, slide_id, protos)
        self.rows = prototype_rows(self.annotations, slide_id, protos, self.suggestions)
        # The colours every view draws (stored, else the palette, unique within the slide).
        _, colors = self.annotations.styles(slide_id, protos)
        for row in self.rows:
            row.color = colors.get(row.proto_idx, row.color)
        named = sum(r.named for r in self.rows)
        self.title.setText(f"{slide_id}: {len(self.rows)} prototypes, {named} named")
        self._fill_table()

    def _suggestions_for(self, session, slide_id: str, protos) -> list:
        """ProAlign's names for the slide's prototypes, read again only when either file changed."""
        from napari_slpd.labeling import prototype_identity
        from napari_slpd.proalign.suggestions import load_suggestions

        path = session.cohort.proalign_path(slide_id)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return []
        key = (slide_id, stamp, prototype_identity(protos.centroids))
        if key != self._suggestions_key:
            try:
                self._suggestions_cache = load_suggestions(session, slide_id)
            except Exception as exc:  # computed on other features, or unreadable: no suggestions
                log.info("no zero-shot names for %s: %s", slide_id, exc)
                self._suggestions_cache = []
            self._suggestions_key = key
        return list(self._suggestions_cache)

    def _apply_style(self) -> None:
        """Names or colours were stored: every view of the slide draws them again (the layer, the legend,
        hover; a neighbour keeps the colours of the query prototypes it was matched to)."""
        self.state.restyle_prototypes()

    def _fill_table(self) -> None:
        self._filling = True
        try:
            self.table.setRowCount(len(self.rows))
            for i, row in enumerate(self.rows):
                swatch = QTableWidgetItem()
                swatch.setBackground(QColor(row.color))
                swatch.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                swatch.setToolTip(f"{row.color} (double-click to change)")
                self.table.setItem(i, COL_COLOR, swatch)
                name = QTableWidgetItem(row.name)
                name.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEditable)
                if not row.named:
                    name.setForeground(QColor("#909090"))
                self.table.setItem(i, COL_NAME, name)
                regions = QTableWidgetItem(f"{row.regions} ({100 * row.share:.0f}%)")
                regions.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                self.table.setItem(i, COL_REGIONS, regions)
                source = row.source + (f" {row.confidence:.2f}" if row.confidence is not None else "")
                src = QTableWidgetItem(source)
                src.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                self.table.setItem(i, COL_SOURCE, src)
                sug = QTableWidgetItem(row.suggestion_text)
                sug.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable)
                if row.suggestion is not None and row.suggestion.runner_up:
                    sug.setToolTip(plain_tooltip(f"share {row.suggestion.share:.0%} of its patches, mean confidence "
                                                 f"{row.suggestion.mean_confidence:.2f}; next: {row.suggestion.runner_up}"))
                self.table.setItem(i, COL_SUGGESTION, sug)
                if row.suggestion is not None and row.suggestion.name != row.name:
                    button = QPushButton("Accept")
                    button.clicked.connect(guarded("Zero-shot names")(
                        lambda _=False, k=row.proto_idx: self.accept_suggestion(k)))
                    self.table.setCellWidget(i, COL_ACCEPT, button)
                else:
                    self.table.removeCellWidget(i, COL_ACCEPT)
                    self.table.setItem(i, COL_ACCEPT, QTableWidgetItem(""))
            self.accept_all_button.setEnabled(bool(self.suggestions))
            current = self.proto_combo.currentIndex()
            self.proto_combo.clear()
            for row in self.rows:
                self.proto_combo.addItem(f"{row.proto_idx}: {row.name}", row.proto_idx)
            if 0 <= current < self.proto_combo.count():
                self.proto_combo.setCurrentIndex(current)
        finally:
            self._filling = False

    # -- names and colours -----------------------------------------------------------------------------
    def _require(self):
        from napari_slpd.errors import SlpdError

        session, slide_id, protos = self._current()
        if session is None:
            raise SlpdError("no cohort is open; choose a cohort folder in the Cohort panel first")
        if slide_id is None:
            raise SlpdError("no slide is open; open one from the Cohort panel first")
        if protos is None:
            raise SlpdError(f"{slide_id} has no prototypes for the current settings; compute them in the "
                            "Prototypes panel first")
        return session, slide_id, protos

    def _on_item_changed(self, item) -> None:
        if self._filling or item.column() != COL_NAME:
            return
        k = self.rows[item.row()].proto_idx
        text = item.text().strip()
        # Rebuilding the table inside its own itemChanged signal would delete the item being edited.
        QTimer.singleShot(0, lambda: self._commit_name(k, text))

    def _commit_name(self, k: int, text: str) -> None:
        guarded("Rename")(self.rename)(k, text)
        if k < len(self.rows) and self.rows[k].name != text:
            self.refresh()  # the rename was refused: show the stored name again

    def rename(self, k: int, name: str) -> None:
        _, slide_id, _ = self._require()
        if name == self.rows[k].name:
            return
        self.annotations.rename(slide_id, k, name)
        self.refresh()
        self._apply_style()

    def set_color(self, k: int, color) -> None:
        from napari_slpd.errors import SlpdError
        from napari_slpd.labeling import normalize_color

        _, slide_id, _ = self._require()
        wanted = normalize_color(color)
        taken = [r for r in self.rows if r.proto_idx != k and normalize_color(r.color) == wanted]
        if taken:
            raise SlpdError(f"{wanted} is already the colour of '{taken[0].name}' on {slide_id}; choose another "
                            "(each prototype of a slide keeps its own colour)")
        self.annotations.recolor(slide_id, k, color)
        self.refresh()
        self._apply_style()

    def _on_double_click(self, row: int, col: int) -> None:
        if col != COL_COLOR or row >= len(self.rows):
            return
        chosen = QColorDialog.getColor(QColor(self.rows[row].color), self, f"Colour of {self.rows[row].name}")
        if chosen.isValid():
            guarded("Recolour")(self.set_color)(self.rows[row].proto_idx, chosen.name())

    def _on_row_selected(self) -> None:
        rows = sorted({i.row() for i in self.table.selectedItems()})
        if rows and rows[0] < self.proto_combo.count():
            self.proto_combo.setCurrentIndex(rows[0])

    # -- stale names -----------------------------------------------------------------------------------
    def carry_over(self) -> None:
        _, slide_id, protos = self._require()
        plan = self.annotations.plan_carry_over(slide_id)
        report = self.annotations.carry_over()
        dropped = [c.reason for c in plan if c.action == "skip"]
        show_info(f"{slide_id}: {report.get(slide_id, 'nothing to carry over')}"
                  + (f" ({'; '.join(dropped)})" if dropped else ""))
        self.refresh()
        self._apply_style()

    def discard_stale(self) -> None:
        _, slide_id, _ = self._require()
        self.annotations.discard_stale(slide_id)
        self.refresh()
        self._apply_style()

    # -- zero-shot names -------------------------------------------------------------------------------
    def _fill_descriptions(self) -> None:
        try:
            from napari_slpd.proalign import available_descriptions

            for organ in sorted(available_descriptions()):
                self.descriptions_combo.addItem(organ)
        except Exception as exc:  # descriptions folder unreadable: a path can still be typed
            log.warning("cannot list prototype descriptions: %s", exc)

    def _browse(self, edit: QLineEdit, what: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, what, edit.text() or str(Path.home()))
        if path:
            edit.setText(path)

    def compute_zero_shot(self):
        """Run ProAlign on the open slide with the model and descriptions of the form (in a worker)."""
        from napari_slpd.errors import SlpdError

        session, slide_id, _ = self._require()
        model = self.vlm_edit.text().strip()
        checkpoint = self.checkpoint_edit.text().strip()
        descriptions = self.descriptions_combo.currentText().strip()
        if not model or not checkpoint:
            raise SlpdError("give the vision-language model (open_clip name) and its local checkpoint")
        if not descriptions:
            raise SlpdError("choose prototype descriptions (an organ, or a YAML file)")
        device = session.settings.features.device

        def work(progress, cancel):
            from napari_slpd.proalign import VisionLanguageModel, load_descriptions, run_proalign

            vlm = VisionLanguageModel.load(model, checkpoint, device=device)
            outcomes = run_proalign(session.cohort, vlm, load_descriptions(descriptions), slide_ids=[slide_id],
                                    progress=progress, cancel=cancel)
            return outcomes[0]

        def done(outcome):
            if outcome.status == "failed":
                show_warning(f"{slide_id}: {outcome.message}")
            self.refresh()
            status = f"Zero-shot names of {slide_id}: {outcome.status} {outcome.message}".strip()
            self.task_bar.finish("failed" if outcome.status == "failed" else
                                 ("cached" if outcome.status in ("skipped", "current", "cached") else "done"), status)

        return self.run_task(work, f"Zero-shot names of {slide_id}", on_result=done)

    def accept_suggestion(self, k: int | None) -> None:
        """Take ProAlign's name of prototype ``k`` (None: all, keeping names a person typed)."""
        from napari_slpd.labeling import accept_suggestions
        from napari_slpd.errors import SlpdError

        _, slide_id, _ = self._require()
        chosen = [s for s in self.suggestions if k is None or s.proto_idx == k]
        if not chosen:
            raise SlpdError("no zero-shot name to accept; compute zero-shot names first")
        accepted = accept_suggestions(self.annotations, slide_id, chosen, keep_user_names=k is None)
        self.refresh()
        self._apply_style()
        self.task_bar.status.setText(f"{len(accepted)} zero-shot name(s) accepted")

    # -- propagation -----------------------------------------------------------------------------------
    def preview_propagation(self):
        """Plan (in a worker: it may build the similar-slides index) and show what propagating would change."""
        from napari_slpd.labeling import plan_propagation

        session, slide_id, _ = self._require()
        k = self.proto_combo.currentData()
        if k is None:
            k = 0
        row = self.rows[int(k)]
        name, color, n = row.name, row.color, self.neighbours_spin.value()
        overwrite = self.overwrite_check.isChecked()
        annotations = self.annotations

        def work(progress, cancel):
            matches = session.similar_slides(slide_id, top_k=n)
            targets = [m.slide_id for m in matches]
            return plan_propagation(session, slide_id, int(k), name, targets, color=color, annotations=annotations,
                                    overwrite_user=overwrite)

        def done(plan):
            self.plan = plan
            self._fill_preview()
            n_set = sum(c.action == "set" for c in plan)
            self.task_bar.status.setText(f"'{name}': {n_set} of {len(plan)} similar slides would change")

        return self.run_task(work, f"Propagation preview of '{name}'", on_result=done)

    def _fill_preview(self) -> None:
        self.preview.setRowCount(len(self.plan))
        for i, change in enumerate(self.plan):
            slide = QTableWidgetItem(change.slide_id)
            if change.action == "set":
                slide.setFlags(slide.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                slide.setCheckState(Qt.CheckState.Checked)
            else:
                slide.setFlags(slide.flags() & ~Qt.ItemFlag.ItemIsUserCheckable)
                slide.setForeground(QColor("#909090"))
            self.preview.setItem(i, 0, slide)
            self.preview.setItem(i, 1, QTableWidgetItem(str(change.proto_idx) if change.proto_idx >= 0 else "–"))
            text = change.describe().split(": ", 1)[-1]
            item = QTableWidgetItem(text)
            item.setToolTip(change.reason or text)
            self.preview.setItem(i, 2, item)
            self.preview.setItem(i, 3, QTableWidgetItem("" if change.similarity is None else f"{change.similarity:.3f}"))
        self.apply_button.setEnabled(any(c.action == "set" for c in self.plan))

    def checked_changes(self) -> list:
        checked = []
        for i, change in enumerate(self.plan):
            item = self.preview.item(i, 0)
            if change.action == "set" and item is not None and item.checkState() == Qt.CheckState.Checked:
                checked.append(change)
        return checked

    def apply_propagation(self) -> None:
        from napari_slpd.errors import SlpdError

        self._require()
        changes = self.checked_changes()
        if not changes:
            raise SlpdError("no change is checked in the preview")
        applied = self.annotations.apply(changes)
        show_info(f"name given to {len(applied)} prototype(s) of similar slides")
        self.plan = []
        self.refresh()
        self._apply_style()
        self.task_bar.status.setText(f"propagated to {', '.join(c.slide_id for c in applied)}")

    # -- export ----------------------------------------------------------------------------------------
    def _save_path(self, caption: str, suffix: str, filters: str) -> str | None:
        _, slide_id, _ = self._require()
        start = str(Path(self.state.session.root) / f"{slide_id}{suffix}")
        path, _ = QFileDialog.getSaveFileName(self, caption, start, filters)
        return path or None

    def export_geojson(self, path: str | None = None):
        """Write the open slide's prototype regions as QuPath GeoJSON (asks for a path when none is given)."""
        from napari_slpd.export import export_slide_prototypes

        session, slide_id, _ = self._require()
        path = path or self._save_path("Export prototype regions", ".geojson", "GeoJSON (*.geojson *.json)")
        if not path:
            return None
        result = export_slide_prototypes(session, slide_id, geojson_path=path, annotations=self.annotations,
                                         named_only=self.named_only.isChecked())
        self.task_bar.status.setText(f"{result.n_features} classes written to {result.geojson}")
        return result

    def export_tiff(self, path: str | None = None):
        """Write the open slide's label map as a palette TIFF (one pixel per region)."""
        from napari_slpd.export import export_slide_prototypes

        session, slide_id, _ = self._require()
        path = path or self._save_path("Export label map", "_prototypes.tif", "TIFF (*.tif *.tiff)")
        if not path:
            return None
        result = export_slide_prototypes(session, slide_id, tiff_path=path, annotations=self.annotations,
                                         named_only=self.named_only.isChecked())
        self.task_bar.status.setText(f"label map written to {result.tiff}")
        return result
