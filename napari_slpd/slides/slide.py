"""Whole-slide images through openslide: pixel size, lazy tile-aligned pyramids, thread-safe reads.

Everything openslide reads opens here (Aperio SVS, generic and Philips TIFF, Hamamatsu NDPI/VMS, MIRAX,
Leica SCN, Ventana BIF, DICOM WSI; a folder of ``.dcm`` files too). The pyramid is a list of dask arrays
whose chunks are whole tiles of the slide, so showing a field of view reads only the tiles it touches and
no level is ever read as a whole. openslide handles are kept one per thread (``threading.local``) because
openslide serialises work through a handle; dask and napari read chunks from several threads at once.

Region pixels come from the fast tile reader (``napari_slpd.slides.readers``: tiled TIFF incl. SVS JPEG and
JPEG 2000, generic and Philips TIFF, DICOM WSI) when it handles the slide, which decodes the compressed
tiles straight into the region with GIL-free decoders; openslide reads everything else, and is the
reference the fast reader is checked against (a probe on open falls back to openslide on any mismatch).

One idea: the ``Slide`` object (opening, reads, pyramid, closing); its pixel size is resolved in
``slides/pixel_size.py``, the file checks before opening are ``slides/slide_file.py``'s, the lazy pyramid's
levels ``slides/pyramid.py``'s, and the readers it delegates to live in ``slides/readers``.
``SLPD_READER=openslide`` (or ``reader="openslide"``) forces openslide. ``slide.reader`` names the reader.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import uuid
from pathlib import Path

import numpy as np

from napari_slpd.errors import NotASlideError, SlideError
from napari_slpd.slides.pixel_size import (  # noqa: F401  (public here too)
    LEVEL0_ASSUMED_MPP,
    MPP_FALLBACKS,
    PLAUSIBLE_MPP,
    PixelSize,
    _parse_float,
    is_plausible_mpp,
    objective_power_of,
    resolve_pixel_size,
)
from napari_slpd.slides.pyramid import MIN_CHUNK_PX, _even_chunks, _halve, _halve_block, _LevelReader  # noqa: F401
from napari_slpd.slides.slide_file import (  # noqa: F401  (public here too)
    _check_tiff_complete,
    _dicom_candidates,
    _looks_like_text,
    locate_slide_file,
)

log = logging.getLogger(__name__)

# A pyramid gets virtual 2x levels until its coarsest level fits in this many px per side.
VIRTUAL_LEVEL_MAX_SIDE = 1024
DEFAULT_TILE_PX = 256
READERS = ("auto", "openslide", "tiles")
# The open-time probe: the fast reader must agree with openslide within this (pixman's bilinear rounding).
PROBE_TOLERANCE = 3


# -- opening --------------------------------------------------------------------------------------------


def open_slide(path: str | os.PathLike, mpp: float | None = None, mpp_fallback: str = "none",
               reader: str | None = None) -> "Slide":
    """Open a whole-slide image. ``mpp`` overrides the file's pixel size; ``mpp_fallback`` ("none",
    "objective" or "level0") is used only when the file states no plausible pixel size. ``reader``:
    "auto" (fast tile reader where it applies, else openslide), "openslide" or "tiles" (fail if the fast
    reader does not apply); default: $SLPD_READER or "auto"."""
    return Slide(path, mpp=mpp, mpp_fallback=mpp_fallback, reader=reader)


# -- the slide ------------------------------------------------------------------------------------------


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA read onto white: openslide marks areas outside the scan as transparent."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


# One tile cache shared by all of a slide's handles (one per reading thread): without it each handle
# decodes on its own the tiles that neighbouring regions share, which a single reader would have cached.
# Twice openslide's default per-handle size, since several readers fill it at once.
SHARED_TILE_CACHE_BYTES = 64 * 1024 * 1024


def _raw_reader():
    """openslide's own read into a caller's buffer (premultiplied ARGB, native-endian uint32), or None
    when this openslide-python does not expose it; then the public read_region is used."""
    try:
        from openslide import lowlevel

        read, convert = lowlevel._read_region, lowlevel._convert.argb2rgba
    except (ImportError, AttributeError):
        return None
    return read, convert


_RAW_READER = None  # resolved on first use: (read, argb2rgba) or False


def _read_rgb_image(handle, x: int, y: int, level: int, w: int, h: int):
    """PIL RGB image of a region composited onto white, with as few full-size passes as possible.

    openslide-python's read_region un-premultiplies the whole buffer and wraps it as RGBA; turning that
    into an RGB array then costs two or three more full copies. An opaque region (the usual case: alpha
    only drops outside the scan) needs none of that: premultiplied and straight colour agree at alpha 255,
    so one C unpack (BGRX -> RGB) gives the same pixels. Anything transparent takes openslide's own
    conversion and the same compositing as ever, so the pixels are identical either way.
    """
    import ctypes
    import sys

    from PIL import Image

    global _RAW_READER
    if _RAW_READER is None:
        _RAW_READER = _raw_reader() or False
    osr = getattr(handle, "_osr", None)
    if not _RAW_READER or osr is None or sys.byteorder != "little":
        return Image.fromarray(_rgba_to_rgb_on_white(np.asarray(handle.read_region((x, y), level, (w, h)))))
    read, argb2rgba = _RAW_READER
    buf = (ctypes.c_uint32 * (w * h))()
    read(osr, buf, x, y, level, w, h)
    argb = np.frombuffer(buf, np.uint32)
    if argb.min() >= 0xFF000000:  # every pixel opaque; bytes in memory are B, G, R, A
        return Image.frombuffer("RGB", (w, h), buf, "raw", "BGRX", 0, 1)
    argb2rgba(buf)
    return Image.fromarray(_rgba_to_rgb_on_white(np.frombuffer(buf, np.uint8).reshape(h, w, 4)))


class Slide:
    """An open whole-slide image. See docs/ARCHITECTURE.md "Slides" for the contract."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, mpp_fallback: str = "none",
                 reader: str | None = None):
        import openslide

        reader = reader or os.environ.get("SLPD_READER") or "auto"
        if reader not in READERS:
            raise SlideError(f"reader must be one of {READERS}, not {reader!r}")
        self._tiles = None
        self.reader_note = "forced by reader='openslide'" if reader == "openslide" else ""

        from napari_slpd.slides.ids import slide_id_for

        self.file = locate_slide_file(path).resolve()
        self.path = Path(path).expanduser().resolve()
        _check_tiff_complete(self.file)
        try:
            handle = openslide.OpenSlide(str(self.file))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise NotASlideError(f"{self.path} is not a whole-slide image openslide can read ({exc})") from exc
        except Exception as exc:  # OpenSlideError and OSError carry openslide's own reason
            raise SlideError(f"cannot open slide {self.path}: {exc}") from exc

        self._local = threading.local()
        # One openslide handle per thread, each with a lock held while it reads: close() takes every lock
        # before closing, so a handle is never closed under a read still running in another thread (the
        # viewer's slicing threads, a tissue worker) - openslide would read freed memory.
        lock = threading.Lock()
        self._handles: list = [(handle, lock)]
        self._handles_lock = threading.Lock()
        self._local.handle, self._local.lock = handle, lock
        self._tile_cache = None
        self._share_cache(handle)
        self._closed = False
        self._read_calls = 0
        self._count_lock = threading.Lock()

        self.properties: dict[str, str] = dict(handle.properties)
        self.vendor: str = self.properties.get("openslide.vendor", "unknown")
        self.dimensions: tuple[int, int] = tuple(handle.dimensions)
        self.level_count: int = handle.level_count
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(d) for d in handle.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.associated_image_names: list[str] = sorted(handle.associated_images.keys())
        self.objective_power: float | None = objective_power_of(self.properties)
        self.pixel_size: PixelSize = resolve_pixel_size(self.properties, mpp, mpp_fallback)
        # A DICOM series is named after its folder, whichever of its files was opened.
        if self.vendor == "dicom" and self.path.is_file():
            self.slide_id = slide_id_for(self.path.parent)
        else:
            self.slide_id = slide_id_for(self.path)
        self._pyramid: list | None = None
        if reader != "openslide":
            self._open_tiles(required=reader == "tiles")
        self._check_first_tile()

    def _open_tiles(self, required: bool) -> None:
        """Use the fast tile reader when it handles this slide and agrees with openslide on a probe."""
        from napari_slpd.slides.readers import open_tile_reader

        tiles, why = open_tile_reader(self.file, self.vendor, self.level_dimensions, self.level_downsamples)
        if tiles is not None:
            why = self._probe_tiles(tiles)
            if why:
                tiles.close()
                tiles = None
        if tiles is None:
            self.reader_note = why
            if required:
                raise SlideError(f"the fast tile reader cannot read {self.path}: {why}")
            log.debug("%s: openslide reads it (%s)", self.path, why)
            return
        self._tiles = tiles

    def _probe_tiles(self, tiles) -> str:
        """"" when the fast reader gives openslide's pixels on a small read of the finest and the coarsest
        level (a tile at the slide's centre), else why not."""
        for level in sorted({0, self.level_count - 1}):
            w, h = self.level_dimensions[level]
            size = (min(w, 96), min(h, 96))
            ds = self.level_downsamples[level]
            where = (int((w - size[0]) // 2 * ds), int((h - size[1]) // 2 * ds))
            try:
                fast = tiles.read(where, level, size)
            except Exception as exc:  # damaged or unusual tiles: openslide's error path reports them
                return f"probe read failed ({exc})"
            with self._handle() as handle:
                ref = np.asarray(_read_rgb_image(handle, where[0], where[1], level, *size))
            diff = int(np.abs(fast.astype(np.int16) - ref.astype(np.int16)).max()) if ref.size else 0
            if diff > PROBE_TOLERANCE:
                return f"probe differs from openslide by up to {diff} levels at level {level}"
        return ""

    @property
    def reader(self) -> str:
        """Which reader decodes regions: "openslide" or the fast reader's name (e.g. "tiles:aperio-jpeg")."""
        return self._tiles.name if self._tiles is not None else "openslide"

    # -- metadata ------------------------------------------------------------------------------------
    @property
    def mpp(self) -> float | None:
        return self.pixel_size.mpp

    @property
    def format_name(self) -> str:
        return self.vendor

    def tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of a tile at ``level`` as the file stores it (256 when the file does not say)."""
        w = _parse_float(self.properties.get(f"openslide.level[{level}].tile-width"))
        h = _parse_float(self.properties.get(f"openslide.level[{level}].tile-height"))
        return (int(w) if w else DEFAULT_TILE_PX, int(h) if h else DEFAULT_TILE_PX)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest real level whose downsample does not exceed ``downsample`` (no detail is lost)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = level
        return best

    @property
    def read_calls(self) -> int:
        """How many openslide read_region calls this slide has made (every chunk read is one)."""
        return self._read_calls

    def reset_read_calls(self) -> None:
        with self._count_lock:
            self._read_calls = 0

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"Slide({str(self.path)!r}, {self.vendor}, {w}x{h}, levels={self.level_count}, mpp={self.mpp}, "
                f"reader={self.reader})")

    # -- reading -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _handle(self):
        """This thread's openslide handle, locked for the duration of a read (see ``__init__``)."""
        handle = getattr(self._local, "handle", None)
        if handle is None:
            if self._closed:
                raise SlideError(f"slide {self.path} is closed")
            import openslide

            handle, lock = openslide.OpenSlide(str(self.file)), threading.Lock()
            self._share_cache(handle)
            self._local.handle, self._local.lock = handle, lock
            with self._handles_lock:
                self._handles.append((handle, lock))
        with self._local.lock:
            if self._closed:
                raise SlideError(f"slide {self.path} is closed")
            yield handle

    def _share_cache(self, handle) -> None:
        """Give ``handle`` the slide's shared tile cache (openslide >= 4: OpenSlideCache)."""
        try:
            import openslide

            if self._tile_cache is None:
                self._tile_cache = openslide.OpenSlideCache(SHARED_TILE_CACHE_BYTES)
            handle.set_cache(self._tile_cache)
        except Exception as exc:  # an older openslide: every handle keeps its private cache
            log.debug("openslide tile cache not shared: %s", exc)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` px at ``level``, top-left at level-0 ``location``; areas outside
        the scan are white. Safe to call from several threads at once."""
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            self._check_readable(level)
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        if self._tiles is not None:
            self._check_readable(level)
            with self._count_lock:
                self._read_calls += 1
            return self._read_tiles(location, level, (w, h))
        return np.array(self.read_region_image(location, level, (w, h)))

    def read_region_image(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """The same pixels as :meth:`read_region` as a PIL RGB image, for callers that resize next (it
        saves the array round trip). Safe to call from several threads at once."""
        from PIL import Image

        self._check_readable(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return Image.new("RGB", (max(w, 0), max(h, 0)), (255, 255, 255))
        with self._count_lock:
            self._read_calls += 1
        if self._tiles is not None:
            return Image.fromarray(self._read_tiles(location, level, (w, h)))
        try:
            with self._handle() as handle:
                return _read_rgb_image(handle, int(location[0]), int(location[1]), level, w, h)
        except Exception as exc:
            raise SlideError(
                f"cannot read {w}x{h} px at level {level}, {tuple(location)} of {self.path}: {exc} "
                "(the file may be damaged)"
            ) from exc

    def _read_tiles(self, location, level: int, size, scale: int = 1, parallel: bool = False,
                    more_below: bool = False) -> np.ndarray:
        from napari_slpd.slides.readers.tiles import TileDecodeError, tile_error

        try:
            return self._tiles.read((int(location[0]), int(location[1])), level, size, scale, parallel, more_below)
        except TileDecodeError as exc:
            raise tile_error(self.path, location, level, size, exc) from exc

    def read_region_reduced(self, location: tuple[int, int], level: int, size: tuple[int, int],
                            max_scale: int = 1, parallel: bool = False,
                            more_below: bool = False) -> tuple[np.ndarray, int]:
        """The region of :meth:`read_region` decoded at 1/s of ``level`` (s the largest of 1, 2, 4, 8 up
        to ``max_scale`` the tiles allow, through libjpeg's scaled IDCT): (RGB array of
        ceil(w/s) x ceil(h/s) px, s). s is 1 with openslide. ``parallel`` splits a large read over the
        shared decode pool (for a caller that reads one region at a time). ``more_below``: the caller
        reads the rows just below next (a region in bands): the tile row the bottom edge cuts is cached."""
        self._check_readable(level)
        w, h = int(size[0]), int(size[1])
        scale = 1
        if self._tiles is not None:
            while scale * 2 <= max_scale and scale < 8 and self._tiles.level_scale_ok(level, scale * 2):
                scale *= 2
        if w <= 0 or h <= 0 or self._tiles is None:
            return self.read_region(location, level, (w, h)), 1
        with self._count_lock:
            self._read_calls += 1
        out_size = (math.ceil(w / scale), math.ceil(h / scale))
        return self._read_tiles(location, level, out_size, scale, parallel, more_below), scale

    def _check_readable(self, level: int) -> None:
        if self._closed:
            raise SlideError(f"slide {self.path} is closed")
        if not 0 <= level < self.level_count:
            raise SlideError(f"level {level} does not exist in {self.path} (it has {self.level_count})")

    def _check_first_tile(self) -> None:
        # Opening succeeds on files whose tiles are damaged; one small read makes the error surface here,
        # naming the file, rather than later inside a napari draw.
        level = self.level_count - 1
        w, h = self.level_dimensions[level]
        self.read_region((0, 0), level, (min(w, 64), min(h, 64)))
        self.reset_read_calls()

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self.associated_image_names:
            raise SlideError(
                f"{self.path} has no associated image {name!r}; it has {self.associated_image_names or 'none'}"
            )
        with self._handle() as handle:
            image = handle.associated_images[name]
        return _rgba_to_rgb_on_white(np.asarray(image.convert("RGBA")))

    def read_downsampled(self, downsample: float, block_px: int = 2048) -> np.ndarray:
        """The whole slide at ``level-0 / downsample`` resolution, read block by block from the best level.

        Memory stays at the output plus one block, however large the slide.
        """
        from PIL import Image

        downsample = max(float(downsample), 1.0)
        W, H = self.dimensions
        out_w, out_h = max(1, round(W / downsample)), max(1, round(H / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        lds = self.level_downsamples[level]
        out = np.empty((out_h, out_w, 3), np.uint8)
        # Output blocks whose source box at `level` is at most block_px per side.
        scale = (lw / out_w, lh / out_h)  # level px per output px
        step_x = max(1, int(block_px / scale[0]))
        step_y = max(1, int(block_px / scale[1]))
        for oy in range(0, out_h, step_y):
            oh = min(step_y, out_h - oy)
            sy0, sy1 = round(oy * scale[1]), min(lh, round((oy + oh) * scale[1]))
            for ox in range(0, out_w, step_x):
                ow = min(step_x, out_w - ox)
                sx0, sx1 = round(ox * scale[0]), min(lw, round((ox + ow) * scale[0]))
                block = self.read_region(
                    (round(sx0 * lds), round(sy0 * lds)), level, (max(1, sx1 - sx0), max(1, sy1 - sy0))
                )
                if block.shape[:2] != (oh, ow):
                    block = np.asarray(Image.fromarray(block).resize((ow, oh), Image.BOX))
                out[oy : oy + oh, ox : ox + ow] = block
        return out

    def thumbnail(self, max_px: int = 1024) -> np.ndarray:
        """RGB uint8 image of the whole slide whose longer side is at most ``max_px``."""
        W, H = self.dimensions
        return self.read_downsampled(max(1.0, max(W, H) / max_px))

    # -- pyramid -------------------------------------------------------------------------------------
    def pyramid(self) -> list:
        """The slide as a list of lazy dask arrays (H, W, 3) uint8, finest first.

        Real levels are chunked on the slide's own tiles (one read_region per chunk). When the coarsest
        real level is still larger than VIRTUAL_LEVEL_MAX_SIDE, virtual 2x levels are appended; each
        virtual chunk is computed from the level above it on demand.
        """
        if self._pyramid is None:
            self._pyramid = self._build_pyramid()
        return list(self._pyramid)

    def pyramid_downsamples(self) -> list[float]:
        """The level-0 downsample of every pyramid() level (real then virtual)."""
        W = self.dimensions[0]
        return [W / arr.shape[1] for arr in self.pyramid()]

    def _build_pyramid(self) -> list:
        import dask.array as da

        token = uuid.uuid4().hex  # unique per open slide: dask caches must never mix two slides' chunks
        levels = []
        for level in range(self.level_count):
            reader = _LevelReader(self, level)
            levels.append(
                da.from_array(
                    reader,
                    chunks=reader.chunks,
                    name=f"slide-{token}-level{level}",
                    asarray=False,
                    lock=False,
                    meta=np.empty((0, 0, 3), np.uint8),
                    inline_array=True,
                )
            )
        while max(levels[-1].shape[:2]) > VIRTUAL_LEVEL_MAX_SIDE:
            levels.append(_halve(levels[-1]))
        return levels

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        tiles, self._tiles = getattr(self, "_tiles", None), None
        if tiles is not None:
            tiles.close()
        with self._handles_lock:
            handles, self._handles = self._handles, []
        for handle, lock in handles:
            with lock:  # waits for a read still running in another thread
                try:
                    handle.close()
                except Exception:  # closing twice or at interpreter exit
                    pass
        self._local = threading.local()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

