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

Over 600 lines, but one idea: the ``Slide`` object (opening, pixel size, reads, pyramid, closing) and the
small helpers only it uses; the readers it delegates to live in ``slides/readers``.
``SLPD_READER=openslide`` (or ``reader="openslide"``) forces openslide. ``slide.reader`` names the reader.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_slpd.errors import NotASlideError, PixelSizeError, SlideError

log = logging.getLogger(__name__)

# um/px outside this range is not a microscope scan: e.g. 264.58 um/px is a 96-dpi default written by
# generic TIFF writers, 25400 um/px is a 1-dpi default.
PLAUSIBLE_MPP = (0.1, 2.0)
# The "level0" fallback: assume level 0 was scanned at 20x, the most common objective.
LEVEL0_ASSUMED_MPP = 0.5
# A pyramid gets virtual 2x levels until its coarsest level fits in this many px per side.
VIRTUAL_LEVEL_MAX_SIDE = 1024
# Tiles smaller than this (some DICOM levels use 1 x 1 px "tiles") are grouped into one chunk per read.
MIN_CHUNK_PX = 128
DEFAULT_TILE_PX = 256
MPP_FALLBACKS = ("none", "objective", "level0")
READERS = ("auto", "openslide", "tiles")
# The open-time probe: the fast reader must agree with openslide within this (pixman's bilinear rounding).
PROBE_TOLERANCE = 3
# The first bytes of the files that openslide reads through TIFF: used to spot truncated slides early.
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class PixelSize:
    """The pixel size used for a slide and where it came from.

    ``source`` is ``"metadata"``, ``"user"``, ``"objective-power"``, ``"level0-assumed"`` (``mpp`` set) or
    ``"missing"``, ``"implausible"`` (``mpp`` None). ``raw`` is the value the file states, even when bogus.
    """

    mpp: float | None
    source: str
    raw: float | None = None

    @property
    def known(self) -> bool:
        return self.mpp is not None

    def describe(self) -> str:
        if self.mpp is None:
            if self.source == "implausible":
                return f"unknown (file states an implausible {self.raw:g} um/px)"
            return "unknown (not in the file)"
        text = f"{self.mpp:.4g} um/px ({self.source})"
        if self.source != "metadata" and self.raw is not None:
            text += f"; file states {self.raw:g}"
        return text


def is_plausible_mpp(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def resolve_pixel_size(
    properties: dict[str, str], mpp: float | None = None, mpp_fallback: str = "none"
) -> PixelSize:
    """Choose the um/px of a slide: the user's value, else plausible metadata, else the chosen fallback."""
    if mpp_fallback not in MPP_FALLBACKS:
        raise PixelSizeError(f"mpp_fallback must be one of {MPP_FALLBACKS}, not {mpp_fallback!r}")
    mpp_x = _parse_float(properties.get("openslide.mpp-x"))
    mpp_y = _parse_float(properties.get("openslide.mpp-y"))
    stated = [v for v in (mpp_x, mpp_y) if v is not None]
    raw = float(np.mean(stated)) if stated else None
    if mpp is not None:
        mpp = float(mpp)
        if not is_plausible_mpp(mpp):
            raise PixelSizeError(
                f"a pixel size of {mpp:g} um/px is outside the plausible range "
                f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px (20x is about 0.5, 40x about 0.25)"
            )
        return PixelSize(mpp, "user", raw)
    if raw is not None and is_plausible_mpp(raw):
        return PixelSize(raw, "metadata", raw)
    unknown = PixelSize(None, "implausible" if raw is not None else "missing", raw)
    if mpp_fallback == "objective":
        power = objective_power_of(properties)
        if power is not None:
            return PixelSize(10.0 / power, "objective-power", raw)
        log.warning("mpp_fallback='objective' but the slide states no objective power; pixel size unknown")
        return unknown
    if mpp_fallback == "level0":
        return PixelSize(LEVEL0_ASSUMED_MPP, "level0-assumed", raw)
    return unknown


def objective_power_of(properties: dict[str, str]) -> float | None:
    power = _parse_float(properties.get("openslide.objective-power"))
    return power if power is not None and 1.0 <= power <= 150.0 else None


# -- opening --------------------------------------------------------------------------------------------


def _dicom_candidates(folder: Path) -> list[Path]:
    # The largest file of a series is usually the full-resolution level: try it first.
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm"]
    return sorted(files, key=lambda p: (-p.stat().st_size, p.name))


class _CollectWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _check_tiff_complete(path: Path) -> None:
    """Raise SlideError when a TIFF-based slide ends early (a cut copy or download) or its directories
    are broken: a directory or tile that lies past the end of the file."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(16)
    except OSError as exc:
        raise SlideError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if header[:4] not in _TIFF_MAGICS:
        return
    size = path.stat().st_size
    order = "<" if header[:2] == b"II" else ">"
    big = header[2:4] in (b"+\x00", b"\x00+")
    if len(header) < (16 if big else 8):
        raise SlideError(f"{path} is truncated: it ends inside its {len(header)}-byte header")
    first_ifd = int(np.frombuffer(header[8:16] if big else header[4:8], dtype=order + ("u8" if big else "u4"))[0])
    if first_ifd >= size:
        raise SlideError(
            f"{path} is truncated: it is {size:,} bytes but its first image directory starts at byte "
            f"{first_ifd:,}; the copy or download did not finish"
        )
    import tifffile

    collector = _CollectWarnings()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(collector)
    propagate, tiff_log.propagate = tiff_log.propagate, False
    try:
        with tifffile.TiffFile(path) as tif:
            needed = 0
            pages = list(tif.pages)
            for page in pages:
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size:
                    needed = max(needed, int((offsets + counts).max()))
    except Exception as exc:  # tifffile raises many types for broken directories
        raise SlideError(
            f"{path} is a damaged TIFF-based slide ({type(exc).__name__}: {exc}); copy or download it again"
        ) from exc
    finally:
        tiff_log.removeHandler(collector)
        tiff_log.propagate = propagate
    if needed > size:
        raise SlideError(
            f"{path} is truncated: it is {size:,} bytes but its image data needs {needed:,} bytes; "
            "the copy or download did not finish"
        )
    broken = [m for m in collector.messages if "offset" in m.lower()]
    if broken or not pages:
        raise SlideError(
            f"{path} is truncated or damaged: its image directories point past the end of the "
            f"{size:,}-byte file ({broken[0] if broken else 'no readable image'})"
        )


def locate_slide_file(path: str | os.PathLike) -> Path:
    """The file openslide is given for ``path``: the path itself, or a ``.dcm`` of a DICOM folder.

    Raises SlideError for a missing path or an empty file and NotASlideError for anything openslide does
    not recognise, with a message that says which.
    """
    import openslide

    path = Path(path).expanduser()
    if not path.exists():
        raise SlideError(f"slide {path} does not exist")
    if path.is_dir():
        candidates = _dicom_candidates(path)
        if not candidates:
            raise NotASlideError(
                f"{path} is a folder without .dcm files; give a slide file (or a folder of one DICOM WSI series)"
            )
        for candidate in candidates:
            if candidate.stat().st_size and openslide.OpenSlide.detect_format(str(candidate)):
                return candidate
        raise NotASlideError(f"{path} holds .dcm files but none is a DICOM whole-slide image openslide can read")
    if not path.is_file():
        raise NotASlideError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        raise SlideError(f"slide {path} is empty (0 bytes); the copy or download did not finish")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception as exc:
        raise SlideError(f"cannot read {path}: {exc}") from exc
    if fmt is None:
        with open(path, "rb") as fh:
            head = fh.read(512)
        if head[:4] in _TIFF_MAGICS:
            _check_tiff_complete(path)  # a cut-off slide is damaged, not "not a slide"
            raise NotASlideError(
                f"{path} is a TIFF but not a whole-slide image openslide reads (no tiled pyramid or vendor "
                "metadata); open it with napari's own TIFF reader"
            )
        kind = "a text file" if head and _looks_like_text(head) else "not a format openslide reads"
        raise NotASlideError(
            f"{path} is not a whole-slide image ({kind}); openslide reads SVS, TIFF, NDPI, VMS, MRXS, SCN, BIF "
            "and DICOM slides"
        )
    return path


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


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


class _LevelReader:
    """Array-like view of one real level for dask.array.from_array: each __getitem__ is one read_region.

    Chunks are the level's tiles (grouped when tiles are tiny) so a chunk never straddles a tile boundary.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, slide: Slide, level: int):
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
