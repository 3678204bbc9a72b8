"""Embedding map panel: a UMAP of region embeddings, coloured by prototype, linked to the slide.

Drawing a lasso (or a rectangle) around points selects their regions on the slide; selecting regions
anywhere else (a legend row, a click, a similar-region match) highlights their points. UMAP runs in a
worker (numba compiles on first use) and the map is cached in the cohort folder
(``COHORT/embedding/<slide or cohort>_umap.npz``, keyed by the feature settings and UMAP parameters).
"""

from __future__ import annotations

import numpy as np
from matplotlib.path import Path as MplPath
from matplotlib.widgets import LassoSelector, RectangleSelector
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton

from napari_slpd.widgets._base import SlpdPanel, dark_figure, style_map_axes
from napari_slpd.widgets._common import guarded
from napari_slpd.widgets._panels import panel_layout

SCOPE_SLIDE = "Current slide"
SCOPE_COHORT = "Whole cohort"
OTHER_SLIDE_COLOR = (0.6, 0.6, 0.6, 0.35)


class EmbeddingMapWidget(SlpdPanel):
    """2-D map of the region embeddings of the current slide (or the cohort)."""

    OBJECT_NAME = "slpd-embedding"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)

        self.scope = QComboBox()
        self.scope.addItems([SCOPE_SLIDE, SCOPE_COHORT])
        self.tool = QComboBox()
        self.tool.addItems(["Lasso", "Rectangle"])
        self.tool.currentTextChanged.connect(lambda _t: self._make_selector())
        self.compute_button = QPushButton("Compute map")
        self.compute_button.clicked.connect(guarded("Embedding map")(self.compute))
        clear = QPushButton("Clear selection")
        clear.clicked.connect(self.state.clear_selection)
        # Two rows: what to map, then what to do (one row was wider than the dock).
        row = QHBoxLayout()
        row.addWidget(self.scope, 1)
        row.addWidget(self.tool, 1)
        row2 = QHBoxLayout()
        row2.addWidget(self.compute_button)
        row2.addWidget(clear)
        row2.addStretch(1)

        self.figure, self.canvas = dark_figure((4, 4), 100, constrained=False)
        self.canvas.setMinimumHeight(240)
        self.ax = self.figure.add_subplot(111)
        self._style_axes()
        self.info = QLabel("Open a slide with features, then compute the map.")
        self.info.setWordWrap(True)

        layout = panel_layout(self)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.info)
        layout.addWidget(self.task_bar)

        self.map = None  # EmbeddingMap
        self.slide_id: str | None = None  # whose regions the highlighted points are
        self.rows: np.ndarray = np.zeros(0, np.int64)  # rows of the map that belong to the current slide
        self.highlighted: np.ndarray = np.zeros(0, np.int64)  # map rows highlighted
        self._scatter = None
        self._highlight = None
        self._selector = None
        self._make_selector()

        self.state.slide_opened.connect(self._on_slide_opened)
        self.state.prototypes_updated.connect(self._on_prototypes_updated)
        self.state.selection_changed.connect(self._on_selection_changed)
        self.state.cohort_changed.connect(lambda _s: self._reset())

    # -- drawing ---------------------------------------------------------------------------------------
    def _style_axes(self) -> None:
        style_map_axes(self.ax)
        self.figure.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.02)

    def _make_selector(self) -> None:
        if self._selector is not None:
            self._selector.set_active(False)
            self._selector.disconnect_events()
        props = {"color": "#ffff00", "linewidth": 1.2}
        if self.tool.currentText() == "Lasso":
            self._selector = LassoSelector(self.ax, onselect=self._on_lasso, props=props, useblit=False)
        else:
            self._selector = RectangleSelector(
                self.ax, onselect=self._on_rectangle, useblit=False, interactive=False,
                props={"edgecolor": "#ffff00", "facecolor": "none", "linewidth": 1.2},
            )

    def _reset(self) -> None:
        self.map = None
        self.slide_id = None
        self.rows = np.zeros(0, np.int64)
        self.highlighted = np.zeros(0, np.int64)
        self.ax.clear()
        self._style_axes()
        self._scatter = self._highlight = None
        self.info.setText("Press 'Compute map' to map the regions of the current slide.")
        self.canvas.draw_idle()

    def point_colors(self) -> np.ndarray:
        """RGBA per map row: the current slide's points by prototype, other slides' points grey."""
        emap = self.map
        colors = np.tile(np.asarray(OTHER_SLIDE_COLOR, np.float64), (len(emap), 1))
        opened = self.state.current
        protos = opened.extras.get("prototypes") if opened is not None else None
        if opened is not None and len(self.rows):
            if protos is not None and len(np.asarray(protos.assignments)) == int(emap.region_index[self.rows].max()) + 1:
                assignments = np.asarray(protos.assignments)[emap.region_index[self.rows]]
                palette = {int(k): self.state.prototype_color(int(k)) for k in np.unique(assignments)}
                colors[self.rows] = [palette[int(k)] for k in assignments]
            else:
                colors[self.rows] = (0.9, 0.9, 0.9, 0.9)
        return colors

    def redraw(self) -> None:
        emap = self.map
        ax = self.ax
        ax.clear()
        self._style_axes()
        self._highlight = None
        if emap is None or not len(emap):
            self._scatter = None
            self.canvas.draw_idle()
            return
        colors = self.point_colors()
        order = np.argsort(colors[:, 3], kind="stable")  # grey (other slides) underneath
        size = float(np.clip(4000 / max(1, len(emap)), 6, 40))
        self._scatter = ax.scatter(emap.xy[order, 0], emap.xy[order, 1], c=colors[order], s=size, linewidths=0)
        self._order = order
        title = f"{emap.method.upper()} of {len(emap)} regions"
        if self.scope.currentText() == SCOPE_COHORT:
            title += f" ({len(np.unique(emap.slide_ids))} slides)"
        ax.set_title(title, color="#d0d4dc", fontsize=9)
        self._draw_highlight()

    def _draw_highlight(self) -> None:
        if self._highlight is not None:
            self._highlight.remove()
            self._highlight = None
        if self.map is not None and len(self.highlighted):
            xy = self.map.xy[self.highlighted]
            self._highlight = self.ax.scatter(
                xy[:, 0], xy[:, 1], s=60, facecolors="none", edgecolors="#ffff00", linewidths=1.4
            )
        self.canvas.draw_idle()

    # -- computing -------------------------------------------------------------------------------------
    def compute(self):
        """Compute (or load from the cache) the map for the chosen scope in a worker."""
        session = self.state.require_session()
        opened = self.state.require_current()
        if opened.regions is None:
            from napari_slpd.errors import SlpdError

            raise SlpdError(f"{opened.slide_id} has no features yet; compute them in the Features panel first")
        cohort = self.scope.currentText() == SCOPE_COHORT
        slide_ids = session.slides_with_features() if cohort else [opened.slide_id]
        name = "cohort" if cohort else opened.slide_id

        def work(progress, cancel):
            return session.embedding_map(slide_ids, name=name, progress=progress, cancel=cancel)

        return self.run_task(work, f"Embedding map of {name}", on_result=lambda r: self._on_map(r, opened.slide_id))

    def _on_map(self, result, slide_id: str) -> None:
        emap, cached = result
        self.map = emap
        self.slide_id = slide_id
        self.rows = emap.rows_of(slide_id)
        self.highlighted = np.zeros(0, np.int64)
        if self.state.selection is not None and self.state.selection.slide_id == slide_id:
            self.highlighted = emap.rows_of(slide_id, self.state.selection.regions)
        self.redraw()
        how = "from the cache" if cached else "computed"
        self.task_bar.finish("cached" if cached else "done")
        self.info.setText(f"{emap.method.upper()} map {how}: {len(emap)} regions. Draw around points to select their regions.")

    def _on_slide_opened(self, slide_id: str) -> None:
        if self.map is not None and slide_id in set(np.unique(self.map.slide_ids)) and self.scope.currentText() == SCOPE_COHORT:
            self.slide_id = slide_id
            self.rows = self.map.rows_of(slide_id)
            self.highlighted = np.zeros(0, np.int64)
            self.redraw()
            return
        self._reset()
        opened = self.state.current
        if opened is not None and opened.regions is not None and self.state.session is not None:
            # Show a cached map at once; computing a new one waits for the button (UMAP takes a while).
            from napari_slpd.similarity.embedding_map import cache_path

            if cache_path(self.state.session.root, slide_id).exists():
                guarded("Embedding map")(self.compute)()

    def _on_prototypes_updated(self, slide_id: str) -> None:
        if self.map is not None and slide_id in ("", self.slide_id):
            self.redraw()

    # -- selection both ways ---------------------------------------------------------------------------
    def _on_lasso(self, vertices) -> None:
        if self.map is None or len(vertices) < 3:
            return
        inside = MplPath(vertices).contains_points(self.map.xy)
        self.select_rows(np.flatnonzero(inside))

    def _on_rectangle(self, press, release) -> None:
        if self.map is None:
            return
        x0, x1 = sorted((press.xdata, release.xdata))
        y0, y1 = sorted((press.ydata, release.ydata))
        xy = self.map.xy
        inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
        self.select_rows(np.flatnonzero(inside))

    def select_rows(self, rows) -> None:
        """Select map rows: their current-slide regions become the selection (drawn on the slide)."""
        rows = np.asarray(rows, dtype=np.int64)
        mine = rows[np.isin(rows, self.rows)]
        self.highlighted = mine
        self._draw_highlight()
        others = len(rows) - len(mine)
        self.info.setText(
            f"{len(mine)} regions of {self.slide_id} selected"
            + (f" (+{others} points of other slides)" if others else "")
        )
        if self.slide_id is not None:
            self.state.select_regions(self.slide_id, self.map.region_index[mine], source="map")

    def select_in_rectangle(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Select the points inside a rectangle of map coordinates (what dragging the rectangle does)."""
        class _E:  # the two corner events matplotlib's RectangleSelector hands over
            def __init__(self, x, y):
                self.xdata, self.ydata = x, y

        self._on_rectangle(_E(x0, y0), _E(x1, y1))

    def _on_selection_changed(self, selection) -> None:
        if self.map is None:
            return
        if selection is None or selection.slide_id != self.slide_id:
            self.highlighted = np.zeros(0, np.int64)
        elif selection.source == "map":
            return  # drawn already
        else:
            self.highlighted = self.map.rows_of(self.slide_id, selection.regions)
        self._draw_highlight()
