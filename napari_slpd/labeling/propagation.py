"""Propagating a prototype's name to similar slides: the source prototype's partner in the optimal
one-to-one matching of the two slides' prototype sets (the matching that defines slide similarity) gets
the name. :func:`plan_propagation` returns a preview; :meth:`PrototypeAnnotations.apply` writes it."""

from __future__ import annotations

import logging
from typing import Sequence


from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.labeling.names import (Change, PrototypeAnnotations, PrototypeLabel, StaleAnnotationsError,
                                       _clean_name, _cohort_of, prototype_identity, prototype_source)
from napari_slpd.labeling.palette import default_color, normalize_color

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------
# Propagation


def plan_propagation(
    provider,
    slide_id: str,
    proto_idx: int,
    name: str,
    targets: Sequence[str],
    color: str | None = None,
    annotations: PrototypeAnnotations | None = None,
    overwrite_user: bool = False,
    min_similarity: float | None = None,
) -> list[Change]:
    """Preview: give ``name`` to the partner of prototype ``proto_idx`` of ``slide_id`` in each target slide.

    The partner is found by the optimal one-to-one matching of the two slides' prototype sets (the
    matching behind the similar-slides ranking). A target whose partner already carries a name typed by
    a person is skipped unless ``overwrite_user``; partners less similar than ``min_similarity`` (cosine)
    are skipped. ``provider``: a Session, a Cohort or a slide_id -> SlidePrototypes function.
    """
    from napari_slpd.similarity import match_prototypes

    source = prototype_source(provider)
    annotations = annotations or PrototypeAnnotations.load(_cohort_of(provider), provider)
    name = _clean_name(name)
    src = source(slide_id)
    if src is None:
        raise PrototypeError(f"{slide_id} has no prototypes; compute them first")
    if not 0 <= int(proto_idx) < src.k:
        raise PrototypeError(f"{slide_id} has {src.k} prototypes; there is no prototype {proto_idx}")
    if color is None:
        try:
            current = annotations.label(slide_id, proto_idx, src)
        except StaleAnnotationsError:
            current = None
        color = current.color if current else default_color(proto_idx)
    color = normalize_color(color)
    changes = []
    for target in dict.fromkeys(targets):  # unique, order kept
        if target == slide_id:
            continue
        try:
            other = source(target)
        except SlpdError as exc:
            changes.append(Change(target, -1, "skip", None, reason=f"no prototypes ({exc})"))
            continue
        if other is None:
            changes.append(Change(target, -1, "skip", None, reason="no prototypes"))
            continue
        identity = prototype_identity(other.centroids)
        try:
            pairs = match_prototypes(src.centroids, other.centroids)
        except PrototypeError as exc:
            changes.append(Change(target, -1, "skip", None, reason=str(exc), identity=identity))
            continue
        partner = next((p for p in pairs if p.k == int(proto_idx)), None)
        if partner is None:
            changes.append(Change(target, -1, "skip", None, reason=(
                f"prototype {proto_idx} has no partner among its {other.k} prototypes"), identity=identity))
            continue
        l, sim = int(partner.l), float(partner.similarity)
        new = PrototypeLabel(name, color, "propagated", confidence=sim, origin=f"{slide_id}:{int(proto_idx)}")
        try:
            old = annotations.label(target, l, other)
        except StaleAnnotationsError:
            changes.append(Change(target, l, "skip", new, None, sim, reason=(
                "its names are stale (prototypes recomputed); carry them over or discard them first"),
                identity=identity))
            continue
        if old is not None and old.name == name and old.color == color:
            changes.append(Change(target, l, "unchanged", new, old, sim, identity=identity))
        elif old is not None and old.source == "user" and not overwrite_user:
            changes.append(Change(target, l, "skip", new, old, sim, reason=(
                f"prototype {l} is already named '{old.name}' by a person"), identity=identity))
        elif min_similarity is not None and sim < min_similarity:
            changes.append(Change(target, l, "skip", new, old, sim, reason=(
                f"the matched prototype {l} is too different (cosine {sim:.2f} < {min_similarity:.2f})"),
                identity=identity))
        else:
            changes.append(Change(target, l, "set", new, old, sim, identity=identity))
    return changes


