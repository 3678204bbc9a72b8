"""Exporting a slide's prototypes for other tools: QuPath GeoJSON (exact outlines on the region lattice)
and label-map TIFFs with resolution tags."""
