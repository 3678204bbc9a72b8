"""QuPath GeoJSON of labelled regions: one Feature per class (a Polygon or MultiPolygon with holes, exact on
the region lattice; see :mod:`napari_slpd.export.geometry`), level-0 px coordinates,
``properties.objectType = "annotation"`` and ``properties.classification = {"name": ..., "color": [r, g, b]}``.
Feature ids are stable (uuid5 of slide, label and name), so re-importing into QuPath replaces rather than
duplicates."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from napari_slpd.errors import ExportError
from napari_slpd.export.geometry import RegionLattice, mask_to_polygons, region_label_grid
from napari_slpd.labeling.palette import ClassStyle
from napari_slpd.utils.files import atomic_write_text

__all__ = ["hex_to_rgb", "label_grid_to_features", "prototype_geojson", "write_geojson", "read_geojson"]


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    text = color.strip().lstrip("#")
    if len(text) != 6:
        raise ExportError(f"colour {color!r} is not a #rrggbb hex colour")
    try:
        return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    except ValueError as exc:
        raise ExportError(f"colour {color!r} is not a #rrggbb hex colour") from exc


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
