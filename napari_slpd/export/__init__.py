"""Exporting a slide's prototypes for other tools: QuPath GeoJSON (exact outlines on the region lattice)
and label-map TIFFs with resolution tags.

- :mod:`~napari_slpd.export.geometry`: the region lattice and exact cell outlines (pure numpy + shapely);
- :mod:`~napari_slpd.export.geojson`: QuPath-shaped GeoJSON features, writing and reading;
- :mod:`~napari_slpd.export.tiff`: the palette label-map TIFF;
- :mod:`~napari_slpd.export.slide_export`: :func:`export_slide_prototypes`, the one that reads the
  prototypes, names and feature file of a slide.
"""

from napari_slpd.errors import ExportError
from napari_slpd.export.geojson import (hex_to_rgb, label_grid_to_features, prototype_geojson, read_geojson,
                                        write_geojson)
from napari_slpd.export.geometry import RegionLattice, mask_to_polygons, region_label_grid, signed_area
from napari_slpd.export.slide_export import SlideExport, export_slide_prototypes
from napari_slpd.export.tiff import write_label_map_tiff
from napari_slpd.labeling.palette import ClassStyle

__all__ = [
    "ExportError",
    "ClassStyle",
    "RegionLattice",
    "mask_to_polygons",
    "signed_area",
    "region_label_grid",
    "label_grid_to_features",
    "hex_to_rgb",
    "prototype_geojson",
    "write_geojson",
    "read_geojson",
    "write_label_map_tiff",
    "export_slide_prototypes",
    "SlideExport",
]
