"""Use a fine-tuned region encoder: encode every slide's region embeddings from the token grids cached
in its FeatureStore (no slide is read again) as a new version beside the earlier ones, select it, then
refresh prototypes and the similar-slides index. Switching between versions afterwards is
:mod:`napari_slpd.features.versions`."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from napari_slpd.errors import CheckpointError, FeatureStoreError, SlpdError
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


@dataclass
class UseCheckpointReport:
    checkpoint: str
    reencoded: list[ReencodeResult]
    prototypes: dict[str, str]  # slide_id -> "ok" or why it has none
    index_slides: int
    names: dict[str, str] = field(default_factory=dict)  # slide_id -> what happened to its prototype names
    cancelled: bool = False
    previous_version: str | None = None  # region-embedding version selected before (switch back to it)
    version: str = ""  # the checkpoint's version key
    label: str = ""

    def summary(self) -> str:
        n_re = sum(r.status == "reencoded" for r in self.reencoded)
        n_cur = sum(r.status == "current" for r in self.reencoded)
        errors = [f"{r.slide_id}: {r.message}" for r in self.reencoded if r.status == "error"]
        ok = sum(v == "ok" for v in self.prototypes.values())
        text = (f"{n_re} slides re-encoded ({n_cur} already current) with {Path(self.checkpoint).name}; "
                f"prototypes of {ok} slides refreshed; similar-slides index over {self.index_slides} slides")
        if self.names:
            text += f"; names: {'; '.join(f'{k}: {v}' for k, v in sorted(self.names.items()))}"
        if errors:
            text += f"; problems: {'; '.join(errors)}"
        if self.cancelled:
            text += " (cancelled: every slide keeps its earlier embeddings)"
        elif self.previous_version and self.previous_version != self.version:
            text += f"; the earlier region embeddings ({self.previous_version}) are kept: switch back any time"
        return text


def use_checkpoint(
    session,
    checkpoint: str | os.PathLike,
    progress: ProgressFn | None = None,
    cancel=None,
    carry_names: bool = True,
) -> UseCheckpointReport:
    """Make ``checkpoint`` (an exported teacher ViT-4K) the region encoder of the session's cohort.

    Encodes region embeddings from the cached token grids as a new version in each feature file (the
    earlier versions stay: :func:`napari_slpd.features.versions.use_region_encoder` switches back
    instantly), then selects it everywhere, switches the session's feature settings to the new encoder (so
    later extractions use it too), recomputes every slide's prototypes and the cohort index. The
    prototypes of the version left are kept for switching back. Prototype names given before are carried
    to the new prototypes by region overlap when ``carry_names`` (see
    :meth:`napari_slpd.labeling.names.PrototypeAnnotations.carry_over`).

    Progress: encoding is the first 80 %, prototypes and index the rest (in thousandths). A cancelled run
    selects nothing (every slide keeps its embeddings); the slides encoded so far are skipped next time.
    """
    from napari_slpd.features.store import version_key
    from napari_slpd.features.versions import activate, find_region_encoder, selected_region_encoder

    checkpoint = Path(checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    cohort = session.cohort
    fs = session.settings.features
    from napari_slpd.models.encoders import build_region_encoder

    # Fail on a bad checkpoint before touching any file.
    encoder = build_region_encoder("hipt_vit4k", checkpoint=checkpoint, device=fs.device, in_dim=_token_dim(cohort))
    before = None
    if carry_names:
        from napari_slpd.labeling import PrototypeAnnotations

        # Names are stored with the region assignments they were given on, which is all carrying them
        # over to the new prototypes needs.
        before = PrototypeAnnotations.load(cohort, session)
    previous = selected_region_encoder(cohort)
    unit = 1000

    def stage(lo, hi):
        def report(done, total):
            if progress and total > 0:
                progress(int(lo + (hi - lo) * done / total), unit)
        return report

    results = reencode_region_embeddings(cohort, checkpoint, device=fs.device, progress=stage(0, 800),
                                         cancel=cancel, region_encoder=encoder, select=False)
    cancelled = any(r.status == "cancelled" for r in results)
    protos: dict[str, str] = {}
    n_index = 0
    names: dict[str, str] = {}
    key = version_key(str(encoder.model_id), encoder.checkpoint_sha256 or "")
    if not cancelled:
        # Only once every slide is encoded does the cohort switch encoders.
        _, _, _, _, protos, n_index, names = activate(
            session, key, progress=progress, cancel=cancel, carry_names=carry_names, names_before=before, lo=800)
    if progress:
        progress(unit, unit)
    label = ""
    try:
        label = find_region_encoder(cohort, key).label
    except SlpdError:
        pass
    return UseCheckpointReport(str(checkpoint), results, protos, n_index, names, cancelled,
                               previous_version=previous, version=key, label=label)


def _token_dim(cohort) -> int:
    from napari_slpd.features.store import FeatureStore

    for sid in cohort.slide_ids():
        path = cohort.features_path(sid)
        if path.exists():
            try:
                with FeatureStore.open(path) as store:
                    return int(store.token_dim)
            except FeatureStoreError:
                continue
    raise FeatureStoreError(f"no slide of {cohort.root} has complete features; extract features first")


def _index_size(index) -> int:
    for attr in ("slide_ids", "members", "ids"):
        value = getattr(index, attr, None)
        if value is not None:
            with contextlib.suppress(TypeError):
                return len(value() if callable(value) else value)
    with contextlib.suppress(TypeError):
        return len(index)
    return 0
