"""The region grid of a slide: square regions of ``region_px`` px at ``target_mpp`` um/px over its tissue.

A region is read at the finest real level that is not finer than needed (``read_level``) over
``read_size`` px and resized to ``region_px`` (e.g. a 0.25 um/px scan: 8192 px at level 0 -> 4096 px),
then cut into ``patches_per_side`` x ``patches_per_side`` patches of ``patch_px``. All coordinates are
level-0 px, the convention of openslide, CLAM and TRIDENT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from napari_slpd.errors import PixelSizeError, SlpdError
from napari_slpd.slides.slide import PLAUSIBLE_MPP, Slide
from napari_slpd.slides.tissue import TissueMask, detect_tissue


@dataclass(frozen=True)
class GridConfig:
    region_px: int = 4096  # side of a region at target_mpp (SPEC: 4096 at 20x)
    patch_px: int = 256  # side of a patch (SPEC: 256)
    target_mpp: float = 0.5  # um/px at which regions are cut (20x)
    min_tissue: float = 0.25  # a region is kept when tissue covers at least this fraction

    def __post_init__(self):
        if self.region_px <= 0 or self.patch_px <= 0:
            raise SlpdError(f"region_px and patch_px must be positive (got {self.region_px}, {self.patch_px})")
        if self.region_px % self.patch_px:
            raise SlpdError(
                f"region_px ({self.region_px}) must be a whole multiple of patch_px ({self.patch_px})"
            )
        if not PLAUSIBLE_MPP[0] <= self.target_mpp <= 16.0:
            raise SlpdError(f"target_mpp {self.target_mpp} um/px is not a sensible resolution (0.1-16)")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise SlpdError(f"min_tissue must be a fraction between 0 and 1, not {self.min_tissue}")

    @property
    def patches_per_side(self) -> int:
        return self.region_px // self.patch_px


@dataclass(eq=False)
class RegionGrid:
    """Regions kept on a slide and how to read them. Empty (with ``reason``) when none fits or has tissue."""

    coords: np.ndarray  # [M, 2] int64 level-0 (x, y) of each region's top-left
    region_size_level0: int
    read_level: int
    read_size: int
    resize_factor: float
    patches_per_side: int
    patch_size_level0: float
    tissue_fraction: np.ndarray  # [M] tissue fraction of each region
    mpp: float
    mpp_source: str
    config: GridConfig = field(default_factory=GridConfig)
    reason: str = ""  # why the grid is empty ("" when it is not)
    slide_dimensions: tuple[int, int] = (0, 0)
    read_downsample: float = 1.0  # level-0 px per read-level px

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def is_empty(self) -> bool:
        return len(self) == 0

    def patch_coords(self) -> np.ndarray:
        """[M * G * G, 2] int64 level-0 top-left of every patch: region-major, row-major inside a region."""
        g = self.patches_per_side
        offsets = np.arange(g, dtype=np.float64) * self.patch_size_level0
        oy, ox = np.meshgrid(offsets, offsets, indexing="ij")  # row-major: y outer, x inner
        local = np.stack([ox.ravel(), oy.ravel()], axis=1)  # [G*G, 2] (x, y)
        out = self.coords[:, None, :].astype(np.float64) + local[None]
        return np.round(out).astype(np.int64).reshape(-1, 2)

    def region_boxes(self) -> np.ndarray:
        """[M, 4] level-0 (x0, y0, x1, y1) of every region."""
        c = self.coords.astype(np.int64)
        return np.concatenate([c, c + self.region_size_level0], axis=1)

    def to_attrs(self) -> dict:
        """Scalars to store as HDF5 attributes; ``from_attrs(attrs, coords)`` rebuilds the grid."""
        return {
            "region_px": int(self.config.region_px),
            "patch_px": int(self.config.patch_px),
            "target_mpp": float(self.config.target_mpp),
            "min_tissue": float(self.config.min_tissue),
            "mpp": float(self.mpp),
            "mpp_source": str(self.mpp_source),
            "region_size_level0": int(self.region_size_level0),
            "read_level": int(self.read_level),
            "read_size": int(self.read_size),
            "read_downsample": float(self.read_downsample),
            "resize_factor": float(self.resize_factor),
            "patches_per_side": int(self.patches_per_side),
            "patch_size_level0": float(self.patch_size_level0),
            "grid_reason": str(self.reason),
            "slide_width": int(self.slide_dimensions[0]),
            "slide_height": int(self.slide_dimensions[1]),
        }

    @classmethod
    def from_attrs(cls, attrs, coords, tissue_fraction=None) -> "RegionGrid":
        attrs = dict(attrs)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        cfg = GridConfig(
            region_px=int(attrs["region_px"]),
            patch_px=int(attrs["patch_px"]),
            target_mpp=float(attrs["target_mpp"]),
            min_tissue=float(attrs.get("min_tissue", GridConfig.min_tissue)),
        )
        if tissue_fraction is None:
            tissue_fraction = np.full(coords.shape[0], np.nan)
        return cls(
            coords=coords,
            region_size_level0=int(attrs["region_size_level0"]),
            read_level=int(attrs.get("read_level", 0)),
            read_size=int(attrs.get("read_size", attrs["region_size_level0"])),
            resize_factor=float(attrs.get("resize_factor", 1.0)),
            patches_per_side=int(attrs.get("patches_per_side", cfg.patches_per_side)),
            patch_size_level0=float(
                attrs.get("patch_size_level0", int(attrs["region_size_level0"]) / cfg.patches_per_side)
            ),
            tissue_fraction=np.asarray(tissue_fraction, dtype=np.float64),
            mpp=float(attrs["mpp"]),
            mpp_source=str(attrs.get("mpp_source", "")),
            config=cfg,
            reason=str(attrs.get("grid_reason", "")),
            slide_dimensions=(int(attrs.get("slide_width", 0)), int(attrs.get("slide_height", 0))),
            read_downsample=float(attrs.get("read_downsample", 1.0)),
        )

    def summary(self) -> str:
        if self.is_empty:
            return f"0 regions: {self.reason}"
        return (
            f"{len(self)} regions of {self.config.region_px} px at {self.config.target_mpp:g} um/px "
            f"({self.region_size_level0} level-0 px, read at level {self.read_level} over {self.read_size} px)"
        )


def _axis_positions(lo: float, hi: float, extent: int, size: int) -> np.ndarray:
    """Origins along one axis: a regular grid of ``size`` centred on the tissue span [lo, hi), kept
    inside [0, extent). Centring on the tissue leaves the unused margin on glass rather than tissue."""
    n_fit = extent // size
    if n_fit == 0:
        return np.zeros(0, np.int64)
    n = min(n_fit, max(1, math.ceil((hi - lo) / size)))
    start = (lo + hi) / 2 - n * size / 2
    start = int(round(min(max(start, 0), extent - n * size)))
    # Extend the grid both ways by whole steps while it stays inside the slide (tissue may be ragged).
    first = start - (start // size) * size
    return np.arange(first, extent - size + 1, size, dtype=np.int64)


def build_region_grid(slide: Slide, mask: TissueMask | None = None, config: GridConfig | None = None) -> RegionGrid:
    """Regions of ``config`` over the tissue of ``slide``. Raises PixelSizeError when the slide's pixel
    size is unknown (open it with ``mpp=`` or an ``mpp_fallback``); a slide that holds no region, or no
    region with enough tissue, gives an empty grid whose ``reason`` says why."""
    config = config or GridConfig()
    if slide.mpp is None:
        raise PixelSizeError(
            f"the pixel size of {slide.path} is unknown ({slide.pixel_size.describe()}); give it "
            "(e.g. --mpp 0.5 / open_slide(path, mpp=0.5)) or accept a fallback "
            "(--mpp-fallback objective: 10 / objective power; --mpp-fallback level0: level 0 is 0.5 um/px)"
        )
    mask = mask if mask is not None else detect_tissue(slide)
    mpp = float(slide.mpp)
    size0 = int(round(config.region_px * config.target_mpp / mpp))
    read_level = slide.best_level_for_downsample(size0 / config.region_px)
    read_ds = slide.level_downsamples[read_level]
    read_size = max(1, int(round(size0 / read_ds)))
    W, H = slide.dimensions
    common = dict(
        region_size_level0=size0,
        read_level=read_level,
        read_size=read_size,
        resize_factor=config.region_px / read_size,
        patches_per_side=config.patches_per_side,
        patch_size_level0=size0 / config.patches_per_side,
        mpp=mpp,
        mpp_source=slide.pixel_size.source,
        config=config,
        slide_dimensions=(W, H),
        read_downsample=read_ds,
    )

    def empty(reason: str) -> RegionGrid:
        return RegionGrid(coords=np.zeros((0, 2), np.int64), tissue_fraction=np.zeros(0), reason=reason, **common)

    if W < size0 or H < size0:
        return empty(
            f"the slide ({W} x {H} px at {mpp:.3g} um/px) is smaller than one region "
            f"({config.region_px} px at {config.target_mpp:g} um/px = {size0} level-0 px); "
            "use a smaller region size"
        )
    if not mask.mask.any():
        return empty("no tissue was found on the slide (adjust the tissue detection parameters)")
    sx, sy = mask.scale_xy
    rows = np.flatnonzero(mask.mask.any(axis=1))
    cols = np.flatnonzero(mask.mask.any(axis=0))
    xs = _axis_positions(cols[0] * sx, (cols[-1] + 1) * sx, W, size0)
    ys = _axis_positions(rows[0] * sy, (rows[-1] + 1) * sy, H, size0)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major order of regions
    candidates = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    fractions = mask.coverage_many(candidates, size0)
    keep = fractions >= config.min_tissue
    if not keep.any():
        return empty(
            f"none of the {len(candidates)} regions has at least {config.min_tissue:.0%} tissue "
            f"(best {fractions.max():.0%}); lower min_tissue or the region size"
        )
    return RegionGrid(coords=candidates[keep], tissue_fraction=fractions[keep], **common)


def grid_config_dict(config: GridConfig) -> dict:
    return asdict(config)
