"""What napari shows, without Qt: layer-data tuples in each slide's world frame (``slides.frame``), the npe2
reader and sample data, the software-OpenGL workaround. Widgets draw these."""
