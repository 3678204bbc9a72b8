"""GPU decoding of a region's JPEG tiles (optional; imported only where CUDA is present).

The CPU reads the tiles' compressed bytes (os.pread, microseconds each) and nvJPEG decodes all of a
region's tiles in one batched call (``torchvision.io.decode_jpeg(list, device="cuda")``); the region is
assembled on the device, so the engine can hand it to the ViT without a host round trip. Tiles whose
components are RGB (Aperio) carry an Adobe APP14 marker (transform 0) so the decoder does not convert
them from YCbCr, as with the CPU's scaled decoder. Only whole-pixel geometry (level-0 locations that fall
on whole level pixels, as at level 0) and JPEG levels are handled here; other reads use the CPU reader.

Reading is split in two so that the extraction engine's reader threads only touch the CPU:
:meth:`CudaRegionReader.prepare` (any thread) reads the tile bytes and checks the geometry;
:meth:`CudaRegionReader.decode` (the thread that runs the model) decodes them on the GPU. nvJPEG runs on a
side stream of this reader: torchvision's CUDA decoder allocates its output on the caller's stream and
writes it from a private one (pytorch/vision#9606), so the output never comes from blocks the model's
stream has freed but may still read; the result is handed to the caller's stream (wait_stream +
record_stream).

Nothing imports this module on a CPU machine: :func:`cuda_available` is the gate, and tests that use it
are marked ``cuda``.
"""

from __future__ import annotations

from dataclasses import dataclass

from napari_slpd.slides.readers.tiles import TileDecodeError, TileReader, _merge_tables
from napari_slpd.utils.device import cuda_available


class GpuUnsupported(Exception):
    """This read is not one the GPU path handles (non-JPEG level, fractional position): read it on the CPU."""


@dataclass
class PreparedRegion:
    """A region's compressed tiles, read on the CPU, ready for one nvJPEG batch."""

    level: int
    origin: tuple[int, int]  # top-left in level px
    size: tuple[int, int]  # (w, h)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the part inside the level, level px
    jobs: list  # (col, row) of each stored tile
    streams: list  # complete JPEG streams (uint8 CPU tensors), one per job


_NVJPEG_OK: dict = {}


def nvjpeg_works(device: str = "cuda") -> bool:
    """True when torchvision decodes a JPEG on ``device`` (CUDA present and torchvision built with
    nvJPEG): a 16-px image decoded once per process and device."""
    if device not in _NVJPEG_OK:
        ok = False
        if cuda_available():
            try:
                import io

                import numpy as np
                import torch
                from PIL import Image
                from torchvision.io import decode_jpeg

                buf = io.BytesIO()
                Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buf, format="JPEG")
                data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
                out = decode_jpeg([data], device=device)[0]
                ok = tuple(out.shape) == (3, 16, 16) and out.is_cuda
            except Exception:  # no nvJPEG in this torchvision, a driver problem: the CPU decodes
                ok = False
        _NVJPEG_OK[device] = ok
    return _NVJPEG_OK[device]


class CudaRegionReader:
    """read(location, level, size) -> torch.uint8 tensor (h, w, 3) on ``device``, from a CPU TileReader's
    tile bytes decoded in one nvJPEG batch per region."""

    def __init__(self, tiles: TileReader, tables_of, rgb_of, device: str = "cuda"):
        import torch
        import torchvision.io  # noqa: F401  (fails early when torchvision lacks the CUDA decoder)

        self.tiles = tiles
        self.device = torch.device(device)
        self._tables_of = tables_of  # level -> JPEGTables bytes or None
        self._rgb_of = rgb_of  # level -> True when components are RGB
        self._stream = torch.cuda.Stream(device=self.device)  # nvJPEG's side stream (see module doc)

    def handles(self, location, level: int) -> bool:
        """True when :meth:`prepare` takes this read (JPEG level, whole level-px position)."""
        try:
            self._origin(location, level)
        except GpuUnsupported:
            return False
        return True

    def _origin(self, location, level: int) -> tuple[int, int]:
        lv = self.tiles.levels[level]
        if lv.codec != "jpeg":
            raise GpuUnsupported(f"level {level} is {lv.codec}, not JPEG")
        lx, ly = float(location[0]) / lv.downsample, float(location[1]) / lv.downsample
        ix, iy = round(lx), round(ly)
        if abs(lx - ix) > 1 / 256 or abs(ly - iy) > 1 / 256:
            raise GpuUnsupported("a fractional level position (openslide's sub-pixel geometry)")
        return ix, iy

    def prepare(self, location, level: int, size) -> PreparedRegion:
        """The region's tile bytes, read on the CPU (any thread). Raises GpuUnsupported for reads the
        GPU path does not take, TileDecodeError when a tile cannot be read from the file."""
        import torch

        lv = self.tiles.levels[level]
        ix, iy = self._origin(location, level)
        w, h = int(size[0]), int(size[1])
        x0, y0, x1, y1 = max(ix, 0), max(iy, 0), min(ix + w, lv.width), min(iy + h, lv.height)
        jobs, streams = [], []
        if x1 > x0 and y1 > y0:
            tw, th = lv.tile_w, lv.tile_h
            tables, rgb = self._tables_of(level), self._rgb_of(level)
            for r in range(y0 // th, (y1 - 1) // th + 1):
                for c in range(x0 // tw, (x1 - 1) // tw + 1):
                    index = r * lv.tiles_across + c
                    try:
                        data = lv.tile_bytes(index)
                    except OSError as exc:
                        raise TileDecodeError(self.tiles._where(level, c, r, index) + f" cannot be read ({exc})") from exc
                    if data:
                        jobs.append((c, r))
                        stream = _merge_tables(data, tables, rgb)
                        streams.append(torch.frombuffer(bytearray(stream), dtype=torch.uint8))
        return PreparedRegion(level, (ix, iy), (w, h), (x0, y0, x1, y1), jobs, streams)

    def decode(self, region: PreparedRegion):
        """uint8 (h, w, 3) on the device, usable on the caller's current stream. A damaged tile raises
        TileDecodeError naming it (found again on the CPU, whose decoder says which)."""
        import torch
        from torchvision.io import decode_jpeg

        lv = self.tiles.levels[region.level]
        (ix, iy), (w, h) = region.origin, region.size
        x0, y0, x1, y1 = region.box
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = torch.full((h, w, 3), 255, dtype=torch.uint8, device=self.device)
            if region.streams:
                try:
                    decoded = decode_jpeg(region.streams, device=self.device)
                except RuntimeError as exc:  # find the damaged tile on the CPU, which names it
                    for c, r in region.jobs:
                        self.tiles.tile(region.level, c, r)
                    raise TileDecodeError(f"nvJPEG failed on a batch of {len(region.jobs)} tiles ({exc})") from exc
                tw, th = lv.tile_w, lv.tile_h
                for (c, r), tile in zip(region.jobs, decoded):
                    tile = tile.permute(1, 2, 0)  # (3, th, tw) -> (th, tw, 3)
                    tx, ty = c * tw, r * th
                    sx0, sy0 = max(x0, tx), max(y0, ty)
                    sx1, sy1 = min(x1, tx + tile.shape[1]), min(y1, ty + tile.shape[0])
                    out[sy0 - iy : sy1 - iy, sx0 - ix : sx1 - ix] = tile[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx]
        caller.wait_stream(self._stream)
        out.record_stream(caller)
        return out

    def read(self, location, level: int, size):
        """prepare + decode in one call. Raises TileDecodeError for reads the GPU path does not take."""
        try:
            return self.decode(self.prepare(location, level, size))
        except GpuUnsupported as exc:
            raise TileDecodeError(f"{exc}: read it on the CPU") from exc


def cuda_reader_for(slide, device: str = "cuda") -> CudaRegionReader | None:
    """A CudaRegionReader for an open Slide read by the tile reader from JPEG tiles, else None."""
    tiles = getattr(slide, "_tiles", None)
    if tiles is None or not cuda_available():
        return None
    if not any(lv.codec == "jpeg" for lv in tiles.levels):
        return None
    meta = _jpeg_meta(slide)
    return CudaRegionReader(tiles, lambda level: meta[level][0], lambda level: meta[level][1], device)


def _jpeg_meta(slide) -> list[tuple[bytes | None, bool]]:
    """(JPEGTables, RGB components?) per level, read again from the file's headers."""
    tiles = slide._tiles
    if slide.vendor == "dicom":
        import pydicom

        meta = []
        by_size = {}
        for f in sorted(slide.file.parent.glob("*.dcm")):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                by_size[(int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))] = ds
            except Exception:
                continue
        for lv in tiles.levels:
            ds = by_size.get((lv.width, lv.height))
            meta.append((None, ds is not None and str(ds.PhotometricInterpretation).upper() == "RGB"))
        return meta
    import tifffile

    with tifffile.TiffFile(slide.file) as tif:
        pages = {(int(p.imagewidth), int(p.imagelength)): p for p in tif.pages if p.is_tiled}
        return [(bytes(pages[(lv.width, lv.height)].jpegtables or b"") or None,
                 int(pages[(lv.width, lv.height)].photometric) == 2) for lv in tiles.levels]


__all__ = ["CudaRegionReader", "GpuUnsupported", "PreparedRegion", "cuda_available", "cuda_reader_for",
           "nvjpeg_works"]
