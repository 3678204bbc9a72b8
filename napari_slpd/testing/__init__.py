"""Helpers for tests, benchmarks and the demo: tiny models with random weights written in the official
checkpoint layouts (``tiny_clip``), large mosaic slides built from a small one (``mosaic``), a virtual X
display for screenshots without a screen (``xvfb``).

Nothing here downloads anything; every model is created locally with random weights.
"""
