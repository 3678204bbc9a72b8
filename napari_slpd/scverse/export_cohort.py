"""The cohort as one AnnData for scanpy: one row per slide (``X`` = a slide representation of
:mod:`napari_slpd.evaluation.representations`, ``region_mean`` by default), ``obs`` = the slide's record
(path, pixel size, encoders, counts, the path of its exported zarr for ``wsidata.agg_wsi`` /
``concat_feature_anndata`` with ``store_col="store"``) and the columns of a labels table, ``obsm`` = the
other vector representations asked for, and ``uns["prototypes"]`` = each slide's prototype set (centroids,
sizes, names), which a fixed-width matrix cannot hold since K varies by slide. Needs the scverse extra.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.scverse import require_scverse

log = logging.getLogger(__name__)


def _prototype_sets(cohort, slide_ids: list[str]) -> dict:
    from napari_slpd.labeling.names import PrototypeAnnotations
    from napari_slpd.labeling.palette import default_name
    from napari_slpd.prototypes.cache import load_prototypes

    try:
        annotations = PrototypeAnnotations.load(cohort)
    except SlpdError:
        annotations = None
    out = {}
    for slide_id in slide_ids:
        if not cohort.prototypes_path(slide_id).exists():
            continue
        try:
            protos = load_prototypes(cohort, slide_id)
        except SlpdError as exc:
            log.warning("%s: prototypes left out of the cohort table (%s)", slide_id, exc)
            continue
        names = [default_name(k) for k in range(protos.k)]
        if annotations is not None:
            try:
                styles = annotations.class_styles(slide_id, protos)
                names = [styles[k].name for k in range(protos.k)]
            except SlpdError:
                pass
        out[slide_id] = {"centroids": np.asarray(protos.centroids, np.float32),
                         "sizes": np.asarray(protos.sizes, np.float64), "names": np.asarray(names, dtype=object),
                         "source": str(protos.source)}
    return out


def _slide_rows(cohort, slide_ids: list[str], stores: dict[str, Path]) -> dict[str, list]:
    from napari_slpd.features.store import read_store_attrs

    rows = {"slide_id": [], "path": [], "mpp": [], "patch_encoder": [], "region_encoder": [], "store": []}
    for slide_id in slide_ids:
        attrs = read_store_attrs(cohort.features_path(slide_id))
        try:
            path = str(cohort.slide(slide_id).path)
        except SlpdError:
            path = str(attrs.get("slide_path") or "")
        mpp = attrs.get("mpp")
        rows["slide_id"].append(slide_id)
        rows["path"].append(path)
        rows["mpp"].append(float(mpp) if mpp not in (None, "") else np.nan)
        rows["patch_encoder"].append(str(attrs.get("patch_encoder") or ""))
        rows["region_encoder"].append(str(attrs.get("region_encoder") or ""))
        rows["store"].append(str(stores.get(slide_id, "")))
    return rows


def cohort_anndata(cohort, slide_ids: list[str] | None = None, representation: str = "region_mean",
                   also: tuple[str, ...] = (), labels_path: str | os.PathLike | None = None,
                   stores: dict[str, Path] | None = None, progress=None):
    """The AnnData of the module docstring for ``slide_ids`` (default: every slide with features)."""
    require_scverse("the cohort AnnData", ("anndata",))
    import pandas as pd
    from anndata import AnnData

    from napari_slpd.evaluation.representations import VECTOR, load_representation
    from napari_slpd.scverse.export_slide import plain_strings

    if slide_ids is None:
        slide_ids = [s for s in cohort.slide_ids() if cohort.features_path(s).exists()]
    if not slide_ids:
        raise SlpdError(f"cohort {cohort.root} has no slide with features to export")
    rep = load_representation(cohort, representation, list(slide_ids), progress=progress)
    if VECTOR not in rep.kinds:
        raise SlpdError(f"representation {representation!r} is not one vector per slide; choose a vector "
                        "representation (region_mean, patch_mean, panther, proalign_mean, ...)")
    for slide_id, why in rep.missing.items():
        log.warning("%s left out of the cohort table: %s", slide_id, why)
    ids = list(rep.slide_ids)
    rows = _slide_rows(cohort, ids, stores or {})
    obs = pd.DataFrame(rows, index=pd.Index(np.asarray(ids, dtype=object), dtype=object))
    if labels_path is not None:
        from napari_slpd.evaluation.labels import read_labels

        table = read_labels(labels_path)
        position = {s: i for i, s in enumerate(table.slide_ids)}
        at = [position.get(s, -1) for s in ids]
        for name, values in table.columns.items():
            column = [values[i] if i >= 0 else None for i in at]
            task = table.tasks.get(name)
            if task is not None and task.kind == "classification":
                obs[name] = pd.Categorical(column, categories=list(task.classes))
            else:
                obs[name] = np.asarray([("" if v is None else str(v)) for v in column], dtype=object)
        if table.survival is not None:
            time, event = table.survival
            obs["survival_time"] = [float(time[i]) if i >= 0 else np.nan for i in at]
            obs["survival_event"] = [float(event[i]) if i >= 0 else np.nan for i in at]
        unmatched = sum(1 for i in at if i < 0)
        if unmatched:
            log.warning("%d slide(s) have no row in %s", unmatched, labels_path)
    adata = AnnData(X=np.asarray(rep.vectors, np.float32), obs=obs)
    for name in also:
        other = load_representation(cohort, name, ids, progress=progress)
        if VECTOR not in other.kinds:
            raise SlpdError(f"representation {name!r} is not one vector per slide")
        position = {s: i for i, s in enumerate(other.slide_ids)}
        dim = other.vectors.shape[1]
        block = np.full((len(ids), dim), np.nan, np.float32)
        for row, s in enumerate(ids):
            if s in position:
                block[row] = other.vectors[position[s]]
        adata.obsm[f"X_{name}"] = block
    sets = _prototype_sets(cohort, ids)
    if sets:
        adata.uns["prototypes"] = sets
        adata.obs["n_prototypes"] = [int(len(sets[s]["sizes"])) if s in sets else 0 for s in ids]
    from napari_slpd import __version__

    adata.uns["napari_slpd"] = {"cohort": str(cohort.root), "representation": representation,
                                "description": rep.description, "code_version": __version__}
    return plain_strings(adata)


def write_cohort_anndata(adata, path: str | os.PathLike) -> Path:
    """Write ``adata`` as .h5ad atomically."""
    from napari_slpd.utils.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path


__all__ = ["cohort_anndata", "write_cohort_anndata"]
