"""Cohort panel: choose a cohort folder, list its slides with thumbnails and status, open one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from qtpy.QtCore import QSize, Qt
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.widgets._common import TaskBar, guarded, show_info, show_warning
from napari_slpd.widgets.state import SlpdState

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
COLUMNS = ("", "Slide", "µm/px", "Features", "Protos")


def array_to_pixmap(image: np.ndarray) -> QPixmap:
    """RGB uint8 (H, W, 3) -> QPixmap (copied, so the array may go away)."""
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    h, w = image.shape[:2]
    qimage = QImage(image.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimage.copy())


class CohortWidget(QWidget):
    """Open a cohort folder (slides + cache), see each slide's status, open a slide in the viewer."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.state = SlpdState.for_viewer(napari_viewer)
        self.setObjectName("slpd-cohort")

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("cohort folder (slides and cache)")
        choose = QPushButton("Choose…")
        choose.clicked.connect(self._choose_folder)
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(guarded("Open cohort")(lambda: self.open_cohort(self.folder_edit.text())))
        row = QHBoxLayout()
        row.addWidget(self.folder_edit, 1)
        row.addWidget(choose)
        row.addWidget(self.open_button)

        self.add_button = QPushButton("Add slides…")
        self.add_button.setToolTip("Register slides from another folder; their cache goes to this cohort")
        self.add_button.clicked.connect(self._choose_slides)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(guarded("Refresh")(self.refresh))
        row2 = QHBoxLayout()
        row2.addWidget(self.add_button)
        row2.addWidget(refresh)
        row2.addStretch(1)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(THUMB_PX + 4)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Fixed)
        self.table.setColumnWidth(0, THUMB_PX + 6)
        for col in (2, 3, 4):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        self.table.cellDoubleClicked.connect(lambda row, _col: self._open_row(row))

        self.open_slide_button = QPushButton("Open slide")
        self.open_slide_button.clicked.connect(lambda: self._open_row(self.table.currentRow()))
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setRange(0.1, 2.0)
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setValue(0.5)
        self.mpp_spin.setSuffix(" µm/px")
        set_mpp = QPushButton("Set pixel size")
        set_mpp.setToolTip("Record the pixel size of the selected slide (for slides whose file has none)")
        set_mpp.clicked.connect(guarded("Set pixel size")(self._set_mpp_of_selected))
        row3 = QHBoxLayout()
        row3.addWidget(self.open_slide_button)
        row3.addStretch(1)
        row3.addWidget(self.mpp_spin)
        row3.addWidget(set_mpp)

        self.summary = QLabel("No cohort open.")
        self.summary.setWordWrap(True)
        self.task_bar = TaskBar()
        self._thumb_worker = None

        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 1)
        layout.addLayout(row3)
        layout.addWidget(self.task_bar)

        self.destroyed.connect(lambda *_args, panel=self: panel._thumb_worker.quit() if panel._thumb_worker else None)
        self.state.cohort_changed.connect(self._on_cohort_changed)
        self.state.features_updated.connect(self._on_cache_changed)
        self.state.prototypes_updated.connect(self._on_cache_changed)
        self.state.slide_opened.connect(self._on_slide_opened)
        if self.state.session is not None:
            self._on_cohort_changed(self.state.session)

    # -- cohort ----------------------------------------------------------------------------------------
    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cohort folder (slides and cache)", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)
            guarded("Open cohort")(self.open_cohort)(folder)

    def _choose_slides(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of slides to add")
        if folder:
            guarded("Add slides")(self.add_slides)(folder)

    def open_cohort(self, folder: str | Path, slides=None):
        """Open (or create) the cohort folder and register the slides in it (or in ``slides``)."""
        from napari_slpd.errors import SlpdError
        from napari_slpd.session import Session

        if not str(folder).strip():
            raise SlpdError("choose a cohort folder first")
        session = Session.open(folder, slides=slides, settings=self.state.settings)
        self.folder_edit.setText(str(session.root))
        self.state.set_session(session)
        if not session.slide_ids():
            show_warning(
                f"{session.root} holds no slides yet; put slides in it or use 'Add slides…' "
                "(SVS, TIFF, NDPI, MRXS, SCN, BIF, DICOM folders…)"
            )
        return session

    def add_slides(self, folder_or_paths) -> None:
        from napari_slpd.slides.ids import find_slides

        session = self.state.require_session()
        paths = find_slides(folder_or_paths) if isinstance(folder_or_paths, (str, Path)) else folder_or_paths
        added, problems = session.add_slides(paths)
        for problem in problems[:5]:
            show_warning(problem)
        show_info(f"added {len(added)} slide(s) to the cohort")
        self.refresh()

    def _set_mpp_of_selected(self) -> None:
        slide_id = self.selected_slide_id()
        if slide_id is None:
            show_warning("select a slide in the list first")
            return
        self.state.require_session().set_slide_mpp(slide_id, self.mpp_spin.value())
        show_info(f"{slide_id}: pixel size set to {self.mpp_spin.value():g} µm/px")
        self.refresh()

    def _on_cohort_changed(self, session) -> None:
        self.table.setRowCount(0)
        if session is None:
            self.summary.setText("No cohort open.")
            return
        self.folder_edit.setText(str(session.root))
        self.refresh()
        self._load_thumbnails()

    def _on_cache_changed(self, _slide_id: str) -> None:
        if self.state.session is not None:
            self.refresh()

    def _on_slide_opened(self, slide_id: str) -> None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 1)
            font = item.font()
            font.setBold(item.text() == slide_id)
            item.setFont(font)

    # -- the list --------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the registry and each slide's cache status."""
        session = self.state.session
        if session is None:
            return
        selected = self.selected_slide_id()
        statuses = session.statuses()
        icons = {}
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and not item.icon().isNull():
                icons[self.table.item(row, 1).text()] = item.icon()
        self.table.setRowCount(len(statuses))
        n_feat = n_proto = 0
        for row, st in enumerate(statuses):
            thumb = QTableWidgetItem()
            if st.slide_id in icons:
                thumb.setIcon(icons[st.slide_id])
            self.table.setItem(row, 0, thumb)
            name = QTableWidgetItem(st.slide_id)
            name.setToolTip(str(st.path) + ("" if st.exists else "  (file missing)"))
            name.setData(Qt.ItemDataRole.UserRole, st.slide_id)
            self.table.setItem(row, 1, name)
            mpp_item = QTableWidgetItem(f"{st.mpp:.3g}" if st.mpp is not None else "file")
            mpp_item.setToolTip(
                f"pixel size set to {st.mpp:g} um/px ({st.mpp_source or 'user'})" if st.mpp is not None
                else "pixel size as the slide file states it"
            )
            self.table.setItem(row, 2, mpp_item)
            feat = QTableWidgetItem(STATUS_TEXT.get(st.features, st.features))
            feat.setToolTip(st.detail or st.features)
            feat.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            self.table.setItem(row, 3, feat)
            proto = QTableWidgetItem(STATUS_TEXT.get(st.prototypes, st.prototypes))
            proto.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            self.table.setItem(row, 4, proto)
            n_feat += st.features_done
            n_proto += st.prototypes_done
            if st.slide_id == selected:
                self.table.selectRow(row)
        self.statuses = {st.slide_id: st for st in statuses}
        self.summary.setText(
            f"{session.root}\n{len(statuses)} slides · features {n_feat}/{len(statuses)} · "
            f"prototypes {n_proto}/{len(statuses)} (K={self.state.settings.prototypes.k})"
        )
        if self.state.current_slide_id:
            self._on_slide_opened(self.state.current_slide_id)

    def selected_slide_id(self) -> str | None:
        row = self.table.currentRow()
        if row < 0 or self.table.item(row, 1) is None:
            return None
        return self.table.item(row, 1).text()

    def slide_ids(self) -> list[str]:
        return [self.table.item(r, 1).text() for r in range(self.table.rowCount())]

    def _load_thumbnails(self) -> None:
        """Make the thumbnails in a worker (cached as PNG in the cohort) and show each as it comes."""
        from napari.qt.threading import create_worker

        session = self.state.session
        if session is None:
            return
        slide_ids = session.slide_ids()

        def work():
            for slide_id in slide_ids:
                try:
                    yield slide_id, session.thumbnail(slide_id)
                except Exception as exc:  # one unreadable slide must not stop the other thumbnails
                    log.warning("no thumbnail for %s: %s", slide_id, exc)

        if self._thumb_worker is not None:
            self._thumb_worker.quit()
        worker = create_worker(work, _start_thread=False)
        worker.yielded.connect(self._set_thumbnail)
        self._thumb_worker = worker
        worker.finished.connect(lambda: setattr(self, "_thumb_worker", None) if self._thumb_worker is worker else None)
        worker.start()

    def _set_thumbnail(self, item) -> None:
        slide_id, image = item
        for row in range(self.table.rowCount()):
            if self.table.item(row, 1) is not None and self.table.item(row, 1).text() == slide_id:
                self.table.item(row, 0).setIcon(QIcon(array_to_pixmap(image)))

    # -- opening a slide -------------------------------------------------------------------------------
    def _open_row(self, row: int) -> None:
        if row < 0 or self.table.item(row, 1) is None:
            show_warning("select a slide in the list first")
            return
        guarded("Open slide")(self.open_slide)(self.table.item(row, 1).text())

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

            self.task_bar.run(work, f"Tissue of {slide_id}", on_result=done)
        return opened
