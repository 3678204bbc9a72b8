"""LazySlide's feature tables into a cohort: a slide's ``slide.zarr`` (wsidata layout, see
:mod:`napari_slpd.scverse.layout`) gives its tiles (``shapes/<tile_key>``, level-0 px), their tile spec and
one encoder's features (``tables/<model>_<tile_key>``); they become the slide's patch features, and the
same path as CLAM/TRIDENT ``.h5`` imports (:func:`napari_slpd.features.import_h5.import_patch_features`)
assembles the region token grids and writes the FeatureStore. Prototypes, similar slides, SLPD and the
evaluation then run on LazySlide's features as on any other. Needs the scverse extra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_slpd.errors import FeatureStoreError, SlpdError
from napari_slpd.scverse import require_scverse
from napari_slpd.scverse.layout import GLOBAL, TILE_SPEC_KEY, TILES_KEY, TileSpec

log = logging.getLogger(__name__)


@dataclass
class FeatureTable:
    """One LazySlide feature table with its tiles, in level-0 px."""

    store: Path
    key: str  # the table's key, "<model>_<tile_key>"
    model: str
    tile_key: str
    features: np.ndarray  # [N, D] float32
    coords: np.ndarray  # [N, 2] int64 level-0 top-left, in the table's row order
    spec: TileSpec | None

    def fingerprint(self) -> str:
        """sha256 of what the import depends on: the features, the coordinates, the key and the spec."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.features, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.coords, np.int64).tobytes())
        h.update(json.dumps({"key": self.key, "spec": None if self.spec is None else self.spec.to_dict()},
                            sort_keys=True).encode())
        return h.hexdigest()


def _read(store: Path):
    from spatialdata import read_zarr

    if not store.exists():
        raise SlpdError(f"{store} does not exist")
    try:
        return read_zarr(store)
    except Exception as exc:  # noqa: BLE001 - any reader failure means: not a SpatialData store
        raise SlpdError(f"{store} is not a readable SpatialData zarr store ({exc})") from exc


def _annotated_shapes(table) -> str | None:
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    if isinstance(region, (list, tuple, np.ndarray)):
        region = region[0] if len(region) == 1 else None
    return None if region is None else str(region)


def feature_tables(sdata) -> dict[str, str]:
    """{table key: tile key} of the tables that hold one feature row per tile of a tile collection."""
    out = {}
    for key, table in sdata.tables.items():
        region = _annotated_shapes(table)
        if region is not None and region in sdata.shapes and table.n_vars > 0:
            out[key] = region
    return out


def choose_table(sdata, store: Path, feature_key: str | None, tile_key: str | None) -> tuple[str, str]:
    """(table key, tile key) asked for: ``feature_key`` is a model name (LazySlide's ``key_added``) or a
    full table key; without it the store must hold exactly one feature table (of ``tile_key``)."""
    tables = feature_tables(sdata)
    if tile_key is not None:
        tables = {k: v for k, v in tables.items() if v == tile_key}
    listing = ", ".join(f"{k} (tiles {v})" for k, v in sorted(tables.items())) or "none"
    if feature_key is not None:
        for candidate in (feature_key, f"{feature_key}_{tile_key or TILES_KEY}"):
            if candidate in tables:
                return candidate, tables[candidate]
        raise SlpdError(f"{store.name} has no feature table {feature_key!r}; its feature tables: {listing}")
    if len(tables) != 1:
        raise SlpdError(f"{store.name} holds {len(tables)} feature tables ({listing}); choose one with "
                        "--feature-key (the model name, e.g. uni, or the table key)")
    key = next(iter(tables))
    return key, tables[key]


def _level0_corners(shapes, tile_ids) -> np.ndarray:
    """Level-0 top-left corners of the tiles ``tile_ids`` (by the ``tile_id`` column, else the index)."""
    from spatialdata.transformations import get_transformation

    bounds = shapes.bounds
    if "tile_id" in shapes.columns:
        position = {int(t): i for i, t in enumerate(shapes["tile_id"].to_numpy())}
    else:
        position = {int(t): i for i, t in enumerate(shapes.index)}
    try:
        rows = np.array([position[int(t)] for t in tile_ids], np.int64)
    except KeyError as exc:
        raise SlpdError(f"the feature table names tile {exc.args[0]}, which its tiles do not hold") from None
    corners = bounds[["minx", "miny"]].to_numpy(np.float64)[rows]
    transform = get_transformation(shapes, to_coordinate_system=GLOBAL)
    matrix = np.asarray(transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
    if not np.allclose(matrix, np.eye(3)):
        if not np.allclose(matrix[:2, :2], np.diag(np.diag(matrix[:2, :2]))) or np.any(np.diag(matrix)[:2] <= 0):
            raise SlpdError("the tiles are rotated or flipped relative to the slide; only scaled and shifted "
                            "tiles can be imported")
        corners = corners @ matrix[:2, :2].T + matrix[:2, 2]
    return corners


def read_feature_table(store: str | os.PathLike, feature_key: str | None = None,
                       tile_key: str | None = None) -> FeatureTable:
    """The features and level-0 tile corners of one LazySlide feature table of ``store``."""
    require_scverse("importing SpatialData / LazySlide features", ("spatialdata", "anndata"))
    store = Path(store)
    sdata = _read(store)
    key, tiles = choose_table(sdata, store, feature_key, tile_key)
    table = sdata.tables[key]
    X = table.X
    if hasattr(X, "toarray"):
        X = X.toarray()
    features = np.asarray(X, np.float32)
    if features.ndim != 2 or features.shape[0] == 0:
        raise FeatureStoreError(f"{store.name}: table {key} holds no feature rows (shape {features.shape})")
    if not np.isfinite(features).all():
        raise FeatureStoreError(f"{store.name}: table {key} has NaN or infinite features")
    instance_key = table.uns.get("spatialdata_attrs", {}).get("instance_key") or "tile_id"
    tile_ids = table.obs[instance_key].to_numpy() if instance_key in table.obs else np.arange(table.n_obs)
    corners = _level0_corners(sdata.shapes[tiles], tile_ids)
    spec_data = sdata.attrs.get(TILE_SPEC_KEY, {}).get(tiles)
    spec = TileSpec.from_dict(spec_data) if spec_data else None
    model = key[: -len(tiles) - 1] if key.endswith(f"_{tiles}") else key
    return FeatureTable(store, key, model, tiles, features, np.round(corners).astype(np.int64), spec)


def patch_features_of(table: FeatureTable, slide=None):
    """The table as CLAM-layout patch features (what the .h5 import reads): tile size at the tile spec's
    level, that level, and the level-0 size; without a tile spec, the size from the tiles' boxes."""
    from napari_slpd.features.import_h5 import PatchFeatures

    if table.spec is not None:
        size0 = table.spec.size_level0
        patch_size, level = int(table.spec.width), int(table.spec.ops_level)
        if table.spec.height != table.spec.width:
            raise FeatureStoreError(f"{table.store.name}: tiles of {table.spec.width} x {table.spec.height} px are "
                                    "not square; napari-slpd's regions need square patches")
    else:
        log.warning("%s: no tile spec for %s; the patch size is read off the tile spacing", table.store.name,
                    table.tile_key)
        size0, patch_size, level = None, None, 0
    attrs = {"encoder": table.model, "source_key": table.key, "tile_key": table.tile_key}
    return PatchFeatures(table.store, table.features, table.coords, patch_size, level,
                         None if size0 is None else float(size0), attrs)


def slide_id_of_store(store: Path) -> str:
    """The slide id of ``slide.zarr`` (that of its slide file ``slide.svs``)."""
    from napari_slpd.slides.ids import slide_id_for

    store = Path(store)
    name = store.name[: -len(".zarr")] if store.name.endswith(".zarr") else store.name
    return slide_id_for(store.parent / f"{name}.svs")


def slide_beside(store: Path) -> Path | None:
    """The slide a ``slide.zarr`` belongs to, when it lies beside it (wsidata's default place)."""
    from napari_slpd.slides.ids import SLIDE_SUFFIXES

    stem = store.name[: -len(".zarr")] if store.name.endswith(".zarr") else store.stem
    for candidate in sorted(store.parent.glob(f"{stem}.*")):
        if candidate != store and candidate.suffix.lower() in SLIDE_SUFFIXES:
            return candidate
    return None


__all__ = ["FeatureTable", "feature_tables", "choose_table", "read_feature_table", "patch_features_of",
           "slide_beside", "slide_id_of_store"]
