"""Tables as model/view: elided names with the full (plain-text) value in a tooltip, stretch columns."""

from __future__ import annotations

import logging

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
)

from napari_slpd.widgets._common import plain_tooltip

log = logging.getLogger(__name__)


# -- tables: model/view, elided names with the full text in a tooltip, stretch columns -----------------


class Cell:
    """One table cell: text (elided by the view when too long; the tooltip then carries it whole),
    tooltip, icon, alignment, sort/user data, text colour."""

    __slots__ = ("text", "tooltip", "icon", "align", "data", "color", "background", "bold")

    def __init__(self, text: str = "", tooltip: str | None = None, icon=None, align=None, data=None,
                 color: str | None = None, background: str | None = None, bold: bool = False):
        self.bold = bold
        self.text = str(text)
        self.tooltip = tooltip
        self.icon = icon
        self.align = align
        self.data = data
        self.color = color
        self.background = background


def make_row_model(headers: list[str], parent=None):
    from qtpy.QtCore import QAbstractTableModel, QModelIndex
    from qtpy.QtGui import QBrush, QColor

    class _Model(QAbstractTableModel):
        def __init__(self):
            super().__init__(parent)
            self.headers = list(headers)
            self.rows: list[list[Cell]] = []

        def rowCount(self, index=QModelIndex()):  # noqa: N802
            return 0 if index.isValid() else len(self.rows)

        def columnCount(self, index=QModelIndex()):  # noqa: N802
            return 0 if index.isValid() else len(self.headers)

        def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
            if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
                return self.headers[section] if 0 <= section < len(self.headers) else None
            return None

        def data(self, index, role=Qt.ItemDataRole.DisplayRole):
            if not index.isValid() or index.row() >= len(self.rows):
                return None
            row = self.rows[index.row()]
            if index.column() >= len(row):
                return None
            cell = row[index.column()]
            if role == Qt.ItemDataRole.DisplayRole:
                return cell.text
            if role == Qt.ItemDataRole.ToolTipRole:  # shown literally (names may look like HTML)
                return plain_tooltip(cell.tooltip if cell.tooltip is not None else (cell.text or None))
            if role == Qt.ItemDataRole.DecorationRole:
                return cell.icon
            if role == Qt.ItemDataRole.TextAlignmentRole and cell.align is not None:
                return int(cell.align)
            if role == Qt.ItemDataRole.UserRole:
                return cell.data
            if role == Qt.ItemDataRole.ForegroundRole and cell.color:
                return QBrush(QColor(cell.color))
            if role == Qt.ItemDataRole.BackgroundRole and cell.background:
                return QBrush(QColor(cell.background))
            if role == Qt.ItemDataRole.FontRole and cell.bold:
                from qtpy.QtGui import QFont

                font = QFont()
                font.setBold(True)
                return font
            return None

        def set_headers(self, new_headers: list[str]) -> None:
            self.beginResetModel()
            self.headers = list(new_headers)
            self.endResetModel()

        def set_rows(self, rows: list[list[Cell]]) -> None:
            self.beginResetModel()
            self.rows = [list(r) for r in rows]
            self.endResetModel()

        def set_row(self, row: int, cells: list[Cell]) -> None:
            self.rows[row] = list(cells)
            self.dataChanged.emit(self.index(row, 0), self.index(row, len(self.headers) - 1))

        def update_cell(self, row: int, column: int, **changes) -> None:
            cell = self.rows[row][column]
            for key, value in changes.items():
                setattr(cell, key, value)
            index = self.index(row, column)
            self.dataChanged.emit(index, index)

        def cell(self, row: int, column: int) -> Cell:
            return self.rows[row][column]

    return _Model()


def make_table(headers: list[str], stretch: int, fit: tuple[int, ...] = (), icon_px: int | None = None,
               row_px: int | None = None, elide=Qt.TextElideMode.ElideMiddle):
    """A read-only, row-selecting table view over a :func:`make_row_model` model: column ``stretch``
    takes the free width, the ``fit`` columns their contents' width, long texts are elided in the middle
    (slide names keep their distinctive ends) with the whole text in the tooltip."""
    from qtpy.QtCore import QSize
    from qtpy.QtWidgets import QHeaderView, QTableView

    class _Table(QTableView):
        cellDoubleClicked = Signal(int, int)  # row, column (as QTableWidget's)

        def __init__(self):
            super().__init__()
            self.doubleClicked.connect(lambda index: self.cellDoubleClicked.emit(index.row(), index.column()))

        def rowCount(self) -> int:  # noqa: N802 (QTableWidget's name)
            return self.model().rowCount()

        def text(self, row: int, column: int) -> str:
            return self.model().cell(row, column).text

        def tooltip(self, row: int, column: int) -> str:
            return self.model().data(self.model().index(row, column), Qt.ItemDataRole.ToolTipRole) or ""

        def currentRow(self) -> int:  # noqa: N802
            index = self.currentIndex()
            return index.row() if index.isValid() else -1

    table = _Table()
    model = make_row_model(headers, table)
    table.setModel(model)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setTextElideMode(elide)
    table.setWordWrap(False)
    table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    table.verticalHeader().setVisible(False)
    if icon_px:
        table.setIconSize(QSize(icon_px, icon_px))
    if row_px:
        table.verticalHeader().setDefaultSectionSize(row_px)
        table.verticalHeader().setMinimumSectionSize(min(row_px, 18))
    header = table.horizontalHeader()
    header.setMinimumSectionSize(24)
    header.setStretchLastSection(False)
    for column in range(len(headers)):
        if column == stretch:
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Stretch)
        elif column in fit:
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        else:
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
    return table
