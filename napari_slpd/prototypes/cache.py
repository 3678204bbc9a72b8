"""The cohort's prototype cache: one HDF5 file per slide at ``Cohort.prototypes_path(slide_id)``.

Layout::

    centroids    [K, E] float32   L2-normalized prototypes, largest first
    assignments  [M] int16/int32  prototype of each region (or patch)
    similarity   [M] float32      cosine of each region to its prototype
    sizes        [K] float64      fraction of tissue in each prototype
    coords       [M, 2] int64     level-0 (x, y) top-left of each region (or patch), for label maps
    attrs: format, format_version, slide_id, source, k, k_requested, seed, niter, nredo, min_regions,
           features_settings_key, tile_size_level0, dim, n_regions, note, code_version, created

A file is written to a temporary name and renamed (atomic); a slide that fails (NaNs, too few regions)
keeps whatever file it had. A file is *current* when it was made with the same K, seed, niter, nredo and
source from features with the same ``settings_key``: re-extracted features make it stale.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_slpd.errors import FeatureStoreError, PrototypeError
from napari_slpd.utils.h5_attrs import decode_attr
from napari_slpd.utils.files import atomic_path
from napari_slpd.utils.progress import is_cancelled
from napari_slpd.prototypes.kmeans import (
    DEFAULT_K,
    KMEANS_NITER,
    KMEANS_NREDO,
    KMEANS_SEED,
    SlidePrototypes,
    compute_prototypes,
)

log = logging.getLogger(__name__)

FORMAT = "napari-slpd-prototypes"
FORMAT_VERSION = 1
SOURCES = ("region_embeddings", "features")


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise PrototypeError(
            f"prototype source must be one of {', '.join(SOURCES)} (region embeddings, or patch features), "
            f"not {source!r}"
        )
    return source


# -- one file ----------------------------------------------------------------------------------------------


def save_prototypes(path: str | os.PathLike, protos: SlidePrototypes, min_regions: int | None = None) -> Path:
    """Write ``protos`` (with its slide_id, source, coords, tile size and features key) atomically."""
    import h5py

    from napari_slpd import __version__

    path = Path(path)
    assign_dtype = np.int16 if protos.k < np.iinfo(np.int16).max else np.int32
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("centroids", data=np.asarray(protos.centroids, np.float32))
            fh.create_dataset("assignments", data=np.asarray(protos.assignments, assign_dtype))
            fh.create_dataset("similarity", data=np.asarray(protos.similarity, np.float32))
            fh.create_dataset("sizes", data=np.asarray(protos.sizes, np.float64))
            if protos.coords is not None:
                fh.create_dataset("coords", data=np.asarray(protos.coords, np.int64))
            attrs = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "slide_id": protos.slide_id or path.stem,
                "source": protos.source or "",
                "k": protos.k,
                "k_requested": int(protos.k_requested),
                "seed": int(protos.seed),
                "niter": int(protos.niter),
                "nredo": int(protos.nredo),
                "min_regions": -1 if min_regions is None else int(min_regions),
                "features_settings_key": protos.features_settings_key or "",
                "tile_size_level0": float(protos.tile_size_level0 or 0.0),
                "dim": protos.dim,
                "n_regions": protos.n_regions,
                "note": protos.note,
                "code_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            fh.attrs.update(attrs)
    return path


def read_attrs(path: str | os.PathLike) -> dict:
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: decode_attr(v) for k, v in fh.attrs.items()}
    except OSError as exc:
        raise PrototypeError(f"prototypes file {path} is damaged ({exc}); run `slpd prototypes` again") from exc
    if attrs.get("format") != FORMAT:
        raise PrototypeError(f"{path} is not a napari-slpd prototypes file")
    return attrs


def read_centroids(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Only the prototypes [K, E] and the attributes of a prototypes file (what the cohort index needs)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise PrototypeError(f"prototypes file {path} does not exist; run `slpd prototypes` first")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: decode_attr(v) for k, v in fh.attrs.items()}
            centroids = np.asarray(fh["centroids"][()], np.float32)
    except (OSError, KeyError) as exc:
        raise PrototypeError(f"prototypes file {path} is damaged ({exc}); run `slpd prototypes` again") from exc
    if attrs.get("format") != FORMAT:
        raise PrototypeError(f"{path} is not a napari-slpd prototypes file")
    return centroids, attrs


def read_prototypes(path: str | os.PathLike) -> SlidePrototypes:
    import h5py

    path = Path(path)
    if not path.exists():
        raise PrototypeError(f"prototypes file {path} does not exist; run `slpd prototypes` first")
    attrs = read_attrs(path)
    try:
        with h5py.File(path, "r") as fh:
            data = {name: fh[name][()] for name in ("centroids", "assignments", "similarity", "sizes")}
            coords = np.asarray(fh["coords"][()], np.int64) if "coords" in fh else None
    except (OSError, KeyError) as exc:
        raise PrototypeError(f"prototypes file {path} is damaged ({exc}); run `slpd prototypes` again") from exc
    tile = float(attrs.get("tile_size_level0") or 0.0)
    min_regions = int(attrs.get("min_regions", -1))
    return SlidePrototypes(
        centroids=np.asarray(data["centroids"], np.float32),
        assignments=np.asarray(data["assignments"], np.int64),
        similarity=np.asarray(data["similarity"], np.float32),
        sizes=np.asarray(data["sizes"], np.float64),
        k_requested=int(attrs.get("k_requested", attrs.get("k", 0))),
        seed=int(attrs.get("seed", KMEANS_SEED)),
        niter=int(attrs.get("niter", KMEANS_NITER)),
        nredo=int(attrs.get("nredo", KMEANS_NREDO)),
        note=str(attrs.get("note", "")),
        slide_id=str(attrs.get("slide_id", path.stem)),
        source=str(attrs.get("source", "")) or None,
        coords=coords,
        tile_size_level0=tile or None,
        features_settings_key=str(attrs.get("features_settings_key", "")) or None,
        extra={"min_regions": None if min_regions < 0 else min_regions, "created": attrs.get("created")},
    )


def prototypes_stamp(cohort, slide_id: str) -> str | None:
    """A cheap fingerprint of a slide's prototypes file (None when there is none): changes on rewrite."""
    try:
        st = os.stat(cohort.prototypes_path(slide_id))
    except FileNotFoundError:
        return None
    return f"{st.st_mtime_ns}-{st.st_size}"


def _features_settings_key(cohort, slide_id: str) -> str | None:
    from napari_slpd.features.store import read_store_attrs

    path = cohort.features_path(slide_id)
    if not path.exists():
        return None
    return str(read_store_attrs(path).get("settings_key", "")) or None


def stale_reason(attrs: dict, features_key: str | None, k: int | None = None, source: str | None = None,
                 seed: int | None = None, niter: int | None = None, nredo: int | None = None,
                 min_regions: int | None = None) -> str | None:
    """Why a prototypes file (its ``attrs``) does not match these settings, or None when it is current.
    Settings given as None are not compared."""
    wanted = {"k_requested": k, "source": source, "seed": seed, "niter": niter, "nredo": nredo}
    for name, value in wanted.items():
        if value is not None and attrs.get(name) != value:
            return f"{name} was {attrs.get(name)!r}, now {value!r}"
    if min_regions is not None and int(attrs.get("min_regions", -1)) != int(min_regions):
        return f"min_regions was {attrs.get('min_regions')}, now {min_regions}"
    if features_key is not None and attrs.get("features_settings_key") != features_key:
        return "the slide's features were extracted again with other settings"
    return None


def load_prototypes(cohort, slide_id: str, check_stale: bool = True, k: int | None = None,
                    source: str | None = None) -> SlidePrototypes:
    """A slide's cached prototypes. Raises PrototypeError when there are none, or (``check_stale``) when
    its features were re-extracted since or they were made with another ``k`` / ``source`` than given."""
    path = cohort.prototypes_path(slide_id)
    if not path.exists():
        raise PrototypeError(
            f"slide {slide_id!r} has no prototypes yet; run `slpd prototypes {cohort.root}` first"
        )
    protos = read_prototypes(path)
    if check_stale:
        try:
            features_key = _features_settings_key(cohort, slide_id)
        except FeatureStoreError as exc:
            log.warning("%s: cannot check the prototypes against the features (%s)", slide_id, exc)
            features_key = None
        attrs = read_attrs(path)
        reason = stale_reason(attrs, features_key, k=k, source=source)
        if reason:
            raise PrototypeError(
                f"the cached prototypes of {slide_id!r} are out of date ({reason}); run `slpd prototypes "
                f"{cohort.root}` again"
            )
    return protos


# -- one slide from its features ----------------------------------------------------------------------------


def embeddings_of(store, source: str) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """(embeddings [M, E], coords [M, 2], tile size in level-0 px, weights or None) of an open FeatureStore."""
    check_source(source)
    if source == "region_embeddings":
        weights = store.region_coverage
        if weights is not None and not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
            weights = None
        return store.region_embeddings, store.region_coords, float(store.region_size_level0), weights
    features = store.features
    if features is None:
        raise PrototypeError(
            f"{store.slide_id}: the feature file has no patch features (it was extracted without them); "
            "use --source region_embeddings or extract again with patch features"
        )
    coords = store.coords
    attrs = store.coords_attrs
    size = attrs.get("patch_size_level0") or store.attrs.get("patch_size_level0")
    if not size:
        grid = int(store.grid_size) or 1
        size = float(store.region_size_level0) / grid
    return np.asarray(features[()], np.float32), coords, float(size), None


def compute_slide_prototypes(cohort, slide_id: str, k: int = DEFAULT_K, source: str = "region_embeddings",
                             seed: int = KMEANS_SEED, niter: int = KMEANS_NITER, nredo: int = KMEANS_NREDO,
                             min_regions: int | None = None, device: str = "auto",
                             save: bool = True) -> SlidePrototypes:
    """Compute (and, with ``save``, cache) one slide's prototypes from its FeatureStore."""
    from napari_slpd.features.store import FeatureStore

    check_source(source)
    with FeatureStore.open(cohort.features_path(slide_id)) as store:
        embeddings, coords, tile, weights = embeddings_of(store, source)
        try:
            protos = compute_prototypes(embeddings, k=k, seed=seed, niter=niter, nredo=nredo,
                                        min_regions=min_regions, device=device, weights=weights)
        except PrototypeError as exc:
            raise PrototypeError(f"{slide_id}: {exc}") from exc
        protos.slide_id = slide_id
        protos.source = source
        protos.coords = np.asarray(coords, np.int64)
        protos.tile_size_level0 = tile
        protos.features_settings_key = store.settings_key or None
    if save:
        save_prototypes(cohort.prototypes_path(slide_id), protos, min_regions=min_regions)
    return protos


# -- a whole cohort ---------------------------------------------------------------------------------------


@dataclass
class SlideResult:
    slide_id: str
    status: str  # "computed", "current" (cache reused), "skipped" (no features), "failed"
    message: str = ""
    k: int | None = None
    n_regions: int | None = None
    dim: int | None = None
    sizes: list[float] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class PrototypesReport:
    cohort: str
    k: int
    source: str
    results: list[SlideResult] = field(default_factory=list)
    cancelled: bool = False
    warnings: list[str] = field(default_factory=list)

    def _with(self, status: str) -> list[SlideResult]:
        return [r for r in self.results if r.status == status]

    @property
    def computed(self) -> list[SlideResult]:
        return self._with("computed")

    @property
    def current(self) -> list[SlideResult]:
        return self._with("current")

    @property
    def failed(self) -> list[SlideResult]:
        return self._with("failed")

    @property
    def skipped(self) -> list[SlideResult]:
        return self._with("skipped")

    @property
    def usable(self) -> int:
        return len(self.computed) + len(self.current)

    def to_dict(self) -> dict:
        return {
            "cohort": self.cohort,
            "k": self.k,
            "source": self.source,
            "cancelled": self.cancelled,
            "warnings": list(self.warnings),
            "slides": [r.to_dict() for r in self.results],
        }


def compute_cohort_prototypes(
    cohort,
    k: int = DEFAULT_K,
    source: str = "region_embeddings",
    seed: int = KMEANS_SEED,
    niter: int = KMEANS_NITER,
    nredo: int = KMEANS_NREDO,
    min_regions: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    slide_ids: list[str] | None = None,
    progress=None,
    cancel=None,
) -> PrototypesReport:
    """Prototypes of every slide of ``cohort`` with extracted features, cached per slide.

    Current cache files are reused (``overwrite`` recomputes them); a slide that cannot get prototypes
    (too few regions, NaNs) is reported as failed and keeps its old file; ``cancel`` stops between slides,
    keeping what was done. Raises PrototypeError for an empty cohort or one without any extracted features.
    """
    from napari_slpd.features.store import FeatureStore

    check_source(source)
    all_ids = cohort.slide_ids()
    if not all_ids:
        raise PrototypeError(f"cohort {cohort.root} has no slides; add slides with `slpd extract` first")
    if slide_ids is not None:
        unknown = sorted(set(slide_ids) - set(all_ids))
        if unknown:
            raise PrototypeError(f"slide(s) {', '.join(unknown)} are not in cohort {cohort.root}")
        all_ids = [s for s in all_ids if s in set(slide_ids)]
    report = PrototypesReport(str(cohort.root), int(k), source)
    dims: dict[int, list[str]] = {}
    for i, slide_id in enumerate(all_ids):
        if is_cancelled(cancel):
            report.cancelled = True
            break
        result = _one_slide(cohort, slide_id, FeatureStore, k, source, seed, niter, nredo, min_regions, device,
                            overwrite)
        report.results.append(result)
        if result.dim is not None:
            dims.setdefault(result.dim, []).append(slide_id)
        if progress is not None:
            progress(i + 1, len(all_ids))
    if not report.cancelled and report.results and len(report.skipped) == len(report.results):
        raise PrototypeError(
            f"none of the {len(report.results)} slides of cohort {cohort.root} has extracted features; "
            "run `slpd extract` first"
        )
    if len(dims) > 1:
        parts = "; ".join(f"{d}-d: {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''}"
                          for d, ids in sorted(dims.items()))
        report.warnings.append(
            f"the slides' embeddings have different sizes ({parts}): they come from different encoders and "
            "cannot be compared; extract every slide with the same encoders"
        )
    return report


def _one_slide(cohort, slide_id, FeatureStore, k, source, seed, niter, nredo, min_regions, device,
               overwrite) -> SlideResult:
    features_path = cohort.features_path(slide_id)
    if not features_path.exists():
        return SlideResult(slide_id, "skipped", "no extracted features (run `slpd extract`)")
    try:
        store = FeatureStore.open(features_path)
    except FeatureStoreError as exc:
        return SlideResult(slide_id, "failed", str(exc))
    try:
        proto_path = cohort.prototypes_path(slide_id)
        if not overwrite and proto_path.exists():
            try:
                attrs = read_attrs(proto_path)
            except PrototypeError:
                attrs = None
            if attrs is not None and stale_reason(attrs, store.settings_key or "", k, source, seed, niter, nredo,
                                                  -1 if min_regions is None else min_regions) is None:
                return SlideResult(slide_id, "current", str(attrs.get("note", "")), int(attrs["k"]),
                                   int(attrs["n_regions"]), int(attrs["dim"]))
        try:
            embeddings, coords, tile, weights = embeddings_of(store, source)
            protos = compute_prototypes(embeddings, k=k, seed=seed, niter=niter, nredo=nredo,
                                        min_regions=min_regions, device=device, weights=weights)
        except PrototypeError as exc:
            return SlideResult(slide_id, "failed", str(exc), dim=_dim_of(store, source))
        protos.slide_id = slide_id
        protos.source = source
        protos.coords = np.asarray(coords, np.int64)
        protos.tile_size_level0 = tile
        protos.features_settings_key = store.settings_key or ""
        save_prototypes(proto_path, protos, min_regions=min_regions)
        return SlideResult(slide_id, "computed", protos.note, protos.k, protos.n_regions, protos.dim,
                           [round(float(s), 4) for s in protos.sizes])
    finally:
        store.close()


def _dim_of(store, source: str) -> int | None:
    try:
        return int(store.embed_dim if source == "region_embeddings" else store.token_dim)
    except Exception:  # a damaged file has no meaningful dim
        return None
