"""Helpers for tests and demos: tiny models with random weights written in the official checkpoint layouts.

Nothing here downloads anything; every model is created locally with random weights.
"""
