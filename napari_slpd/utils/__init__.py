"""Plumbing every stage shares: atomic file writes, HDF5 attribute encoding, the progress/cancel
convention, device resolution. Imports nothing else of the package but ``napari_slpd.errors``."""
