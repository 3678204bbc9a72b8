"""The world frame of a slide: the one place that says where level-0 pixels sit on napari's canvas.

Every layer of a slide is placed in micrometres (``s = mpp`` world units per level-0 px) when the slide's
pixel size is known, and in level-0 pixels (``s = 1``) for every layer of that slide when it is not, so
layers always align with each other. napari puts pixel *centres* on integer data coordinates, so level-0
pixel ``x`` (openslide: it spans ``[x, x + 1)``) is centred at world ``x * s`` and covers world
``[(x - 0.5) * s, (x + 0.5) * s)``. Hence, for every kind of layer:

- the slide image (and its pyramid levels, which napari scales itself): ``scale = (s, s)``, no translate;
- a raster whose pixel (0, 0) covers level-0 ``[origin, origin + step)`` and each pixel ``step`` level-0
  px (tissue mask, region or patch label maps): ``scale = step * s``,
  ``translate = (origin - 0.5 + step / 2) * s``;
- shapes and points given in world coordinates: a level-0 point ``(x, y)`` (continuous, openslide
  convention) is at world ``((y - 0.5) * s, (x - 0.5) * s)``, so a region box ``[x0, x1)`` has its edges
  exactly on the image's pixel edges.

Pure numpy, no napari: the viewer layers, the widgets, prototype label maps all take their placement here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNKNOWN_MPP_NOTE = "pixel size unknown: distances are in level-0 pixels, not micrometres"

__all__ = ["SlideFrame", "UNKNOWN_MPP_NOTE", "world_scale"]


def world_scale(mpp: float | None) -> float:
    """World units per level-0 px: ``mpp`` (um) when known and positive, else 1 (level-0 px)."""
    return float(mpp) if mpp else 1.0


@dataclass(frozen=True)
class SlideFrame:
    """How a slide's level-0 pixels map to napari world coordinates (um, or px when mpp is unknown)."""

    dimensions: tuple[int, int]  # (width, height) of level 0
    mpp: float | None

    @classmethod
    def of(cls, slide) -> SlideFrame:
        """The frame of an open :class:`~napari_slpd.slides.slide.Slide` (anything with ``dimensions``
        and ``mpp``)."""
        return cls(tuple(int(v) for v in slide.dimensions), slide.mpp)

    @property
    def unit(self) -> str:
        return "um" if self.mpp else "px"

    @property
    def s(self) -> float:
        """World units per level-0 px."""
        return world_scale(self.mpp)

    @property
    def units(self) -> tuple[str, str] | None:
        """napari's ``units`` of every layer of the slide: ("um", "um"), or None (pixels, napari's default)."""
        return ("um", "um") if self.mpp else None

    @property
    def image_scale(self) -> tuple[float, float]:
        return (self.s, self.s)

    def units_kwargs(self) -> dict:
        """``{"units": ("um", "um")}`` when the pixel size is known, else ``{}``."""
        return {"units": self.units} if self.units is not None else {}

    def image_kwargs(self) -> dict:
        """scale (and units) of the slide image layer."""
        return {"scale": self.image_scale, **self.units_kwargs()}

    def raster_transform(
        self, origin_xy: tuple[float, float], step_xy: float | tuple[float, float]
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, translate) in (y, x) of a raster whose pixel (0, 0) covers level-0
        ``[origin, origin + step)`` and each pixel ``step`` level-0 px (one value or (step_x, step_y))."""
        sx, sy = (step_xy, step_xy) if np.isscalar(step_xy) else step_xy
        ox, oy = origin_xy
        scale = (sy * self.s, sx * self.s)
        translate = ((oy - 0.5 + sy / 2) * self.s, (ox - 0.5 + sx / 2) * self.s)
        return scale, translate

    def raster_kwargs(self, origin_xy: tuple[float, float], step_xy: float | tuple[float, float]) -> dict:
        """scale, translate (and units) of a raster layer (see :meth:`raster_transform`)."""
        scale, translate = self.raster_transform(origin_xy, step_xy)
        return {"scale": scale, "translate": translate, **self.units_kwargs()}

    def world_to_level0(self, world_yx: Sequence[float]) -> tuple[float, float]:
        """Continuous level-0 (x, y) (openslide convention: pixel x spans [x, x + 1)) of a world point."""
        wy, wx = float(world_yx[-2]), float(world_yx[-1])
        return (wx / self.s + 0.5, wy / self.s + 0.5)

    def level0_to_world(self, x: float, y: float) -> tuple[float, float]:
        return ((y - 0.5) * self.s, (x - 0.5) * self.s)

    def box_corners_world(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """[M, 4, 2] world (y, x) corners of level-0 boxes (x0, y0, x1, y1), for a napari Shapes layer."""
        return self.box_corners_data(boxes_xyxy) * self.s

    @staticmethod
    def box_corners_data(boxes_xyxy: np.ndarray) -> np.ndarray:
        """[M, 4, 2] (row, col) corners of level-0 boxes in level-0 pixel-centre coordinates, for a Shapes
        layer that carries the image's ``scale`` itself."""
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4) - 0.5
        x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        return np.stack(
            [np.stack([y0, x0], 1), np.stack([y0, x1], 1), np.stack([y1, x1], 1), np.stack([y1, x0], 1)], axis=1
        )
