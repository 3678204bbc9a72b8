"""Naming prototypes: the names and colours a person (or ProAlign, or propagation) gives to a slide's
prototypes, kept in the cohort; the palette for unnamed ones; propagation to similar slides; accepting
suggested names (ProAlign's: napari_slpd.proalign.suggestions); the labeling table. Qt-free."""

from napari_slpd.labeling.names import (Change, PrototypeAnnotations, PrototypeLabel, SlideState,
                                       StaleAnnotationsError, prototype_identity, regions_identity)
from napari_slpd.labeling.palette import color_to_rgba, default_color, default_name, normalize_color
from napari_slpd.labeling.propagation import plan_propagation
from napari_slpd.labeling.suggestions import NameSuggestion, accept_suggestions
from napari_slpd.labeling.table import PrototypeRow, prototype_rows

__all__ = ["Change", "NameSuggestion", "PrototypeAnnotations", "PrototypeLabel", "PrototypeRow", "SlideState",
           "StaleAnnotationsError", "accept_suggestions", "color_to_rgba", "default_color", "default_name",
           "normalize_color", "plan_propagation", "prototype_identity",
           "prototype_rows", "regions_identity"]
