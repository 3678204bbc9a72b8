"""napari-slpd: slide-level prototypes for whole-slide images.

The core (everything outside ``napari_slpd.widgets``) imports no Qt and can be used from a notebook.
"""

__version__ = "0.1.0"
