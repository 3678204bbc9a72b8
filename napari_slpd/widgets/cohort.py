"""Cohort panel: choose a cohort folder, list its slides with thumbnails, pixel size and status, open one.

The cohort folder owns its settings (``cohort.json`` "settings"): opening it loads them into every panel
(see :meth:`SlpdState.set_session`). The list of slides, filled in the background, is
:mod:`.cohort_list`'s; this module opens cohorts and slides, adds slides, sets the cache folder of
read-only cohorts and the pixel size of slides whose file has none.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
)

from napari_slpd.widgets._base import SlpdPanel
from napari_slpd.widgets._common import guarded, show_info, show_warning
from napari_slpd.widgets._panels import panel_layout
from napari_slpd.widgets.cohort_list import COL_MPP, COL_PROTOS, COL_SLIDE, LAZY_ROWS, WARN_COLOR, CohortSlideList

# The list's columns and its threshold for large cohorts were defined here before the list had a module of
# its own: still importable from here.
__all__ = ["COL_MPP", "COL_PROTOS", "COL_SLIDE", "LAZY_ROWS", "CohortWidget", "skipped_summary"]

log = logging.getLogger(__name__)


def skipped_summary(skipped) -> str:
    """'2 unreadable file(s), 1 duplicate slide id' for a list of SkippedFile."""
    from collections import Counter

    counts = Counter(sk.state for sk in skipped)
    words = {"unreadable": "unreadable file(s)", "duplicate id": "file(s) whose slide id another file has",
             "not extracted": "slide(s) without features (see the reason)"}
    return ", ".join(f"{n} {words.get(state, state)}" for state, n in sorted(counts.items()))


class CohortWidget(CohortSlideList, SlpdPanel):
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

        self._make_slide_list()

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
        self._cache_applied = False

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

    def _on_cohort_changed(self, session) -> None:
        self._clear_slide_list()
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
