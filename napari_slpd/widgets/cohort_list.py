"""The Cohort panel's list of slides: thumbnails, pixel sizes and the features / prototypes status of each
slide, read in the background as slides are listed or added, so the list appears at once and fills in."""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QHeaderView

from napari_slpd.widgets._common import show_warning
from napari_slpd.widgets._panels import keep_rows_visible
from napari_slpd.widgets._tables import Cell, make_table

log = logging.getLogger(__name__)

THUMB_PX = 48
STATUS_TEXT = {
    "done": "✓",
    "missing": "–",
    "partial": "partial",
    "other-settings": "other",
    "damaged": "damaged",
    "stale": "stale",
}
STATUS_TIPS = {
    "missing": "not computed yet",
    "partial": "an unfinished computation; computing again resumes it",
    "stale": "computed for other settings (K, or other features); computing again replaces them",
}
COLUMNS = ("", "Slide", "µm/px", "Features", "Protos")
COL_THUMB, COL_SLIDE, COL_MPP, COL_FEATURES, COL_PROTOS = range(5)
WARN_COLOR = "#f0a030"
SKIPPED_COLOR = "#e05050"  # files offered to the cohort that are not slides of it
# Up to this many slides, statuses are read before the list shows and every thumbnail is read in the
# background; a larger cohort lists its rows at once (from the cohort file), reads unknown statuses off
# the GUI thread (rows on screen first) and thumbnails only for the rows on screen.
LAZY_ROWS = 300
STATUS_BATCH = 200
MAX_ICONS = 1000  # thumbnails kept in the list of a large cohort (the farthest from view are dropped)
FIT_COLUMNS = (COL_MPP, COL_FEATURES, COL_PROTOS)
FIT_PAD_PX = 14  # a cell's text margins and grid line


def array_to_pixmap(image: np.ndarray) -> QPixmap:
    """RGB uint8 (H, W, 3) -> QPixmap (copied, so the array may go away)."""
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = image.shape[:2]
    qimage = QImage(image.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimage.copy())


class CohortSlideList:
    """The slide list of the Cohort panel (:class:`~napari_slpd.widgets.cohort.CohortWidget` derives from
    it): a row per slide with its thumbnail, pixel size and cache statuses, then the files not added. Small
    cohorts are read at once; a large one lists its rows at once and reads the rest off the GUI thread, the
    rows on screen first. The panel provides ``state``, ``summary``, ``pixel_note``, ``_update_notes``,
    ``_open_row`` and :meth:`SlpdPanel.start_worker`."""

    def _make_slide_list(self) -> None:
        """The table (``self.table``) and what the list keeps of the cohort's slides."""
        self.table = make_table(list(COLUMNS), stretch=COL_SLIDE, fit=FIT_COLUMNS,
                                icon_px=THUMB_PX, row_px=THUMB_PX + 4)
        self.table.setColumnWidth(COL_THUMB, THUMB_PX + 8)
        keep_rows_visible(self.table)
        # Fitted columns are measured on the rows on screen and this many more, not on 10,000 rows.
        self.table.horizontalHeader().setResizeContentsPrecision(LAZY_ROWS)
        self.table.cellDoubleClicked.connect(lambda row, _col: self._open_row(row))
        self.table.selectionModel().currentRowChanged.connect(lambda *_: self._update_pixel_note())
        self.table.verticalScrollBar().valueChanged.connect(lambda *_: self._visible_timer.start())
        self._thumb_worker = None
        self._pending_thumbs: list[str] = []
        self._info_tried: set[str] = set()
        self._unusable: list[tuple[str, str]] = []
        self._skipped: dict = {}  # row -> SkippedFile (files listed after the slides, not in the cohort)
        self.file_pixel_sizes: dict = {}  # slide_id -> PixelSize the file states
        self.statuses: dict = {}
        self._rows: dict[str, int] = {}  # slide_id -> row
        self._listed_with = None  # the session and status settings the list was read with
        self._bold: str | None = None
        self._status_worker = None
        self._icons: dict[str, None] = {}  # slide ids with a thumbnail shown, oldest first (large cohorts)
        self._visible_timer = QTimer(self)
        self._visible_timer.setSingleShot(True)
        self._visible_timer.setInterval(60)
        self._visible_timer.timeout.connect(self._load_visible_info)
        # Unknown statuses are read once the list has painted (the reading worker and the first paint
        # otherwise compete for the interpreter).
        self._unknown: list = []
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(0)
        self._status_timer.timeout.connect(self._read_unknown_statuses)

    def _clear_slide_list(self) -> None:
        """An empty list, its background reading stopped (another cohort, or none, is open)."""
        if self._status_worker is not None:
            self._status_worker.quit()
            self._status_worker = None
        self._status_timer.stop()
        self._unknown = []
        self._listed_with = None
        self._pending_thumbs.clear()
        self.table.model().set_rows([])
        self._skipped = {}
        self._rows = {}
        self._icons = {}
        self.file_pixel_sizes = {}
        self._info_tried.clear()

    def _quit_workers(self) -> None:
        self._unknown = []
        for worker in (self._thumb_worker, self._status_worker):
            if worker is not None:
                worker.quit()
        self._status_worker = None

    def _on_slide_opened(self, slide_id: str) -> None:
        model = self.table.model()
        for sid, bold in ((self._bold, False), (slide_id, True)):  # two rows change, not the whole list
            row = self._rows.get(sid) if sid is not None else None
            if row is not None and row < model.rowCount() and model.cell(row, COL_SLIDE).data == sid:
                model.update_cell(row, COL_SLIDE, bold=bold)
        self._bold = slide_id

    # -- listing ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the registry and each slide's cache status."""
        session = self.state.session
        if session is None:
            return
        selected = self.selected_slide_id()
        self._listed_with = (session, session.status_settings())
        records = session.cohort.slides()
        large = len(records) > LAZY_ROWS
        # Known statuses (files unchanged: stat calls only); a small cohort reads the others now, a large
        # one lists its rows at once and reads them in a worker.
        statuses = [session.known_status(r) if large else session.status(r.slide_id) for r in records]
        model = self.table.model()
        icons = {model.cell(r, COL_SLIDE).data: model.cell(r, COL_THUMB).icon for r in range(model.rowCount())}
        rows = []
        unusable = []
        for record, st in zip(records, statuses):
            exists = st.exists if st is not None else True
            name = Cell(record.slide_id, tooltip=str(record.path) + ("" if exists else "  (file missing)"),
                        data=record.slide_id, color=None if exists else WARN_COLOR)
            mpp_text, mpp_tip, usable = session.pixel_size_text(record.slide_id,
                                                                self.file_pixel_sizes.get(record.slide_id), record)
            if not usable:
                unusable.append((record.slide_id, mpp_text))
            mpp = Cell(mpp_text, tooltip=mpp_tip, color=None if usable else WARN_COLOR)
            rows.append([Cell("", icon=icons.get(record.slide_id)), name, mpp, *self._status_cells(st)])
        try:
            skipped = session.cohort.skipped_files()
        except Exception as exc:  # the list of refused files is a courtesy: the slides list stands without it
            log.warning("files not added: %s", exc)
            skipped = []
        self._skipped = {len(rows) + i: sk for i, sk in enumerate(skipped)}
        for sk in skipped:
            tip = f"{sk.path}\nnot added ({sk.state}): {sk.reason}"
            rows.append([Cell(""), Cell(f"{sk.path.name} ({sk.state})", tooltip=tip, color=SKIPPED_COLOR),
                         Cell("", tooltip=tip), Cell("–", tooltip=tip, align=Qt.AlignmentFlag.AlignCenter),
                         Cell("–", tooltip=tip, align=Qt.AlignmentFlag.AlignCenter)])
        model.set_rows(rows)
        self._fit_columns(large)
        self._rows = {record.slide_id: row for row, record in enumerate(records)}
        if selected in self._rows:
            self.table.selectRow(self._rows[selected])
        self.statuses = {st.slide_id: st for st in statuses if st is not None}
        self._unusable = unusable
        self._update_summary(len(records))
        self._update_notes()
        self._update_pixel_note()
        self._bold = None
        if self.state.current_slide_id:
            self._on_slide_opened(self.state.current_slide_id)
        self._unknown = [r for r, st in zip(records, statuses) if st is None]
        if self._unknown:
            self._status_timer.start()
        if large:
            self._icons = {sid: None for sid in self._icons if icons.get(sid) is not None}
            self._visible_timer.start()  # thumbnails and pixel sizes of the rows on screen
            return
        missing = [r.slide_id for r in records if icons.get(r.slide_id) is None and r.slide_id not in self._info_tried]
        if missing:
            self._load_slide_info(missing)

    def _fit_columns(self, large: bool) -> None:
        """Widths of the pixel size and status columns. Qt's ResizeToContents measures hundreds of rows
        through the model at every layout pass (most of the time of listing 2,000 slides, and again as
        statuses fill in); a large cohort's columns are measured here, once, from the texts they hold."""
        header = self.table.horizontalHeader()
        if not large:
            for column in FIT_COLUMNS:
                header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
            return
        model = self.table.model()
        status_texts = [*STATUS_TEXT.values(), "…", STATUS_TEXT["done"] + "  0 regions"]
        texts = {
            COL_MPP: {"…", "unknown"} | {row[COL_MPP].text for row in model.rows},
            COL_FEATURES: status_texts,
            COL_PROTOS: status_texts,
        }
        for column in FIT_COLUMNS:  # all first: a column left to fit would be measured at each resize
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
        for column in FIT_COLUMNS:
            header.resizeSection(column, self._column_width(column, texts[column]))

    def _column_width(self, column: int, texts) -> int:
        fm, bold = self.table.fontMetrics(), self.table.horizontalHeader().fontMetrics()
        widest = max((fm.horizontalAdvance(t) for t in texts), default=0)
        return max(widest, bold.horizontalAdvance(COLUMNS[column]) + 6) + FIT_PAD_PX

    def _widen(self, column: int, text: str) -> None:
        """A large cohort's column made wide enough for ``text`` (filled in after the list was measured)."""
        header = self.table.horizontalHeader()
        if header.sectionResizeMode(column) == QHeaderView.ResizeMode.ResizeToContents:
            return
        width = self._column_width(column, [text])
        if width > header.sectionSize(column):
            header.resizeSection(column, width)

    @staticmethod
    def _status_cells(st) -> list:
        """The Features and Protos cells of a status (None: not read yet)."""
        if st is None:
            waiting = "reading the slide's cache status"
            return [Cell("…", tooltip=waiting, align=Qt.AlignmentFlag.AlignCenter),
                    Cell("…", tooltip=waiting, align=Qt.AlignmentFlag.AlignCenter)]
        feat_tip = st.detail or STATUS_TIPS.get(st.features, st.features)
        if st.features == "done" and st.n_regions == 0:
            feat_tip = "no region fits this slide with the current region size (see the Features panel)"
        feat = Cell(STATUS_TEXT.get(st.features, st.features) + ("  0 regions" if st.n_regions == 0 else ""),
                    tooltip=feat_tip, align=Qt.AlignmentFlag.AlignCenter,
                    color=WARN_COLOR if st.features in ("other-settings", "damaged") or st.n_regions == 0 else None)
        proto = Cell(STATUS_TEXT.get(st.prototypes, st.prototypes), tooltip=STATUS_TIPS.get(st.prototypes, ""),
                     align=Qt.AlignmentFlag.AlignCenter)
        return [feat, proto]

    def _read_unknown_statuses(self) -> None:
        unknown, self._unknown = self._unknown, []
        if unknown and self.state.session is not None:
            self._read_statuses(unknown)

    def _read_statuses(self, records) -> None:
        """Read the statuses of ``records`` in a worker, the rows on screen first; rows fill in by batches."""
        session = self.state.session
        if self._status_worker is not None:
            self._status_worker.quit()
        first = self.table.rowAt(0)
        first = max(0, first)
        order = sorted(records, key=lambda r: self._rows.get(r.slide_id, 0) < first)  # from the view down, then above

        def work():
            batch = []
            for record in order:
                batch.append(session.status(record.slide_id))
                if len(batch) >= STATUS_BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch

        def read(batch):
            # Only while it is this panel's worker: a batch queued as the panel closes (_quit_workers) is dropped.
            if self._status_worker is worker:
                self._set_statuses(session, batch)

        def ended():
            if self._status_worker is worker:
                self._status_worker = None

        worker = self.start_worker(work, on_yielded=read, on_finished=ended,
                                   on_error=lambda exc: show_warning(f"slide statuses: {exc}"))
        self._status_worker = worker

    def _set_statuses(self, session, batch) -> None:
        if session is not self.state.session:
            return
        model = self.table.model()
        changed = []
        for st in batch:
            row = self._rows.get(st.slide_id)
            if row is None or row >= model.rowCount() or model.cell(row, COL_SLIDE).data != st.slide_id:
                continue
            self.statuses[st.slide_id] = st
            model.rows[row][COL_FEATURES:COL_PROTOS + 1] = self._status_cells(st)
            changed.append(row)
        if changed:  # one change signal per batch (each signal re-measures the fitted columns)
            model.dataChanged.emit(model.index(min(changed), COL_FEATURES), model.index(max(changed), COL_PROTOS))
        self._update_summary(model.rowCount() - len(self._skipped))

    def _update_summary(self, n: int) -> None:
        session = self.state.session
        if session is None:
            return
        statuses = self.statuses.values()
        n_feat = sum(st.features_done for st in statuses)
        n_proto = sum(st.prototypes_done for st in statuses)
        pending = n - len(self.statuses)
        fs, k = self.state.settings.features, self.state.settings.prototypes.k
        weights = "random-init encoders" if fs.random_init else "checkpoint encoders"
        text = (f"{session.root}\n{n} slides · features {n_feat}/{n} · "
                f"prototypes {n_proto}/{n}" + (f" (reading {pending} more)" if pending > 0 else "")
                + (f" · {len(self._skipped)} file(s) not added (red; select one to see why)" if self._skipped else "")
                + f"\nsettings (saved in the cohort): {fs.region_px}-px regions "
                f"of {fs.patch_px}-px patches at {fs.target_mpp:g} µm/px, {weights}, K={k}")
        if session.settings_save_error:
            text += "\n⚠ " + session.settings_save_error
        self.summary.setText(text)

    def _load_visible_info(self) -> None:
        """Thumbnails and pixel sizes of the rows on screen (and a screen's worth around them) of a large
        cohort; thumbnails far from view are dropped beyond MAX_ICONS."""
        if self.state.session is None or not self._rows:
            return
        model = self.table.model()
        n = model.rowCount()
        top = max(0, self.table.rowAt(0))
        bottom = self.table.rowAt(self.table.viewport().height() - 1)
        bottom = n - 1 if bottom < 0 else bottom
        page = bottom - top + 1
        lo, hi = max(0, top - page), min(n, bottom + page + 1)
        wanted = [sid for sid in (model.cell(r, COL_SLIDE).data for r in range(lo, hi)) if sid is not None]
        missing = [sid for sid in wanted if model.cell(self._rows[sid], COL_THUMB).icon is None
                   and sid not in self._info_tried]
        if missing:
            self._load_slide_info(missing)
        if len(self._icons) > MAX_ICONS:
            keep = set(wanted)
            for sid in list(self._icons)[: len(self._icons) - MAX_ICONS]:
                row = self._rows.get(sid)
                if sid in keep or row is None:
                    continue
                self._icons.pop(sid, None)
                self._info_tried.discard(sid)
                model.update_cell(row, COL_THUMB, icon=None)

    def _update_pixel_note(self) -> None:
        unusable = self._unusable
        skipped = self._skipped.get(self.table.currentRow())
        if skipped is not None:  # the selected row is a file that is not in the cohort: say why
            self.pixel_note.setText(f"⚠ {skipped.path.name} was not added ({skipped.state}): {skipped.reason}")
            self.pixel_note.setVisible(True)
            return
        if not unusable:
            self.pixel_note.setVisible(False)
            return
        selected = self.selected_slide_id()
        chosen = next((u for u in unusable if u[0] == selected), None)
        if chosen is not None:
            text = (f"⚠ {chosen[0]}: pixel size {chosen[1]}. Its regions cannot be placed: enter the pixel size "
                    "(e.g. 0.25 for 40x, 0.5 for 20x) and press 'Set pixel size' below.")
        else:
            names = ", ".join(f"{sid} ({what})" for sid, what in unusable[:3]) + ("…" if len(unusable) > 3 else "")
            text = (f"⚠ {len(unusable)} slide(s) without a usable pixel size: {names}. Select one and press "
                    "'Set pixel size' below.")
        self.pixel_note.setText(text)
        self.pixel_note.setVisible(True)

    def selected_slide_id(self) -> str | None:
        row = self.table.currentRow()
        model = self.table.model()
        if row < 0 or row >= model.rowCount():
            return None
        return model.cell(row, COL_SLIDE).data

    def select_slide(self, slide_id: str) -> None:
        row = self._rows.get(slide_id)
        if row is not None:
            self.table.selectRow(row)
            self.table.scrollTo(self.table.model().index(row, COL_SLIDE))

    def slide_ids(self) -> list[str]:
        model = self.table.model()
        return [sid for sid in (model.cell(r, COL_SLIDE).data for r in range(model.rowCount())) if sid is not None]

    def skipped_files(self) -> list:
        """The files listed after the slides that are not in the cohort (SkippedFile: path, state, reason)."""
        return [self._skipped[row] for row in sorted(self._skipped)]

    def cell_text(self, slide_id: str, column: int) -> str:
        """What the list shows for ``slide_id`` in ``column`` (COL_MPP, COL_FEATURES, ...)."""
        return self.table.text(self._rows[slide_id], column)

    def _load_slide_info(self, slide_ids) -> None:
        """Read thumbnails (cached as PNG in the cohort) and the pixel size each file states in a worker;
        each row fills in as its slide is read."""
        session = self.state.session
        if session is None:
            return
        for slide_id in slide_ids:
            self._info_tried.add(slide_id)
            if slide_id not in self._pending_thumbs:
                self._pending_thumbs.append(slide_id)
        if self._thumb_worker is not None:
            return  # the running worker takes the new ones too

        pending = self._pending_thumbs

        def work():
            while pending:
                slide_id = pending.pop(0)
                info = image = None
                try:
                    info = session.file_pixel_size(slide_id)[0]
                    image = session.thumbnail(slide_id)
                except Exception as exc:  # one unreadable slide must not stop the others
                    log.warning("no thumbnail for %s: %s", slide_id, exc)
                yield slide_id, image, info

        # Each slide's errors are caught in the work: nothing to report for the worker itself.
        worker = self.start_worker(work, on_yielded=self._set_slide_info,
                                   on_finished=lambda: self._info_finished(worker))
        self._thumb_worker = worker

    def _info_finished(self, worker) -> None:
        if self._thumb_worker is worker:
            self._thumb_worker = None
            if self._pending_thumbs and self.state.session is not None:  # added while it was finishing
                self._load_slide_info([])

    def _set_slide_info(self, item) -> None:
        slide_id, image, info = item
        session = self.state.session
        if info is not None:
            self.file_pixel_sizes[slide_id] = info
        row = self._rows.get(slide_id)
        model = self.table.model()
        if row is None or session is None or row >= model.rowCount() or model.cell(row, COL_SLIDE).data != slide_id:
            return
        if image is not None:
            model.update_cell(row, COL_THUMB, icon=QIcon(array_to_pixmap(image)))
            self._icons[slide_id] = None
        if info is not None:
            text, tip, usable = session.pixel_size_text(slide_id, info)
            model.update_cell(row, COL_MPP, text=text, tooltip=tip, color=None if usable else WARN_COLOR)
            self._widen(COL_MPP, text)
            self._unusable = [u for u in self._unusable if u[0] != slide_id]
            if not usable:
                self._unusable.append((slide_id, text))
            self._update_pixel_note()
