"""Make a fine-tuned checkpoint the cohort's region encoder: re-encode every slide from its cached token grids
(:func:`napari_slpd.features.reencode.reencode_region_embeddings`), then switch the cohort to that version with
its prototypes, names and index (:func:`napari_slpd.session.versions.activate`). Switching back is
:func:`napari_slpd.session.versions.use_region_encoder`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from napari_slpd.errors import CheckpointError, FeatureStoreError, SlpdError
from napari_slpd.features.reencode import ReencodeResult, reencode_region_embeddings
from napari_slpd.utils.progress import ProgressFn, progress_span


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
    earlier versions stay: :func:`napari_slpd.session.versions.use_region_encoder` switches back
    instantly), then selects it everywhere, switches the session's feature settings to the new encoder (so
    later extractions use it too), recomputes every slide's prototypes and the cohort index. The
    prototypes of the version left are kept for switching back. Prototype names given before are carried
    to the new prototypes by region overlap when ``carry_names`` (see
    :meth:`napari_slpd.labeling.names.PrototypeAnnotations.carry_over`).

    Progress: encoding is the first 80 %, prototypes and index the rest (in thousandths). A cancelled run
    selects nothing (every slide keeps its embeddings); the slides encoded so far are skipped next time.
    """
    from napari_slpd.features.store import version_key
    from napari_slpd.session.versions import activate, find_region_encoder, selected_region_encoder

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

    results = reencode_region_embeddings(cohort, checkpoint, device=fs.device, cancel=cancel, region_encoder=encoder,
                                         progress=progress_span(progress, 0, 800, unit), select=False)
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
