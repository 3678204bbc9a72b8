"""Suggested names of a slide's prototypes (made by :mod:`napari_slpd.proalign.suggestions` from ProAlign's
zero-shot labels), accepted one by one or all at once into the cohort's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from napari_slpd.labeling.names import PrototypeAnnotations, PrototypeLabel



# -------------------------------------------------------------------------------------------------
# ProAlign zero-shot names


@dataclass
class NameSuggestion:
    """ProAlign's name for one prototype: the zero-shot label most of its patches carry."""

    proto_idx: int
    name: str
    color: str
    confidence: float  # share * mean_confidence
    share: float  # fraction of the prototype's patches (or regions) with this label
    mean_confidence: float  # their mean zero-shot confidence
    runner_up: str = ""


def accept_suggestions(annotations: PrototypeAnnotations, slide_id: str, suggestions: Iterable[NameSuggestion],
                       keep_user_names: bool = True) -> list[PrototypeLabel]:
    """Give the suggested names (source "proalign"); names a person typed stay unless told otherwise."""
    accepted = []
    annotations.reload_if_changed()
    current = annotations.labels(slide_id)
    for s in suggestions:
        old = current.get(s.proto_idx)
        if keep_user_names and old is not None and old.source == "user":
            continue
        accepted.append(annotations.set_label(slide_id, s.proto_idx, name=s.name, color=s.color, source="proalign",
                                              confidence=s.confidence, origin="proalign zero-shot", save=False))
    if accepted:
        annotations.save()
    return accepted


