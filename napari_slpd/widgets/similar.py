"""Similar slides panel: click a region (or ask for the whole slide) and list the nearest slides or regions.

Slide mode ranks the cohort's slides by prototype set distance K - S (SPEC section 2) to the current
slide and lists, per neighbour, the matched prototype pairs. With a clicked region the query prototype
is that region's prototype, and opening a neighbour outlines its regions of the matched prototype (for a
whole-slide query, those of the most similar matched pair).
Region mode lists the regions across the cohort nearest (cosine) to the clicked region. Double-clicking a
row opens that slide with its prototypes, coloured like the query's prototypes they were matched to,
and outlines the matched regions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.widgets._common import TaskBar, guarded, show_warning
from napari_slpd.widgets.cohort import array_to_pixmap
from napari_slpd.widgets.state import SlpdState

log = logging.getLogger(__name__)

MODE_SLIDES = "Similar slides"
MODE_REGIONS = "Similar regions"
THUMB_PX = 72


@dataclass
class Query:
    """What was asked: a slide, optionally one of its regions, and the mode."""

    slide_id: str
    mode: str
    region: int | None = None
    prototype: int | None = None  # the clicked region's prototype (slide mode)
    results: list = field(default_factory=list)
    thumbnails: dict = field(default_factory=dict)


class SimilarSlidesWidget(QWidget):
    """Query the cohort with the current slide or a clicked region."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.state = SlpdState.for_viewer(napari_viewer)
        self.setObjectName("slpd-similar")

        self.mode = QComboBox()
        self.mode.addItems([MODE_SLIDES, MODE_REGIONS])
        self.top_k = QSpinBox()
        self.top_k.setRange(1, 500)
        self.top_k.setValue(int(self.state.settings.top_k))
        self.click_to_query = QCheckBox("Click a region to query")
        self.click_to_query.setChecked(True)
        self.click_to_query.setToolTip("A click (without dragging) on the slide queries the region under it")
        self.whole_button = QPushButton("Whole slide")
        self.whole_button.setToolTip("Rank the cohort's slides by prototype set distance to the current slide")
        self.whole_button.clicked.connect(guarded("Similar slides")(self.query_whole_slide))
        self.back_button = QPushButton("Back to query slide")
        self.back_button.setEnabled(False)
        self.back_button.clicked.connect(guarded("Open slide")(self.back_to_query))
        row = QHBoxLayout()
        row.addWidget(self.mode)
        row.addWidget(QLabel("top"))
        row.addWidget(self.top_k)
        row2 = QHBoxLayout()
        row2.addWidget(self.click_to_query)
        row2.addStretch(1)
        row2.addWidget(self.whole_button)

        self.title = QLabel("Open a slide, then click a region or press 'Whole slide'.")
        self.title.setWordWrap(True)
        self.table = QTableWidget(0, 4)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.table.verticalHeader().setDefaultSectionSize(THUMB_PX + 4)
        self.table.cellDoubleClicked.connect(lambda row, _c: guarded("Open neighbour")(self.open_result)(row))
        self.task_bar = TaskBar()

        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addWidget(self.title)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.back_button)
        layout.addWidget(self.task_bar)

        self.query: Query | None = None
        self._opening_result = False
        self.top_k.valueChanged.connect(lambda v: setattr(self.state.settings, "top_k", int(v)))
        self.state.cohort_changed.connect(lambda _s: self._clear())
        self.state.slide_opened.connect(self._on_slide_opened)
        self._click_cb = self._on_mouse_drag
        napari_viewer.mouse_drag_callbacks.append(self._click_cb)
        self.destroyed.connect(lambda *_: self._disconnect_viewer())

    def _disconnect_viewer(self) -> None:
        try:
            self.viewer.mouse_drag_callbacks.remove(self._click_cb)
        except (ValueError, RuntimeError, AttributeError):
            pass

    def _clear(self) -> None:
        self.query = None
        self.table.setRowCount(0)
        self.back_button.setEnabled(False)
        self.title.setText("Open a slide, then click a region or press 'Whole slide'.")

    def _on_slide_opened(self, slide_id: str) -> None:
        if self.query is not None and not self._opening_result and slide_id != self.query.slide_id:
            # The user moved on to another slide: the list no longer belongs to what is shown.
            self.back_button.setEnabled(True)

    # -- the canvas click ------------------------------------------------------------------------------
    def _on_mouse_drag(self, viewer, event):
        """A click without drag queries the region under the cursor (pan and zoom are left alone)."""
        if getattr(event, "button", 1) not in (1, None) or getattr(event, "modifiers", ()):
            return
        if not self.click_to_query.isChecked() or self.state.current is None:
            return
        position = tuple(event.position)
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged:
            guarded("Similar slides")(self.query_at)(position)

    def query_at(self, world_position):
        """Query with the region of the current slide at a world (physical) position; None outside."""
        from napari_slpd.widgets._layers import region_at_world

        opened = self.state.require_current()
        if opened.regions is None:
            show_warning(f"{opened.slide_id} has no features yet; compute them in the Features panel first")
            return None
        region = region_at_world(self.state, world_position)
        if region is None:
            return None
        return self.query_region(region)

    # -- queries ---------------------------------------------------------------------------------------
    def query_whole_slide(self):
        opened = self.state.require_current()
        self.mode.setCurrentText(MODE_SLIDES)
        return self._run(Query(opened.slide_id, MODE_SLIDES))

    def query_region(self, region: int):
        opened = self.state.require_current()
        self.state.select_regions(opened.slide_id, [region], source="canvas")
        return self._run(Query(opened.slide_id, self.mode.currentText(), region=int(region)))

    def _run(self, query: Query):
        session = self.state.require_session()
        top_k = self.top_k.value()

        def work(progress, cancel):
            progress(0, 2)
            if query.mode == MODE_SLIDES:
                if query.region is not None:
                    protos = session.prototypes(query.slide_id)
                    query.prototype = int(np.asarray(protos.assignments)[query.region])
                query.results = session.similar_slides(query.slide_id, top_k)
            else:
                query.results = session.similar_regions(query.slide_id, query.region, top_k)
            progress(1, 2)
            for sid in dict.fromkeys(r.slide_id for r in query.results):
                if cancel.is_set():
                    break
                try:
                    query.thumbnails[sid] = session.thumbnail(sid)
                except Exception as exc:  # a thumbnail is decoration; the result stands without it
                    log.warning("no thumbnail for %s: %s", sid, exc)
            progress(2, 2)
            return query

        what = f"region {query.region} of {query.slide_id}" if query.region is not None else query.slide_id
        return self.task_bar.run(work, f"{query.mode} to {what}", on_result=self._show)

    def _show(self, query: Query) -> None:
        self.query = query
        self.back_button.setEnabled(False)
        table = self.table
        table.setRowCount(0)
        if query.mode == MODE_SLIDES:
            headers = ["", "Slide", "Distance", "Matched prototypes"]
        else:
            headers = ["", "Slide", "Region", "Distance"]
        table.setHorizontalHeaderLabels(headers)
        header = table.horizontalHeader()
        for col in range(4):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        table.setRowCount(len(query.results))
        for row, res in enumerate(query.results):
            thumb = QTableWidgetItem()
            if res.slide_id in query.thumbnails:
                thumb.setIcon(QIcon(array_to_pixmap(query.thumbnails[res.slide_id])))
            table.setItem(row, 0, thumb)
            table.setItem(row, 1, QTableWidgetItem(res.slide_id))
            if query.mode == MODE_SLIDES:
                table.setItem(row, 2, _number_item(res.distance))
                pairs = ", ".join(f"{k}↔{l} ({s:.2f})" for (k, l), s in zip(res.pairs, res.pair_similarities))
                item = QTableWidgetItem(pairs)
                item.setToolTip("query prototype ↔ this slide's prototype (cosine similarity)")
                table.setItem(row, 3, item)
            else:
                table.setItem(row, 2, QTableWidgetItem(f"{res.region}" + (f" (p{res.prototype})" if res.prototype is not None else "")))
                table.setItem(row, 3, _number_item(res.distance))
        if query.mode == MODE_SLIDES:
            about = f"region {query.region} (prototype {query.prototype}) of " if query.region is not None else ""
            self.title.setText(
                f"{len(query.results)} slides nearest to {about}{query.slide_id} by prototype set distance "
                f"(K − S). Double-click to open."
            )
        else:
            self.title.setText(
                f"{len(query.results)} regions nearest to region {query.region} of {query.slide_id} "
                "(cosine distance). Double-click to open."
            )
        if not query.results:
            self.title.setText(self.title.text() + " No other slide has prototypes yet.")

    def results(self) -> list:
        return list(self.query.results) if self.query is not None else []

    # -- opening a result ------------------------------------------------------------------------------
    def open_result(self, row: int):
        """Open the slide of result ``row`` with its prototypes and outline the matched regions."""
        from napari_slpd.widgets._layers import center_on_regions, ensure_selection_painter, show_matches, show_prototypes, show_slide

        query = self.query
        if query is None or not 0 <= row < len(query.results):
            return None
        res = query.results[row]
        session = self.state.require_session()
        ensure_selection_painter(self.state)
        self._opening_result = True
        try:
            opened = show_slide(self.state, res.slide_id, with_prototypes=False)
        finally:
            self._opening_result = False
        self.back_button.setEnabled(True)
        protos = session.prototypes(res.slide_id)
        matched: list[int] = []
        if query.mode == MODE_SLIDES:
            # Colour each neighbour prototype like the query prototype it was matched to.
            color_of = {int(l): int(k) for k, l in res.pairs}
            show_prototypes(self.state, protos, color_of=color_of)
            if query.prototype is not None:
                # The regions of the prototype matched to the clicked region's prototype.
                partner = next((l for k, l in res.pairs if k == query.prototype), None)
            elif res.pairs:
                # Whole slide: the regions of the most similar matched pair.
                partner = res.pairs[int(np.argmax(res.pair_similarities))][1]
            else:
                partner = None
            if partner is not None:
                matched = np.flatnonzero(np.asarray(protos.assignments) == partner).tolist()
        else:
            show_prototypes(self.state, protos)
            matched = [int(res.region)]
            center_on_regions(self.state, matched)
        show_matches(self.state, matched)
        self.state.prototypes_updated.emit(res.slide_id)
        opened.extras["matched_regions"] = matched
        return opened

    def back_to_query(self):
        from napari_slpd.widgets._layers import show_slide

        if self.query is None:
            return None
        opened = show_slide(self.state, self.query.slide_id)
        if self.query.region is not None:
            self.state.select_regions(self.query.slide_id, [self.query.region], source="similar")
        self.back_button.setEnabled(False)
        return opened


def _number_item(value: float) -> QTableWidgetItem:
    item = QTableWidgetItem(f"{value:.4f}")
    item.setData(Qt.ItemDataRole.UserRole, float(value))
    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    return item
