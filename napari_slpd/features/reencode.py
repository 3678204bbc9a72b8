"""Use a fine-tuned region encoder: re-encode every slide's region embeddings from the token grids cached
in its FeatureStore (no slide is read again), then refresh prototypes and the similar-slides index."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from napari_slpd.errors import CheckpointError, FeatureStoreError, SlpdError
from napari_slpd.utils.files import atomic_path
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
) -> list[ReencodeResult]:
    """Recompute the region embeddings of every FeatureStore of ``cohort`` with the ViT-4K ``checkpoint``.

    Region embeddings are the only cached values that depend on the region encoder; the token grids
    (patch encoder output) are read back from each file. Each file is rewritten through a copy that
    replaces it atomically, with its settings (and so its ``settings_key``) updated to the new encoder,
    so prototypes computed from the old embeddings are known to be stale. Progress is counted in regions.
    """
    import h5py

    from napari_slpd.features.engine import encode_regions
    from napari_slpd.features.store import FeatureStore, settings_key

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
                attrs = dict(store.attrs)
                n = store.n_regions
            if attrs.get("region_encoder_sha256") == (region_encoder.checkpoint_sha256 or "") and \
                    attrs.get("region_encoder") == str(region_encoder.model_id):
                results.append(ReencodeResult(sid, "current", n, "already encoded with this checkpoint"))
                done += n
                if progress:
                    progress(done, total)
                continue
            settings = attrs.get("settings") or {}
            if isinstance(settings, str):
                try:
                    settings = json.loads(settings)
                except json.JSONDecodeError:
                    settings = {}
            if not settings:
                raise FeatureStoreError(f"{path} does not record its extraction settings; extract it again")
            settings["region_encoder"] = str(region_encoder.model_id)
            settings["region_encoder_sha256"] = region_encoder.checkpoint_sha256 or ""
            new_key = settings_key(settings)
            with atomic_path(path, suffix=".reencode.partial") as tmp:
                shutil.copyfile(path, tmp)
                with h5py.File(tmp, "r+") as fh:
                    tokens = fh["region_tokens"]
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
                    old = fh["region_embeddings"]
                    if old.shape != emb.shape:
                        chunks = old.chunks
                        del fh["region_embeddings"]
                        fh.create_dataset("region_embeddings", data=emb, dtype="float32",
                                          maxshape=(None, emb.shape[1]),
                                          chunks=(max(1, min(256, 65536 // emb.shape[1])), emb.shape[1])
                                          if chunks else None)
                    else:
                        old[...] = emb
                    previous = f"{attrs.get('region_encoder', '?')}"
                    fh.attrs["region_encoder"] = settings["region_encoder"]
                    fh.attrs["region_encoder_sha256"] = settings["region_encoder_sha256"]
                    fh.attrs["region_encoder_checkpoint"] = str(Path(checkpoint).resolve())
                    fh.attrs["reencoded_from"] = previous
                    fh.attrs["settings"] = json.dumps(settings, sort_keys=True)
                    fh.attrs["settings_key"] = new_key
                    run_settings = attrs.get("run_settings") or {}
                    if isinstance(run_settings, str):
                        try:
                            run_settings = json.loads(run_settings)
                        except json.JSONDecodeError:
                            run_settings = {}
                    fh.attrs["run_key"] = settings_key({"settings_key": new_key, **run_settings})
            results.append(ReencodeResult(sid, "reencoded", n))
        except _Cancelled:
            results.append(ReencodeResult(sid, "cancelled", 0, "cancelled; the file keeps its earlier embeddings"))
        except SlpdError as exc:
            results.append(ReencodeResult(sid, "error", 0, str(exc)))
            log.warning("%s: %s", sid, exc)
    return results


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
            text += " (cancelled: slides not done keep their earlier embeddings)"
        return text


def use_checkpoint(
    session,
    checkpoint: str | os.PathLike,
    progress: ProgressFn | None = None,
    cancel=None,
    carry_names: bool = True,
) -> UseCheckpointReport:
    """Make ``checkpoint`` (an exported teacher ViT-4K) the region encoder of the session's cohort.

    Re-encodes region embeddings from the cached token grids, switches the session's feature settings to
    the new encoder (so later extractions use it too), recomputes every slide's prototypes and the
    cohort index. Prototype names given before are carried to the new prototypes by region overlap when
    ``carry_names`` (see :meth:`napari_slpd.labeling.names.PrototypeAnnotations.carry_over`).

    Progress: re-encoding is the first 80 %, prototypes and index the rest (in thousandths).
    """
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
    unit = 1000

    def stage(lo, hi):
        def report(done, total):
            if progress and total > 0:
                progress(int(lo + (hi - lo) * done / total), unit)
        return report

    results = reencode_region_embeddings(cohort, checkpoint, device=fs.device, progress=stage(0, 800),
                                         cancel=cancel, region_encoder=encoder)
    cancelled = any(r.status == "cancelled" for r in results)
    protos: dict[str, str] = {}
    n_index = 0
    names: dict[str, str] = {}
    if not cancelled:
        # Only once every slide is re-encoded does the cohort switch encoders (a cancelled run keeps the
        # slides done so far; running it again skips them).
        from dataclasses import replace

        session.settings.features = replace(fs, region_encoder="hipt_vit4k", region_checkpoint=str(checkpoint))
        protos = session.ensure_prototypes(progress=stage(800, 950), cancel=cancel)
        index = session.index(progress=stage(950, 1000), cancel=cancel)
        n_index = _index_size(index)
        if before is not None:
            names = before.carry_over(session)
    if progress:
        progress(unit, unit)
    return UseCheckpointReport(str(checkpoint), results, protos, n_index, names, cancelled)


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
