"""Errors of slide-level evaluation. Each message says what is wrong with the input and how to fix it."""

from __future__ import annotations

from napari_slpd.errors import SlpdError


class EvaluationError(SlpdError):
    """An evaluation cannot run as asked (no usable representation, protocol not applicable, ...)."""


class LabelsError(EvaluationError):
    """A labels or split file cannot be used (unknown slides, too few members per class, bad values)."""


class RepresentationError(EvaluationError):
    """A slide representation was never computed (the message says how to compute it) or is unknown."""
