"""Exporting one slide's named prototypes: reads the prototypes (session or cohort cache), their names and
colours (:mod:`napari_slpd.labeling`) and the region frame (the slide's feature file), then writes QuPath
GeoJSON and/or the label-map TIFF with :mod:`napari_slpd.export.geojson` and :mod:`napari_slpd.export.tiff`.
The only export module that touches stores and slides."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from napari_slpd.errors import ExportError, SlpdError
from napari_slpd.export.geojson import prototype_geojson, write_geojson
from napari_slpd.export.tiff import write_label_map_tiff
from napari_slpd.labeling.names import PrototypeAnnotations, _cohort_of, prototype_source

log = logging.getLogger(__name__)

__all__ = ["SlideExport", "export_slide_prototypes"]


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
