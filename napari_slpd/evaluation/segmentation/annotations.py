"""Ground-truth tissue annotations of a slide: QuPath GeoJSON or a label mask with a class table, as a
class raster at a chosen downsample.

QuPath GeoJSON (File > Export objects as GeoJSON): a FeatureCollection (or a bare list of features) whose
features carry ``Polygon`` / ``MultiPolygon`` geometries in level-0 pixels and a classification in
``properties.classification.name`` (or ``properties.classification`` as text, or ``properties.name``).
Holes (interior rings) are not part of the region; polygons drawn later paint over earlier ones (as
QuPath draws them). Features without a class are ignored.

Label masks: ``SLIDE.png``/``.tif``/``.npy`` holding class values (0 = not annotated unless the class
table names it), with a class table CSV ``value,name`` and an optional ``downsample`` per mask given by
the table file's ``downsample`` column or the default: the mask covers the whole slide.

```python
from napari_slpd.evaluation.segmentation.annotations import read_geojson, rasterize, find_annotation
shapes = read_geojson("annotations/S1.geojson")          # [Shape(name, polygons=[[exterior, hole, ...], ...])]
raster, names = rasterize(shapes, (width, height), downsample=16, class_names=None)  # int16, -1 = none
```
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_slpd.evaluation.errors import LabelsError

GEOJSON_SUFFIXES = (".geojson", ".json")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
CLASS_TABLE_NAMES = ("classes.csv", "class_table.csv")


@dataclass
class Shape:
    """One annotated object: its class name and polygons, each a list of rings (exterior first, then
    holes), each ring an [n, 2] float array of level-0 (x, y)."""

    name: str
    polygons: list[list[np.ndarray]] = field(default_factory=list)


def normalize_name(name: str) -> str:
    """Class names compared case- and separator-insensitively ("Tumor-rich" == "tumor rich")."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _class_of(properties: dict) -> str | None:
    cls = properties.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    if not cls:
        cls = properties.get("name") if properties.get("objectType", "annotation") == "annotation" else None
    return str(cls) if cls else None


def _rings(coords, path, what) -> list[np.ndarray]:
    rings = []
    for ring in coords:
        arr = np.asarray(ring, np.float64)
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] < 3:
            raise LabelsError(f"{path}: {what} has a ring that is not a list of at least 3 [x, y] points")
        rings.append(arr[:, :2])
    return rings


def read_geojson(path: str | os.PathLike) -> list[Shape]:
    """The classified polygons of a QuPath GeoJSON export (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelsError(f"annotations {path} are not readable GeoJSON ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise LabelsError(f"annotations {path}: expected a GeoJSON FeatureCollection or a list of features")
    shapes = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            continue
        name = _class_of(feature.get("properties") or {})
        geometry = feature.get("geometry") or {}
        kind = geometry.get("type")
        if name is None or kind not in ("Polygon", "MultiPolygon"):
            continue
        what = f"feature {i} ({name})"
        try:
            parts = [geometry["coordinates"]] if kind == "Polygon" else list(geometry["coordinates"])
            polygons = [_rings(part, path, what) for part in parts]
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelsError(f"annotations {path}: {what} has malformed coordinates ({exc})") from exc
        shapes.append(Shape(name, polygons))
    return shapes


def rasterize(shapes: list[Shape], size_level0: tuple[int, int], downsample: float,
              class_names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(raster [h, w] int16 class index, -1 where nothing is annotated; class names). A pixel belongs to a
    polygon when its centre does (exterior filled, holes cleared); later shapes paint over earlier ones.
    ``class_names``: the order of classes (names not in it are added at the end)."""
    from skimage.draw import polygon as polygon_pixels

    width, height = int(size_level0[0]), int(size_level0[1])
    w, h = max(1, int(np.ceil(width / downsample))), max(1, int(np.ceil(height / downsample)))
    names = list(class_names or [])
    index = {normalize_name(n): i for i, n in enumerate(names)}
    out = np.full((h, w), -1, np.int16)
    for shape in shapes:
        key = normalize_name(shape.name)
        if key not in index:
            index[key] = len(names)
            names.append(shape.name)
        mask = np.zeros((h, w), bool)
        for polygon in shape.polygons:
            inside = np.zeros((h, w), bool)
            for r, ring in enumerate(polygon):
                # raster pixel (i, j) has its centre at level-0 ((j + 0.5) * ds, (i + 0.5) * ds)
                rows, cols = polygon_pixels(ring[:, 1] / downsample - 0.5, ring[:, 0] / downsample - 0.5, (h, w))
                inside[rows, cols] = r == 0
            mask |= inside
        out[mask] = index[key]
    return out, names


def read_class_table(path: str | os.PathLike) -> dict[int, str]:
    """value -> class name from a CSV with ``value`` and ``name`` columns."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"value", "name"} <= set(rows[0]):
        raise LabelsError(f"class table {path} needs the columns value,name (one row per mask value)")
    table = {}
    for row in rows:
        try:
            table[int(row["value"])] = row["name"].strip()
        except ValueError as exc:
            raise LabelsError(f"class table {path}: value {row['value']!r} is not an integer") from exc
    return table


def read_mask(path: str | os.PathLike, table: dict[int, str], size_level0: tuple[int, int], downsample: float,
              class_names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """A label mask resampled (nearest) to the raster of ``rasterize``; values not in ``table`` are -1."""
    from PIL import Image

    path = Path(path)
    if path.suffix == ".npy":
        mask = np.load(path, allow_pickle=False)
    else:
        mask = np.asarray(Image.open(path))
    if mask.ndim != 2:
        raise LabelsError(f"label mask {path} must be one channel of class values, not shape {mask.shape}")
    width, height = int(size_level0[0]), int(size_level0[1])
    w, h = max(1, int(np.ceil(width / downsample))), max(1, int(np.ceil(height / downsample)))
    ys = np.minimum(((np.arange(h) + 0.5) * downsample * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * downsample * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    values = mask[np.ix_(ys, xs)]
    names = list(class_names or [])
    index = {normalize_name(n): i for i, n in enumerate(names)}
    out = np.full((h, w), -1, np.int16)
    for value, name in table.items():
        key = normalize_name(name)
        if key not in index:
            index[key] = len(names)
            names.append(name)
        out[values == value] = index[key]
    return out, names


def find_annotation(folder: str | os.PathLike, slide_id: str) -> Path | None:
    """The annotation file of ``slide_id`` in ``folder`` (GeoJSON first, then a label mask), or None."""
    folder = Path(folder)
    for suffix in GEOJSON_SUFFIXES + MASK_SUFFIXES:
        path = folder / f"{slide_id}{suffix}"
        if path.exists():
            return path
    return None


def class_table_of(folder: str | os.PathLike) -> dict[int, str] | None:
    for name in CLASS_TABLE_NAMES:
        path = Path(folder) / name
        if path.exists():
            return read_class_table(path)
    return None


def shapes_to_geojson(shapes: list[Shape], colors: dict[str, str] | None = None) -> dict:
    """A QuPath-readable FeatureCollection of ``shapes`` (one MultiPolygon feature per shape)."""
    features = []
    for shape in shapes:
        classification = {"name": shape.name}
        if colors and shape.name in colors:
            hex_color = colors[shape.name].lstrip("#")
            classification["color"] = [int(hex_color[i : i + 2], 16) for i in (0, 2, 4)]
        features.append({
            "type": "Feature",
            "geometry": {"type": "MultiPolygon",
                         "coordinates": [[ring.round(2).tolist() for ring in polygon] for polygon in shape.polygons]},
            "properties": {"objectType": "annotation", "classification": classification},
        })
    return {"type": "FeatureCollection", "features": features}


def raster_to_shapes(classes: np.ndarray, names: list[str], scale: float) -> list[Shape]:
    """Polygons (with holes) of each class of an integer raster (value i -> names[i], others ignored),
    in level-0 pixels (``scale`` level-0 px per raster px); exact: the union of the pixel squares."""
    from shapely.geometry import MultiPolygon, Polygon, box
    from shapely.ops import unary_union

    shapes = []
    for value, name in enumerate(names):
        mask = classes == value
        if not mask.any():
            continue
        boxes = []
        for y in range(mask.shape[0]):
            row = np.concatenate([[0], mask[y].astype(np.int8), [0]])
            starts = np.flatnonzero(np.diff(row) == 1)
            ends = np.flatnonzero(np.diff(row) == -1)
            boxes.extend(box(s, y, e, y + 1) for s, e in zip(starts, ends))
        union = unary_union(boxes)
        parts = [union] if isinstance(union, Polygon) else list(getattr(union, "geoms", []))
        polygons = []
        for part in parts:
            if not isinstance(part, (Polygon, MultiPolygon)) or part.is_empty:
                continue
            rings = [np.asarray(part.exterior.coords) * scale] + [np.asarray(r.coords) * scale for r in part.interiors]
            polygons.append(rings)
        shapes.append(Shape(name, polygons))
    return shapes
