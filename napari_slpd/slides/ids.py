"""Slide ids and slide files: how a slide file (or DICOM folder) is named inside a cohort and found on disk.
The lowest layer: slides, the cohort and the CLI all use it, and it imports nothing of the package at module level."""

from __future__ import annotations

import os
import re
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")


MAX_ID_CHARS = 120  # ids name cache files (<id>.h5, .<id>.h5.XXXX.partial): well below 255 bytes
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slide_id_for(path: str | os.PathLike) -> str:
    """A file-system-safe id for a slide: its file stem (folder name for DICOM folders).

    Only ASCII letters, digits, ``.``, ``_`` and ``-`` are kept (anything else, ``/``, spaces, non-ASCII,
    ``<>&"'``, becomes ``_``), so an id never leaves the cohort folder and is plain text; an id that would
    start with a dot (hidden files, ``..``) starts with ``_``, and one longer than MAX_ID_CHARS is cut and
    ends with a hash of the whole name (two long names never share an id).
    """
    path = Path(path)
    stem = path.name if path.is_dir() else path.stem
    slide_id = _UNSAFE.sub("_", stem)
    if slide_id.startswith("."):
        slide_id = "_" + slide_id[1:]
    if not slide_id:
        slide_id = "slide"
    if len(slide_id) > MAX_ID_CHARS:
        import hashlib

        digest = hashlib.sha1(stem.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        slide_id = f"{slide_id[: MAX_ID_CHARS - 11]}-{digest}"
    return slide_id


def safe_slide_id(slide_id: str) -> str:
    """``slide_id`` itself when it can name a file inside a cohort folder; raises SlpdError otherwise
    (an id from an edited or foreign cohort.json such as ``../x`` or one with a ``/``)."""
    slide_id = str(slide_id)
    if (not slide_id or slide_id in (".", "..") or _UNSAFE.search(slide_id) or slide_id.startswith(".")
            or len(slide_id) > 200):
        from napari_slpd.errors import SlpdError

        raise SlpdError(f"slide id {slide_id[:80]!r} cannot name a file in a cohort folder (only letters, digits, "
                        "'.', '_' and '-', not starting with '.'); fix it in cohort.json or add the slide again")
    return slide_id


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a DICOM series (one slide: .dcm files, one per level)."""
    path = Path(path)
    return path.is_dir() and any(p.suffix.lower() == ".dcm" and p.is_file() for p in path.iterdir())


def find_slides(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[Path]:
    """Slide files (and DICOM folders) directly inside ``folder``, sorted by name; subfolders named in
    ``skip`` are not looked into (a cohort's own cache folders: thousands of files, never a slide)."""
    folder = Path(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in skip:
            continue
        if entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES:
            found.append(entry)
        elif is_dicom_folder(entry):
            found.append(entry)
    return found
