"""Prototypes panel: K, (re)compute, the prototype map on the slide and a legend of prototype sizes.

K (and the seed) belong to the cohort: changing them makes every slide's cached prototypes stale. Once
prototypes are cached, another K in the form is *tried on the open slide only* (computed, shown, not
saved) until "Apply to all slides" makes it the cohort's K; the panel says which is which.

The map is a Labels layer aligned with the slide (see ``_layers.show_prototypes``): one colour per
prototype; hovering a region shows its prototype and its distance to that prototype both in napari's
status bar and in this panel. Clicking a legend row selects that prototype's regions.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
)

from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import guarded, plain_label, show_warning
from napari_slpd.widgets._panels import keep_rows_visible, panel_layout
from napari_slpd.widgets.state import ROLE_PROTOTYPES


class PrototypesWidget(SlpdPanel):
    """Compute the intra-slide prototypes (K-means of region embeddings) and show them."""

    OBJECT_NAME = "slpd-prototypes"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        ps = self.state.settings.prototypes

        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 32)
        self.k_spin.setValue(int(ps.k))
        self.k_spin.setToolTip("Number of prototypes per slide (SLPD: 4 for NSCLC, 2 for BRCA)")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setValue(int(ps.seed))
        self.auto = QCheckBox("Show automatically")
        self.auto.setChecked(True)
        self.auto.setToolTip("Compute and show the prototypes as soon as a slide with features is open")
        self.compute_button = QPushButton("Compute")
        self.compute_button.clicked.connect(guarded("Prototypes")(lambda: self.compute(all_slides=False)))
        self.compute_all_button = QPushButton("All slides")
        self.compute_all_button.setToolTip("Compute the prototypes of every slide that has features")
        # Shown while the form's K/seed differ from the cohort's (see the module docstring).
        self.trial_note = plain_label("", word_wrap=True)
        self.trial_note.setStyleSheet("color: #f0a030;")
        self.trial_note.setVisible(False)
        self.compute_all_button.clicked.connect(guarded("Prototypes")(lambda: self.compute(all_slides=True)))
        row = QHBoxLayout()
        row.addWidget(QLabel("K"))
        row.addWidget(self.k_spin)
        row.addWidget(QLabel("seed"))
        row.addWidget(self.seed_spin)
        row.addStretch(1)
        row2 = QHBoxLayout()
        row2.addWidget(self.compute_button)
        row2.addWidget(self.compute_all_button)
        row2.addWidget(self.auto)

        self.legend = QTableWidget(0, 4)
        self.legend.setHorizontalHeaderLabels(["", "Prototype", "Regions", "Share"])
        self.legend.verticalHeader().setVisible(False)
        self.legend.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.legend.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        header = self.legend.horizontalHeader()
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        for col in (0, 2, 3):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.legend.itemSelectionChanged.connect(self._legend_selection)
        self.legend.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.legend.setWordWrap(False)
        keep_rows_visible(self.legend, 4)
        self.hover = plain_label("Hover a region to see its prototype.", word_wrap=True)  # names: never HTML
        self.title = plain_label("No slide open.", word_wrap=True)

        layout = panel_layout(self)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addWidget(self.trial_note)
        layout.addWidget(self.title)
        layout.addWidget(self.legend, 1)
        layout.addWidget(self.hover)
        layout.addWidget(self.task_bar)

        self.k_spin.valueChanged.connect(self._settings_from_form)
        self.seed_spin.valueChanged.connect(self._settings_from_form)
        self.state.cohort_changed.connect(self._on_cohort_changed)  # a bound method: psygnal holds it weakly
        self.state.slide_opened.connect(self._on_slide_opened)
        self.state.features_updated.connect(self._on_features_updated)
        self.state.prototype_style_changed.connect(lambda _sid: self.update_legend())
        self.state.prototypes_updated.connect(self._on_prototypes_updated)
        self.state.settings_changed.connect(self._on_settings_changed)
        self._hover_cb = self._on_mouse_move
        napari_viewer.mouse_move_callbacks.append(self._hover_cb)
        self.destroyed.connect(lambda *_: self._disconnect_viewer())
        if self.state.current is not None:
            self._on_slide_opened(self.state.current.slide_id)

    def _disconnect_viewer(self) -> None:
        try:
            self.viewer.mouse_move_callbacks.remove(self._hover_cb)
        except (ValueError, RuntimeError, AttributeError):
            pass

    # -- settings --------------------------------------------------------------------------------------
    def _form_settings(self):
        from dataclasses import replace

        return replace(self.state.settings.prototypes, k=self.k_spin.value(), seed=self.seed_spin.value())

    def form_differs(self) -> bool:
        """Whether the form's K/seed are not the cohort's (they are then tried on the open slide only)."""
        return self._form_settings() != self.state.settings.prototypes

    def _settings_from_form(self, *_):
        """The form's K/seed become the cohort's at once while nothing would go stale (no cohort, or no
        prototypes cached yet); otherwise they wait for 'Apply to all slides'."""
        new = self._form_settings()
        if new != self.state.settings.prototypes:
            session = self.state.session
            if session is None or not session.has_cached_prototypes():
                self.state.update_settings(prototypes=new)
        self._update_trial_note()

    def apply_to_cohort(self) -> bool:
        """Make the form's K/seed the cohort's (every slide's cached prototypes become stale); False when
        they already are."""
        new = self._form_settings()
        if new == self.state.settings.prototypes:
            return False
        self.state.update_settings(prototypes=new)
        self._update_trial_note()
        return True

    def _on_cohort_changed(self, _session) -> None:
        self._update_trial_note()

    def _update_trial_note(self) -> None:
        ps = self.state.settings.prototypes
        differs = self.form_differs()
        self.compute_all_button.setText("Apply to all slides" if differs else "All slides")
        self.compute_all_button.setToolTip(
            f"Make K={self.k_spin.value()} (seed {self.seed_spin.value()}) the cohort's and compute every slide's "
            f"prototypes with it (those cached for K={ps.k} are replaced)" if differs
            else "Compute the prototypes of every slide that has features")
        if differs:
            self.trial_note.setText(
                f"K={self.k_spin.value()}, seed {self.seed_spin.value()}: tried on the open slide only (not saved). "
                f"The cohort keeps K={ps.k}, seed {ps.seed}, and its slides' prototypes; 'Apply to all slides' "
                "changes that.")
        self.trial_note.setVisible(differs)

    def _on_settings_changed(self, settings) -> None:
        ps = settings.prototypes
        for spin, value in ((self.k_spin, ps.k), (self.seed_spin, ps.seed)):
            if spin.value() != int(value):
                spin.blockSignals(True)
                spin.setValue(int(value))
                spin.blockSignals(False)
        self._update_trial_note()

    # -- reacting to the slide -------------------------------------------------------------------------
    def _on_slide_opened(self, slide_id: str) -> None:
        self.title.setText(f"{slide_id}")
        self.update_legend()
        # Whoever opened the slide may still draw its prototypes (e.g. coloured by a match): look after
        # the current event, and compute only when nothing was drawn.
        QTimer.singleShot(0, lambda: self._auto_show(slide_id))

    def _auto_show(self, slide_id: str) -> None:
        opened = self.state.current
        if opened is None or opened.slide_id != slide_id:
            return
        self.update_legend()
        if opened.regions is not None and "prototypes" not in opened.extras and self.auto.isChecked():
            guarded("Prototypes")(self.compute)(False)

    def _on_features_updated(self, slide_id: str) -> None:
        opened = self.state.current
        if opened is None or slide_id != opened.slide_id or opened.regions is None:
            return
        if self.auto.isChecked():
            guarded("Prototypes")(self.compute)(False)

    def _on_prototypes_updated(self, slide_id: str) -> None:
        if slide_id in ("", self.state.current_slide_id):
            self.update_legend()

    # -- computing -------------------------------------------------------------------------------------
    def compute(self, all_slides: bool = False):
        """Compute (or load from the cache) the prototypes of the current slide, or of every slide."""
        from napari_slpd.errors import SlpdError

        session = self.state.require_session()
        self._settings_from_form()
        if all_slides:
            self.apply_to_cohort()  # the button says so while the form differs
            slide_ids = session.slides_with_features()
            if not slide_ids:
                raise SlpdError("no slide has features yet; compute them in the Features panel first")
        else:
            opened = self.state.require_current()
            if opened.regions is None:
                raise SlpdError(f"{opened.slide_id} has no features yet; compute them in the Features panel first")
            if not len(opened.regions):
                fs = self.state.settings.features
                raise SlpdError(
                    f"no {fs.region_px}-px region fits {opened.slide_id} ({session.slide_size_text(opened.slide_id)}); "
                    "choose a smaller region size in the Features panel (it offers the largest that fits)")
            slide_ids = [opened.slide_id]
            if self.form_differs():
                return self._compute_trial(session, opened.slide_id)
        current = self.state.current_slide_id

        def work(progress, cancel):
            cached = all(session.prototypes_current(s) for s in slide_ids)
            outcome = session.ensure_prototypes(slide_ids, progress=progress, cancel=cancel)
            protos = None
            if current in slide_ids and outcome.get(current) == "ok":
                protos = session.prototypes(current, compute=False)
            return outcome, protos, cached

        what = slide_ids[0] if len(slide_ids) == 1 else f"{len(slide_ids)} slides"
        return self.run_task(work, f"Prototypes of {what} (K={self.k_spin.value()})", on_result=self._on_computed)

    def _compute_trial(self, session, slide_id: str):
        """The open slide's prototypes for the form's K/seed, shown but not cached (the cohort unchanged)."""
        k, seed, cohort_k = self.k_spin.value(), self.seed_spin.value(), self.state.settings.prototypes.k

        def work(progress, cancel):
            progress(0, 1)
            protos = session.trial_prototypes(slide_id, k, seed)
            progress(1, 1)
            return protos

        def done(protos):
            from napari_slpd.widgets._layers import show_prototypes

            opened = self.state.current
            if opened is None or opened.slide_id != slide_id:
                self.task_bar.finish("done", f"K={k} on {slide_id}: computed, not shown ({slide_id} was closed)")
                return
            show_prototypes(self.state, protos)
            opened.extras["trial_k"] = k
            self.update_legend()
            self.task_bar.finish("done", f"K={k} tried on {slide_id} only (not saved); the cohort keeps K={cohort_k}")

        return self.run_task(work, f"Prototypes of {slide_id} (K={k}, this slide only)", on_result=done)

    def _on_computed(self, result) -> None:
        from napari_slpd.widgets._layers import show_prototypes

        outcome, protos, cached = result
        failed = {sid: msg for sid, msg in outcome.items() if msg != "ok"}
        for sid, msg in list(failed.items())[:5]:
            show_warning(f"{sid}: {msg}")
        opened = self.state.current
        if protos is not None and opened is not None and opened.slide_id in outcome:
            show_prototypes(self.state, protos)
            layer = self.state.layer(ROLE_PROTOTYPES)
            if layer is not None:
                self.viewer.layers.selection.active = layer  # so the status bar shows the hovered region
        self.update_legend()
        ok = len(outcome) - len(failed)
        status = f"Prototypes: {ok} slide(s) " + ("from the cache" if cached and ok else "done")
        if failed:
            status += f", {len(failed)} without: " + "; ".join(f"{sid}: {msg}" for sid, msg in list(failed.items())[:3])
        if failed and not ok:
            self.task_bar.finish("failed", status)
        elif failed:
            self.task_bar.finish("partial", status, label=f"done · {len(failed)} failed")
        else:
            self.task_bar.finish("cached" if cached else "done", status)
        self.state.prototypes_updated.emit(opened.slide_id if opened is not None and opened.slide_id in outcome else "")

    # -- legend ----------------------------------------------------------------------------------------
    def update_legend(self) -> None:
        opened = self.state.current
        protos = opened.extras.get("prototypes") if opened is not None else None
        self.legend.setRowCount(0)
        if protos is None:
            return
        sizes = _region_counts(protos)
        color_of = opened.extras.get("color_of") or {}
        total = max(1, int(sizes.sum()))
        self.legend.setRowCount(len(sizes))
        query_names = self._query_names(opened) if color_of else {}
        for k, size in enumerate(sizes):
            r, g, b, _ = self.state.prototype_color(k)
            swatch = QTableWidgetItem()
            swatch.setBackground(QColor.fromRgbF(r, g, b))
            swatch.setData(Qt.ItemDataRole.UserRole, k)
            swatch.setToolTip(self.state.prototype_hex(k))
            self.legend.setItem(k, 0, swatch)
            label = self.state.prototype_name(k)
            tip = f"prototype {k} of {opened.slide_id}: {label}"
            if k in color_of:
                q = color_of[k]
                label += f"  (≙ {query_names.get(q, f'query {q}')})"
                tip += f"; matched to '{query_names.get(q, q)}' of {opened.extras.get('query_slide') or 'the query'}"
            item = QTableWidgetItem(label)
            item.setToolTip(tip)
            self.legend.setItem(k, 1, item)
            count = QTableWidgetItem(str(int(size)))
            count.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.legend.setItem(k, 2, count)
            share = QTableWidgetItem(f"{100 * size / total:.0f}%")
            share.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.legend.setItem(k, 3, share)
        title = f"{opened.slide_id}: {len(sizes)} prototypes over {total} regions"
        if opened.extras.get("trial_k"):
            title += f" (K={opened.extras['trial_k']} on this slide only; the cohort's K is " \
                     f"{self.state.settings.prototypes.k})"
        self.title.setText(title)

    def _query_names(self, opened) -> dict[int, str]:
        query = opened.extras.get("query_slide")
        if not query or self.state.session is None:
            return {}
        try:
            names, _ = self.state.session.prototype_styles(query)
        except Exception:  # the query's prototypes are gone: the indices say enough
            return {}
        return names

    def legend_rows(self) -> list[tuple[str, int]]:
        """(name, size) of each legend row, for tests and scripts."""
        return [(self.legend.item(r, 1).text(), int(self.legend.item(r, 2).text())) for r in range(self.legend.rowCount())]

    def _legend_selection(self) -> None:
        opened = self.state.current
        protos = opened.extras.get("prototypes") if opened is not None else None
        rows = sorted({i.row() for i in self.legend.selectedItems()})
        if protos is None or not rows:
            return
        regions = np.flatnonzero(np.isin(np.asarray(protos.assignments), rows))
        self.state.select_regions(opened.slide_id, regions, source="prototype")

    # -- hover -----------------------------------------------------------------------------------------
    def describe_position(self, world_position) -> str:
        """What the panel says about the region under a world position ('' outside regions)."""
        from napari_slpd.widgets._layers import region_at_world

        opened = self.state.current
        region = region_at_world(self.state, world_position)
        if opened is None or region is None:
            return ""
        protos = opened.extras.get("prototypes")
        if protos is None:
            return f"region {region}"
        k = int(np.asarray(protos.assignments)[region])
        distance = 1.0 - float(np.asarray(protos.similarity)[region])
        return f"region {region} · {self.state.prototype_name(k)} · distance to prototype {distance:.3f}"

    def _on_mouse_move(self, viewer, event) -> None:
        try:
            text = self.describe_position(event.position)
        except Exception:  # hovering must never raise into napari's event loop
            return
        if text:
            self.hover.setText(text)


def _region_counts(protos) -> np.ndarray:
    """Regions per prototype ([K] int), whether ``sizes`` holds counts or fractions."""
    if hasattr(protos, "counts"):
        return np.asarray(protos.counts(), dtype=np.int64)
    k = int(np.asarray(protos.centroids).shape[0])
    return np.bincount(np.asarray(protos.assignments, dtype=np.int64), minlength=k)
