"""The per-region label-map TIFF: one pixel per region (0 = no region, k + 1 = prototype k), a palette image
whose colours are the prototypes' colours, with resolution tags (one pixel = one region) and a JSON
ImageDescription giving the level-0 origin, the pixel size and the class names, so that the map can be
placed back on the slide."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from napari_slpd.export.geojson import hex_to_rgb
from napari_slpd.export.geometry import region_label_grid
from napari_slpd.labeling.palette import ClassStyle
from napari_slpd.utils.files import atomic_path

__all__ = ["write_label_map_tiff"]


def write_label_map_tiff(
    path: str | os.PathLike,
    region_coords: np.ndarray,
    region_size_level0: float,
    assignments: np.ndarray,
    styles: Mapping[int, ClassStyle],
    mpp: float | None = None,
    slide_id: str = "",
) -> Path:
    """Write the per-region label map: 0 = no region, k + 1 = prototype k, coloured by a palette.

    One pixel is one region, ``region_size_level0 * mpp`` um wide; the resolution tags say so when the
    slide's pixel size is known. The ImageDescription is JSON with the origin and the classes, so the map
    can be placed back on the slide.
    """
    import tifffile

    _, lattice, lm = region_label_grid(region_coords, region_size_level0, assignments)
    image = lm.data
    bits = 8 if image.dtype == np.uint8 else 16
    colormap = np.zeros((3, 2**bits), dtype=np.uint16)
    for label, style in styles.items():
        if 0 <= label + 1 < 2**bits:
            colormap[:, label + 1] = np.asarray(hex_to_rgb(style.color), dtype=np.uint16) * 257
    description = {
        "napari_slpd": "prototype label map",
        "slide_id": slide_id,
        "origin_level0": list(lattice.origin),
        "pixel_size_level0": lattice.step,
        "mpp_level0": mpp,
        "values": {"0": "no region", **{str(k + 1): s.name for k, s in sorted(styles.items())}},
        "colors": {str(k + 1): s.color for k, s in sorted(styles.items())},
    }
    kwargs = {}
    if mpp is not None and mpp > 0:
        px_per_cm = 1e4 / (mpp * lattice.step)
        kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            image,
            photometric="palette",
            colormap=colormap,
            description=json.dumps(description),
            metadata=None,
            **kwargs,
        )
    return path
