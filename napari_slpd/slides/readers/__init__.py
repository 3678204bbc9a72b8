"""Fast region readers that decode a slide's compressed tiles directly (see readers/tiles.py for the
choice of decoders). ``open_tile_reader`` returns one for a slide, or None and the reason openslide reads it."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def open_tile_reader(path, vendor: str, level_dimensions, level_downsamples):
    """(TileReader, "") for a slide this package reads, else (None, why openslide reads it)."""
    from napari_slpd.slides.readers.tiff import Unsupported, open_tiff_reader

    try:
        if vendor == "dicom":
            from napari_slpd.slides.readers.dicom import open_dicom_reader

            return open_dicom_reader(path, level_dimensions, level_downsamples), ""
        return open_tiff_reader(str(path), vendor, level_dimensions, level_downsamples), ""
    except Unsupported as exc:
        return None, str(exc)
    except ImportError as exc:
        return None, f"{exc.name or exc} is not installed"
    except Exception as exc:  # an unusual file: openslide reads it as it always has
        log.debug("fast reader unavailable for %s: %s", path, exc)
        return None, f"{type(exc).__name__}: {exc}"


__all__ = ["open_tile_reader"]
