"""wsidata's (LazySlide's) on-disk conventions, in plain numpy: what napari-slpd writes and reads.

A slide's SpatialData zarr (``slide.zarr`` beside the slide, by wsidata's default) holds, as wsidata and
LazySlide write them:

- ``shapes/tissues``: tissue outlines (``tissue_id``, ``geometry``), polygons in level-0 px;
- ``shapes/<tile_key>``: one box per tile (``tile_id``, ``x``, ``y``, ``tissue_id``, ``geometry``), level-0 px,
  index = ``tile_id`` = 0..n-1; LazySlide's default tile key is ``tiles``;
- ``attrs["tile_spec"][<tile_key>]``: the tile spec of each tile collection (wsidata ``TileSpec`` fields:
  the tile size and stride at the requested ``mpp``, ``ops_level``/``ops_downsample`` to read it from the
  pyramid, ``base_downsample`` = level-0 px per tile px);
- ``tables/<model>_<tile_key>``: an AnnData with one row per tile (``X`` = the model's features; ``obs``:
  ``tile_id``, ``library_id`` = the tile key, as spatialdata's table annotation of the shapes);
  aggregates (LazySlide's ``tl.feature_aggregation``) in ``varm["agg_<by>"]`` [D, groups] with their
  description in ``uns["agg_ops"]["agg_<by>"]``.

napari-slpd writes its patches as ``tiles`` (the patch encoder's table), its regions as ``regions`` (the
region encoder's table), prototype assignments and names in the ``obs`` of the table they were computed
from, the prototypes themselves as the aggregate ``agg_prototype`` (one column per prototype), label maps
as ``labels``, and its own provenance in ``attrs["napari_slpd"]``. The "global" coordinate system is
level-0 px; ``um`` (when the pixel size is known) scales x and y by their own pixel sizes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from napari_slpd.errors import SlpdError

TILES_KEY = "tiles"  # LazySlide's default tile key: napari-slpd's patches
REGIONS_KEY = "regions"  # napari-slpd's regions (G x G patches)
TISSUES_KEY = "tissues"
TILE_SPEC_KEY = "tile_spec"  # wsidata.WSIData.TILE_SPEC_KEY
SLPD_ATTRS_KEY = "napari_slpd"  # our provenance in SpatialData.attrs
GLOBAL = "global"  # level-0 px (wsidata's frame)
MICRONS = "um"
PROTOTYPE_AGG = "agg_prototype"  # LazySlide's name for an aggregate by the obs column "prototype"
SLIDE_AGG = "agg_slide"  # LazySlide's name for a whole-slide aggregate
PROTOTYPE_LABELS = "prototypes"  # labels element: the prototype label map
PROALIGN_LABELS = "proalign_{}"  # labels elements: ProAlign's patch and region label maps
THUMBNAIL_KEY = "wsi_thumbnail"  # wsidata's thumbnail key


def safe_name(name: str) -> str:
    """A model name usable in a zarr key ("hipt/vit 256" -> "hipt_vit_256")."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_")
    return text or "features"


def feature_key(model: str, tile_key: str = TILES_KEY) -> str:
    """LazySlide's table key of ``model``'s features of ``tile_key`` (lazyslide._const.Key.feature)."""
    return f"{safe_name(model)}_{tile_key}"


@dataclass(frozen=True)
class TileSpec:
    """wsidata's ``TileSpec`` fields, as stored in ``attrs["tile_spec"]`` (``to_dict()`` is its dict)."""

    height: int
    width: int
    stride_height: int
    stride_width: int
    mpp: float | None = None
    ops_level: int = 0
    ops_downsample: float = 1.0
    base_level: int = 0
    base_downsample: float = 1.0
    tissue_name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "TileSpec":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = [k for k in ("height", "width") if k not in fields]
        if missing:
            raise SlpdError(f"a tile spec needs {', '.join(missing)} (has {', '.join(sorted(data)) or 'nothing'})")
        fields.setdefault("stride_height", fields["height"])
        fields.setdefault("stride_width", fields["width"])
        spec = cls(**fields)
        return cls(int(spec.height), int(spec.width), int(spec.stride_height), int(spec.stride_width),
                   None if spec.mpp is None else float(spec.mpp), int(spec.ops_level), float(spec.ops_downsample),
                   int(spec.base_level), float(spec.base_downsample), spec.tissue_name)

    @property
    def size_level0(self) -> float:
        """Side of a tile in level-0 px (width; napari-slpd's tiles are square)."""
        return float(self.width) * float(self.base_downsample)

    @property
    def step_level0(self) -> float:
        """Tile stride in level-0 px (x)."""
        return float(self.stride_width) * float(self.base_downsample)


def tile_spec_for(tile_px: int, size_level0: float, step_level0: float | None, mpp: float | None,
                  ops_level: int, level_downsample: float, tissue_name: str | None = TISSUES_KEY) -> TileSpec:
    """The wsidata tile spec of square tiles of ``tile_px`` px covering ``size_level0`` level-0 px, stepped by
    ``step_level0`` (None: no overlap), read from pyramid level ``ops_level`` whose downsample is
    ``level_downsample`` (level-0 px per level px)."""
    if tile_px <= 0 or size_level0 <= 0:
        raise SlpdError(f"tiles need a positive size (got {tile_px} px covering {size_level0} level-0 px)")
    if level_downsample <= 0:
        raise SlpdError(f"level {ops_level} has a downsample of {level_downsample}; it must be positive")
    base = float(size_level0) / float(tile_px)
    stride = tile_px if step_level0 is None else max(1, int(round(float(step_level0) / base)))
    return TileSpec(
        height=int(tile_px), width=int(tile_px), stride_height=stride, stride_width=stride,
        mpp=None if mpp is None else float(mpp), ops_level=int(ops_level),
        ops_downsample=base / float(level_downsample), base_level=0, base_downsample=base,
        tissue_name=tissue_name,
    )


def tile_boxes(coords: np.ndarray, size_level0: float) -> np.ndarray:
    """[N, 4] level-0 (x0, y0, x1, y1) of square tiles whose top-left corners are ``coords`` [N, 2]."""
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    return np.concatenate([c, c + float(size_level0)], axis=1)


def microns_scale(mpp_x: float | None, mpp_y: float | None) -> tuple[float, float] | None:
    """(x, y) um per level-0 px, or None when the pixel size is unknown. Non-square pixels keep both."""
    if mpp_x is None and mpp_y is None:
        return None
    x = float(mpp_x if mpp_x is not None else mpp_y)
    y = float(mpp_y if mpp_y is not None else mpp_x)
    if not (x > 0 and y > 0):
        return None
    return x, y


__all__ = [
    "TILES_KEY", "REGIONS_KEY", "TISSUES_KEY", "TILE_SPEC_KEY", "SLPD_ATTRS_KEY", "GLOBAL", "MICRONS",
    "PROTOTYPE_AGG", "SLIDE_AGG", "PROTOTYPE_LABELS", "PROALIGN_LABELS", "THUMBNAIL_KEY", "TileSpec",
    "safe_name", "feature_key", "tile_spec_for", "tile_boxes", "microns_scale",
]
