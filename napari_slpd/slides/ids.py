"""Slide ids and slide files: how a slide file (or DICOM folder) is named inside a cohort and found on disk.
The lowest layer: slides, the cohort and the CLI all use it, and it imports nothing of the package."""

from __future__ import annotations

import os
import re
from pathlib import Path

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")


def slide_id_for(path: str | os.PathLike) -> str:
    """A file-system-safe id for a slide: its file stem (folder name for DICOM folders)."""
    path = Path(path)
    stem = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def find_slides(folder: str | os.PathLike) -> list[Path]:
    """Slide files (and DICOM folders) directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES:
            found.append(entry)
        elif entry.is_dir() and any(p.suffix.lower() == ".dcm" for p in entry.iterdir()):
            found.append(entry)
    return found
