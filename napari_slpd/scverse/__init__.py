"""The scverse way in and out: SpatialData / wsidata (LazySlide) zarr stores and AnnData.

- :mod:`~napari_slpd.scverse.layout`: wsidata's on-disk conventions (element keys, tile specs, level-0
  pixel frame), in plain numpy so that the core can describe them without the libraries;
- :mod:`~napari_slpd.scverse.export_slide`: one slide's features, prototypes, label maps and tissue as a
  SpatialData zarr that ``wsidata.open_wsi(slide, store=...)`` and LazySlide read as their own;
- :mod:`~napari_slpd.scverse.export_cohort`: the cohort as one AnnData (slides x slide representation,
  labels, prototype sets) for scanpy;
- :mod:`~napari_slpd.scverse.importing`: LazySlide's feature tables (any encoder) into a cohort's patch
  features, through the same path as CLAM/TRIDENT ``.h5`` imports.

The libraries (spatialdata, anndata, geopandas; wsidata and lazyslide to open the result) are an optional
extra: :func:`require_scverse` says how to install them when a command needs them.
"""

from __future__ import annotations

import importlib

from napari_slpd.errors import SlpdError

INSTALL_HINT = (
    'install the scverse extra: pip install "napari-slpd[scverse]" (from a checkout: `make venv-scverse`, '
    "which uses the pinned versions of constraints/)"
)


class ScverseMissingError(SlpdError):
    """A scverse library needed by a command is not installed."""


def require_scverse(what: str, modules: tuple[str, ...] = ("spatialdata", "anndata", "geopandas")) -> None:
    """Import ``modules`` or raise ScverseMissingError naming the missing one, ``what`` needed it and how to
    install it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ScverseMissingError(f"{what} needs the Python package {name!r}, which is not installed "
                                      f"({exc}); {INSTALL_HINT}") from exc


__all__ = ["INSTALL_HINT", "ScverseMissingError", "require_scverse"]
