"""Use a fine-tuned region encoder: encode every slide's region embeddings from the token grids cached
in its FeatureStore (no slide is read again) as a new version beside the earlier ones, select it, then
refresh prototypes and the similar-slides index. Switching between versions afterwards is
:mod:`napari_slpd.session.versions`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from napari_slpd.errors import FeatureStoreError, SlpdError
from napari_slpd.utils.progress import ProgressFn, is_cancelled

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------
# Using a checkpoint


@dataclass
class ReencodeResult:
    slide_id: str
    status: str  # "reencoded" | "current" | "error" | "cancelled"
    n_regions: int = 0
    message: str = ""


def reencode_region_embeddings(
    cohort,
    checkpoint: str | os.PathLike,
    slide_ids: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: ProgressFn | None = None,
    cancel=None,
    region_encoder=None,
    select: bool = True,
    label: str = "",
) -> list[ReencodeResult]:
    """Compute the region embeddings of every FeatureStore of ``cohort`` with the ViT-4K ``checkpoint``.

    Region embeddings are the only cached values that depend on the region encoder; the token grids
    (patch encoder output) are read back from each file. The new embeddings are stored as a new version
    next to the existing ones (``napari_slpd.features.store``: nothing is overwritten), and with
    ``select`` made the file's selected version, whose settings (and so its ``settings_key``) name the new
    encoder: prototypes computed from other embeddings are then known to be stale. A slide that already
    holds this encoder's embeddings is not computed again ("current"). Progress is counted in regions.
    """
    from napari_slpd.features.engine import encode_regions
    from napari_slpd.features.store import (FeatureStore, add_region_embedding_version,
                                            select_region_embedding_version, version_key)

    slide_ids = list(slide_ids) if slide_ids is not None else cohort.slide_ids()
    paths = {sid: cohort.features_path(sid) for sid in slide_ids}
    present = {sid: p for sid, p in paths.items() if p.exists()}
    counts = {}
    token_dim = None
    for sid, path in present.items():
        try:
            with FeatureStore.open(path) as store:
                counts[sid] = store.n_regions
                token_dim = token_dim or store.token_dim
        except FeatureStoreError:
            counts[sid] = 0
    if not counts:
        raise FeatureStoreError(f"no slide of {cohort.root} has features yet; extract features first")
    if region_encoder is None:
        from napari_slpd.models.encoders import build_region_encoder

        region_encoder = build_region_encoder("hipt_vit4k", checkpoint=checkpoint, device=device,
                                              in_dim=int(token_dim))
    model_id = str(region_encoder.model_id)
    sha = region_encoder.checkpoint_sha256 or ""
    key = version_key(model_id, sha)
    label = label or _checkpoint_label(checkpoint)
    total = sum(counts.values())
    done = 0
    if progress:
        progress(0, total)
    results = []
    for sid in slide_ids:
        path = paths[sid]
        if sid not in present:
            results.append(ReencodeResult(sid, "error", 0, "no feature file"))
            continue
        if is_cancelled(cancel):
            results.append(ReencodeResult(sid, "cancelled"))
            continue
        try:
            with FeatureStore.open(path, expect_token_dim=getattr(region_encoder, "in_dim", None)) as store:
                n = store.n_regions
                have = {v.key: v for v in store.region_embedding_versions()}
                if key in have and have[key].region_encoder == model_id:
                    status = "current"
                else:
                    status = "reencoded"
                    tokens = store.region_tokens
                    embeddings = []
                    for start in range(0, n, batch_size):
                        if is_cancelled(cancel):
                            raise _Cancelled()
                        block = tokens[start:start + batch_size]
                        embeddings.append(encode_regions(region_encoder, block, batch_size))
                        done += len(block)
                        if progress:
                            progress(done, total)
                    emb = np.concatenate(embeddings, axis=0) if embeddings else \
                        np.zeros((0, region_encoder.dim), np.float32)
            if status == "current":
                if select:
                    select_region_embedding_version(path, key)
                results.append(ReencodeResult(sid, "current", n, "already encoded with this checkpoint"))
                done += n
                if progress:
                    progress(done, total)
                continue
            add_region_embedding_version(path, emb, model_id, sha, checkpoint=checkpoint, label=label,
                                         select=select)
            results.append(ReencodeResult(sid, "reencoded", n))
        except _Cancelled:
            results.append(ReencodeResult(sid, "cancelled", 0, "cancelled; the file keeps its earlier embeddings"))
        except SlpdError as exc:
            results.append(ReencodeResult(sid, "error", 0, str(exc)))
            log.warning("%s: %s", sid, exc)
    return results


def _checkpoint_label(checkpoint) -> str:
    """A readable name of a fine-tune checkpoint: its run folder and epoch when the file records them."""
    path = Path(checkpoint)
    label = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    try:
        import torch

        extra = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(extra, dict) and "epoch" in extra:
            label += f" (epoch {int(extra['epoch'])})"
    except Exception:  # noqa: BLE001 - the label is cosmetic
        pass
    return label


class _Cancelled(Exception):
    pass
