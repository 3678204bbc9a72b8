"""The napari layers of the open slide: image, tissue, region grid, prototypes, selected/matched regions.

All of them share the world frame of :mod:`napari_slpd.viewer.layers` (um when the slide's pixel size is known,
level-0 px for every layer otherwise) and carry ``metadata = {"slpd_slide": id, "slpd_role": role}`` so
that :class:`~napari_slpd.widgets.state.SlpdState` finds them. The prototypes layer is a Labels layer whose
value is region index + 1, coloured by each region's prototype: napari's status bar then shows, for the
region under the cursor, its prototype and its distance to the prototype (the layer's ``features``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from napari_slpd.widgets.gc_policy import refreeze_if_imports_grew
from napari_slpd.widgets.state import (
    ROLE_IMAGE,
    ROLE_MATCHES,
    ROLE_PROTOTYPES,
    ROLE_REGIONS,
    ROLE_SELECTION,
    ROLE_TISSUE,
    OpenSlide,
    RegionLayout,
    SlideGeometry,
    SlpdState,
)

log = logging.getLogger(__name__)

# Above this many rectangles a Shapes layer gets slow to build and draw; the grid outline is skipped and
# selections are drawn as filled cells instead.
MAX_OUTLINE_SHAPES = 4000
SELECTION_COLOR = "#ffff00"
MATCH_COLOR = "#ff00ff"
GRID_COLOR = "#00e5ff"
TISSUE_COLOR = (0.2, 1.0, 0.5, 1.0)


def _tag(kwargs: dict, slide_id: str, role: str) -> dict:
    meta = dict(kwargs.get("metadata") or {})
    meta.update(slpd_slide=slide_id, slpd_role=role)
    kwargs["metadata"] = meta
    return kwargs


def _units(geometry: SlideGeometry) -> dict:
    return geometry.units_kwargs()


def _replace_layer(viewer, name: str, data, kwargs: dict, layer_type: str):
    """Add a layer, replacing one of the same name (keeps its position in the layer list)."""
    index = None
    active = viewer.layers.selection.active
    if name in viewer.layers:
        if active is viewer.layers[name]:
            active = None  # the replacement becomes active instead
        index = viewer.layers.index(name)
        viewer.layers.remove(name)
    adder = getattr(viewer, f"add_{layer_type}")
    layer = adder(data, **kwargs)
    if index is not None and index < len(viewer.layers) - 1:
        viewer.layers.move(len(viewer.layers) - 1, index)
    if active is not None and active in viewer.layers:
        # A layer drawn by a worker must not take the selection (and the status bar) from the user's layer.
        viewer.layers.selection.active = active
    return layer


def remove_slide_layers(state: SlpdState, except_slide: str | None = None) -> None:
    viewer = state.viewer
    if viewer is None:
        return
    images = 0
    for layer in list(state.slpd_layers()):
        if layer.metadata.get("slpd_slide") != except_slide:
            images += layer.metadata.get("slpd_role") == ROLE_IMAGE
            viewer.layers.remove(layer)
            release_layer(layer)
    if images:
        drop_cached_tiles()


def drop_cached_tiles() -> None:
    """Empty napari's cache of computed image chunks (its dask cache) once a slide is closed: the closed
    slide's tiles are never read from it again, and napari would keep them up to its bound (Preferences >
    Application > dask cache: a quarter of the machine's memory), about 40 MB a slide over a session.
    Other layers' chunks are computed again when next shown. napari's public resize_dask_cache: shrunk to
    nothing, then back to the size it had."""
    try:
        from napari.utils import resize_dask_cache

        cache = resize_dask_cache()  # the cache as it is (no resize without a size)
        size = int(cache.cache.available_bytes)
        if size > 1 and cache.cache.total_bytes:
            resize_dask_cache(0)
            resize_dask_cache(size)
    except Exception as exc:  # noqa: BLE001 - a cache is not worth failing to open a slide
        log.debug("napari's dask cache not emptied: %s", exc)


def release_layer(layer) -> None:
    """Drop what a removed layer holds: napari's layer controls keep a removed Shapes layer alive (its
    mode buttons stay bound in napari's action manager), which over a session of 100 slides kept every
    slide's region outlines; emptied, what stays behind is a few kilobytes."""
    try:
        if layer.__class__.__name__ == "Shapes":
            layer.data = []
    except Exception as exc:  # noqa: BLE001 - freeing memory must never break opening the next slide
        log.debug("could not empty removed layer %s: %s", layer.name, exc)


# -- the slide -----------------------------------------------------------------------------------------


def show_slide(state: SlpdState, slide_id: str, with_prototypes: bool = True) -> OpenSlide:
    """Open ``slide_id`` of the state's cohort in the viewer as the current slide.

    Replaces the layers of the previously shown slide. Adds the multiscale image, the region grid and the
    prototypes when the cache has them (the tissue mask is added later by :func:`show_tissue`, it needs
    a read of the whole slide at low resolution). Emits ``slide_opened``.
    """
    from napari_slpd.viewer.layers import UNKNOWN_MPP_NOTE, slide_image_layer

    session = state.require_session()
    viewer = state.viewer
    slide = session.open_slide(slide_id)
    geometry = SlideGeometry(tuple(slide.dimensions), slide.mpp)
    previous = state.current
    remove_slide_layers(state)
    if previous is not None and previous.slide is not slide:
        previous.slide.close()
    refreeze_if_imports_grew()  # napari's gc.collect at every layer removal: gc_policy.py says why
    data, kwargs, _ = slide_image_layer(slide, name=SlpdState.layer_name(slide_id, ROLE_IMAGE))
    kwargs["name"] = SlpdState.layer_name(slide_id, ROLE_IMAGE)
    if viewer is not None:
        viewer.add_image(data, **_tag(kwargs, slide_id, ROLE_IMAGE))
    if slide.mpp is None:
        from napari_slpd.widgets._common import show_warning

        show_warning(f"{slide_id}: {slide.pixel_size.describe()}; {UNKNOWN_MPP_NOTE} (all its layers)")
    opened = OpenSlide(slide_id, slide, geometry)
    if session.status(slide_id).features_done:
        data = session.region_data(slide_id)
        opened.regions = RegionLayout(data.coords, data.size)
    state.set_current(opened)  # panels learn about the slide before its overlays appear
    if opened.regions is not None:
        show_region_grid(state)
        if with_prototypes:
            try:
                protos = session.prototypes(slide_id, compute=False)
            except Exception:  # not computed for this K yet: the Prototypes panel offers to
                protos = None
            if protos is not None:
                show_prototypes(state, protos)
    if viewer is not None:
        viewer.reset_view()
        image = state.layer(ROLE_IMAGE)
        if image is not None:
            viewer.layers.selection.active = state.layer(ROLE_PROTOTYPES) or image
    return opened


def refresh_regions(state: SlpdState) -> bool:
    """Pick up a feature file written for the current slide after it was opened; True when it has one."""
    opened = state.current
    if opened is None or state.session is None:
        return False
    if not state.session.status(opened.slide_id).features_done:
        return False
    data = state.session.region_data(opened.slide_id)
    opened.regions = RegionLayout(data.coords, data.size)
    show_region_grid(state)
    return True


def show_tissue(state: SlpdState, mask) -> Any:
    """Add the tissue mask of the current slide (a napari_slpd.slides.tissue.TissueMask)."""
    from napari_slpd.viewer.layers import tissue_mask_layer

    opened = state.require_current()
    viewer = state.viewer
    if viewer is None:
        return None
    from napari.utils.colormaps import DirectLabelColormap

    data, kwargs, _ = tissue_mask_layer(opened.slide, mask)
    name = SlpdState.layer_name(opened.slide_id, ROLE_TISSUE)
    kwargs["name"] = name
    # An outline in one fixed colour: a filled, randomly coloured mask would read as one more prototype.
    kwargs["colormap"] = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: TISSUE_COLOR})
    kwargs["opacity"] = 0.9
    layer = _replace_layer(viewer, name, data, _tag(kwargs, opened.slide_id, ROLE_TISSUE), "labels")
    layer.contour = 1
    layer.editable = False
    _keep_image_at_bottom(state)
    return layer


def _keep_image_at_bottom(state: SlpdState) -> None:
    viewer = state.viewer
    image = state.layer(ROLE_IMAGE)
    if viewer is not None and image is not None:
        index = viewer.layers.index(image)
        if index != 0:
            viewer.layers.move(index, 0)


def show_region_grid(state: SlpdState):
    """Outline every region of the current slide (skipped above MAX_OUTLINE_SHAPES regions)."""
    opened = state.require_current()
    viewer = state.viewer
    if viewer is None or opened.regions is None or not len(opened.regions):
        return None
    name = SlpdState.layer_name(opened.slide_id, ROLE_REGIONS)
    if len(opened.regions) > MAX_OUTLINE_SHAPES:
        log.info("%s: %d regions; the grid outline is not drawn (the prototypes layer shows them)",
                 opened.slide_id, len(opened.regions))
        return None
    corners = opened.geometry.box_corners_world(opened.regions.boxes())
    kwargs = dict(
        name=name,
        shape_type="rectangle",
        edge_color=GRID_COLOR,
        face_color="transparent",
        edge_width=max(opened.regions.size * opened.geometry.s / 40, opened.geometry.s),
        opacity=0.6,
        features={"region": np.arange(len(opened.regions))},
        **_units(opened.geometry),
    )
    # Shapes data are world coordinates here (scale 1), the same frame as the image.
    layer = _replace_layer(viewer, name, list(corners), _tag(kwargs, opened.slide_id, ROLE_REGIONS), "shapes")
    layer.mode = "pan_zoom"
    return layer


# -- prototypes ----------------------------------------------------------------------------------------


def apply_cohort_style(state: SlpdState, slide_id: str, protos, color_of: dict[int, int] | None = None,
                       query_slide: str | None = None) -> None:
    """Put the cohort's names and colours of ``slide_id``'s prototypes into the state (no signal).

    ``color_of`` maps this slide's prototype to the query prototype it was matched to (a neighbour opened
    from a query): it then takes that query prototype's colour (``query_slide``'s stored colour)."""
    from napari_slpd.labeling.palette import default_name, neighbour_colors, slide_colors

    k = int(np.asarray(protos.centroids).shape[0])
    session = state.session
    names, colors = {i: default_name(i) for i in range(k)}, slide_colors(k)
    if session is not None:
        try:
            if color_of and query_slide:
                names, colors = session.neighbour_styles(query_slide, slide_id,
                                                         [(q, l) for l, q in color_of.items()], protos=protos)
            else:
                names, colors = session.prototype_styles(slide_id, protos)
        except Exception as exc:  # names are decoration: the map is drawn with the palette then
            log.warning("prototype names of %s: %s", slide_id, exc)
    if color_of and not (session is not None and query_slide):
        colors = neighbour_colors(slide_colors(max([k, *[q + 1 for q in color_of.values()]])),
                                  [(q, l) for l, q in color_of.items()], k)
    state.set_prototype_style(names=names, colors=colors, emit=False)


def prototype_colors_for(state: SlpdState, k: int) -> list[tuple]:
    """RGBA of each of the current slide's ``k`` prototypes (as set by :func:`apply_cohort_style`)."""
    return [state.prototype_color(p) for p in range(k)]


def show_prototypes(state: SlpdState, protos, color_of: dict[int, int] | None = None, opacity: float = 0.45,
                    query_slide: str | None = None):
    """The prototype assignment of the current slide as a Labels layer aligned with the slide, drawn
    with the cohort's names and colours of its prototypes (see :func:`apply_cohort_style`).

    ``protos`` has ``assignments`` [M], ``similarity`` [M] (cosine to the own prototype) and ``sizes``.
    """
    opened = state.require_current()
    viewer = state.viewer
    regions = opened.regions
    if regions is None:
        from napari_slpd.errors import SlpdError

        raise SlpdError(f"{opened.slide_id} has no features yet; compute them in the Features panel first")
    assignments = np.asarray(protos.assignments, dtype=np.int64)
    if assignments.shape[0] != len(regions):
        from napari_slpd.errors import PrototypeError

        raise PrototypeError(
            f"{opened.slide_id}: {assignments.shape[0]} prototype assignments for {len(regions)} regions; "
            "the prototypes are stale, recompute them"
        )
    raster, origin, step = regions.region_raster()
    scale, translate = opened.geometry.raster_transform(origin, step)
    k = int(np.asarray(protos.centroids).shape[0])
    if query_slide is None and color_of:
        query_slide = opened.extras.get("query_slide")
    apply_cohort_style(state, opened.slide_id, protos, color_of, query_slide)
    colors = prototype_colors_for(state, k)
    similarity = np.asarray(getattr(protos, "similarity", np.full(len(regions), np.nan)), dtype=np.float64)
    color_dict = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for i, p in enumerate(assignments):
        color_dict[i + 1] = colors[int(p)] if p >= 0 else (0.5, 0.5, 0.5, 0.6)
    from napari.utils.colormaps import DirectLabelColormap

    features = {
        "index": np.arange(1, len(regions) + 1),
        "region": np.arange(len(regions)),
        "prototype": assignments,
        "name": np.array([state.prototype_name(p) if p >= 0 else "none" for p in assignments], dtype=object),
        "distance": np.round(1.0 - similarity, 4),
    }
    name = SlpdState.layer_name(opened.slide_id, ROLE_PROTOTYPES)
    kwargs = dict(
        name=name,
        scale=scale,
        translate=translate,
        opacity=opacity,
        colormap=DirectLabelColormap(color_dict=color_dict),
        features=features,
        metadata={"sizes": np.bincount(assignments[assignments >= 0], minlength=k).tolist(), "k": k,
                  "color_of": dict(color_of or {})},
        **_units(opened.geometry),
    )
    state.layer_restyler = recolor_prototypes  # SlpdState.restyle_prototypes redraws this layer first
    opened.extras["prototypes"] = protos
    opened.extras.pop("trial_k", None)  # the Prototypes panel marks a K tried on this slide only after this
    opened.extras["color_of"] = dict(color_of or {})
    opened.extras["query_slide"] = query_slide if color_of else None
    if viewer is None:
        return None
    before = viewer.layers.selection.active
    layer = _replace_layer(viewer, name, raster.astype(np.int32), _tag(kwargs, opened.slide_id, ROLE_PROTOTYPES),
                           "labels")
    layer.editable = False  # an analysis result, not an annotation to paint on
    if before is None or (before.metadata or {}).get("slpd_role") in (ROLE_IMAGE, ROLE_TISSUE, ROLE_PROTOTYPES, None):
        # napari's status bar describes the active layer: the prototypes layer names the hovered region.
        viewer.layers.selection.active = layer
    _keep_on_top(state, (ROLE_SELECTION, ROLE_MATCHES))
    return layer


def recolor_prototypes(state: SlpdState) -> None:
    """Apply the state's prototype names and colours to the current prototypes layer."""
    opened = state.current
    if opened is None or "prototypes" not in opened.extras:
        return
    trial_k = opened.extras.get("trial_k")  # the same prototypes, still a K tried on this slide only
    show_prototypes(state, opened.extras["prototypes"], opened.extras.get("color_of"),
                    query_slide=opened.extras.get("query_slide"))
    if trial_k:
        opened.extras["trial_k"] = trial_k


def _keep_on_top(state: SlpdState, roles: Sequence[str]) -> None:
    viewer = state.viewer
    for role in roles:
        layer = state.layer(role)
        if viewer is not None and layer is not None:
            viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))


# -- highlighted regions -------------------------------------------------------------------------------


def show_region_boxes(state: SlpdState, role: str, regions: Sequence[int], color: str) -> Any:
    """Outline ``regions`` of the current slide on a Shapes layer of ``role`` (removed when empty)."""
    opened = state.current
    viewer = state.viewer
    if opened is None or viewer is None or opened.regions is None:
        return None
    name = SlpdState.layer_name(opened.slide_id, role)
    regions = [int(r) for r in regions if 0 <= int(r) < len(opened.regions)]
    if not regions:
        if name in viewer.layers:
            viewer.layers.remove(name)
        return None
    regions = regions[:MAX_OUTLINE_SHAPES]
    boxes = opened.regions.boxes()[regions]
    corners = opened.geometry.box_corners_world(boxes)
    kwargs = dict(
        name=name,
        shape_type="rectangle",
        edge_color=color,
        face_color="transparent",
        edge_width=max(opened.regions.size * opened.geometry.s / 25, 2 * opened.geometry.s),
        features={"region": np.asarray(regions)},
        **_units(opened.geometry),
    )
    layer = _replace_layer(viewer, name, list(corners), _tag(kwargs, opened.slide_id, role), "shapes")
    layer.mode = "pan_zoom"
    return layer


def show_selection(state: SlpdState, selection) -> Any:
    """Draw the state's selection (RegionSelection or None) on the current slide."""
    opened = state.current
    if opened is None:
        return None
    regions = selection.regions if selection is not None and selection.slide_id == opened.slide_id else ()
    return show_region_boxes(state, ROLE_SELECTION, regions, SELECTION_COLOR)


def show_matches(state: SlpdState, regions: Sequence[int]) -> Any:
    return show_region_boxes(state, ROLE_MATCHES, regions, MATCH_COLOR)


def center_on_regions(state: SlpdState, regions: Sequence[int]) -> None:
    """Move the camera to the middle of ``regions`` of the current slide (zoom unchanged)."""
    opened = state.current
    viewer = state.viewer
    if opened is None or viewer is None or opened.regions is None or not len(regions):
        return
    boxes = opened.regions.boxes()[np.asarray(regions, dtype=np.int64)]
    cx = (boxes[:, 0].min() + boxes[:, 2].max()) / 2
    cy = (boxes[:, 1].min() + boxes[:, 3].max()) / 2
    viewer.camera.center = opened.geometry.level0_to_world(cx, cy)


def region_at_world(state: SlpdState, world_position: Sequence[float]) -> int | None:
    """Region of the current slide under a world (physical) position, or None."""
    opened = state.current
    if opened is None or opened.regions is None:
        return None
    x, y = opened.geometry.world_to_level0(world_position)
    return opened.regions.region_at(x, y)


def ensure_selection_painter(state: SlpdState) -> None:
    """Draw every selection change of ``state`` on the canvas (connected once per state)."""
    if getattr(state, "_selection_painter", False):
        return
    state._selection_painter = True

    def paint(selection, state_ref=state):
        try:
            show_selection(state_ref, selection)
        except Exception as exc:  # drawing must never break whoever changed the selection
            log.warning("could not draw the selected regions: %s", exc)

    state.selection_changed.connect(paint)
    # Restyling (SlpdState.restyle_prototypes) redraws the prototypes layer itself before it signals.
