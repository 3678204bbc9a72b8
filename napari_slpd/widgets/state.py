"""The state every SLPD panel of one viewer shares, and the geometry that puts slide data on the canvas.

Panels never talk to each other directly: they change :class:`SlpdState` and listen to its psygnal
signals, so any subset of panels can be docked in any order and stay in sync. Nothing here imports Qt,
so the state can be tested without a display; the viewer is only used to look layers up by name.

World coordinates: every layer of a slide is placed by :class:`napari_slpd.slides.frame.SlideFrame`
(``SlideGeometry`` here): micrometres when the slide's pixel size is known, level-0 pixels otherwise, pixel
centres on integer data coordinates.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from psygnal import Signal

from napari_slpd.session import Session, SessionSettings
from napari_slpd.slides.frame import SlideFrame
from napari_slpd.labeling.palette import default_prototype_rgba as default_prototype_color

log = logging.getLogger(__name__)

# Roles of the layers a slide gets; a layer's metadata holds {"slpd_slide": id, "slpd_role": role}.
ROLE_IMAGE = "image"
ROLE_TISSUE = "tissue"
ROLE_REGIONS = "regions"
ROLE_PROTOTYPES = "prototypes"
ROLE_SELECTION = "selection"
ROLE_MATCHES = "matches"
ROLES = (ROLE_IMAGE, ROLE_TISSUE, ROLE_REGIONS, ROLE_PROTOTYPES, ROLE_SELECTION, ROLE_MATCHES)
LAYER_SUFFIX = {
    ROLE_IMAGE: "",
    ROLE_TISSUE: " tissue",
    ROLE_REGIONS: " regions",
    ROLE_PROTOTYPES: " prototypes",
    ROLE_SELECTION: " selected regions",
    ROLE_MATCHES: " matched regions",
}


# -- geometry ------------------------------------------------------------------------------------------


# The world frame of a slide (level-0 px <-> um or px, pixel centres, layer scale/translate) has one home:
# napari_slpd.slides.frame. SlideGeometry is its name here.
SlideGeometry = SlideFrame


@dataclass
class RegionLayout:
    """Where the regions of one slide's feature file are: level-0 top-left corners and side."""

    coords: np.ndarray  # [M, 2] int64 (x, y)
    size: float  # level-0 px per region side

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def boxes(self) -> np.ndarray:
        c = self.coords.astype(np.float64)
        return np.concatenate([c, c + self.size], axis=1)

    def region_at(self, x: float, y: float) -> int | None:
        """Index of the region holding level-0 point (x, y), or None (the last one wins on overlap)."""
        if not len(self):
            return None
        c = self.coords
        inside = (c[:, 0] <= x) & (x < c[:, 0] + self.size) & (c[:, 1] <= y) & (y < c[:, 1] + self.size)
        hits = np.flatnonzero(inside)
        return int(hits[-1]) if hits.size else None

    def lattice(self) -> tuple[tuple[int, int], int, np.ndarray] | None:
        """(origin_xy, step, cells [M, 2] (row, col)) when the regions lie on a lattice of their own size
        (the region grid always does); None for arbitrary placements (e.g. imported coordinates)."""
        if not len(self):
            return None
        step = float(self.size)
        origin = self.coords.min(axis=0).astype(np.float64)
        offsets = (self.coords - origin) / step
        cells = np.rint(offsets).astype(np.int64)
        if np.abs(offsets - cells).max() * step > 1.0 + 1e-6:
            return None
        rc = cells[:, ::-1].copy()
        if len(np.unique(rc, axis=0)) != len(rc):
            return None
        return (int(origin[0]), int(origin[1])), int(round(step)), rc

    def region_raster(self) -> tuple[np.ndarray, tuple[float, float], float]:
        """A uint32 raster whose value is region index + 1 (0 = no region), its level-0 origin and the
        level-0 px per raster px. One raster px per region on a lattice; otherwise regions are painted
        at an eighth of their size (later regions over earlier ones)."""
        lat = self.lattice()
        if lat is not None:
            origin, step, rc = lat
            shape = (int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1)
            raster = np.zeros(shape, np.uint32)
            raster[rc[:, 0], rc[:, 1]] = np.arange(1, len(rc) + 1, dtype=np.uint32)
            return raster, (float(origin[0]), float(origin[1])), float(step)
        step = max(1.0, float(self.size) / 8)
        origin = self.coords.min(axis=0).astype(np.float64)
        extent = (self.coords.max(axis=0) + self.size - origin) / step
        raster = np.zeros((int(np.ceil(extent[1])), int(np.ceil(extent[0]))), np.uint32)
        n = int(round(self.size / step))
        for i, (x, y) in enumerate(self.coords):
            c0 = int(round((x - origin[0]) / step))
            r0 = int(round((y - origin[1]) / step))
            raster[r0 : r0 + n, c0 : c0 + n] = i + 1
        return raster, (float(origin[0]), float(origin[1])), step


# -- selection -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionSelection:
    """Regions of one slide picked somewhere (``source``: "canvas", "map", "similar", "prototype", ...)."""

    slide_id: str
    regions: tuple[int, ...]
    source: str = ""

    @classmethod
    def of(cls, slide_id: str, regions, source: str = "") -> "RegionSelection":
        return cls(slide_id, tuple(sorted({int(r) for r in np.asarray(regions).ravel()})), source)


# -- the state -----------------------------------------------------------------------------------------


def _rgba(color) -> tuple[float, float, float, float]:
    """napari RGBA floats from '#rrggbb' or an RGB(A) sequence of floats."""
    if isinstance(color, str):
        from napari_slpd.labeling.palette import color_to_rgba

        return color_to_rgba(color)
    values = tuple(float(c) for c in color)
    return values if len(values) == 4 else (*values[:3], 1.0)


@dataclass
class OpenSlide:
    """The slide shown in the viewer: its id, the open Slide, and where it sits in world coordinates."""

    slide_id: str
    slide: Any  # napari_slpd.slides.slide.Slide
    geometry: SlideGeometry
    regions: RegionLayout | None = None  # from its feature file, once there is one
    extras: dict = field(default_factory=dict)


_STATES: "weakref.WeakKeyDictionary[Any, SlpdState]" = weakref.WeakKeyDictionary()
_STATES_BY_ID: dict[int, "SlpdState"] = {}


class SlpdState:
    """Shared state of the SLPD panels of one viewer.

    Signals (all carry plain Python values):
      cohort_changed(session)        a cohort was opened (Session) or closed (None)
      slide_opened(slide_id)         a slide became the current slide (its layers are in the viewer)
      features_updated(slide_id)     features of a slide were computed or loaded ("" = several slides)
      prototypes_updated(slide_id)   prototypes of a slide changed ("" = several slides)
      selection_changed(selection)   the selected regions changed (RegionSelection or None)
      settings_changed(settings)     the shared SessionSettings changed
      prototype_style_changed(slide_id)  names or colours of prototypes changed (labeling panel)
      busy_changed(busy)             some panel started (True) / finished (False) a long task
    """

    cohort_changed = Signal(object)
    slide_opened = Signal(str)
    features_updated = Signal(str)
    prototypes_updated = Signal(str)
    selection_changed = Signal(object)
    settings_changed = Signal(object)
    prototype_style_changed = Signal(str)
    busy_changed = Signal(bool)

    def __init__(self, viewer: Any = None, settings: SessionSettings | None = None):
        self._viewer_ref = weakref.ref(viewer) if viewer is not None else None
        self.settings: SessionSettings = settings or SessionSettings()
        self.session: Session | None = None
        self.current: OpenSlide | None = None
        self.selection: RegionSelection | None = None
        # prototype index -> (name, rgba) chosen by the user; empty = defaults
        self.prototype_names: dict[int, str] = {}
        self.prototype_colors: dict[int, tuple[float, float, float, float]] = {}
        # Redraws the prototypes layer with the cohort's names and colours (set by _layers.show_prototypes).
        self.layer_restyler: Callable[["SlpdState"], None] | None = None

    # -- one state per viewer ------------------------------------------------------------------------
    @classmethod
    def for_viewer(cls, viewer: Any) -> "SlpdState":
        """The state shared by all SLPD panels docked in ``viewer`` (created on first use)."""
        try:
            state = _STATES.get(viewer)
        except TypeError:  # an object that cannot be weakly referenced
            state = _STATES_BY_ID.get(id(viewer))
        if state is None:
            state = cls(viewer)
            try:
                _STATES[viewer] = state
            except TypeError:
                _STATES_BY_ID[id(viewer)] = state
            if viewer is not None:
                from napari_slpd.viewer.gl_compat import delete_layer_gl_in_canvas_context

                # Panels replace layers right after repainting themselves: without this a removed layer's
                # GL objects were deleted in Qt's compositing context (llvmpipe then crashed drawing).
                delete_layer_gl_in_canvas_context(viewer)
                from napari_slpd.widgets.gc_policy import freeze_for

                freeze_for(viewer)  # napari's gc.collect at every layer removal: gc_policy.py says why
        return state

    @classmethod
    def forget_viewer(cls, viewer: Any) -> None:
        try:
            _STATES.pop(viewer, None)
        except TypeError:
            _STATES_BY_ID.pop(id(viewer), None)

    @property
    def viewer(self):
        return self._viewer_ref() if self._viewer_ref is not None else None

    # -- cohort --------------------------------------------------------------------------------------
    def set_session(self, session: Session | None) -> None:
        """Make ``session`` the open cohort. Its settings (the cohort's own, saved in its folder) become
        the shared settings, and every panel shows them (``settings_changed``)."""
        self.session = session
        if session is not None:
            self.settings = session.settings
        self.current = None
        self.selection = None
        self.prototype_names, self.prototype_colors = {}, {}
        self.cohort_changed.emit(session)
        self.settings_changed.emit(self.settings)

    def require_session(self) -> Session:
        from napari_slpd.errors import SlpdError

        if self.session is None:
            raise SlpdError("no cohort is open; choose a cohort folder in the Cohort panel first")
        return self.session

    def update_settings(self, **changes) -> None:
        """Change shared settings: ``features=FeatureSettings(...)``, ``prototypes=...``, top-level fields.
        With a cohort open they are saved in it at once (``Session.save_settings``)."""
        for key, value in changes.items():
            if not hasattr(self.settings, key):
                raise AttributeError(f"SessionSettings has no field {key!r}")
            if getattr(self.settings, key) != value:
                setattr(self.settings, key, value)
        if self.session is not None and self.session.settings is not self.settings:
            self.session.settings = self.settings
        self.settings_changed.emit(self.settings)

    # -- current slide -------------------------------------------------------------------------------
    @property
    def current_slide_id(self) -> str | None:
        return self.current.slide_id if self.current else None

    def set_current(self, opened: OpenSlide) -> None:
        self.current = opened
        self.selection = None
        self.slide_opened.emit(opened.slide_id)

    def require_current(self) -> OpenSlide:
        from napari_slpd.errors import SlpdError

        if self.current is None:
            raise SlpdError("no slide is open; open one from the Cohort panel first")
        return self.current

    # -- selection -----------------------------------------------------------------------------------
    def select_regions(self, slide_id: str, regions, source: str = "") -> RegionSelection:
        selection = RegionSelection.of(slide_id, regions, source)
        self.selection = selection
        self.selection_changed.emit(selection)
        return selection

    def clear_selection(self) -> None:
        self.selection = None
        self.selection_changed.emit(None)

    # -- prototype styling: the names and colours the current slide's prototypes are drawn with --------
    # They come from the cohort (Session.prototype_styles: stored names/colours + the palette), set by
    # _layers.show_prototypes for the slide shown; a neighbour opened from a query carries the colours of
    # the query prototypes it was matched to. No panel needs to be open for them.
    def set_prototype_style(
        self, names: dict[int, str] | None = None, colors: dict[int, Sequence[float]] | None = None,
        emit: bool = True,
    ) -> None:
        if names is not None:
            self.prototype_names = {int(k): str(v) for k, v in names.items()}
        if colors is not None:
            self.prototype_colors = {int(k): _rgba(v) for k, v in colors.items()}
        if emit:
            self.prototype_style_changed.emit(self.current_slide_id or "")

    def restyle_prototypes(self) -> None:
        """Names or colours changed in the cohort (labeling panel, propagation): the prototypes layer reads
        them again first, then every view (legend, hover) is told, so none shows the previous style (a
        listener connected before the layer's would otherwise read the state one edit behind)."""
        try:
            if self.layer_restyler is not None:
                self.layer_restyler(self)
        except Exception as exc:  # drawing must never break whoever changed the names
            log.warning("could not redraw the prototypes: %s", exc)
        self.prototype_style_changed.emit(self.current_slide_id or "")

    def prototype_name(self, k: int) -> str:
        return self.prototype_names.get(int(k), f"prototype {int(k)}")

    def prototype_color(self, k: int) -> tuple[float, float, float, float]:
        if int(k) in self.prototype_colors:
            return self.prototype_colors[int(k)]
        return default_prototype_color(k)

    def prototype_hex(self, k: int) -> str:
        from napari_slpd.labeling.palette import normalize_color

        return normalize_color(self.prototype_color(k))

    # -- layers of the current slide -----------------------------------------------------------------
    @staticmethod
    def layer_name(slide_id: str, role: str) -> str:
        return f"{slide_id}{LAYER_SUFFIX[role]}"

    def slide_layers(self, slide_id: str | None = None) -> dict[str, Any]:
        """role -> layer of ``slide_id`` (the current slide by default) present in the viewer."""
        viewer = self.viewer
        slide_id = slide_id or self.current_slide_id
        if viewer is None or slide_id is None:
            return {}
        found = {}
        for layer in viewer.layers:
            meta = getattr(layer, "metadata", {}) or {}
            if meta.get("slpd_slide") == slide_id and meta.get("slpd_role") in ROLES:
                found[meta["slpd_role"]] = layer
        return found

    def layer(self, role: str, slide_id: str | None = None):
        return self.slide_layers(slide_id).get(role)

    def slpd_layers(self) -> list:
        """Every layer an SLPD panel added (any slide)."""
        viewer = self.viewer
        if viewer is None:
            return []
        return [l for l in viewer.layers if (getattr(l, "metadata", {}) or {}).get("slpd_role") in ROLES]
