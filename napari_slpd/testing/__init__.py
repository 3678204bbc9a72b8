"""Helpers for tests, benchmarks and the demo: tiny models with random weights written in the official
checkpoint layouts (``tiny_clip``, ``vlm_checkpoints``), a virtual X display for screenshots without a
screen (``xvfb``). Synthetic slides and cohorts are in :mod:`napari_slpd.samples`.

Nothing here downloads anything; every model is created locally with random weights.
"""
