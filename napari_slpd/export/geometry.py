"""Pure geometry of an export: the region lattice of a slide and the exact outlines of its label cells.

Regions of a slide lie on a square lattice (``region_coords`` are level-0 top-left corners, one region is
``region_size_level0`` px wide), so a prototype's area is a union of lattice cells. Its outline is that
union, computed by GEOS (shapely's ``coverage_union_all`` of the unit cells): rectilinear
polygons with holes, exact (integer lattice coordinates, no simplification error), OGC-valid.

Conventions, chosen to satisfy both RFC 7946 and QuPath:

- lattice vertices are (x = col, y = row); :meth:`RegionLattice.to_level0` maps them to level-0 pixels
  (x right, y down), as QuPath's GeoJSON import expects;
- a shell has positive signed (shoelace) area on the raw numbers and a hole negative area (RFC 7946's
  right-hand rule applied to the coordinate values); only corners are kept, each ring starts at its
  top-most, then left-most vertex, holes are listed in that order and polygons in raster order of their
  first cell;
- cells are 4-connected: two cells touching only at a corner are separate polygons (of one MultiPolygon),
  and inside a polygon an empty cell reaching the outside only through a corner is a hole touching the
  shell at that point, which the OGC simple-feature rules allow; no ring touches itself (GEOS builds
  these OGC-valid rings itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_slpd.errors import ExportError, PrototypeError

__all__ = ["RegionLattice", "region_label_grid", "mask_to_polygons", "signed_area"]


@dataclass
class RegionLattice:
    """Cells of a label grid in level-0 px: cell (row, col) covers ``origin + (col, row) * step``."""

    origin: tuple[float, float]  # level-0 (x, y) of the top-left corner of cell (0, 0)
    step: float  # level-0 px per cell

    def to_level0(self, xy: np.ndarray, bounds: tuple[int, int] | None = None) -> np.ndarray:
        """Lattice vertices (x = col, y = row) to level-0 px, clamped to the slide when ``bounds`` is given.

        Clamping only ever moves the far edge of a border cell (region top-left corners lie inside the
        slide), so no ring degenerates.
        """
        pts = np.asarray(xy, dtype=np.float64) * self.step + np.asarray(self.origin, dtype=np.float64)
        if bounds is not None and bounds[0] > 0 and bounds[1] > 0:
            pts[:, 0] = np.clip(pts[:, 0], 0, bounds[0])
            pts[:, 1] = np.clip(pts[:, 1], 0, bounds[1])
        return pts


def region_label_grid(region_coords: np.ndarray, region_size_level0: float, labels: np.ndarray):
    """(grid [H, W] int64 with -1 where no region, RegionLattice, LabelMap) of per-region labels (negative =
    none).

    The painting is napari_slpd.prototypes.label_map's: exact for regions on a lattice of their size.
    """
    from napari_slpd.prototypes.label_map import label_map

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    coords = np.asarray(region_coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ExportError(f"region coordinates must have shape [M, 2], got {coords.shape}")
    if len(labels) != len(coords):
        raise ExportError(f"{len(labels)} labels for {len(coords)} regions")
    if len(coords) == 0:
        raise ExportError("the slide has no regions, so there is nothing to export")
    try:
        lm = label_map(labels, coords, float(region_size_level0))
    except PrototypeError as exc:
        raise ExportError(f"the regions cannot be drawn as a label grid: {exc}") from exc
    if not lm.exact:
        raise ExportError(
            "region coordinates are not on an integer lattice of the region size "
            f"({region_size_level0} px); their outlines cannot be exported exactly"
        )
    grid = lm.data.astype(np.int64) - 1
    return grid, RegionLattice((float(lm.origin[0]), float(lm.origin[1])), float(lm.scale)), lm


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring on the raw numbers (positive for a shell, negative for a hole)."""
    ring = np.asarray(ring, dtype=np.float64)
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def mask_to_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons covering exactly the True cells of ``mask``, in lattice units (x = col, y = row).

    Each polygon is a list of closed [N + 1, 2] int64 vertex rings, shell first (positive signed area)
    then its holes (negative); one polygon per 4-connected component (see the module notes).
    """
    import shapely

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ExportError(f"a cell mask must be 2-D, got shape {mask.shape}")
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return []
    # Unit cells share their edges and corners exactly, i.e. they form a valid coverage, whose union GEOS
    # computes in time linear in the cells (a general overlay of the same boxes is several times slower).
    union = shapely.coverage_union_all(shapely.box(cols, rows, cols + 1, rows + 1))
    polygons = []
    for part in shapely.get_parts(union):
        part = shapely.orient_polygons(part, exterior_cw=False)  # CCW on the raw numbers: positive area
        shell = _corners(shapely.get_coordinates(part.exterior))
        holes = sorted((_corners(shapely.get_coordinates(h)) for h in part.interiors),
                       key=lambda r: (r[0, 1], r[0, 0]))
        polygons.append([shell] + holes)
    polygons.sort(key=lambda p: (p[0][0, 1], p[0][0, 0]))
    return polygons


def _corners(ring: np.ndarray) -> np.ndarray:
    """A closed ring with only its corners, starting at its top-most, then left-most vertex."""
    pts = np.rint(ring[:-1]).astype(np.int64)
    before = pts - np.roll(pts, 1, axis=0)
    after = np.roll(pts, -1, axis=0) - pts
    pts = pts[before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0]
    first = np.lexsort((pts[:, 0], pts[:, 1]))[0]
    pts = np.roll(pts, -first, axis=0)
    return np.vstack([pts, pts[:1]])
