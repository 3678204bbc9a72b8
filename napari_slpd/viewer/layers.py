"""napari layer-data tuples for slides, tissue masks and region grids (Qt-free, napari-free).

Every layer of one slide shares one world frame (:mod:`napari_slpd.slides.frame`): micrometres when the
pixel size is known, level-0 pixels otherwise, pixel centres on integer data coordinates; all helpers here
take their scale and translate from it, so overlays line up with the image at every zoom.
"""

from __future__ import annotations

import numpy as np

from napari_slpd.slides.grid import RegionGrid
from napari_slpd.slides.slide import Slide
from napari_slpd.slides.tissue import TissueMask
from napari_slpd.slides.frame import UNKNOWN_MPP_NOTE, SlideFrame  # noqa: F401  (UNKNOWN_MPP_NOTE re-exported)


def world_units(slide: Slide) -> tuple[tuple[float, float], tuple[str, str] | None]:
    """(scale, units) of level-0 pixels in the world frame: (mpp, mpp), ("um", "um") or (1, 1), None."""
    frame = SlideFrame.of(slide)
    return frame.image_scale, frame.units


def slide_metadata(slide: Slide) -> dict:
    """What a layer carries about its slide: for widgets (path, id, pixel size) and for people."""
    return {
        "slpd_slide_path": str(slide.path),
        "slide_id": slide.slide_id,
        "vendor": slide.vendor,
        "dimensions": tuple(slide.dimensions),
        "level_dimensions": [tuple(d) for d in slide.level_dimensions],
        "mpp": slide.mpp,
        "mpp_source": slide.pixel_size.source,
        "mpp_raw": slide.pixel_size.raw,
        "objective_power": slide.objective_power,
        "associated_images": list(slide.associated_image_names),
        "properties": dict(slide.properties),
    }


def slide_image_layer(slide: Slide, name: str | None = None) -> tuple:
    """The slide as a multiscale RGB image layer (lazy dask pyramid, physical scale when known)."""
    kwargs = {
        "name": name or slide.slide_id,
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "metadata": slide_metadata(slide),
        **SlideFrame.of(slide).image_kwargs(),
    }
    if slide.mpp is None:
        kwargs["name"] = f"{kwargs['name']} [pixels: pixel size unknown]"
        kwargs["metadata"]["warning"] = UNKNOWN_MPP_NOTE
    return (slide.pyramid(), kwargs, "image")


def associated_image_layers(slide: Slide, visible: bool = False) -> list[tuple]:
    """Label, macro and thumbnail images as extra layers, hidden by default.

    They have no physical scale of their own. Each is scaled to fit a quarter of the slide's height and
    width and stacked down the slide's top-left corner: inside the slide's frame, because napari's
    "reset view" fits hidden layers too and anything outside would shrink the slide on screen.
    """
    layers = []
    (sy, sx), units = world_units(slide)
    W, H = slide.dimensions
    x_offset = -0.5 * sx
    y_offset = -0.5 * sy
    for name in slide.associated_image_names:
        try:
            image = slide.associated_image(name)
        except Exception:  # a damaged associated image must not stop the slide from opening
            continue
        s = min(0.25 * H * sy / image.shape[0], 0.25 * W * sx / image.shape[1])
        target_h = image.shape[0] * s
        kwargs = {
            "name": f"{slide.slide_id} {name}",
            "rgb": True,
            "visible": visible,
            "scale": (s, s),
            "translate": (y_offset, x_offset),
            "metadata": {"slpd_slide_path": str(slide.path), "associated_image": name},
        }
        if units is not None:
            kwargs["units"] = units
        layers.append((image, kwargs, "image"))
        y_offset += target_h + 0.01 * H * sy
    return layers


TISSUE_COLOR = "#39ff14"  # a green that no H&E stain has, so the overlay reads at a glance


def tissue_mask_layer(slide: Slide, mask: TissueMask, name: str | None = None, opacity: float = 0.3,
                      color: str = TISSUE_COLOR) -> tuple:
    """The tissue mask as a labels layer (1 = tissue, drawn in ``color``) aligned with the slide image."""
    # Mask px (0, 0) covers level-0 [0, scale_xy): a raster in the slide's frame.
    kwargs = SlideFrame.of(slide).raster_kwargs((0.0, 0.0), mask.scale_xy)
    kwargs.update(
        name=name or f"{slide.slide_id} tissue",
        opacity=opacity,
        colormap={0: "transparent", 1: color, None: "transparent"},
        metadata={"slpd_slide_path": str(slide.path), "tissue_fraction": mask.fraction,
                  "threshold": mask.threshold, "params": mask.params.to_dict()},
    )
    return (mask.mask.astype(np.uint8), kwargs, "labels")


def region_rectangles(grid: RegionGrid) -> list[np.ndarray]:
    """One (4, 2) array of (row, col) corners per region, in level-0 pixel-centre coordinates."""
    return list(SlideFrame.box_corners_data(grid.region_boxes()))


def region_grid_layer(slide: Slide, grid: RegionGrid, name: str | None = None,
                      edge_color: str = "#00e5ff", edge_width_um: float | None = None) -> tuple:
    """The region grid as a shapes layer of rectangles with ``region`` and ``tissue_fraction`` features."""
    frame = SlideFrame.of(slide)
    kwargs = frame.image_kwargs()  # data in level-0 pixel-centre coordinates, scaled like the image
    width_px = grid.region_size_level0 / 60 if edge_width_um is None else edge_width_um / frame.s
    kwargs.update(
        name=name or f"{slide.slide_id} regions",
        shape_type="rectangle",
        edge_color=edge_color,
        face_color="transparent",
        edge_width=max(1.0, float(width_px)),
        features={
            "region": np.arange(len(grid), dtype=np.int64),
            "tissue_fraction": np.asarray(grid.tissue_fraction, dtype=np.float64),
        },
        metadata={"slpd_slide_path": str(slide.path), "grid": grid.to_attrs(), "reason": grid.reason},
    )
    return (region_rectangles(grid), kwargs, "shapes")


def region_values_image(grid: RegionGrid, values: np.ndarray, fill: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Paint one integer per region into a small image with one pixel per grid cell.

    Returns (image [rows, cols], (x_origin, y_origin)) where the cell (r, c) covers level-0
    [x_origin + c * size, ...). Regions off the regular grid (from other tools) are snapped to it.
    """
    values = np.asarray(values)
    size = grid.region_size_level0
    if len(grid) == 0:
        return np.zeros((1, 1), values.dtype if values.size else np.int32), (0, 0)
    xo = int(grid.coords[:, 0].min() % size)
    yo = int(grid.coords[:, 1].min() % size)
    cols = np.round((grid.coords[:, 0] - xo) / size).astype(np.int64)
    rows = np.round((grid.coords[:, 1] - yo) / size).astype(np.int64)
    W, H = grid.slide_dimensions
    shape = (max(int(rows.max()) + 1, (H - yo) // size), max(int(cols.max()) + 1, (W - xo) // size))
    image = np.full(shape, fill, dtype=values.dtype)
    image[rows, cols] = values
    return image, (xo, yo)


def region_labels_layer(slide: Slide, grid: RegionGrid, labels: np.ndarray, name: str = "regions",
                        opacity: float = 0.5, offset: int = 1) -> tuple:
    """A labels layer with one label per region (e.g. its prototype, ``labels + offset`` so 0 stays
    background), aligned with the slide."""
    image, (xo, yo) = region_values_image(grid, np.asarray(labels, dtype=np.int64) + offset, fill=0)
    kwargs = SlideFrame.of(slide).raster_kwargs((xo, yo), grid.region_size_level0)
    kwargs.update(name=name, opacity=opacity, metadata={"slpd_slide_path": str(slide.path)})
    return (image.astype(np.int32), kwargs, "labels")
