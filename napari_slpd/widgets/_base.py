"""What every SLPD dock panel starts from: :class:`SlpdPanel` (the viewer, the viewer's shared state, the
panel's object name, its task bar and background workers) and the dark plot theme the plotting panels
share, so their figures read like napari's own dark theme."""

from __future__ import annotations

from typing import Any, Callable

from qtpy.QtWidgets import QWidget

from napari_slpd.widgets._common import Task, TaskBar, TaskFn
from napari_slpd.widgets._panels import DockedPanel
from napari_slpd.widgets.state import SlpdState

# -- dark plot theme (napari's dark theme: its panel background, a darker plot area, light text) ----------
FIGURE_COLOR = "#262930"  # napari's panel background, so a figure has no visible edge in its dock
AXES_COLOR = "#1e1f24"
SPINE_COLOR = "#888888"
LABEL_COLOR = "#cccccc"
TITLE_COLOR = "#dddddd"
NOTE_COLOR = "#999999"  # the text a plot shows instead of data ("select a row", "monitor off")
GRID_COLOR = "#444444"
LEGEND_EDGE_COLOR = "#555555"
MAP_SPINE_COLOR = "#5a5f6b"
THEME_FONT_SIZE = 8


def dark_figure(figsize: tuple[float, float], dpi: int, constrained: bool = True):
    """A matplotlib figure in napari's panel colour and the Qt canvas that shows it: ``(figure, canvas)``.
    ``constrained``: matplotlib keeps labels and legends inside the figure as the dock resizes it."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi, facecolor=FIGURE_COLOR, layout="constrained" if constrained else None)
    return figure, FigureCanvasQTAgg(figure)


def style_axes(ax, xlabel: str = "", ylabel: str = "", title: str | None = None) -> None:
    """``ax`` as a dark plot with a grid; ``title`` None leaves the axes' title as it is."""
    ax.set_facecolor(AXES_COLOR)
    for spine in ax.spines.values():
        spine.set_color(SPINE_COLOR)
    ax.tick_params(colors=LABEL_COLOR, labelsize=THEME_FONT_SIZE)
    ax.set_xlabel(xlabel, color=LABEL_COLOR, fontsize=THEME_FONT_SIZE)
    ax.set_ylabel(ylabel, color=LABEL_COLOR, fontsize=THEME_FONT_SIZE)
    if title is not None:
        ax.set_title(title, color=TITLE_COLOR, fontsize=THEME_FONT_SIZE)
    ax.grid(True, color=GRID_COLOR, linewidth=0.5)


def style_map_axes(ax) -> None:
    """``ax`` as a map without scales (an embedding's axes have no units): no ticks, the figure's colour."""
    ax.set_facecolor(FIGURE_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(MAP_SPINE_COLOR)


def style_legend(ax, fontsize: float, **legend_kw):
    """The legend of ``ax`` on a dark frame with light text; ``legend_kw`` go to ``ax.legend``."""
    legend = ax.legend(fontsize=fontsize, facecolor=FIGURE_COLOR, edgecolor=LEGEND_EDGE_COLOR, **legend_kw)
    for text in legend.get_texts():
        text.set_color(TITLE_COLOR)
    return legend


# -- the panel --------------------------------------------------------------------------------------------


class SlpdPanel(DockedPanel, QWidget):
    """A napari dock panel of SLPD: ``viewer``, ``state`` (the viewer's :class:`SlpdState`, shared by all
    panels), object name ``OBJECT_NAME`` (the "slpd-" prefix is how docked panels find each other to share
    a tab) and ``task_bar`` (its progress, status line and Cancel; the panel places it in its layout).

    Long work goes through :meth:`run_task` (one task at a time, progress and Cancel on the task bar);
    work that streams results without occupying the task bar (thumbnails, statuses) through
    :meth:`start_worker`."""

    OBJECT_NAME = ""

    def __init__(self, napari_viewer):
        super().__init__()
        if not self.OBJECT_NAME:
            raise TypeError(f"{type(self).__name__} must set OBJECT_NAME")
        self.viewer = napari_viewer
        self.state = SlpdState.for_viewer(napari_viewer)
        self.setObjectName(self.OBJECT_NAME)
        self.task_bar = TaskBar()

    def run_task(self, fn: TaskFn, description: str, **options) -> Task | None:
        """Run ``fn(progress, cancel)`` on this panel's task bar; ``options`` (``on_result``, ``on_error``,
        ``on_cancelled``, ``activity``) are :meth:`TaskBar.run`'s. None when a task of the panel is still
        running."""
        return self.task_bar.run(fn, description, **options)

    @staticmethod
    def start_worker(
        work: Callable[[], Any],
        on_yielded: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_finished: Callable[[], None] | None = None,
    ):
        """Start the generator function ``work`` in a napari thread worker and return the worker (``quit()``
        stops it at its next yield). Each yielded value reaches ``on_yielded`` in the GUI thread. An error
        reaches ``on_error`` only: superqt would also raise it again in the GUI thread, where napari shows
        it a second time with its traceback."""
        from napari.qt.threading import create_worker

        worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        if on_error is not None:
            worker.errored.connect(on_error)
        if on_yielded is not None:
            worker.yielded.connect(on_yielded)
        if on_finished is not None:
            worker.finished.connect(on_finished)
        worker.start()
        return worker
