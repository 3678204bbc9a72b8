"""Panels that fit a 1,080-px screen in any combination: contents in a scroll area, tables that keep
room for a few rows, panels that join the other SLPD docks as tabs when the screen is short."""

from __future__ import annotations

import logging
import weakref

from qtpy.QtCore import QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDockWidget,
    QFrame,
    QMainWindow,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)


log = logging.getLogger(__name__)


def later(ms: int, fn, widget) -> None:
    """Call ``fn(widget)`` in ``ms`` milliseconds unless ``widget`` is gone by then. The pending timer holds
    only a weak reference: a viewer closed meanwhile is not kept alive by it (napari's tests count leaks)."""
    ref = weakref.ref(widget)

    def call():
        target = ref()
        if target is not None:
            try:
                fn(target)
            except RuntimeError:  # the Qt object was deleted
                pass

    QTimer.singleShot(ms, call)


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
    # Once the panel's __init__ has put every widget in place (the next turn of the event loop).
    later(0, narrow_combos, panel)
    return QVBoxLayout(inner)





def compact_form(form):
    """``form`` (a QFormLayout) laid out to fit a dock: a field too wide beside its label goes under it,
    and fields take the width there is (not their own preferred width)."""
    from qtpy.QtWidgets import QFormLayout

    form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return form


COMBO_MIN_CHARS = 12


def narrow_combos(panel: QWidget) -> None:
    """Combo boxes of ``panel`` take the width the dock gives them, not that of their longest item (an encoder
    or checkpoint name made the fine-tune panel 600 px wide); the list that drops down still shows whole
    items, and the chosen one is in the tooltip of the row anyway."""
    from qtpy.QtWidgets import QComboBox

    for combo in panel.findChildren(QComboBox):
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(min(COMBO_MIN_CHARS, max(4, combo.minimumContentsLength())))


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
            narrow_combos(self)
            # After napari finished adding the dock (it resizes its area right after showing it).
            later(0, _tabify_quietly, self)
            _DockArranger.install(self)


def _tabify_quietly(panel) -> None:
    try:
        tabify_with_siblings(panel)
        main = panel.window()
    except RuntimeError:  # the panel was closed at once
        return
    short_dock_title(panel)
    # Qt lays the dock areas out after this event: check the window's height and tabs once that is done.
    later(0, lambda window: (fit_window_to_screen(window), readable_dock_tabs(window)), main)


# The tab of a docked panel shows its dock's title; napari's "Cohort (napari-slpd)" leaves ~60 px per tab
# once all eight panels share a dock ("Fe…", "Pro…"). Short titles, and tab bars that scroll instead of
# eliding, keep every title readable.
SHORT_TITLES = {"SLPD fine-tune": "Fine-tune", "Prototype labeling": "Labeling", "Similar slides": "Similar",
                "Embedding map": "Map"}


def short_dock_title(panel: QWidget) -> str | None:
    """Drop napari's " (plugin)" suffix from the title of ``panel``'s dock, and shorten the longer names;
    returns the new title (None when the panel is not docked)."""
    dock = _dock_of(panel)
    if dock is None:
        return None
    title = dock.windowTitle()
    if title.endswith(")") and " (" in title:
        title = title[: title.rindex(" (")]
    title = SHORT_TITLES.get(title, title)
    if title != dock.windowTitle():
        dock.setWindowTitle(title)
    return title


def readable_dock_tabs(main) -> None:
    """The dock tab bars of ``main`` scroll instead of eliding their titles."""
    from qtpy.QtWidgets import QTabBar

    try:
        for bar in main.findChildren(QTabBar, options=Qt.FindChildOption.FindDirectChildrenOnly):
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)
    except RuntimeError:  # the window is gone
        pass


def fit_window_to_screen(main, attempts: int = 5) -> bool:
    """Bring ``main`` (napari's window) back within its screen's height when docking panels made it taller
    than the screen while its own minimum fits (Qt grows a window to its docks' preferred heights when
    several are added at once). True if it was resized."""
    try:
        screen = main.screen() if isinstance(main, QMainWindow) else None
        if screen is None or main.isMaximized() or main.isFullScreen():
            return False
        available = screen.availableGeometry()
        frame = main.frameGeometry()
        # Title bar and borders (none without a window manager; the frame may lag a resize: never below 0).
        extra = max(0, frame.height() - main.height())
        if max(frame.height(), main.height()) <= available.height() or main.minimumSizeHint().height() + extra > available.height():
            return False
        main.resize(main.width(), available.height() - extra)
        if main.height() > available.height() - extra and attempts > 1:
            # Refused while the dock areas are still being laid out (it happens right after a slide opens):
            # try again shortly.
            later(100, lambda window: fit_window_to_screen(window, attempts - 1), main)
        if main.frameGeometry().top() < available.top() or main.frameGeometry().bottom() > available.bottom():
            main.move(main.x(), available.top())
        return True
    except RuntimeError:  # the window is gone
        return False


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
        elif event.type() == QEvent.Type.Resize and obj.isWindow():
            # Docks growing to their preferred heights (a slide opened, a panel filled in) may make the window
            # taller than its screen although its minimum fits: bring it back once the layout is done.
            screen = obj.screen()
            if screen is not None and event.size().height() > screen.availableGeometry().height():
                later(0, fit_window_to_screen, obj)
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
