"""Build a large pyramidal tiled-JPEG TIFF from a small real slide, for scale tests and benchmarks.

A square crop of the source (its period, a power-of-two multiple of the tile size) is repeated across
the mosaic. Because the pattern is periodic, every level of the pyramid is periodic too and holds only a
few distinct tiles (64 at level 0 for a 2048-px period of 256-px tiles). Each distinct tile is JPEG-
encoded once and written once; the TIFF's tile offsets of its repeats point at that one copy. The file
is therefore small (a few MB for 60,000 x 60,000 px), built in seconds, and still a normal pyramidal
TIFF: openslide opens it as generic-tiff and decodes every tile it is asked for, as with a real scan.
Nothing the size of a level is ever held in memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.utils.files import atomic_path


@dataclass
class MosaicInfo:
    path: Path
    width: int
    height: int
    tile: int
    level_dimensions: list[tuple[int, int]]
    mpp: float
    period: int  # level-0 px of the repeated crop
    distinct_tiles: int  # tiles encoded and stored
    total_tiles: int  # tiles the pyramid addresses
    source: str
    crop_origin: tuple[int, int]

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def _box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return image
    h, w = image.shape[0] // factor, image.shape[1] // factor
    view = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).astype(np.float32)
    return (view.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def _best_crop(slide, period: int) -> tuple[int, int]:
    """Level-0 top-left of the period x period crop with the most tissue (coarse saturation check)."""
    from napari_slpd.slides.tissue import saturation_value

    W, H = slide.dimensions
    ds = max(1.0, max(W, H) / 256)
    thumb = slide.read_downsampled(ds)
    sat, _ = saturation_value(thumb)
    tissue = (sat > 0.08).astype(np.float64)
    sat_sum = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1))
    sat_sum[1:, 1:] = tissue.cumsum(0).cumsum(1)
    p = max(1, int(round(period / ds)))
    best, best_xy = -1.0, (0, 0)
    for ty in range(0, max(1, tissue.shape[0] - p + 1), max(1, p // 8)):
        for tx in range(0, max(1, tissue.shape[1] - p + 1), max(1, p // 8)):
            y1, x1 = min(ty + p, tissue.shape[0]), min(tx + p, tissue.shape[1])
            total = sat_sum[y1, x1] - sat_sum[ty, x1] - sat_sum[y1, tx] + sat_sum[ty, tx]
            if total > best:
                best, best_xy = total, (tx, ty)
    x0 = min(int(round(best_xy[0] * ds)), W - period)
    y0 = min(int(round(best_xy[1] * ds)), H - period)
    return max(0, x0), max(0, y0)


def build_mosaic(
    path: str | os.PathLike,
    source: str | os.PathLike,
    width: int = 60_000,
    height: int = 60_000,
    tile: int = 256,
    quality: int = 85,
    min_level_px: int = 1024,
    period: int | None = None,
    progress=None,
    cancel=None,
) -> MosaicInfo:
    """Write a ``width`` x ``height`` pyramidal tiled-JPEG TIFF made of tiles of the real slide ``source``.

    Levels halve until the longer side is at most ``min_level_px``. The mosaic states the source's pixel
    size (0.5 um/px when the source has none). ``progress(done, total)`` is called per level.
    """
    import imagecodecs
    import tifffile

    from napari_slpd.slides.slide import open_slide

    if tile % 16 or tile < 16:
        raise SlpdError(f"tile size must be a positive multiple of 16, not {tile}")
    if width < tile or height < tile:
        raise SlpdError(f"a mosaic must be at least one tile ({tile} px) per side, not {width} x {height}")
    with open_slide(source) as src:
        if period is None:
            period = tile * 2 ** int(math.floor(math.log2(min(src.dimensions) / tile)))
        if period < tile or period % tile or period > min(src.dimensions):
            raise SlpdError(
                f"period {period} must be a multiple of the tile size {tile} that fits in the source "
                f"{src.dimensions[0]} x {src.dimensions[1]} px"
            )
        x0, y0 = _best_crop(src, period)
        crop = src.read_region((x0, y0), 0, (period, period))
        mpp = src.mpp if src.mpp is not None else 0.5
        source_name = str(src.path)

    level_dims = [(width, height)]
    while max(level_dims[-1]) > min_level_px:
        w, h = level_dims[-1]
        level_dims.append((max(1, w // 2), max(1, h // 2)))
    total_tiles = sum(math.ceil(w / tile) * math.ceil(h / tile) for w, h in level_dims)

    # Per level: the periodic image's distinct tiles, encoded once, and which distinct tile each
    # position shows.
    encoded_levels = []
    for k, (w, h) in enumerate(level_dims):
        factor = 2**k
        if factor <= period:
            base = _box_downsample(crop, factor)  # period / factor px, a power of two
        else:
            base = _box_downsample(crop, period)  # a single px: the mean colour
        pk = base.shape[0]
        if pk < tile:
            base = np.tile(base, (tile // pk, tile // pk, 1))
            pk = tile
        per_side = pk // tile
        distinct = [
            imagecodecs.jpeg_encode(
                np.ascontiguousarray(base[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]),
                level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling="420",
            )
            for r in range(per_side)
            for c in range(per_side)
        ]
        rows, cols = math.ceil(h / tile), math.ceil(w / tile)
        rr, cc = np.meshgrid(np.arange(rows) % per_side, np.arange(cols) % per_side, indexing="ij")
        index = (rr * per_side + cc).ravel()
        encoded_levels.append((distinct, index))

    def tile_bytes(distinct, index):
        written = set()
        for i in index:
            if cancel is not None and (cancel() if callable(cancel) else cancel.is_set()):
                raise SlpdError("building the mosaic was cancelled")
            if i in written:
                yield b""  # patched below to point at the first copy
            else:
                written.add(int(i))
                yield distinct[i]

    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for k, ((w, h), (distinct, index)) in enumerate(zip(level_dims, encoded_levels)):
                tif.write(
                    tile_bytes(distinct, index), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                    compression="jpeg", photometric="rgb", subsampling=(2, 2), metadata=None,
                    resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                    description=f"napari-slpd mosaic of {Path(source_name).name} level {k}" if k == 0 else None,
                    subfiletype=1 if k else 0,  # generic-tiff takes only reduced-resolution pages as levels
                )
                if progress is not None:
                    progress(k + 1, len(level_dims))
        # Point every repeated tile at the one stored copy of its distinct tile.
        with tifffile.TiffFile(tmp, mode="r+b") as tif:
            for page, (distinct, index) in zip(tif.pages, encoded_levels):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                first = np.full(len(distinct), -1, np.int64)
                positions = np.arange(index.size)
                seen = counts > 0
                first[index[seen]] = positions[seen]
                page.tags["TileOffsets"].overwrite(offsets[first[index]].tolist())
                page.tags["TileByteCounts"].overwrite(counts[first[index]].tolist())
    distinct_total = sum(len(d) for d, _ in encoded_levels)
    return MosaicInfo(
        path=Path(path), width=width, height=height, tile=tile, level_dimensions=level_dims, mpp=mpp,
        period=period, distinct_tiles=distinct_total, total_tiles=total_tiles, source=source_name,
        crop_origin=(x0, y0),
    )
