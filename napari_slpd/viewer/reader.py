"""napari reader contribution: whole-slide images (every format openslide reads, and DICOM folders).

``get_reader`` answers None for anything that is not a slide, so napari can offer the file to other
readers; it never raises. A slide that is recognised but damaged (truncated, empty, unreadable tiles)
gets a reader that raises a SlideError naming the file, which napari shows to the user.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from napari_slpd.errors import NotASlideError, SlideError

log = logging.getLogger(__name__)


def _warn_visible(message: str) -> None:
    """A warning the napari user sees (a notification), or a Python warning outside napari."""
    try:
        from napari.utils.notifications import show_warning
    except Exception:  # napari not installed: a library or CLI user
        warnings.warn(message, stacklevel=3)
        return
    show_warning(message)


def read_slide_layers(
    path: str | os.PathLike,
    include_associated: bool = True,
    mpp: float | None = None,
    mpp_fallback: str = "none",
) -> list[tuple]:
    """Layer-data tuples for a slide: the multiscale image, then its associated images (hidden)."""
    from napari_slpd.viewer.layers import UNKNOWN_MPP_NOTE, associated_image_layers, slide_image_layer
    from napari_slpd.slides.slide import open_slide

    slide = open_slide(path, mpp=mpp, mpp_fallback=mpp_fallback)
    if slide.mpp is None:
        _warn_visible(f"{slide.path.name}: {slide.pixel_size.describe()}; {UNKNOWN_MPP_NOTE}")
    layers = [slide_image_layer(slide)]
    if include_associated:
        layers.extend(associated_image_layers(slide))
    return layers


def _raise_later(error: SlideError):
    def reader(_path):
        raise error

    return reader


def get_reader(path):
    """npe2 reader hook: a reader function for a slide, None for anything else."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # several files are not one slide (a DICOM series is opened as its folder)
        path = path[0]
    try:
        from napari_slpd.slides.slide import locate_slide_file

        locate_slide_file(Path(path))
    except NotASlideError as exc:
        log.debug("not a slide: %s", exc)
        return None
    except SlideError as exc:
        if not Path(path).exists():
            return None  # nothing to read; napari reports missing files itself
        return _raise_later(exc)
    except Exception as exc:  # never raise into napari from the probe
        log.debug("slide probe failed for %s: %s", path, exc)
        return None
    return lambda p: read_slide_layers(p[0] if isinstance(p, (list, tuple)) else p)
