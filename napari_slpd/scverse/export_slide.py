"""One slide as a SpatialData zarr that wsidata / LazySlide open as their own (see
:mod:`napari_slpd.scverse.layout` for the layout). Needs the scverse extra.

``wsidata.open_wsi(slide_file, store=out_dir / "<slide>.zarr")`` then gives LazySlide the patches as its
``tiles`` (with their tile spec and the patch encoder's features as ``<encoder>_tiles``), the regions as
``regions``, the tissue outlines, the prototypes and label maps; napari-spatialdata shows it in napari.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.scverse import require_scverse
from napari_slpd.scverse.layout import (GLOBAL, MICRONS, REGIONS_KEY, SLPD_ATTRS_KEY, THUMBNAIL_KEY, TILE_SPEC_KEY,
                                        TILES_KEY, TISSUES_KEY, feature_key)
from napari_slpd.scverse.slide_content import LabelRaster, SlideContent, TileTable, gather_slide
from napari_slpd.utils.files import atomic_folder

log = logging.getLogger(__name__)


@dataclass
class SlideZarr:
    """What :func:`export_slide_spatialdata` wrote."""

    slide_id: str
    path: Path
    tables: dict[str, int] = field(default_factory=dict)  # table key -> rows
    shapes: dict[str, int] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _transforms(content: SlideContent, *before):
    """{"global": level-0 px, "um": microns (x and y each by its own pixel size)} for an element whose
    intrinsic coordinates reach level-0 px through ``before`` (transformations applied in order)."""
    from spatialdata.transformations import Identity, Scale, Sequence

    to_global = Sequence(list(before)) if len(before) > 1 else (before[0] if before else Identity())
    out = {GLOBAL: to_global}
    if content.mpp_xy is not None:
        out[MICRONS] = Sequence([*before, Scale(list(content.mpp_xy), axes=("x", "y"))])
    return out


def _tile_shapes(content: SlideContent, table: TileTable, tissue_id: np.ndarray):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    c = table.coords.astype(np.float64)
    size = float(table.size_level0)
    n = len(c)
    gdf = gpd.GeoDataFrame(
        {"tile_id": np.arange(n), "x": table.coords[:, 0], "y": table.coords[:, 1], "tissue_id": tissue_id},
        geometry=shapely.box(c[:, 0], c[:, 1], c[:, 0] + size, c[:, 1] + size),
    )
    return ShapesModel.parse(gdf, transformations=_transforms(content))


def _tissue_ids(content: SlideContent, table: TileTable) -> np.ndarray:
    """The tissue piece holding each tile's centre (-1: none, or no outlines)."""
    import shapely

    out = np.full(len(table.coords), -1, np.int64)
    if not content.tissues:
        return out
    centres = table.coords.astype(np.float64) + table.size_level0 / 2.0
    for i, polygon in enumerate(content.tissues):
        inside = shapely.contains_xy(polygon, centres[:, 0], centres[:, 1])
        out[inside & (out < 0)] = i
    return out


def plain_strings(adata):
    """``adata`` with its names and string categories as object arrays: anndata releases that run on
    Python 3.11 (<= 0.12.6) cannot write pandas 3's default Arrow-backed strings."""
    import pandas as pd

    def plain(index):
        return pd.Index(np.asarray([str(v) for v in index], dtype=object), dtype=object)

    adata.obs_names = plain(adata.obs_names)
    adata.var_names = plain(adata.var_names)
    for frame in (adata.obs, adata.var):
        for name in list(frame.columns):
            column = frame[name]
            if isinstance(column.dtype, pd.CategoricalDtype):
                if column.cat.categories.dtype.kind not in "iuf":
                    frame[name] = column.cat.set_categories(plain(column.cat.categories))
            elif column.dtype.kind in "OUT" or str(column.dtype) in ("str", "string"):
                frame[name] = column.astype(str).astype(object)  # an object array would be re-inferred as str
    return adata


def _feature_table(table: TileTable, tile_key: str, tissue_id: np.ndarray):
    import pandas as pd
    from anndata import AnnData
    from spatialdata.models import TableModel

    n = len(table.coords)
    tile_id = np.arange(n)
    obs = pd.DataFrame({"tile_id": tile_id, "library_id": pd.Categorical([tile_key] * n),
                        "tissue_id": tissue_id}, index=tile_id.astype(str))
    for name, values in table.obs.items():
        obs[name] = np.asarray(values)
    uns = {}
    for name, (codes, categories, colors) in table.categories.items():
        obs[name] = pd.Categorical.from_codes(np.asarray(codes, np.int64).clip(-1), categories=categories)
        uns[f"{name}_colors"] = list(colors)  # scanpy's colour convention
    adata = plain_strings(AnnData(X=np.asarray(table.features, np.float32), obs=obs, uns=uns))
    adata.obsm["spatial"] = table.coords.astype(np.float64)  # squidpy / scanpy.pl.spatial: level-0 px
    agg_ops = {}
    for key, (values, info) in table.aggregates.items():
        values = np.asarray(values, np.float32)
        adata.varm[key] = values.T  # LazySlide: [D, groups]
        agg_ops[key] = {**info, "features": values}
    if agg_ops:
        adata.uns["agg_ops"] = agg_ops
    adata.uns["feature_source"] = table.feature_source
    return plain_strings(TableModel.parse(adata, region=tile_key, region_key="library_id", instance_key="tile_id"))


def _labels(content: SlideContent, raster: LabelRaster):
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Translation

    scale = Scale([raster.scale, raster.scale], axes=("x", "y"))
    shift = Translation([raster.origin[0], raster.origin[1]], axes=("x", "y"))
    return Labels2DModel.parse(np.asarray(raster.data), dims=("y", "x"),
                               transformations=_transforms(content, scale, shift))


def _thumbnail(content: SlideContent):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    thumb = content.thumbnail
    W, H = content.dimensions
    scale = Scale([W / thumb.shape[1], H / thumb.shape[0]], axes=("x", "y"))
    return Image2DModel.parse(np.ascontiguousarray(thumb.transpose(2, 0, 1)), dims=("c", "y", "x"),
                              transformations=_transforms(content, scale))


def build_spatialdata(content: SlideContent):
    """The SpatialData object of ``content`` (see :mod:`napari_slpd.scverse.layout`)."""
    import geopandas as gpd
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel

    shapes, tables, labels, images = {}, {}, {}, {}
    specs = {}
    for tile_key, table in ((TILES_KEY, content.patches), (REGIONS_KEY, content.regions)):
        if table is None:
            continue
        tissue_id = _tissue_ids(content, table)
        shapes[tile_key] = _tile_shapes(content, table, tissue_id)
        tables[feature_key(table.model, tile_key)] = _feature_table(table, tile_key, tissue_id)
        specs[tile_key] = table.spec.to_dict()
    if content.tissues:
        gdf = gpd.GeoDataFrame({"tissue_id": np.arange(len(content.tissues))}, geometry=list(content.tissues))
        shapes[TISSUES_KEY] = ShapesModel.parse(gdf, transformations=_transforms(content))
    for name, raster in content.labels.items():
        labels[name] = _labels(content, raster)
    if content.thumbnail is not None and content.dimensions is not None:
        images[THUMBNAIL_KEY] = _thumbnail(content)
    ours = {k: v for k, v in content.attrs.items() if v is not None}
    # what each label value means (a raster's own attributes are not written by spatialdata)
    ours["labels"] = {name: {"values": {str(k + 1): n for k, n in enumerate(r.names)},
                             "colors": {str(k + 1): c for k, c in enumerate(r.colors)}}
                      for name, r in content.labels.items()}
    attrs = {TILE_SPEC_KEY: specs, SLPD_ATTRS_KEY: ours}
    return SpatialData(images=images, labels=labels, shapes=shapes, tables=tables, attrs=attrs)


def export_slide_spatialdata(cohort, slide_id: str, out_path: str | os.PathLike, overwrite: bool = False,
                             tissues: bool = True, thumbnail: bool = True) -> SlideZarr:
    """Write ``slide_id`` of ``cohort`` as a SpatialData zarr at ``out_path`` (atomically)."""
    require_scverse("exporting to SpatialData")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise SlpdError(f"{out_path} exists; give --overwrite to replace it")
    content = gather_slide(cohort, slide_id, tissues=tissues, thumbnail=thumbnail)
    sdata = build_spatialdata(content)
    with atomic_folder(out_path, created=False) as target:
        sdata.write(target)
    return SlideZarr(slide_id, out_path, {k: int(v.n_obs) for k, v in sdata.tables.items()},
                     {k: int(len(v)) for k, v in sdata.shapes.items()}, sorted(sdata.labels), list(content.notes))


__all__ = ["SlideZarr", "build_spatialdata", "export_slide_spatialdata"]
