"""What every SLPD panel shares: long work off the GUI thread, progress, cancel, errors as notifications.

A panel hands :class:`TaskBar` a plain function ``fn(progress, cancel) -> result`` written against the
Qt-free core. It runs in a napari thread worker; ``progress(done, total)`` may be called from that worker
thread (a queued Qt signal carries it to the GUI thread, where the panel's bar and napari's activity dock
are updated); ``cancel`` is a :class:`threading.Event` that the Cancel button sets and the core polls.
Errors never escape into Qt: they become napari notifications with the message the core wrote for the
user, and the panel stays usable.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDockWidget,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.errors import SlpdError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
TaskFn = Callable[[ProgressFn, threading.Event], Any]


def error_message(exc: BaseException, context: str = "") -> str:
    """The text a person sees for ``exc``: the core's own words for SlpdError, type and text otherwise."""
    if isinstance(exc, SlpdError):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc}" if str(exc) else f"unexpected {type(exc).__name__}"
    return f"{context}: {text}" if context else text


def show_error(exc: BaseException | str, context: str = "") -> str:
    """Report an error as a napari notification (never a modal dialog) and return the message shown."""
    from napari.utils.notifications import show_error as napari_show_error

    message = exc if isinstance(exc, str) else error_message(exc, context)
    if isinstance(exc, BaseException) and not isinstance(exc, SlpdError):
        # Not an input problem the user can fix: keep the traceback for a bug report.
        log.error("%s", message, exc_info=(type(exc), exc, exc.__traceback__))
    napari_show_error(message)
    return message


# -- untrusted text: slide ids (from file names), prototype names (typed, or returned by a language model) --
# Qt guesses whether a label's or tooltip's text is HTML (Qt::mightBeRichText): "<b>x</b>" or "<img src=...>"
# in a name would render (and load) as HTML. Labels that show such text are set to plain text; tooltips
# (which have no text format) carry it escaped inside an explicit rich-text wrapper, so it shows literally.


def plain_label(label_or_text: QLabel | str = "", word_wrap: bool = False) -> QLabel:
    """A QLabel (new, or the one given) that shows its text literally, never as HTML."""
    label = label_or_text if isinstance(label_or_text, QLabel) else QLabel(str(label_or_text))
    label.setTextFormat(Qt.TextFormat.PlainText)
    if word_wrap:
        label.setWordWrap(True)
    return label


def plain_tooltip(text: str | None) -> str | None:
    """``text`` as a tooltip that shows literally: unchanged when Qt could not take it for HTML, else
    escaped (html.escape) inside ``<qt>...</qt>`` with its line breaks kept."""
    if text is None:
        return None
    text = str(text)
    if "<" not in text and "&" not in text:
        return text
    import html

    return "<qt>" + html.escape(text).replace("\n", "<br>") + "</qt>"


def set_plain_tooltip(widget, text: str | None) -> None:
    """``widget.setToolTip`` with :func:`plain_tooltip` (slide ids, prototype names, paths)."""
    widget.setToolTip(plain_tooltip(text) or "")


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as napari_show_info

    napari_show_info(message)


def show_warning(message: str) -> None:
    from napari.utils.notifications import show_warning as napari_show_warning

    napari_show_warning(message)


def guarded(context: str):
    """Decorate a GUI slot so that an exception becomes a notification instead of a Qt crash."""

    def wrap(fn):
        n_params = _positional_capacity(fn)

        def slot(*args, **kwargs):
            # Qt signals pass extra values (clicked passes `checked`): give fn only what it takes.
            if n_params is not None:
                args = args[:n_params]
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # a slot must never raise into the Qt event loop
                show_error(exc, context)
                return None

        slot.__name__ = getattr(fn, "__name__", "slot")
        slot.__doc__ = fn.__doc__
        return slot

    return wrap


def _positional_capacity(fn) -> int | None:
    """How many positional arguments ``fn`` accepts (None: any number)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


class _ProgressRelay(QObject):
    """Lives in the GUI thread; signals emitted from a worker thread are queued to it by Qt."""

    progressed = Signal(int, int)


class Task:
    """One run of ``fn(progress, cancel)`` in a napari thread worker.

    ``on_result(result)`` runs in the GUI thread when ``fn`` returns without being cancelled;
    ``on_cancelled()`` when the user cancelled (whether ``fn`` then returned or raised);
    ``on_error(exc)`` after the error was shown as a notification; ``on_finished()`` always, last.
    """

    def __init__(
        self,
        fn: TaskFn,
        description: str,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        on_finished: Callable[[], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        activity: bool = True,
    ):
        self.fn = fn
        self.description = description
        self.cancel_event = threading.Event()
        self.on_result = on_result
        self.on_error = on_error
        self.on_cancelled = on_cancelled
        self.on_finished = on_finished
        self.on_progress = on_progress
        self.activity = activity
        self.outcome: str | None = None  # "done" | "cancelled" | "error" once finished
        self.error: BaseException | None = None
        self.result: Any = None
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._on_progress, Qt.ConnectionType.QueuedConnection)
        self._pbar = None
        self.worker = None
        self.finished = False

    # -- lifetime ------------------------------------------------------------------------------------
    def start(self) -> "Task":
        from napari.qt.threading import create_worker

        relay = self._relay
        cancel = self.cancel_event

        def progress(done: int, total: int) -> None:
            relay.progressed.emit(int(done), int(total))

        def work():
            return self.fn(progress, cancel)

        if self.activity:
            from napari.utils import cancelable_progress

            # napari's activity dock shows this bar; its own cancel button sets our event too.
            self._pbar = cancelable_progress(total=0, desc=self.description, cancel_callback=self.cancel)
        self.worker = create_worker(work, _start_thread=False)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop; it stops at its next cancel check and leaves no half-written file."""
        self.cancel_event.set()

    @property
    def running(self) -> bool:
        return self.worker is not None and not self.finished

    # -- GUI-thread handlers -------------------------------------------------------------------------
    def _call(self, callback, *args) -> bool:
        """Run a panel's callback; False (and a notification) when it raised. A panel closed while its
        task ran has lost its Qt objects: that is not an error to report."""
        if callback is None:
            return True
        try:
            callback(*args)
        except RuntimeError as exc:
            if "has been deleted" in str(exc):
                return True
            show_error(exc, self.description)
            return False
        except Exception as exc:  # showing a result must not crash the viewer either
            show_error(exc, self.description)
            return False
        return True

    def _on_progress(self, done: int, total: int) -> None:
        if self._pbar is not None:
            if self._pbar.total != total:
                self._pbar.total = total
            self._pbar.n = done
            self._pbar.events.value(value=done)
        self._call(self.on_progress, done, total)

    def _on_returned(self, result: Any) -> None:
        self.result = result
        if self.cancel_event.is_set():
            self.outcome = "cancelled"
            self._call(self.on_cancelled)
        else:
            self.outcome = "done"
            if not self._call(self.on_result, result):
                self.outcome = "error"

    def _on_errored(self, exc: BaseException) -> None:
        if self.cancel_event.is_set():
            # Work that stops because it was cancelled may raise; that is not an error to report.
            self.outcome = "cancelled"
            self._call(self.on_cancelled)
            return
        self.outcome = "error"
        self.error = exc
        show_error(exc, self.description)
        self._call(self.on_error, exc)

    def _on_finished(self) -> None:
        if self.outcome is None:  # a worker quit before returning
            self.outcome = "cancelled" if self.cancel_event.is_set() else "done"
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.finished = True
        self._call(self.on_finished)


# How a finished task's bar reads (the bar's text) and whether it ends full. Set from the outcome, never
# from the last progress report: a task whose slides were all cached ends full and says "cached", one
# that failed says "failed" (the reason is in the status line below), a cancelled one "cancelled".
END_STATES = {
    "done": ("done", True),
    "cached": ("cached", True),
    "partial": ("done", True),  # finished, some items failed: the text says how many
    "failed": ("failed", False),
    "error": ("failed", False),
    "cancelled": ("cancelled", False),
}


class TaskBar(QWidget):
    """A panel's progress bar, status line and Cancel button; runs one :class:`Task` at a time.

    The end state comes from the outcome: ``on_result`` handlers call :meth:`finish` with "done",
    "cached", "partial" (some items failed) or "failed" and the text for the status line; a task that
    raised ends "failed" with its message, a cancelled one "cancelled".
    """

    task_finished = Signal(str)  # the outcome: "done", "cancelled" or "error"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop the running work; finished slides stay cached")
        self.cancel_button.clicked.connect(self.cancel)
        self.status = plain_label("", word_wrap=True)  # shows slide ids and prototype names
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.task: Task | None = None
        self.end_state: str | None = None  # "done" | "cached" | "partial" | "failed" | "cancelled", once finished
        self._final: tuple[str, str | None, str | None] | None = None
        # A panel closed while its task runs: stop the work (finished files stay, nothing half-written).
        self.destroyed.connect(lambda *_args, bar=self: bar.task.cancel() if bar.task is not None else None)

    @property
    def busy(self) -> bool:
        return self.task is not None and self.task.running

    def run(
        self,
        fn: TaskFn,
        description: str,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
    ) -> Task | None:
        """Start ``fn`` unless a task already runs here (then say so and return None)."""
        if self.busy:
            show_warning(f"{self.task.description} is still running; wait for it or cancel it first")
            return None

        def cancelled():
            self.status.setText(f"{description}: cancelled")
            if on_cancelled:
                on_cancelled()

        def errored(exc):
            self.status.setText(error_message(exc, description))
            if on_error:
                on_error(exc)

        task = Task(
            fn,
            description,
            on_result=on_result,
            on_error=errored,
            on_cancelled=cancelled,
            on_finished=self._finished,
            on_progress=self._progress,
        )
        self.task = task
        self.end_state = None
        self._final = None
        self.progress_bar.setFormat("%v / %m")
        self.progress_bar.setRange(0, 0)  # busy until the first progress report gives a total
        self.cancel_button.setEnabled(True)
        self.status.setText(f"{description}…")
        task.start()
        return task

    def cancel(self) -> None:
        if self.busy:
            self.task.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText(f"{self.task.description}: cancelling…")

    def finish(self, state: str, status: str | None = None, label: str | None = None) -> None:
        """Say how the running task ended (from its ``on_result``): ``state`` "done", "cached", "partial"
        or "failed"; ``status`` the line shown below the bar (e.g. the failure reasons); ``label`` the
        bar's own text (default: the state's word)."""
        if state not in END_STATES:
            raise ValueError(f"unknown end state {state!r}")
        self._final = (state, status, label)
        if status is not None:
            self.status.setText(status)

    def _progress(self, done: int, total: int) -> None:
        if not self.busy:
            return  # a report queued behind the end: the end state stays
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
            self.progress_bar.setFormat("%v / %m")

    def _finished(self) -> None:
        task = self.task
        self.cancel_button.setEnabled(False)
        if task.outcome == "cancelled":
            state, label = "cancelled", None
        elif task.outcome == "error":
            state, label = "failed", None
        else:
            state, _status, label = self._final or ("done", None, None)
        word, full = END_STATES[state]
        self.end_state = state
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if full else 0)
        self.progress_bar.setFormat(label or word)
        if state in ("done", "cached") and self.status.text().endswith("…"):
            self.status.setText(f"{task.description}: {word}")
        self.task_finished.emit(task.outcome or "done")


def wait_for(task_bar: TaskBar, qtbot, timeout_ms: int = 60_000) -> str:
    """Test helper: block (processing Qt events) until ``task_bar``'s task has finished; its outcome."""
    qtbot.waitUntil(lambda: task_bar.task is not None and not task_bar.busy, timeout=timeout_ms)
    return task_bar.task.outcome


# -- panels that fit a 1,080-px screen in any combination ----------------------------------------------
# Each panel's contents sit in a scroll area (the dock's minimum height is then small: it scrolls instead
# of pushing napari's window past the screen), its tables keep room for MIN_TABLE_ROWS rows inside the
# scroll area, and the first time a panel is shown docked it joins the other SLPD docks of its dock
# area as a tab (as napari's layer controls and layer list share their side), so docking every panel
# from the Plugins menu gives one tabbed dock, not a stack taller than the screen.

PANEL_MIN_HEIGHT = 120
PANEL_MIN_WIDTH = 440
MIN_TABLE_ROWS = 5
COMFORT_HEIGHT = 460  # below this per stacked dock, a newly docked panel joins a tab instead
SLPD_OBJECT_PREFIX = "slpd-"


def panel_layout(panel: QWidget) -> QVBoxLayout:
    """The layout a panel fills: inside a frameless, vertically scrolling area that is the panel's only
    child. Returns the inner layout (use it as ``QVBoxLayout(panel)`` would have been used)."""
    outer = QVBoxLayout(panel)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea(panel)
    scroll.setObjectName(f"{panel.objectName() or 'slpd'}-scroll")
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
    inner = QWidget()
    inner.setObjectName(f"{panel.objectName() or 'slpd'}-contents")
    scroll.setWidget(inner)
    outer.addWidget(scroll)
    panel.scroll_area = scroll
    panel.setMinimumHeight(PANEL_MIN_HEIGHT)
    panel.setMinimumWidth(PANEL_MIN_WIDTH)  # slide names need room; napari's canvas has plenty on 1920 px
    return QVBoxLayout(inner)


def table_min_height(table: QAbstractItemView, rows: int = MIN_TABLE_ROWS, row_height: int | None = None) -> int:
    """Height that shows the header and ``rows`` rows of ``table``."""
    vh = table.verticalHeader()
    hh = table.horizontalHeader()
    per_row = row_height or vh.defaultSectionSize()
    header = hh.sizeHint().height() if hh is not None and not hh.isHidden() else 0
    return int(header + rows * per_row + 2 * table.frameWidth() + 8)  # 8: the header's real height varies by style


def keep_rows_visible(table: QAbstractItemView, rows: int = MIN_TABLE_ROWS, row_height: int | None = None) -> None:
    """Never squeeze ``table`` below ``rows`` rows (the panel scrolls instead)."""
    table.setMinimumHeight(table_min_height(table, rows, row_height))


def visible_rows(table: QAbstractItemView) -> int:
    """How many whole rows the table's viewport has room for (for tests and layout checks)."""
    per_row = max(1, table.verticalHeader().defaultSectionSize())
    return int(table.viewport().height() // per_row)


def _dock_of(widget: QWidget) -> QDockWidget | None:
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def tabify_with_siblings(panel: QWidget, comfort_height: int | None = None) -> bool:
    """Put ``panel``'s dock into a tab of the last SLPD dock of its dock area when stacking it there would
    leave each stacked dock less than ``comfort_height`` px (room for a table of MIN_TABLE_ROWS rows and
    the controls around it). Public Qt API only: the dock is found through the widget's parents, the
    main window through the dock's. True if it was tabbed."""
    comfort_height = COMFORT_HEIGHT if comfort_height is None else comfort_height
    dock = _dock_of(panel)
    if dock is None or dock.isFloating():
        return False
    main = dock.parentWidget()
    if not isinstance(main, QMainWindow):
        return False
    area = main.dockWidgetArea(dock)
    in_area = [d for d in main.findChildren(QDockWidget)
               if not d.isFloating() and not d.isHidden() and main.dockWidgetArea(d) == area]
    groups = {frozenset([d, *main.tabifiedDockWidgets(d)]) for d in in_area}
    siblings = [d for d in in_area if d is not dock and d.widget() is not None
                and d.widget().objectName().startswith(SLPD_OBJECT_PREFIX)
                and dock not in main.tabifiedDockWidgets(d)]
    if not siblings:
        return False
    central = main.centralWidget()
    height = central.height() if central is not None else main.height()
    screen = main.screen() if hasattr(main, "screen") else None
    if screen is not None:  # a window taller than its screen is no measure: the screen is
        height = min(height, screen.availableGeometry().height() - 140)
    if len(groups) > 1 and height / len(groups) >= comfort_height:
        return False  # room to show it stacked
    main.tabifyDockWidget(siblings[-1], dock)
    dock.show()
    dock.raise_()
    return True


class DockedPanel:
    """Mixin for SLPD panels (QWidget subclasses whose objectName starts with "slpd-"): on first show in
    a dock, join the other SLPD docks as a tab, and from then on arrange any SLPD panel docked later the
    same way (also panels without this mixin)."""

    _slpd_tabified = False

    def showEvent(self, event):  # noqa: N802 (Qt name)
        super().showEvent(event)
        if not self._slpd_tabified:
            self._slpd_tabified = True
            # After napari finished adding the dock (it resizes its area right after showing it).
            QTimer.singleShot(0, lambda panel=self: _tabify_quietly(panel))
            _DockArranger.install(self)


def _tabify_quietly(panel) -> None:
    try:
        tabify_with_siblings(panel)
    except RuntimeError:  # the panel was closed at once
        pass


class _DockArranger(QObject):
    """One per main window: a dock widget holding an SLPD panel that is added later is arranged like
    the panels that use :class:`DockedPanel` (an event filter on the window: public Qt API)."""

    NAME = "slpd-dock-arranger"

    @classmethod
    def install(cls, panel: QWidget) -> None:
        main = panel.window()
        if not isinstance(main, QMainWindow) or main.findChild(QObject, cls.NAME) is not None:
            return
        arranger = cls(main)
        arranger.setObjectName(cls.NAME)
        main.installEventFilter(arranger)

    def eventFilter(self, obj, event):  # noqa: N802 (Qt name)
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Type.ChildAdded and isinstance(event.child(), QDockWidget):
            dock = event.child()
            QTimer.singleShot(0, lambda dock=dock: self._arrange(dock))
        return False

    @staticmethod
    def _arrange(dock) -> None:
        try:
            widget = dock.widget()
            if widget is None or isinstance(widget, DockedPanel):
                return  # not ours, or it arranges itself
            if widget.objectName().startswith(SLPD_OBJECT_PREFIX) and not getattr(widget, "_slpd_tabified", False):
                widget._slpd_tabified = True
                tabify_with_siblings(widget)
        except RuntimeError:  # closed at once
            pass


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
