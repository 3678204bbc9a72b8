"""Cohort panel: choose a cohort folder, list its slides with thumbnails, pixel size and status, open one.

The cohort folder owns its settings (``cohort.json`` "settings"): opening it loads them into every panel
(see :meth:`SlpdState.set_session`). Thumbnails and the pixel size each file states are read in a
background worker as slides are listed or added, so the list appears at once and fills in.

Over 600 lines, but one idea: the Cohort panel (its table model, background statuses and thumbnails,
pixel sizes, cache folder); the tables and panel layout it shares are widgets._tables / _panels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
)

from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import guarded, show_info, show_warning
from napari_slpd.widgets._panels import keep_rows_visible, panel_layout
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


def skipped_summary(skipped) -> str:
    """'2 unreadable file(s), 1 duplicate slide id' for a list of SkippedFile."""
    from collections import Counter

    counts = Counter(sk.state for sk in skipped)
    words = {"unreadable": "unreadable file(s)", "duplicate id": "file(s) whose slide id another file has",
             "not extracted": "slide(s) without features (see the reason)"}
    return ", ".join(f"{n} {words.get(state, state)}" for state, n in sorted(counts.items()))


def array_to_pixmap(image: np.ndarray) -> QPixmap:
    """RGB uint8 (H, W, 3) -> QPixmap (copied, so the array may go away)."""
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = image.shape[:2]
    qimage = QImage(image.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimage.copy())


class CohortWidget(SlpdPanel):
    """Open a cohort folder (slides + cache), see each slide's status, open a slide in the viewer."""

    OBJECT_NAME = "slpd-cohort"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("cohort folder (slides and cache)")
        choose = QPushButton("Choose…")
        choose.clicked.connect(self._choose_folder)
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(guarded("Open cohort")(lambda: self.open_typed_folder()))
        self.folder_edit.returnPressed.connect(guarded("Open cohort")(lambda: self.open_typed_folder()))
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(choose)
        row.addWidget(self.open_button)

        self.add_button = QPushButton("Add slides…")
        self.add_button.setToolTip("Register slides from another folder; their cache goes to this cohort")
        self.add_button.clicked.connect(self._choose_slides)
        refresh = QPushButton("Refresh")
        refresh.setToolTip("Read the slides' status again (and make missing thumbnails)")
        refresh.clicked.connect(guarded("Refresh")(self._refresh_clicked))
        row2 = QHBoxLayout()
        row2.addWidget(self.add_button)
        row2.addWidget(refresh)
        row2.addStretch(1)

        # The writable cache folder of read-only cohorts (as `slpd --cache DIR` / $SLPD_CACHE_DIR).
        self.cache_edit = QLineEdit(self._initial_cache_folder())
        self.cache_edit.setPlaceholderText("cache folder for read-only cohorts (default ~/.cache/napari-slpd/cohorts)")
        self.cache_edit.setToolTip("Where results are written when a cohort folder is read-only (a share, someone "
                                   "else's files): prototypes, index, names, thumbnails, new features. Saved in the "
                                   "cohort when it is writable, else in your user config.")
        self.cache_edit.editingFinished.connect(
            guarded("Cache folder")(lambda: self.set_cache_folder(self.cache_edit.text())))
        choose_cache = QPushButton("Choose…")
        choose_cache.setToolTip("Choose the cache folder for read-only cohorts")
        choose_cache.clicked.connect(self._choose_cache_folder)
        row_cache = QHBoxLayout()
        row_cache.addWidget(QLabel("Cache:"))
        row_cache.addWidget(self.cache_edit, 1)
        row_cache.addWidget(choose_cache)

        self.table = make_table(list(COLUMNS), stretch=COL_SLIDE, fit=FIT_COLUMNS,
                                icon_px=THUMB_PX, row_px=THUMB_PX + 4)
        self.table.setColumnWidth(COL_THUMB, THUMB_PX + 8)
        keep_rows_visible(self.table)
        # Fitted columns are measured on the rows on screen and this many more, not on 10,000 rows.
        self.table.horizontalHeader().setResizeContentsPrecision(LAZY_ROWS)
        self.table.cellDoubleClicked.connect(lambda row, _col: self._open_row(row))
        self.table.selectionModel().currentRowChanged.connect(lambda *_: self._update_pixel_note())

        self.open_slide_button = QPushButton("Open slide")
        self.open_slide_button.clicked.connect(lambda: self._open_row(self.table.currentRow()))
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.1, 2.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setValue(0.5)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setToolTip("20x is about 0.5 µm/px, 40x about 0.25")
        self.set_mpp_button = QPushButton("Set pixel size")
        self.set_mpp_button.setToolTip("Record this pixel size for the selected slide (for slides whose file has "
                                       "none, or a wrong one); an open slide is redrawn in µm")
        self.set_mpp_button.clicked.connect(guarded("Set pixel size")(self._set_mpp_of_selected))
        row3 = QHBoxLayout()
        row3.addWidget(self.open_slide_button)
        row3.addStretch(1)
        row3.addWidget(self.mpp_spin)
        row3.addWidget(self.set_mpp_button)

        self.summary = QLabel("No cohort open.")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.PlainText)
        # What opening settled and what could not be written (read-only cohort and its cache folder, a
        # recovered cohort or names file, an index not saved): plain text, never a traceback dialog.
        self.notes = QLabel("")
        self.notes.setObjectName("slpd-cohort-notes")
        self.notes.setWordWrap(True)
        self.notes.setTextFormat(Qt.TextFormat.PlainText)
        self.notes.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.notes.setStyleSheet(f"color: {WARN_COLOR};")
        self.notes.setVisible(False)
        self.pixel_note = QLabel("")
        self.pixel_note.setWordWrap(True)
        self.pixel_note.setTextFormat(Qt.TextFormat.PlainText)
        self.pixel_note.setStyleSheet(f"color: {WARN_COLOR};")
        self.pixel_note.setVisible(False)
        self.confirm = self._ask  # (title, text, yes) -> bool; tests put their answer here
        self._thumb_worker = None
        self._pending_thumbs: list[str] = []
        self._info_tried: set[str] = set()
        self._unusable: list[tuple[str, str]] = []
        self._skipped: dict = {}  # row -> SkippedFile (files listed after the slides, not in the cohort)
        self.file_pixel_sizes: dict = {}  # slide_id -> PixelSize the file states
        self.statuses: dict = {}
        self._rows: dict[str, int] = {}  # slide_id -> row
        self._cache_applied = False
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

        layout = panel_layout(self)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addLayout(row_cache)
        layout.addWidget(self.summary)
        layout.addWidget(self.notes)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.pixel_note)
        layout.addLayout(row3)
        layout.addWidget(self.task_bar)

        self.table.verticalScrollBar().valueChanged.connect(lambda *_: self._visible_timer.start())
        self.destroyed.connect(lambda *_args, panel=self: panel._quit_workers())
        self.state.cohort_changed.connect(self._on_cohort_changed)
        self.state.features_updated.connect(self._on_cache_changed)
        self.state.prototypes_updated.connect(self._on_cache_changed)
        self.state.settings_changed.connect(self._on_settings_changed)
        self.state.slide_opened.connect(self._on_slide_opened)
        if self.state.session is not None:
            self._on_cohort_changed(self.state.session)

    # -- cohort ----------------------------------------------------------------------------------------
    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cohort folder (slides and cache)", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)
            guarded("Open cohort")(self.open_cohort)(folder)

    def _ask(self, title: str, text: str, yes: str) -> bool:
        """A question whose default answer is Cancel; True when the person chose ``yes``."""
        from qtpy.QtWidgets import QMessageBox

        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle(title)
        box.setText(text)
        box.setTextFormat(Qt.TextFormat.PlainText)
        accept = box.addButton(yes, QMessageBox.ButtonRole.AcceptRole)
        box.setDefaultButton(box.addButton("Cancel", QMessageBox.ButtonRole.RejectRole))
        box.exec()
        return box.clickedButton() is accept

    def open_typed_folder(self):
        """Open the folder typed in the field; one that does not exist is created only when the person says
        so (a mistyped path must not become a new, empty cohort)."""
        folder = self.folder_edit.text().strip()
        if folder and not Path(folder).expanduser().exists():
            path = Path(folder).expanduser().absolute()
            if not self.confirm("New cohort folder", f"{path} does not exist.\n\nCreate it as a new, empty "
                                "cohort folder?", "Create"):
                self.task_bar.status.setText(f"{path} does not exist; nothing was created")
                return None
        return self.open_cohort(folder)

    def _choose_cache_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cache folder for read-only cohorts", self.cache_edit.text())
        if folder:
            self.cache_edit.setText(folder)
            guarded("Cache folder")(self.set_cache_folder)(folder)

    @staticmethod
    def _initial_cache_folder() -> str:
        from napari_slpd.utils.storage import CACHE_ENV, CACHE_SETTING, user_config

        return os.environ.get(CACHE_ENV) or str(user_config().get(CACHE_SETTING) or "")

    def set_cache_folder(self, folder: str | Path) -> str:
        """Use ``folder`` as the cache folder of read-only cohorts ("": the default), as ``slpd --cache`` does
        (``$SLPD_CACHE_DIR`` of this process); saved in the open cohort's settings when it is writable, else
        in the user config. An open read-only cohort is opened again with it. Returns what was done."""
        from napari_slpd.errors import SlpdError
        from napari_slpd.utils.storage import CACHE_ENV, CACHE_SETTING, save_user_config

        folder = str(folder).strip()
        if folder:
            path = Path(folder).expanduser()
            if path.exists() and not path.is_dir():
                raise SlpdError(f"cache folder {path} is a file, not a folder")
            folder = str(path)
        if folder == os.environ.get(CACHE_ENV, "") and self._cache_applied:
            return ""
        self._cache_applied = True
        if folder:
            os.environ[CACHE_ENV] = folder
        else:
            os.environ.pop(CACHE_ENV, None)
        session = self.state.session
        if session is not None and not session.cohort.read_only:
            session.settings.cache_folder = folder  # saved in cohort.json "settings" at once
            where = f"saved in {session.cohort.registry_path}"
        else:
            try:
                where = f"saved in {save_user_config(**{CACHE_SETTING: folder})}"
            except (OSError, SlpdError) as exc:
                where = f"not saved ({exc})"
        message = f"cache folder for read-only cohorts: {folder or 'the default'} ({where})"
        if session is not None and session.cohort.read_only:
            self.open_cohort(session.root)  # what is written from now on goes to the new folder
            message += f"; {session.root} opened again with it"
        self.task_bar.status.setText(message)
        return message

    def _update_notes(self) -> None:
        session = self.state.session
        notes = session.notes() if session is not None else []
        self.notes.setText("\n".join(f"⚠ {note}" for note in notes))
        self.notes.setVisible(bool(notes))
        if session is not None and session.cohort.read_only and not self.cache_edit.hasFocus():
            self.cache_edit.setText(str(session.cohort.cache_root.parent))

    def _choose_slides(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of slides to add")
        if folder:
            guarded("Add slides")(self.add_slides)(folder)

    def open_cohort(self, folder: str | Path, slides=None):
        """Open (or create) the cohort folder and register the slides in it (or in ``slides``).

        A cohort that saved its settings opens with them (every panel shows them); a new one takes the
        panels' current settings and saves them."""
        from napari_slpd.errors import SlpdError
        from napari_slpd.session import Session

        if not str(folder).strip():
            raise SlpdError("choose a cohort folder first")
        session = Session.open(folder, slides=slides)
        if session.saved_settings() is None:
            session.settings = self.state.settings  # saved in the new cohort at once
        self.folder_edit.setText(str(session.root))
        self._remove_slide_layers()  # the previous cohort's slide must not stay on screen under the new one
        self.state.set_session(session)
        for problem in session.settings_problems[:3]:
            show_warning(f"cohort settings: {problem}")
        if session.settings_save_error:
            show_warning(session.settings_save_error)
        if session.last_skipped:
            show_warning(f"{session.root}: not added: {skipped_summary(session.last_skipped)} (listed in the "
                         "Cohort panel; select one to see why)")
        if not session.slide_ids():
            show_warning(
                f"{session.root} holds no slides yet; put slides in it or use 'Add slides…' "
                "(SVS, TIFF, NDPI, MRXS, SCN, BIF, DICOM folders…)"
            )
        return session

    def _remove_slide_layers(self) -> None:
        viewer = self.viewer
        for layer in self.state.slpd_layers():
            try:
                viewer.layers.remove(layer)
            except (ValueError, KeyError):  # removed meanwhile
                pass

    def add_slides(self, folder_or_paths) -> list[str]:
        """Register slides (a folder or paths); only slides new to the cohort are counted. Their
        thumbnails and pixel sizes are read in the background. Returns the new slide ids."""
        from napari_slpd.slides.ids import find_slides

        session = self.state.require_session()
        before = set(session.slide_ids())
        paths = find_slides(folder_or_paths) if isinstance(folder_or_paths, (str, Path)) else folder_or_paths
        added, skipped = session.add_slides(paths)
        new = [r.slide_id for r in added if r.slide_id not in before]
        again = len(added) - len(new)
        message = f"added {len(new)} new slide(s) to the cohort"
        if again:
            message += f" ({again} already in it)"
        if skipped:
            message += "; not added: " + skipped_summary(skipped) + " (listed in red below; select one to see why)"
        # One message: the reasons are in the list (tooltip, and the note under it for the selected file).
        (show_warning if skipped else show_info)(message)
        self.task_bar.status.setText(message)
        self.refresh()
        return new

    def _set_mpp_of_selected(self) -> None:
        slide_id = self.selected_slide_id()
        if slide_id is None:
            show_warning("select a slide in the list first")
            return
        self.set_pixel_size(slide_id, self.mpp_spin.value())

    def set_pixel_size(self, slide_id: str, mpp: float) -> None:
        """Record ``mpp`` for ``slide_id``; when it is the open slide, draw it again in micrometres."""
        self.state.require_session().set_slide_mpp(slide_id, mpp)
        message = f"{slide_id}: pixel size set to {mpp:g} µm/px"
        self.refresh()
        if self.state.current_slide_id == slide_id:
            self.open_slide(slide_id)  # every layer of the slide moves to the µm frame
            message += "; the open slide is redrawn in µm"
        show_info(message)
        self.task_bar.status.setText(message)

    def _refresh_clicked(self) -> None:
        self._info_tried.clear()  # try unreadable thumbnails again
        self.refresh()

    def _quit_workers(self) -> None:
        self._unknown = []
        for worker in (self._thumb_worker, self._status_worker):
            if worker is not None:
                worker.quit()
        self._status_worker = None

    def _on_cohort_changed(self, session) -> None:
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
        if session is None:
            self.summary.setText("No cohort open.")
            self._update_notes()
            return
        self.folder_edit.setText(str(session.root))
        self.refresh()

    def _on_cache_changed(self, _slide_id: str) -> None:
        if self.state.session is not None:
            self.refresh()

    def _on_settings_changed(self, _settings) -> None:
        # Other region sizes or encoders change every slide's status ("other" settings); other settings
        # (and a cohort just opened, listed with its own settings) change the summary only.
        session = self.state.session
        if session is None:
            return
        if self._listed_with != (session, session.status_settings()):
            self.refresh()
        else:
            self._update_summary(self.table.model().rowCount() - len(self._skipped))

    def _on_slide_opened(self, slide_id: str) -> None:
        model = self.table.model()
        for sid, bold in ((self._bold, False), (slide_id, True)):  # two rows change, not the whole list
            row = self._rows.get(sid) if sid is not None else None
            if row is not None and row < model.rowCount() and model.cell(row, COL_SLIDE).data == sid:
                model.update_cell(row, COL_SLIDE, bold=bold)
        self._bold = slide_id

    # -- the list --------------------------------------------------------------------------------------
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
        from napari.qt.threading import create_worker

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

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)  # said once, below
        worker.errored.connect(lambda exc: show_warning(f"slide statuses: {exc}"))
        # Only while it is this panel's worker: a batch queued as the panel closes (_quit_workers) is dropped.
        worker.yielded.connect(lambda batch, s=session, w=worker: self._set_statuses(s, batch)
                               if self._status_worker is w else None)
        worker.finished.connect(lambda w=worker: setattr(self, "_status_worker", None)
                                if self._status_worker is w else None)
        self._status_worker = worker
        worker.start()

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
        from napari.qt.threading import create_worker

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

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)  # each slide's errors are caught
        worker.yielded.connect(self._set_slide_info)
        self._thumb_worker = worker
        worker.finished.connect(lambda: self._info_finished(worker))
        worker.start()

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

    # -- opening a slide -------------------------------------------------------------------------------
    def _open_row(self, row: int) -> None:
        model = self.table.model()
        if row < 0 or row >= model.rowCount():
            show_warning("select a slide in the list first")
            return
        if row in self._skipped:
            sk = self._skipped[row]
            show_warning(f"{sk.path.name} is not a slide of this cohort ({sk.state}): {sk.reason}")
            return
        guarded("Open slide")(self.open_slide)(model.cell(row, COL_SLIDE).data)

    def open_slide(self, slide_id: str, detect_tissue: bool = True):
        """Show ``slide_id`` (image, regions, prototypes when cached); the tissue mask follows from a worker."""
        from napari_slpd.widgets._layers import ensure_selection_painter, show_slide, show_tissue

        ensure_selection_painter(self.state)
        opened = show_slide(self.state, slide_id)
        if detect_tissue:
            slide = opened.slide

            def work(progress, cancel):
                from napari_slpd.slides.tissue import detect_tissue as detect

                progress(0, 1)
                mask = detect(slide)
                progress(1, 1)
                return mask

            def done(mask):
                if self.state.current is opened:  # the user may have opened another slide meanwhile
                    show_tissue(self.state, mask)

            self.run_task(work, f"Tissue of {slide_id}", on_result=done)
        return opened
