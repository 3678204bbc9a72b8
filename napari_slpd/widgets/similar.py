"""Similar slides panel: click a region (or ask for the whole slide) and list the nearest slides or regions.

What is ranked is always said in the title:

* **Whole slide** (the button): the cohort's slides by prototype set distance K - S (SPEC section 2) to
  the current slide; each row sums up its matched prototype pairs (colour chips of the query's
  prototypes, mean cosine), the pairs themselves are in the row's tooltip and in the detail line below.
* **A clicked region, slide mode**: the slides by their best match to the clicked region's prototype
  (1 - the largest cosine between that prototype and one of theirs): where else is this pattern?
* **A clicked region, region mode**: the regions across the cohort nearest (cosine) to the clicked
  region's own embedding.

Rows are listed as soon as the query returns; thumbnails and the neighbours' prototype names (where a row
only shows them in its tooltip) are read afterwards in the background and fill in row by row (kept for
the next queries; a slide without an image is not tried again).

Double-clicking a row opens that slide with its prototypes coloured like the query prototypes they were
matched to (its own names kept) and outlines the matched regions.
"""

from __future__ import annotations

import html
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPainter, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
)

from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import guarded, show_warning
from napari_slpd.widgets._panels import keep_rows_visible, panel_layout
from napari_slpd.widgets._tables import Cell, make_table
from napari_slpd.widgets.cohort_list import array_to_pixmap

log = logging.getLogger(__name__)

MODE_SLIDES = "Similar slides"
MODE_REGIONS = "Similar regions"
THUMB_PX = 48
MATCH_COLUMN_PX = 128
SLIDE_HEADERS = ["", "Slide", "Distance", "Matches"]
REGION_HEADERS = ["", "Slide", "Region", "Distance"]
COL_THUMB, COL_SLIDE = 0, 1
ICONS_KEPT = 256  # thumbnails kept between queries
DECORATE_BATCH_S = 0.25  # thumbnails read in the background are shown at most this often
_SERIAL = itertools.count(1)
INTRO = "Open a slide, then click a region (its pattern) or press 'Whole slide'."


@dataclass
class Query:
    """What was asked: a slide, optionally one of its regions, and the mode."""

    slide_id: str
    mode: str
    region: int | None = None
    prototype: int | None = None  # the clicked region's prototype (slide mode)
    results: list = field(default_factory=list)
    names: dict = field(default_factory=dict)  # query prototype -> name
    colors: dict = field(default_factory=dict)  # query prototype -> '#rrggbb'
    neighbour_names: dict = field(default_factory=dict)  # slide_id -> {prototype: name}

    @property
    def ranks_prototype(self) -> bool:
        return self.mode == MODE_SLIDES and self.region is not None

    def describe(self) -> str:
        """What was ranked, in words."""
        if self.mode == MODE_REGIONS:
            return (f"regions nearest to region {self.region} of {self.slide_id} "
                    "(cosine distance of the region embeddings)")
        if self.region is not None:
            name = self.names.get(self.prototype, f"prototype {self.prototype}")
            return (f"slides ranked by their best match to '{name}' (prototype {self.prototype}, the pattern of "
                    f"region {self.region}) of {self.slide_id} (distance 1 − cosine)")
        return f"slides nearest to the whole slide {self.slide_id} by prototype set distance (K − S)"


_CHIPS: dict[tuple, QIcon] = {}


def chips_icon(colors: list[str], size: int = 14) -> QIcon:
    """A row of colour chips (the query prototypes a row matched); made once per set of colours."""
    key = (tuple(colors[:8]), size)
    if key not in _CHIPS:
        if len(_CHIPS) > 512:
            _CHIPS.clear()
        _CHIPS[key] = _chips_icon(list(key[0]), size)
    return _CHIPS[key]


def _chips_icon(colors: list[str], size: int) -> QIcon:
    pixmap = QPixmap(max(1, len(colors)) * (size + 2), size)
    pixmap.fill(QColor(0, 0, 0, 0))
    painter = QPainter(pixmap)
    for i, color in enumerate(colors):
        painter.fillRect(i * (size + 2), 0, size, size, QColor(color))
    painter.end()
    return QIcon(pixmap)


class SimilarSlidesWidget(SlpdPanel):
    """Query the cohort with the current slide or a clicked region."""

    OBJECT_NAME = "slpd-similar"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)

        self.mode = QComboBox()
        self.mode.addItems([MODE_SLIDES, MODE_REGIONS])
        self.mode.setToolTip("A click on a region ranks slides by its pattern (prototype) or, in region mode, "
                             "the nearest regions across the cohort")
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
        row.addWidget(self.mode, 1)
        row.addWidget(QLabel("top"))
        row.addWidget(self.top_k)
        row2 = QHBoxLayout()
        row2.addWidget(self.click_to_query)
        row2.addStretch(1)
        row2.addWidget(self.whole_button)

        self.title = QLabel(INTRO)
        self.title.setWordWrap(True)
        self.title.setTextFormat(Qt.TextFormat.PlainText)
        # The other way to ask the same region (region mode <-> its pattern's slides), offered after a query.
        self.other_mode_button = QPushButton("")
        self.other_mode_button.setVisible(False)
        self.other_mode_button.clicked.connect(guarded("Similar slides")(self._ask_other_mode))
        self.table = make_table(SLIDE_HEADERS, stretch=COL_SLIDE, fit=(2,), icon_px=THUMB_PX, row_px=THUMB_PX + 4)
        self.table.setColumnWidth(COL_THUMB, THUMB_PX + 8)
        self.table.setColumnWidth(3, MATCH_COLUMN_PX)  # chips + mean cosine; the pairs are in the tooltip
        keep_rows_visible(self.table)
        self.table.cellDoubleClicked.connect(lambda row, _c: guarded("Open neighbour")(self.open_result)(row))
        self.table.selectionModel().currentRowChanged.connect(lambda current, _prev: self._show_detail(current.row()))
        self.detail = QLabel("")
        self.detail.setWordWrap(True)
        self.detail.setTextFormat(Qt.TextFormat.RichText)  # names are escaped (html.escape) before

        layout = panel_layout(self)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addWidget(self.title)
        layout.addWidget(self.other_mode_button)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.detail)
        layout.addWidget(self.back_button)
        layout.addWidget(self.task_bar)

        self.query: Query | None = None
        self._serial = 0  # of the query shown (background thumbnails of an older one are dropped)
        self._icons: OrderedDict[str, QIcon] = OrderedDict()  # slide_id -> thumbnail, most recent last
        self._no_thumbnail: set[str] = set()  # slides without a readable image (feature-only entries)
        self._decorator = None  # the worker reading thumbnails and names of the rows shown
        self._opening_result = False
        self.top_k.valueChanged.connect(self._top_k_changed)
        self.state.cohort_changed.connect(lambda _s: self._clear())
        self.state.slide_opened.connect(self._on_slide_opened)
        self.state.settings_changed.connect(self._on_settings_changed)
        self._click_cb = self._on_mouse_drag
        napari_viewer.mouse_drag_callbacks.append(self._click_cb)
        self.destroyed.connect(lambda *_: self._disconnect_viewer())

    def _disconnect_viewer(self) -> None:
        try:
            self.viewer.mouse_drag_callbacks.remove(self._click_cb)
        except (ValueError, RuntimeError, AttributeError):
            pass

    def _top_k_changed(self, value: int) -> None:
        if int(self.state.settings.top_k) != int(value):
            self.state.update_settings(top_k=int(value))

    def _on_settings_changed(self, settings) -> None:
        if self.top_k.value() != int(settings.top_k):
            self.top_k.blockSignals(True)
            self.top_k.setValue(int(settings.top_k))
            self.top_k.blockSignals(False)

    def _clear(self) -> None:
        self._stop_decorator()
        self._icons.clear()
        self._no_thumbnail.clear()
        self.query = None
        self.table.model().set_rows([])
        self.back_button.setEnabled(False)
        self.other_mode_button.setVisible(False)
        self.detail.setText("")
        self.title.setText(INTRO)

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
        return self._run(Query(opened.slide_id, MODE_SLIDES))

    def query_region(self, region: int, mode: str | None = None):
        opened = self.state.require_current()
        self.state.select_regions(opened.slide_id, [region], source="canvas")
        return self._run(Query(opened.slide_id, mode or self.mode.currentText(), region=int(region)))

    def _ask_other_mode(self):
        """Ask the last region again the other way (its pattern's slides <-> its nearest regions)."""
        query = self.query
        if query is None or query.region is None:
            return None
        other = MODE_REGIONS if query.mode == MODE_SLIDES else MODE_SLIDES
        self.mode.setCurrentText(other)
        if self.state.current_slide_id != query.slide_id:
            self.back_to_query()
        return self.query_region(query.region, other)

    def _run(self, query: Query):
        session = self.state.require_session()
        top_k = self.top_k.value()

        def work(progress, cancel):
            protos = session.prototypes(query.slide_id)
            query.names, query.colors = session.prototype_styles(query.slide_id, protos)
            if query.mode == MODE_SLIDES:
                if query.region is not None:
                    query.prototype = int(np.asarray(protos.assignments)[query.region])
                    query.results = session.similar_to_prototype(query.slide_id, query.prototype, top_k)
                else:
                    query.results = session.similar_slides(query.slide_id, top_k)
            else:
                query.results = session.similar_regions(query.slide_id, query.region, top_k)
            if query.mode == MODE_REGIONS or query.ranks_prototype:  # the rows' text names their prototypes
                for sid in dict.fromkeys(r.slide_id for r in query.results):
                    if cancel.is_set():
                        break
                    query.neighbour_names[sid] = _names(session, sid)
            return query

        what = f"region {query.region} of {query.slide_id}" if query.region is not None else query.slide_id
        # Not in napari's activity dock: a query takes milliseconds, its entry there only made the window repaint.
        return self.run_task(work, f"{query.mode} to {what}", on_result=self._show, activity=False)

    def _row(self, query: Query, res) -> list[Cell]:
        name = Cell(res.slide_id, tooltip=res.slide_id, data=res.slide_id, icon=None)
        thumb = Cell("", icon=self._icons.get(res.slide_id), tooltip=res.slide_id)
        if query.mode == MODE_SLIDES:
            chips = [query.colors.get(k, "#808080") for k, _l in res.pairs]
            summary = self._match_summary(query, res)
            matches = Cell(summary, tooltip=self._pairs_text(query, res, "\n"), icon=chips_icon(chips))
            return [thumb, name, _number(res.distance), matches]
        own = query.neighbour_names.get(res.slide_id, {})
        proto = "" if res.prototype is None else f" · {own.get(res.prototype, f'prototype {res.prototype}')}"
        region = Cell(f"{res.region}{proto}", tooltip=f"region {res.region} of {res.slide_id}{proto}")
        return [thumb, name, region, _number(res.distance)]

    def _show(self, query: Query) -> None:
        self._stop_decorator()
        self.query = query
        self._serial = next(_SERIAL)
        self.back_button.setEnabled(False)
        model = self.table.model()
        model.set_headers(SLIDE_HEADERS if query.mode == MODE_SLIDES else REGION_HEADERS)
        self.table.setColumnWidth(COL_THUMB, THUMB_PX + 8)
        self.table.setColumnWidth(3, MATCH_COLUMN_PX)
        model.set_rows([self._row(query, res) for res in query.results])
        self._decorate(query)
        self.task_bar.finish("done", f"{len(query.results)} {'slides' if query.mode == MODE_SLIDES else 'regions'} "
                                     "ranked")
        title = f"{len(query.results)} {query.describe()}. Double-click a row to open it."
        if not query.results:
            title += " No other slide has prototypes for these settings yet."
        self.title.setText(title)
        if query.region is None:
            self.other_mode_button.setVisible(False)
        elif query.mode == MODE_SLIDES:
            self.other_mode_button.setText(f"Nearest regions to region {query.region} instead")
            self.other_mode_button.setVisible(True)
        else:
            self.other_mode_button.setText(f"Slides with the pattern of region {query.region} instead")
            self.other_mode_button.setVisible(True)
        if query.results:
            self.table.selectRow(0)
        self._show_detail(0 if query.results else -1)

    # -- thumbnails and names, after the rows are listed ----------------------------------------------
    def _decorate(self, query: Query) -> None:
        """Read the thumbnails and names the rows lack in a worker; each row fills in as its slide is read."""
        session = self.state.session
        todo = [sid for sid in dict.fromkeys(r.slide_id for r in query.results)
                if (sid not in self._icons and sid not in self._no_thumbnail) or sid not in query.neighbour_names]
        if session is None or not todo:
            return
        # napari keeps every worker it made: the worker holds this dict only, emptied when it ends.
        job = {"todo": todo, "session": session, "skip": set(self._icons) | self._no_thumbnail,
               "named": set(query.neighbour_names), "serial": self._serial}

        def work():
            batch, started = [], time.perf_counter()
            while job.get("todo"):
                sid = job["todo"].pop(0)
                image = names = None
                if sid not in job["skip"]:
                    try:
                        image = job["session"].thumbnail(sid)
                    except Exception as exc:  # a thumbnail is decoration; the row stands without it
                        log.debug("no thumbnail for %s: %s", sid, exc)
                        image = False
                if sid not in job["named"]:
                    names = _names(job["session"], sid)
                batch.append((sid, image, names))
                if time.perf_counter() - started > DECORATE_BATCH_S:  # a slow read: show what is there
                    yield job.get("serial"), batch
                    batch, started = [], time.perf_counter()
            if batch:
                yield job.get("serial"), batch

        worker = self.start_worker(work, on_yielded=self._decorated, on_finished=job.clear,
                                   on_error=lambda exc: log.warning("slide list decoration stopped: %s", exc))
        self._decorator = (worker, job)

    def _stop_decorator(self) -> None:
        if self._decorator is not None:
            worker, job = self._decorator
            self._decorator = None
            job["todo"] = []  # stops after the slide it is reading
            job["serial"] = None

    def _decorated(self, item) -> None:
        """A batch of (slide id, thumbnail or False when there is none, names or None) for the rows shown
        (one repaint per batch: under software OpenGL every repaint composes the whole window)."""
        serial, batch = item
        query = self.query
        current = serial == self._serial and query is not None
        done = set()
        for sid, image, names in batch:
            if image is False:
                self._no_thumbnail.add(sid)
            elif image is not None:
                self._icons[sid] = QIcon(array_to_pixmap(image))
                while len(self._icons) > ICONS_KEPT:
                    self._icons.popitem(last=False)
            if current and names is not None:
                query.neighbour_names[sid] = names
            done.add(sid)
        if not current:
            return
        model = self.table.model()
        selected = self.table.currentIndex().row()
        for row, res in enumerate(query.results):
            if res.slide_id in done and row < model.rowCount():
                model.set_row(row, self._row(query, res))
                if row == selected:
                    self._show_detail(row)

    def _match_summary(self, query: Query, res) -> str:
        if not res.pairs:
            return "no pairs"
        if query.ranks_prototype:
            k, l = res.pairs[0]
            own = query.neighbour_names.get(res.slide_id, {}).get(l, f"prototype {l}")
            return f"{own} · {res.pair_similarities[0]:.2f}"
        sims = res.pair_similarities or [0.0]
        return f"mean {float(np.mean(sims)):.2f}"

    def _pairs_text(self, query: Query, res, sep: str, rich: bool = False) -> str:
        own = query.neighbour_names.get(res.slide_id, {})
        lines = []
        for (k, l), sim in zip(res.pairs, res.pair_similarities or [float("nan")] * len(res.pairs)):
            qname = query.names.get(k, f"prototype {k}")
            nname = own.get(l, f"prototype {l}")
            if rich:
                chip = (f'<span style="background-color:{query.colors.get(k, "#808080")}">&nbsp;&nbsp;&nbsp;&nbsp;'
                        "</span>")
                lines.append(f"{chip} {html.escape(qname)} ↔ {html.escape(nname)} ({sim:.2f})")
            else:
                lines.append(f"{qname} (prototype {k}) ↔ {nname} (its prototype {l}): cosine {sim:.2f}")
        return sep.join(lines)

    def _show_detail(self, row: int) -> None:
        query = self.query
        if query is None or not 0 <= row < len(query.results):
            self.detail.setText("")
            return
        res = query.results[row]
        if query.mode == MODE_SLIDES:
            head = f"<b>{html.escape(res.slide_id)}</b>, matched prototypes (query ↔ this slide, cosine):<br>"
            self.detail.setText(head + self._pairs_text(query, res, "<br>", rich=True))
        else:
            self.detail.setText(f"<b>{html.escape(res.slide_id)}</b>: region {res.region}, cosine distance "
                                f"{res.distance:.4f}")

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
        # Colour every prototype of the neighbour like the query prototype it is matched to (the optimal
        # matching of the two slides), whatever was ranked.
        if query.mode == MODE_SLIDES and not query.ranks_prototype:
            pairs = [(int(k), int(l)) for k, l in res.pairs]
        else:
            pairs = [(k, l) for k, l, _s in session.prototype_pairs(query.slide_id, res.slide_id)]
        color_of = {l: k for k, l in pairs}
        show_prototypes(self.state, protos, color_of=color_of, query_slide=query.slide_id)
        matched: list[int] = []
        if query.mode == MODE_SLIDES:
            if query.ranks_prototype:
                # The regions of the neighbour's prototype that best matches the clicked region's pattern.
                partner = res.pairs[0][1] if res.pairs else None
            elif res.pairs:
                # Whole slide: the regions of the most similar matched pair.
                partner = res.pairs[int(np.argmax(res.pair_similarities))][1]
            else:
                partner = None
            if partner is not None:
                matched = np.flatnonzero(np.asarray(protos.assignments) == partner).tolist()
        else:
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


def _names(session, slide_id: str) -> dict:
    try:
        return session.prototype_styles(slide_id)[0]
    except Exception:  # noqa: BLE001 - names are decoration: the rows say "prototype l" then
        return {}


def _number(value: float) -> Cell:
    return Cell(f"{value:.4f}", data=float(value), align=Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
