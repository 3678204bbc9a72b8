"""The lazy pyramid of a slide: each real level a dask array whose chunks are whole tiles (one
read_region each), virtual 2x levels box-downsampled chunk by chunk."""

from __future__ import annotations

import math

import numpy as np

# Tiles smaller than this (some DICOM levels use 1 x 1 px "tiles") are grouped into one chunk per read.
MIN_CHUNK_PX = 128


class _LevelReader:
    """Array-like view of one real level for dask.array.from_array: each __getitem__ is one read_region.

    Chunks are the level's tiles (grouped when tiles are tiny) so a chunk never straddles a tile boundary.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, slide, level: int):  # slide: napari_slpd.slides.slide.Slide
        self.slide = slide
        self.level = level
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self.downsample = slide.level_downsamples[level]
        tw, th = slide.tile_size(level)
        # Group tiny tiles so one chunk is at least MIN_CHUNK_PX, still a whole number of tiles.
        cw = tw * max(1, math.ceil(MIN_CHUNK_PX / tw))
        ch = th * max(1, math.ceil(MIN_CHUNK_PX / th))
        self.chunks = (min(ch, h), min(cw, w), 3)

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        location = (round(x0 * self.downsample), round(y0 * self.downsample))
        region = self.slide.read_region(location, self.level, (x1 - x0, y1 - y0))
        return region[:, :, cs]


def _halve_block(block: np.ndarray) -> np.ndarray:
    h, w = block.shape[0] // 2, block.shape[1] // 2
    if h == 0 or w == 0:
        return np.empty((h, w, 3), np.uint8)
    b = block[: 2 * h, : 2 * w].astype(np.uint16)
    out = (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2] + 2) // 4
    return out.astype(np.uint8)


def _halve(level):
    """A virtual level: 2x box-downsample of ``level``, chunk by chunk (each chunk from 2x2 parent px).

    Parent chunks are first made even-sized (rechunk only moves boundaries by one px where a chunk is odd)
    so every output chunk depends only on its own parent chunk; then neighbouring output chunks are merged
    back to about the parent's chunk size so virtual levels do not fragment into tiny chunks.
    """
    import dask.array as da

    h, w = level.shape[:2]
    even_h, even_w = h - h % 2, w - w % 2
    src = level[:even_h, :even_w]
    src = src.rechunk((_even_chunks(src.chunks[0]), _even_chunks(src.chunks[1]), 3))
    out_chunks = (tuple(c // 2 for c in src.chunks[0]), tuple(c // 2 for c in src.chunks[1]), (3,))
    halved = da.map_blocks(_halve_block, src, chunks=out_chunks, dtype=np.uint8,
                           meta=np.empty((0, 0, 3), np.uint8))
    target = (max(level.chunks[0]), max(level.chunks[1]), 3)
    return halved.rechunk(target)


def _even_chunks(chunks: tuple[int, ...]) -> tuple[int, ...]:
    """Shift chunk boundaries so every chunk has an even size (total must already be even)."""
    out, carry = [], 0
    for c in chunks:
        c += carry
        carry = c % 2
        c -= carry
        if c:
            out.append(c)
    if carry:
        out[-1] += carry
    return tuple(out)
