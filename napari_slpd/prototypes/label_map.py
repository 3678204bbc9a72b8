"""Prototype label maps: each region's (or patch's) prototype painted as an integer image that overlays
the slide in napari.

Placement follows the project's world frame (:mod:`napari_slpd.slides.frame`): the slide's level-0 pixel j
is centred at world ``j * u`` (u = um/px, or 1 when the pixel size is unknown), so a level-0 box [x0, x1)
spans world ``(x0 - 0.5) * u`` to ``(x1 - 0.5) * u``. A label pixel of ``scale`` level-0 px whose box
starts at level-0 ``origin`` therefore needs ``translate = (origin + scale / 2 - 0.5) * u``.

Regions lie on a regular lattice (build_region_grid steps by the region size), so one label pixel per
region reproduces every region box exactly. Tiles that overlap or are offset by a fraction of their size
(patch grids with a stride below the patch size) get the largest cell that divides every offset and the
tile size, so they are still exact; tiles whose size is not a whole number of level-0 px (patches of a
region whose level-0 size is not a multiple of 16) are snapped to a lattice of their own size, which is
exact to within the half pixel the stored integer coordinates were rounded to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from napari_slpd.errors import PrototypeError

# A label map is meant to be small (one pixel per region or patch); refuse to allocate absurd ones.
DEFAULT_MAX_PIXELS = 64_000_000
# Per-tile painting loops beyond this many cells per tile (large tiles on a fine lattice).
_VECTORIZED_SPAN_CELLS = 64


@dataclass
class LabelMap:
    """``data`` [H, W] uint8/uint16: 0 = background, k + 1 = prototype k. ``tile_index`` [H, W] int32: the
    region (or patch) painted at each pixel, -1 where none. ``scale``: level-0 px per label pixel.
    ``origin``: level-0 (x, y) of the top-left corner of label pixel (0, 0). ``exact`` is False when
    tiles were snapped to the lattice (fractional tile sizes, see the module notes)."""

    data: np.ndarray
    tile_index: np.ndarray
    scale: float
    origin: tuple[float, float]
    tile_size_level0: float
    n_labels: int
    exact: bool = True

    @property
    def translate(self) -> tuple[float, float]:
        """(y, x) in level-0 px: where napari must put the centre of label pixel (0, 0)."""
        ox, oy = self.origin
        half = self.scale / 2.0 - 0.5
        return (oy + half, ox + half)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def to_layer_kwargs(self, mpp: float | None = None, name: str | None = None, opacity: float = 0.5) -> dict:
        """Keyword arguments for ``viewer.add_labels(lm.data, **kwargs)`` (scale/translate in um when
        ``mpp`` is given, level-0 px otherwise: the same frame as the slide layer)."""
        from napari_slpd.slides.frame import SlideFrame

        kwargs = {
            **SlideFrame((0, 0), mpp).raster_kwargs(self.origin, self.scale),
            "opacity": opacity,
            "metadata": {
                "slpd_label_map": True,
                "n_prototypes": int(self.n_labels),
                "tile_size_level0": float(self.tile_size_level0),
                "exact_overlay": bool(self.exact),
            },
        }
        if name is not None:
            kwargs["name"] = name
        return kwargs

    def pixel_of(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the label pixel covering level-0 point (x, y) (continuous coordinates, pixel j
        spanning [j, j + 1)), or None outside the map."""
        ox, oy = self.origin
        col = math.floor((x - ox) / self.scale)
        row = math.floor((y - oy) / self.scale)
        if 0 <= row < self.data.shape[0] and 0 <= col < self.data.shape[1]:
            return row, col
        return None

    def tile_at(self, x: float, y: float) -> int:
        """Index of the region (or patch) covering level-0 point (x, y), -1 for background."""
        pixel = self.pixel_of(x, y)
        return -1 if pixel is None else int(self.tile_index[pixel])

    def label_at(self, x: float, y: float) -> int:
        """Prototype index at level-0 point (x, y), -1 for background."""
        pixel = self.pixel_of(x, y)
        return -1 if pixel is None else int(self.data[pixel]) - 1

    def level0_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Level-0 (x0, y0, x1, y1) covered by label pixel (row, col)."""
        ox, oy = self.origin
        return (ox + col * self.scale, oy + row * self.scale, ox + (col + 1) * self.scale, oy + (row + 1) * self.scale)


def _integer_lattice(coords: np.ndarray, size: float, max_pixels: int):
    """(cell, origin, rows, cols, span) with every tile exactly on a lattice of integer ``cell``, or None."""
    if not float(size).is_integer() or not np.all(np.mod(coords, 1) == 0):
        return None
    c = coords.astype(np.int64)
    lo = c.min(axis=0)
    off = c - lo
    cell = int(np.gcd.reduce(np.concatenate([[int(size)], np.unique(off[:, 0]), np.unique(off[:, 1])])))
    span = int(size) // cell
    cols, rows = off[:, 0] // cell, off[:, 1] // cell
    if (int(rows.max()) + span) * (int(cols.max()) + span) > max_pixels:
        return None
    return float(cell), (float(lo[0]), float(lo[1])), rows, cols, span


def _snapped_lattice(coords: np.ndarray, size: float):
    """Tiles snapped to a lattice of their own size when each lies within a pixel of it, or None."""
    lo = coords.min(axis=0)
    steps = (coords - lo) / size
    idx = np.round(steps).astype(np.int64)
    if np.abs(steps - idx).max() * size > 1.0 + 1e-6:
        return None
    return float(size), (float(lo[0]), float(lo[1])), idx[:, 1], idx[:, 0], 1


def label_map(
    assignments,
    coords,
    tile_size_level0: float,
    n_labels: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LabelMap:
    """Paint ``assignments`` [M] (prototype index per tile, negative = none) of tiles with level-0 top-left
    ``coords`` [M, 2] (x, y) and side ``tile_size_level0`` into a LabelMap. Later tiles paint over earlier
    ones where tiles overlap."""
    assignments = np.asarray(assignments).reshape(-1)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise PrototypeError(f"tile coordinates must be [M, 2] (x, y), got shape {coords.shape}")
    if coords.shape[0] != assignments.shape[0]:
        raise PrototypeError(
            f"{assignments.shape[0]} prototype assignments for {coords.shape[0]} tile coordinates: "
            "the prototypes were computed from other features than these coordinates"
        )
    size = float(tile_size_level0)
    if not size > 0:
        raise PrototypeError(f"tile size must be positive, got {tile_size_level0}")
    if assignments.size and assignments.dtype.kind not in "iu":
        raise PrototypeError(f"assignments must be integers, got dtype {assignments.dtype}")
    top = int(assignments.max()) + 1 if assignments.size else 0
    n_labels = top if n_labels is None else int(n_labels)
    if top > n_labels:
        raise PrototypeError(f"an assignment ({top - 1}) is out of range for {n_labels} prototypes")
    dtype = np.uint8 if n_labels + 1 <= np.iinfo(np.uint8).max else np.uint16
    if n_labels + 1 > np.iinfo(np.uint16).max:
        raise PrototypeError(f"too many prototypes for a label map: {n_labels}")
    if assignments.size == 0:
        return LabelMap(np.zeros((1, 1), dtype), np.full((1, 1), -1, np.int32), size, (0.0, 0.0), size, n_labels)

    lattice = _integer_lattice(coords, size, max_pixels)
    exact = lattice is not None
    if lattice is None:
        lattice = _snapped_lattice(coords, size)
    if lattice is None:
        raise PrototypeError(
            "the tile coordinates are not on a regular grid of the tile size, so they cannot be drawn as a "
            "label image; were coords and tile size taken from the same feature file?"
        )
    cell, origin, rows, cols, span = lattice
    H, W = int(rows.max()) + span, int(cols.max()) + span
    if H * W > max_pixels:
        raise PrototypeError(
            f"the label map would have {H} x {W} pixels (more than {max_pixels}); the tiles are too spread out"
        )
    data = np.zeros((H, W), dtype)
    tile_index = np.full((H, W), -1, np.int32)
    labels = np.where(assignments >= 0, assignments + 1, 0).astype(dtype)
    if span * span <= _VECTORIZED_SPAN_CELLS:
        # Where tiles overlap the last one wins: keep the highest tile index covering each pixel.
        best = np.full((H, W), -1, np.int64)
        ids = np.arange(assignments.size, dtype=np.int64)
        for dy in range(span):
            for dx in range(span):
                np.maximum.at(best, (rows + dy, cols + dx), ids)
        covered = best >= 0
        tile_index[covered] = best[covered]
        data[covered] = labels[best[covered]]
    else:
        for i in range(assignments.size):
            data[rows[i] : rows[i] + span, cols[i] : cols[i] + span] = labels[i]
            tile_index[rows[i] : rows[i] + span, cols[i] : cols[i] + span] = i
    return LabelMap(data, tile_index, cell, origin, size, n_labels, exact)

