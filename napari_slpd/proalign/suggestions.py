"""ProAlign's zero-shot names as suggestions for a slide's prototypes: the label most of a prototype's
patches carry, with its share and confidence (accepting them is :func:`napari_slpd.labeling.accept_suggestions`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.labeling.names import _cohort_of, prototype_source
from napari_slpd.labeling.palette import default_color, normalize_color
from napari_slpd.labeling.suggestions import NameSuggestion

__all__ = ["load_suggestions", "proalign_suggestions"]


def proalign_suggestions(result, protos) -> list[NameSuggestion]:
    """Zero-shot names of a slide's prototypes from its ProAlign result (napari_slpd.proalign).

    Patch labels are counted per prototype through each patch's region (``patch_region``); without them
    the region-level labels are used. Both results must come from the same feature file (same regions).
    """
    assignments = np.asarray(protos.assignments, dtype=np.int64)
    n_regions = len(assignments)
    coords = getattr(protos, "coords", None)
    if result.region_coords is not None and coords is not None:
        if len(result.region_coords) != n_regions or not np.array_equal(
                np.asarray(result.region_coords, np.int64), np.asarray(coords, np.int64)):
            raise SlpdError(
                f"the ProAlign result of {result.slide_id} was computed on other regions than its prototypes; "
                "run ProAlign again on the current features"
            )
    n_names = len(result.names)
    if result.patch_region is not None:
        region = np.asarray(result.patch_region, dtype=np.int64)
        keep = (region >= 0) & (region < n_regions)
        proto = assignments[region[keep]]
        labels = np.asarray(result.patch_labels, dtype=np.int64)[keep]
        conf = np.asarray(result.patch_confidence, dtype=np.float64)[keep]
    elif result.region_labels is not None:
        labels = np.asarray(result.region_labels, dtype=np.int64)
        keep = labels >= 0
        if len(labels) != n_regions:
            raise SlpdError(f"the ProAlign result of {result.slide_id} has {len(labels)} regions, not {n_regions}")
        proto, labels = assignments[keep], labels[keep]
        conf = np.asarray(result.region_confidence, dtype=np.float64)[keep]
    else:
        raise SlpdError(f"the ProAlign result of {result.slide_id} maps no patch to a region")
    k = protos.k
    votes = np.zeros((k, n_names))
    conf_sum = np.zeros((k, n_names))
    np.add.at(votes, (proto, labels), 1)
    np.add.at(conf_sum, (proto, labels), conf)
    suggestions = []
    for i in range(k):
        total = votes[i].sum()
        if total == 0:
            continue
        order = np.argsort(-votes[i], kind="stable")
        best = int(order[0])
        share = float(votes[i, best] / total)
        mean_conf = float(conf_sum[i, best] / votes[i, best])
        runner = result.names[int(order[1])] if n_names > 1 and votes[i, order[1]] > 0 else ""
        color = result.colors[best] if best < len(result.colors) and result.colors[best] else default_color(i)
        suggestions.append(NameSuggestion(i, result.names[best], normalize_color(color), share * mean_conf, share,
                                          mean_conf, runner))
    return suggestions


def load_suggestions(provider, slide_id: str) -> list[NameSuggestion]:
    """ProAlign suggestions for a slide from the cohort cache (ProAlignCacheError when it has none)."""
    from napari_slpd.proalign.cache import load_proalign

    cohort = _cohort_of(provider)
    path = cohort.proalign_path(slide_id)
    if not Path(path).exists():
        from napari_slpd.proalign.cache import ProAlignCacheError

        raise ProAlignCacheError(f"{slide_id} has no ProAlign result yet; run ProAlign on the cohort first")
    result = load_proalign(path, with_attention=False)
    protos = prototype_source(provider)(slide_id)
    if protos is None:
        raise PrototypeError(f"{slide_id} has no prototypes; compute them first")
    return proalign_suggestions(result, protos)
