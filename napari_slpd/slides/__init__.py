"""Slides: opening a whole-slide image (any format openslide reads), its pixel size, its tissue mask and
the grid of regions features are computed on. The lowest layer of the package: it imports only
``napari_slpd.errors`` and ``napari_slpd.utils``."""
