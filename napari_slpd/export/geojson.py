"""Export named prototype regions for other tools: QuPath GeoJSON and a label-map TIFF.

Regions of a slide lie on a square lattice (``region_coords`` are level-0 top-left corners, one region is
``region_size_level0`` px wide), so a prototype's area is a union of lattice cells. Its outline is traced
exactly on the lattice: every boundary edge between a cell of the prototype and any other cell is
collected with the prototype on its left and the edges are chained into rings. This gives rectilinear
polygons with holes and no geometry library (the cells' union is exact, no simplification error).

Conventions, chosen to satisfy both RFC 7946 and QuPath:

- coordinates are level-0 pixels (x right, y down), as QuPath's GeoJSON import expects;
- a shell has positive signed (shoelace) area on the raw numbers and a hole negative area (RFC 7946's
  right-hand rule applied to the coordinate values);
- cells are 4-connected: two cells touching only at a corner are separate polygons (of one
  MultiPolygon), and inside a polygon an empty cell reaching the outside only through a corner is a hole
  touching the shell at that point, which the OGC simple-feature rules allow; no ring touches itself;
- one Feature per prototype (a Polygon or MultiPolygon) with ``properties.objectType = "annotation"``
  and ``properties.classification = {"name": ..., "color": [r, g, b]}``.

The label map TIFF holds one pixel per region: 0 = no region, k + 1 = prototype k; it is a palette
image whose colours are the prototypes' colours, with resolution tags (one pixel = one region) and a
JSON description giving the level-0 origin, the pixel size and the class names.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.utils.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "RegionLattice",
    "ClassStyle",
    "trace_rings",
    "mask_to_polygons",
    "label_grid_to_features",
    "prototype_geojson",
    "write_geojson",
    "read_geojson",
    "write_label_map_tiff",
    "hex_to_rgb",
    "region_label_grid",
    "export_slide_prototypes",
    "SlideExport",
]


class ExportError(SlpdError):
    """Regions cannot be exported (not on a lattice, mismatched lengths, nothing to write)."""


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    text = color.strip().lstrip("#")
    if len(text) != 6:
        raise ExportError(f"colour {color!r} is not a #rrggbb hex colour")
    try:
        return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    except ValueError as exc:
        raise ExportError(f"colour {color!r} is not a #rrggbb hex colour") from exc


@dataclass(frozen=True)
class ClassStyle:
    """How one prototype appears outside: QuPath class name and colour (#rrggbb)."""

    name: str
    color: str


# -------------------------------------------------------------------------------------------------
# Region lattice


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
    """(grid [H, W] int64 with -1 where no region, RegionLattice) of per-region labels (negative = none).

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


# -------------------------------------------------------------------------------------------------
# Boundary tracing

# Directions as (dx, dy) on the raw numbers; a left turn is a +90 degree rotation (dx, dy) -> (-dy, dx).
_RIGHT, _DOWN, _LEFT, _UP = (1, 0), (0, 1), (-1, 0), (0, -1)


def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Directed unit edges between mask cells and non-mask cells, mask on the left: start -> [direction]."""
    padded = np.pad(mask.astype(bool), 1)
    inner = padded[1:-1, 1:-1]
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(rows, cols, dx, dy, sx, sy):
        for r, c in zip(rows.tolist(), cols.tolist()):
            out.setdefault((c + sx, r + sy), []).append((dx, dy))

    # Cell (r, c) spans x in [c, c+1], y in [r, r+1]; walking its border with the cell on the left:
    rows, cols = np.nonzero(inner & ~padded[:-2, 1:-1])  # no cell at y - 1: edge (c, r) -> (c+1, r)
    add(rows, cols, *_RIGHT, 0, 0)
    rows, cols = np.nonzero(inner & ~padded[1:-1, 2:])  # no cell at x + 1: edge (c+1, r) -> (c+1, r+1)
    add(rows, cols, *_DOWN, 1, 0)
    rows, cols = np.nonzero(inner & ~padded[2:, 1:-1])  # no cell at y + 1: edge (c+1, r+1) -> (c, r+1)
    add(rows, cols, *_LEFT, 1, 1)
    rows, cols = np.nonzero(inner & ~padded[1:-1, :-2])  # no cell at x - 1: edge (c, r+1) -> (c, r)
    add(rows, cols, *_UP, 0, 1)
    return out


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def trace_rings(mask: np.ndarray) -> list[np.ndarray]:
    """All boundary rings of a boolean cell mask, as closed [N + 1, 2] (x = col, y = row) vertex arrays.

    Only corners are kept. Shells have positive signed area, holes negative. Meant for one 4-connected
    component (see :func:`mask_to_polygons`): at a corner where two of its cells touch diagonally the walk
    turns right, i.e. around the empty cell, so an empty cell touching the outside only at that corner
    becomes a hole touching the shell at one point (valid under the OGC rules, which QuPath's JTS
    applies) instead of a shell ring that touches itself (invalid). That rule maps the two edges entering
    such a corner onto the two leaving it one-to-one, so every edge belongs to exactly one ring, and no
    ring passes through a corner twice.
    """
    edges = _boundary_edges(mask)
    rings: list[np.ndarray] = []
    while edges:
        start = next(iter(edges))
        first = edges[start][0]
        vertex, direction = start, first
        points = []
        while True:
            points.append(vertex)
            outs = edges[vertex]
            outs.remove(direction)
            if not outs:
                del edges[vertex]
            vertex = (vertex[0] + direction[0], vertex[1] + direction[1])
            if vertex == start and _turn(direction, edges.get(start, []) + [first]) == first:
                break
            direction = _turn(direction, edges[vertex])
        rings.append(_close_and_simplify(points))
    return rings


def _turn(incoming: tuple[int, int], choices: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The edge to leave a corner by: right turn if there is one, else straight on, else left."""
    dx, dy = incoming
    for candidate in ((dy, -dx), (dx, dy), (-dy, dx)):
        if candidate in choices:
            return candidate
    raise ExportError("internal error: broken boundary while tracing a region outline")


def _close_and_simplify(points: list[tuple[int, int]]) -> np.ndarray:
    pts = np.asarray(points, dtype=np.int64)
    keep = []
    n = len(pts)
    for i in range(n):
        prev_pt, pt, next_pt = pts[i - 1], pts[i], pts[(i + 1) % n]
        d1 = pt - prev_pt
        d2 = next_pt - pt
        if d1[0] * d2[1] - d1[1] * d2[0] != 0:  # a corner, not a point along a straight side
            keep.append(pt)
    if not keep:
        return np.zeros((0, 2), dtype=np.int64)
    ring = np.asarray(keep, dtype=np.int64)
    return np.vstack([ring, ring[:1]])


def mask_to_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons (shell first, then holes) covering exactly the True cells of ``mask``, lattice units.

    Each 4-connected component is one polygon: traced on its own, it has exactly one shell (positive
    area) and its holes (negative area), so no point-in-polygon search is needed to pair them.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    components, count = ndimage.label(mask)  # default structure = 4-connectivity
    polygons: list[list[np.ndarray]] = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        rings = trace_rings(components[box] == index)
        offset = np.array([box[1].start, box[0].start], dtype=np.int64)
        shells = [r for r in rings if _signed_area(r) > 0]
        if len(shells) != 1:
            raise ExportError("internal error: a connected region traced to several outlines")
        polygons.append([shells[0] + offset] + [r + offset for r in rings if _signed_area(r) < 0])
    return polygons


# -------------------------------------------------------------------------------------------------
# GeoJSON


def _feature_id(slide_id: str, label: int, name: str) -> str:
    # Stable across exports so that re-importing into QuPath replaces rather than duplicates.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"napari-slpd:{slide_id}:{label}:{name}"))


def label_grid_to_features(
    labels: np.ndarray,
    lattice: RegionLattice,
    styles: Mapping[int, ClassStyle],
    slide_id: str = "",
    bounds: tuple[int, int] | None = None,
    extra_metadata: Mapping[int, Mapping[str, str]] | None = None,
) -> list[dict]:
    """One GeoJSON Feature per label present in ``labels`` ([rows, cols], -1 = no region)."""
    features = []
    for label in sorted(int(v) for v in np.unique(labels) if v >= 0):
        polys = mask_to_polygons(labels == label)
        coords = [
            [lattice.to_level0(ring, bounds).tolist() for ring in poly]
            for poly in polys
        ]
        if len(coords) == 1:
            geometry = {"type": "Polygon", "coordinates": coords[0]}
        else:
            geometry = {"type": "MultiPolygon", "coordinates": coords}
        style = styles.get(label) or ClassStyle(f"Prototype {label}", "#808080")
        metadata = {"slide_id": slide_id, "prototype": str(label), "regions": str(int((labels == label).sum()))}
        if extra_metadata and label in extra_metadata:
            metadata.update({k: str(v) for k, v in extra_metadata[label].items()})
        features.append(
            {
                "type": "Feature",
                "id": _feature_id(slide_id, label, style.name),
                "geometry": geometry,
                "properties": {
                    "objectType": "annotation",
                    "name": style.name,
                    "classification": {"name": style.name, "color": list(hex_to_rgb(style.color))},
                    "isLocked": False,
                    "metadata": metadata,
                },
            }
        )
    return features


def prototype_geojson(
    region_coords: np.ndarray,
    region_size_level0: float,
    assignments: np.ndarray,
    styles: Mapping[int, ClassStyle],
    slide_id: str = "",
    slide_dimensions: tuple[int, int] | None = None,
    only: Iterable[int] | None = None,
    extra_metadata: Mapping[int, Mapping[str, str]] | None = None,
) -> dict:
    """A GeoJSON FeatureCollection of the regions of each prototype (``only``: a subset of prototypes)."""
    labels, lattice, _ = region_label_grid(region_coords, region_size_level0, assignments)
    if only is not None:
        keep = np.isin(labels, np.asarray(list(only), dtype=np.int64))
        labels = np.where(keep, labels, -1)
    features = label_grid_to_features(labels, lattice, styles, slide_id, slide_dimensions, extra_metadata)
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | os.PathLike, collection: Mapping) -> Path:
    path = Path(path)
    if not collection.get("features"):
        raise ExportError("no labeled regions to export (every prototype was left out)")
    atomic_write_text(path, json.dumps(collection, indent=1) + "\n")
    return path


def read_geojson(path: str | os.PathLike) -> list[dict]:
    """Features of a GeoJSON file (a FeatureCollection, a list of Features, or a single Feature)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read GeoJSON {path}: {exc}") from exc
    if isinstance(data, list):
        return data
    if data.get("type") == "FeatureCollection":
        return list(data.get("features", []))
    if data.get("type") == "Feature":
        return [data]
    raise ExportError(f"{path} is not a GeoJSON Feature or FeatureCollection")


# -------------------------------------------------------------------------------------------------
# Label map TIFF


def write_label_map_tiff(
    path: str | os.PathLike,
    region_coords: np.ndarray,
    region_size_level0: float,
    assignments: np.ndarray,
    styles: Mapping[int, ClassStyle],
    mpp: float | None = None,
    slide_id: str = "",
) -> Path:
    """Write the per-region label map: 0 = no region, k + 1 = prototype k, coloured by a palette.

    One pixel is one region, ``region_size_level0 * mpp`` um wide; the resolution tags say so when the
    slide's pixel size is known. The ImageDescription is JSON with the origin and the classes, so the map
    can be placed back on the slide.
    """
    import tifffile

    _, lattice, lm = region_label_grid(region_coords, region_size_level0, assignments)
    image = lm.data
    bits = 8 if image.dtype == np.uint8 else 16
    colormap = np.zeros((3, 2**bits), dtype=np.uint16)
    for label, style in styles.items():
        if 0 <= label + 1 < 2**bits:
            colormap[:, label + 1] = np.asarray(hex_to_rgb(style.color), dtype=np.uint16) * 257
    description = {
        "napari_slpd": "prototype label map",
        "slide_id": slide_id,
        "origin_level0": list(lattice.origin),
        "pixel_size_level0": lattice.step,
        "mpp_level0": mpp,
        "values": {"0": "no region", **{str(k + 1): s.name for k, s in sorted(styles.items())}},
        "colors": {str(k + 1): s.color for k, s in sorted(styles.items())},
    }
    kwargs = {}
    if mpp is not None and mpp > 0:
        px_per_cm = 1e4 / (mpp * lattice.step)
        kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            image,
            photometric="palette",
            colormap=colormap,
            description=json.dumps(description),
            metadata=None,
            **kwargs,
        )
    return path


# -------------------------------------------------------------------------------------------------
# A slide's named prototypes


@dataclass
class SlideExport:
    """What :func:`export_slide_prototypes` wrote."""

    slide_id: str
    geojson: Path | None
    tiff: Path | None
    n_features: int
    classes: list[str]


def _slide_frame(cohort, slide_id: str, n_regions: int):
    """(region coords, region size, slide dimensions or None, mpp or None) from the slide's feature file."""
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(cohort.features_path(slide_id)) as store:
        coords = np.asarray(store.region_coords, dtype=np.int64)
        size = float(store.region_size_level0)
        attrs = store.attrs
    if len(coords) != n_regions:
        raise ExportError(
            f"{slide_id}: its prototypes assign {n_regions} regions but its feature file holds {len(coords)}; "
            "recompute the prototypes before exporting"
        )
    width, height = int(attrs.get("slide_width") or 0), int(attrs.get("slide_height") or 0)
    dims = (width, height) if width > 0 and height > 0 else None
    if dims is None:
        with_slide = cohort.slide(slide_id)
        try:
            from napari_slpd.slides.slide import open_slide

            slide = open_slide(with_slide.path, mpp=with_slide.mpp)
            try:
                dims = tuple(int(v) for v in slide.dimensions)
            finally:
                slide.close()
        except Exception as exc:  # noqa: BLE001 - the export still works without clamping
            log.warning("%s: slide dimensions unknown (%s); polygons are not clamped to the slide", slide_id, exc)
    mpp = attrs.get("mpp")
    mpp = float(mpp) if mpp not in (None, "") and float(mpp) > 0 else None
    return coords, size, dims, mpp


def export_slide_prototypes(
    provider,
    slide_id: str,
    geojson_path: str | os.PathLike | None = None,
    tiff_path: str | os.PathLike | None = None,
    annotations=None,
    only: Iterable[int] | None = None,
    named_only: bool = False,
) -> SlideExport:
    """Write a slide's prototype regions, with their names and colours, as QuPath GeoJSON and/or a TIFF.

    ``provider``: a Session or a Cohort (where prototypes are read); ``annotations``: the names to use
    (loaded from the cohort by default; stale names are not used). ``only`` restricts the export to some
    prototypes; ``named_only`` to those that carry a name.
    """
    from napari_slpd.labeling.names import PrototypeAnnotations, _cohort_of, prototype_source

    if geojson_path is None and tiff_path is None:
        raise ExportError("give a GeoJSON path, a TIFF path, or both")
    cohort = _cohort_of(provider)
    protos = prototype_source(provider)(slide_id)
    if protos is None:
        raise ExportError(f"{slide_id} has no prototypes to export; compute them first")
    annotations = annotations or PrototypeAnnotations.load(cohort, provider)
    styles = annotations.class_styles(slide_id, protos)
    keep = set(range(protos.k)) if only is None else {int(k) for k in only}
    if named_only:
        try:
            keep &= set(annotations.labels(slide_id, protos))
        except SlpdError:
            keep = set()
    if not keep:
        raise ExportError(f"{slide_id}: no prototype is selected for export (name some first?)")
    assignments = np.asarray(protos.assignments, dtype=np.int64)
    coords, size, dims, mpp = _slide_frame(cohort, slide_id, len(assignments))
    extra = {}
    try:
        labels = annotations.labels(slide_id, protos)
    except SlpdError:
        labels = {}
    for k in range(protos.k):
        meta = {"source": labels[k].source if k in labels else "default"}
        if k in labels and labels[k].confidence is not None:
            meta["confidence"] = f"{labels[k].confidence:.3f}"
        extra[k] = meta
    geo_out = tiff_out = None
    n_features = 0
    if geojson_path is not None:
        collection = prototype_geojson(coords, size, assignments, styles, slide_id, dims, only=keep,
                                       extra_metadata=extra)
        n_features = len(collection["features"])
        geo_out = write_geojson(geojson_path, collection)
    if tiff_path is not None:
        masked = np.where(np.isin(assignments, sorted(keep)), assignments, -1)
        tiff_out = write_label_map_tiff(tiff_path, coords, size, masked,
                                        {k: s for k, s in styles.items() if k in keep}, mpp=mpp, slide_id=slide_id)
    return SlideExport(slide_id, geo_out, tiff_out, n_features, [styles[k].name for k in sorted(keep)])
