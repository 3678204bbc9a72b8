"""ProAlign over a cohort: cached patch features -> slide embeddings and named label maps in the cache.

Per slide: open its FeatureStore, check that the patch features come from the VLM's image tower, run the
two streamed passes of :func:`napari_slpd.proalign.core.align_slide`, map patch labels to the regions of
the feature file (majority vote) and write everything to ``Cohort.proalign_path(slide_id)`` atomically.
A slide whose result was made with the same settings is skipped unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.proalign.cache import (
    FORMAT_VERSION,
    ProAlignResult,
    is_current,
    write_proalign,
)
from napari_slpd.proalign.core import (
    Cancelled,
    ProAlignConfig,
    TextPrototypes,
    align_slide,
    is_cancelled,
    patch_region_index,
    region_labels,
    text_prototypes,
)

log = logging.getLogger(__name__)


@dataclass
class SlideOutcome:
    """What happened to one slide: ``status`` is "written", "skipped" (up to date), "failed" (see
    ``message``) or "cancelled" (nothing written for it)."""

    slide_id: str
    status: str
    path: Path
    message: str = ""
    n_patches: int = 0
    seconds: float = 0.0


def proalign_settings_key(text_protos: TextPrototypes, config: ProAlignConfig, vlm_sha256: str | None,
                          features_settings_key: str) -> str:
    """Hash of everything that changes a slide's result (and of the names/colours written with it)."""
    settings = {
        "format_version": FORMAT_VERSION,
        "vlm": text_protos.model_id,
        "vlm_sha256": vlm_sha256 or "",
        "descriptions_sha256": text_protos.descriptions_sha256,
        "names": list(text_protos.names),
        "colors": list(text_protos.colors),
        "tau": float(config.tau),
        "features_settings_key": features_settings_key,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def align_store(store, text_protos: TextPrototypes, config: ProAlignConfig | None = None,
                vlm_sha256: str | None = None, progress=None, cancel=None, vlm=None) -> ProAlignResult:
    """ProAlign one slide from its open FeatureStore (patch features already checked against the VLM).
    ``vlm`` maps the cached features into its joint space where they are stored before a projection."""
    from napari_slpd import __version__

    config = config or ProAlignConfig()
    features = store.features
    if features is None:
        raise SlpdError(f"{store.path} holds no patch features; extract with patch features kept")
    joint = getattr(vlm, "joint_features", None)
    if joint is not None:
        features = joint(features)
    alignment = align_slide(features, text_protos, config, return_attention=True, progress=progress, cancel=cancel)
    coords = store.coords
    n_regions = int(store.n_regions)
    region_coords = store.region_coords
    region_size = store.region_size_level0
    patch_region = patch_region_index(coords, region_coords, region_size, store.grid_size ** 2)
    regions = region_labels(alignment.labels, alignment.confidence, patch_region, n_regions, text_protos.k)
    coords_attrs = store.coords_attrs
    patch_size_level0 = coords_attrs.get("patch_size_level0", store.attrs.get("patch_size_level0", ""))
    attrs = {
        "organ": text_protos.organ,
        "descriptions_version": text_protos.version,
        "descriptions_sha256": text_protos.descriptions_sha256,
        "vlm": text_protos.model_id,
        "vlm_sha256": vlm_sha256 or "",
        "tau": float(config.tau),
        "features_settings_key": store.settings_key,
        "settings_key": proalign_settings_key(text_protos, config, vlm_sha256, store.settings_key),
        "patch_size_level0": patch_size_level0,
        "region_size_level0": float(region_size),
        "slide_path": store.attrs.get("slide_path", ""),
        "code_version": __version__,
    }
    return ProAlignResult(
        slide_id=store.slide_id,
        names=list(text_protos.names),
        colors=list(text_protos.colors),
        slide_embedding=alignment.slide_embedding,
        slide_embedding_mean=alignment.slide_embedding_mean,
        prototype_embeddings=alignment.prototype_embeddings,
        visual_prototypes=alignment.visual_prototypes,
        text_prototypes=np.asarray(text_protos.embeddings, np.float32),
        patch_coords=coords,
        patch_labels=alignment.labels,
        patch_confidence=alignment.confidence,
        patch_similarity=alignment.similarity,
        patch_region=patch_region,
        patch_attention=alignment.attention,
        region_coords=region_coords,
        region_labels=regions.labels,
        region_vote_share=regions.vote_share,
        region_confidence=regions.confidence,
        attrs=attrs,
    )


def run_proalign(cohort, vlm, descriptions, config: ProAlignConfig | None = None,
                 slide_ids: Iterable[str] | None = None, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None, cancel=None,
                 on_slide: Callable[[SlideOutcome], None] | None = None) -> list[SlideOutcome]:
    """Run ProAlign for the cohort's slides (all, or ``slide_ids``), writing results into its cache.

    ``vlm``: a :class:`~napari_slpd.proalign.vlm.VisionLanguageModel`; ``descriptions``: a
    :class:`~napari_slpd.proalign.descriptions.PrototypeDescriptions`. ``progress(done, total)`` counts
    slides; ``cancel`` stops within the current slide (nothing half-written); ``on_slide`` sees each outcome.
    A slide that cannot be processed (no features, features from another encoder) is reported as "failed"
    and the others go on.
    """
    from napari_slpd.errors import FeatureStoreError
    from napari_slpd.features.store import FeatureStore

    config = config or ProAlignConfig()
    text_protos = text_prototypes(descriptions, vlm)
    ids = list(slide_ids) if slide_ids is not None else cohort.slide_ids()
    known = set(cohort.slide_ids())
    unknown = [s for s in ids if s not in known]
    if unknown:
        raise SlpdError(f"slide(s) {', '.join(unknown)} are not in cohort {cohort.root}")
    outcomes: list[SlideOutcome] = []
    for i, slide_id in enumerate(ids):
        out_path = cohort.proalign_path(slide_id)
        t0 = time.perf_counter()
        if is_cancelled(cancel):
            outcome = SlideOutcome(slide_id, "cancelled", out_path, "cancelled before this slide")
        else:
            try:
                outcome = _run_one(cohort, slide_id, out_path, vlm, text_protos, config, overwrite, cancel,
                                   FeatureStore)
            except Cancelled:
                outcome = SlideOutcome(slide_id, "cancelled", out_path, "cancelled; nothing written for this slide")
            except FeatureStoreError as exc:
                outcome = SlideOutcome(slide_id, "failed", out_path, str(exc))
        outcome.seconds = time.perf_counter() - t0
        log.info("%s: %s %s", slide_id, outcome.status, outcome.message)
        outcomes.append(outcome)
        if on_slide:
            on_slide(outcome)
        if progress:
            progress(i + 1, len(ids))
    return outcomes


def _run_one(cohort, slide_id, out_path, vlm, text_protos, config, overwrite, cancel, FeatureStore) -> SlideOutcome:
    with FeatureStore.open(cohort.features_path(slide_id)) as store:
        vlm.check_feature_store(store)
        key = proalign_settings_key(text_protos, config, vlm.checkpoint_sha256, store.settings_key)
        n = int(store.features.shape[0])
        if not overwrite and is_current(out_path, key):
            return SlideOutcome(slide_id, "skipped", out_path, "already computed with the same settings", n)
        result = align_store(store, text_protos, config, vlm.checkpoint_sha256, cancel=cancel, vlm=vlm)
    write_proalign(out_path, result)
    top = sorted(result.label_fractions().items(), key=lambda kv: -kv[1])[:3]
    summary = ", ".join(f"{name} {share:.0%}" for name, share in top)
    return SlideOutcome(slide_id, "written", out_path, f"{n} patches; {summary}", n)
