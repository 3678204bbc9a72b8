"""What napari shows, without Qt: layer-data tuples in one world frame per slide, the npe2 reader and
sample data, the embedding map (UMAP) data, the software-OpenGL workaround. Widgets draw these."""
