"""Before openslide opens a slide: which file a path means (a DICOM folder's largest .dcm), whether it is a
slide at all (a clear NotASlideError for text files and other formats), and whether a TIFF-based slide is
complete (a cut copy or download is a SlideError, not "not a slide")."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from napari_slpd.errors import NotASlideError, SlideError

# The first bytes of the files that openslide reads through TIFF: used to spot truncated slides early.
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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
