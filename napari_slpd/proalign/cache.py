"""ProAlign results of one slide in the cohort cache: ``Cohort.proalign_path(slide_id)`` (HDF5).

Layout::

    slide_embedding        [K * D] float32  concat_k s_k
    slide_embedding_mean   [D]     float32  mean_k s_k
    prototype_embeddings   [K, D]  float32  s_k
    visual_prototypes      [K, D]  float32  p_k
    text_prototypes        [K, D]  float32  t_k
    patch_coords           [N, 2]  int64    level-0 top-left of each patch (copied from the feature file)
    patch_labels           [N]     int32    zero-shot label = index into attrs["names"]
    patch_confidence       [N]     float32  softmax_k(cos(v_n, t_k) / tau) of the label
    patch_similarity       [N]     float32  cos(v_n, t_label)
    patch_region           [N]     int64    region index of each patch (-1: none)
    patch_attention        [N, K]  float32  softmax_n(cos(v_n, p_k) / tau) (each column sums to 1)
    region_coords          [M, 2]  int64    level-0 top-left of each region
    region_labels          [M]     int32    majority label of the region's patches (-1: no patch)
    region_vote_share      [M]     float32  fraction of its patches with that label
    region_confidence      [M]     float32  their mean confidence

Root attrs: ``names`` and ``colors`` (JSON lists, K entries), ``slide_id``, ``organ``,
``descriptions_version``, ``descriptions_sha256``, ``vlm`` (model id), ``vlm_sha256``, ``tau``,
``features_settings_key``, ``settings_key`` (hash of everything above that changes the numbers),
``patch_size_level0``, ``region_size_level0``, ``code_version``, ``complete``. The file is written to a
temporary name and renamed, so a reader never sees half a result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.utils.h5_attrs import decode_attr, encode_attr
from napari_slpd.utils.files import atomic_path

FORMAT_VERSION = 1

_ARRAYS = {
    # name: (dtype, required)
    "slide_embedding": ("float32", True),
    "slide_embedding_mean": ("float32", True),
    "prototype_embeddings": ("float32", True),
    "visual_prototypes": ("float32", True),
    "text_prototypes": ("float32", True),
    "patch_coords": ("int64", True),
    "patch_labels": ("int32", True),
    "patch_confidence": ("float32", True),
    "patch_similarity": ("float32", True),
    "patch_region": ("int64", False),
    "patch_attention": ("float32", False),
    "region_coords": ("int64", False),
    "region_labels": ("int32", False),
    "region_vote_share": ("float32", False),
    "region_confidence": ("float32", False),
}


class ProAlignCacheError(SlpdError):
    """A ProAlign result file is missing, damaged, or was made with other settings."""


@dataclass
class ProAlignResult:
    """ProAlign output for one slide (see the module docstring for the meaning of each array)."""

    slide_id: str
    names: list[str]
    colors: list[str]
    slide_embedding: np.ndarray
    slide_embedding_mean: np.ndarray
    prototype_embeddings: np.ndarray
    visual_prototypes: np.ndarray
    text_prototypes: np.ndarray
    patch_coords: np.ndarray
    patch_labels: np.ndarray
    patch_confidence: np.ndarray
    patch_similarity: np.ndarray
    patch_region: np.ndarray | None = None
    patch_attention: np.ndarray | None = None
    region_coords: np.ndarray | None = None
    region_labels: np.ndarray | None = None
    region_vote_share: np.ndarray | None = None
    region_confidence: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def patch_size_level0(self) -> float | None:
        value = self.attrs.get("patch_size_level0")
        return float(value) if value not in (None, "") else None

    @property
    def region_size_level0(self) -> float | None:
        value = self.attrs.get("region_size_level0")
        return float(value) if value not in (None, "") else None

    def patch_label_names(self) -> list[str]:
        return [self.names[i] if i >= 0 else "" for i in self.patch_labels.tolist()]

    def region_label_names(self) -> list[str]:
        if self.region_labels is None:
            return []
        return [self.names[i] if i >= 0 else "" for i in self.region_labels.tolist()]

    def label_fractions(self) -> dict[str, float]:
        """Share of the slide's patches carrying each label (a quick composition summary)."""
        counts = np.bincount(self.patch_labels.astype(np.int64), minlength=self.k)
        total = max(int(counts.sum()), 1)
        return {name: float(c) / total for name, c in zip(self.names, counts, strict=True)}

    def class_styles(self) -> dict:
        """{label index: ClassStyle(name, color)} for :mod:`napari_slpd.export` (GeoJSON, label TIFF)."""
        from napari_slpd.labeling.palette import ClassStyle

        return {k: ClassStyle(name, color) for k, (name, color) in enumerate(zip(self.names, self.colors, strict=True))}

    def region_geojson(self, slide_dimensions: tuple[int, int] | None = None) -> dict:
        """The named region-level label map as a QuPath-compatible GeoJSON FeatureCollection."""
        from napari_slpd.export.geojson import prototype_geojson

        if self.region_labels is None or self.region_coords is None or self.region_size_level0 is None:
            raise ProAlignCacheError(f"{self.slide_id}: this ProAlign result has no region-level label map")
        extra = {k: {"source": "ProAlign zero-shot", "vlm": str(self.attrs.get("vlm", ""))} for k in range(self.k)}
        return prototype_geojson(self.region_coords, self.region_size_level0, self.region_labels,
                                 self.class_styles(), slide_id=self.slide_id, slide_dimensions=slide_dimensions,
                                 extra_metadata=extra)


def write_proalign(path: str | os.PathLike, result: ProAlignResult) -> Path:
    """Write ``result`` to ``path`` atomically (temporary file + rename); returns the path."""
    import h5py

    k = len(result.names)
    if len(result.colors) != k:
        raise ProAlignCacheError(f"{len(result.colors)} colours for {k} prototype names")
    n = len(result.patch_labels)
    for name in ("patch_coords", "patch_confidence", "patch_similarity", "patch_region", "patch_attention"):
        value = getattr(result, name)
        if value is not None and len(value) != n:
            raise ProAlignCacheError(f"{result.slide_id}: {name} has {len(value)} rows for {n} patches")
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            for name, (dtype, required) in _ARRAYS.items():
                value = getattr(result, name)
                if value is None:
                    if required:
                        raise ProAlignCacheError(f"{result.slide_id}: {name} is missing")
                    continue
                fh.create_dataset(name, data=np.asarray(value, dtype=dtype))
            for key, value in result.attrs.items():
                fh.attrs[key] = encode_attr(value)
            fh.attrs["slide_id"] = result.slide_id
            fh.attrs["names"] = json.dumps(list(result.names))
            fh.attrs["colors"] = json.dumps(list(result.colors))
            fh.attrs["format_version"] = FORMAT_VERSION
            fh.attrs["complete"] = True
    return path


def read_proalign_attrs(path: str | os.PathLike) -> dict:
    """Root attributes of a result file (no arrays read)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise ProAlignCacheError(f"no ProAlign result at {path}; run `slpd proalign` for this cohort first")
    try:
        with h5py.File(path, "r") as fh:
            return {key: decode_attr(fh.attrs[key]) for key in fh.attrs.keys()}
    except OSError as exc:
        raise ProAlignCacheError(f"ProAlign result {path} is damaged ({exc}); delete it and run again") from None


def load_proalign(path: str | os.PathLike, with_attention: bool = True) -> ProAlignResult:
    """Read a result file written by :func:`write_proalign`."""
    import h5py

    path = Path(path)
    attrs = read_proalign_attrs(path)
    if not attrs.get("complete"):
        raise ProAlignCacheError(f"ProAlign result {path} is incomplete; run `slpd proalign` again")
    try:
        names = json.loads(attrs.pop("names"))
        colors = json.loads(attrs.pop("colors"))
    except (KeyError, ValueError):
        raise ProAlignCacheError(f"ProAlign result {path} lacks valid names/colors attributes") from None
    arrays: dict[str, np.ndarray | None] = {}
    try:
        with h5py.File(path, "r") as fh:
            for name, (_, required) in _ARRAYS.items():
                if name not in fh or (name == "patch_attention" and not with_attention):
                    if required:
                        raise ProAlignCacheError(f"ProAlign result {path} lacks {name}; run `slpd proalign` again")
                    arrays[name] = None
                    continue
                value = fh[name][()]
                arrays[name] = value
    except OSError as exc:
        raise ProAlignCacheError(f"ProAlign result {path} is damaged ({exc}); delete it and run again") from None
    slide_id = str(attrs.pop("slide_id", path.stem))
    return ProAlignResult(slide_id=slide_id, names=list(names), colors=list(colors), attrs=attrs, **arrays)


def is_current(path: str | os.PathLike, settings_key: str) -> bool:
    """Whether a complete result made with ``settings_key`` already sits at ``path``."""
    try:
        attrs = read_proalign_attrs(path)
    except ProAlignCacheError:
        return False
    return bool(attrs.get("complete")) and attrs.get("settings_key") == settings_key


def load_cohort_embeddings(cohort, slide_ids=None, mean: bool = False) -> tuple[list[str], np.ndarray]:
    """Slide embeddings of a cohort's ProAlign results: (slide ids, [S, K*D] or [S, D] with ``mean``).

    Slides without a result are left out; all results must come from one description set and VLM.
    """
    ids, rows, keys = [], [], set()
    for slide_id in (slide_ids if slide_ids is not None else cohort.slide_ids()):
        path = cohort.proalign_path(slide_id)
        if not path.exists():
            continue
        result = load_proalign(path, with_attention=False)
        keys.add((result.attrs.get("descriptions_sha256"), result.attrs.get("vlm_sha256"), tuple(result.names)))
        ids.append(slide_id)
        rows.append(result.slide_embedding_mean if mean else result.slide_embedding)
    if len(keys) > 1:
        raise ProAlignCacheError(
            "the cohort's ProAlign results were made with different descriptions or models; run "
            "`slpd proalign --overwrite` with one setting"
        )
    if not rows:
        return [], np.zeros((0, 0), np.float32)
    return ids, np.stack(rows).astype(np.float32)
