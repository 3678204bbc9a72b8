"""The rows of the labeling panel's table: each prototype of a slide with its name (or the default),
colour, source, size and ProAlign suggestion. Qt-free, so the table can be checked without a viewer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from napari_slpd.labeling.names import PrototypeAnnotations, StaleAnnotationsError
from napari_slpd.labeling.palette import default_color, default_name
from napari_slpd.labeling.suggestions import NameSuggestion


# -------------------------------------------------------------------------------------------------
# What the labeling panel lists


@dataclass
class PrototypeRow:
    """One prototype of a slide as the labeling panel lists it."""

    proto_idx: int
    name: str
    color: str
    named: bool  # a name was given (else the default name)
    source: str  # "user" | "proalign" | "propagated" | "" (the default name, whatever the colour)
    confidence: float | None
    regions: int
    share: float  # fraction of the slide's regions
    suggestion: NameSuggestion | None = None

    @property
    def suggestion_text(self) -> str:
        if self.suggestion is None:
            return ""
        return f"{self.suggestion.name} ({self.suggestion.confidence:.2f})"


def prototype_rows(annotations: PrototypeAnnotations, slide_id: str, protos,
                   suggestions: Iterable[NameSuggestion] = ()) -> list[PrototypeRow]:
    """Rows of the labeling table: names (stale names are not shown), sizes and ProAlign suggestions."""
    try:
        labels = annotations.labels(slide_id, protos)
    except StaleAnnotationsError:
        labels = {}
    counts = np.bincount(np.asarray(protos.assignments, dtype=np.int64), minlength=protos.k)
    total = max(1, int(counts.sum()))
    by_k = {s.proto_idx: s for s in suggestions}
    rows = []
    for k in range(protos.k):
        label = labels.get(k)
        named = label is not None and label.named  # a colour-only label keeps the default name
        rows.append(PrototypeRow(
            proto_idx=k,
            name=label.name if named else default_name(k),
            color=label.color if label else default_color(k),
            named=named,
            source=label.source if named else "",
            confidence=label.confidence if label else None,
            regions=int(counts[k]),
            share=float(counts[k]) / total,
            suggestion=by_k.get(k),
        ))
    return rows
