"""2-D maps of region embeddings (UMAP), computed once and cached in the cohort folder.

UMAP runs through numba, which compiles its kernels on first use in a process (several seconds), so the
GUI runs :func:`load_or_compute_map` in a worker and the result is cached as
``COHORT/embedding/<name>_umap.npz``. The cache is keyed by everything the map depends on: the feature
settings of every slide in it (their FeatureStore ``settings_key``), the slides and region counts, and the
UMAP parameters; a map whose key differs is recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.utils.files import atomic_path
from napari_slpd.utils.progress import Cancelled, is_cancelled

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Below this many points UMAP's neighbour graph is degenerate; a PCA projection is shown instead.
MIN_UMAP_POINTS = 8


@dataclass(frozen=True)
class UmapParams:
    n_neighbors: int = 15
    min_dist: float = 0.1
    metric: str = "cosine"  # region embeddings are compared by cosine everywhere else (prototypes)
    seed: int = 0

    def __post_init__(self):
        if self.n_neighbors < 2:
            raise SlpdError(f"UMAP n_neighbors must be at least 2, not {self.n_neighbors}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise SlpdError(f"UMAP min_dist must be between 0 and 1, not {self.min_dist}")


@dataclass
class EmbeddingMap:
    """One 2-D point per region. Row i is region ``region_index[i]`` of slide ``slide_ids[i]``."""

    xy: np.ndarray  # [N, 2] float32
    slide_ids: np.ndarray  # [N] str
    region_index: np.ndarray  # [N] int64, index into that slide's regions
    method: str  # "umap" | "pca" | "trivial"
    key: str  # cache key (what the map was computed from)

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def rows_of(self, slide_id: str, regions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Row indices of ``slide_id``'s points (only of ``regions`` when given), in map order."""
        rows = np.flatnonzero(self.slide_ids == slide_id)
        if regions is None:
            return rows
        wanted = np.zeros(int(self.region_index[rows].max(initial=-1)) + 1, bool)
        regions = np.asarray(regions, dtype=np.int64)
        regions = regions[(regions >= 0) & (regions < len(wanted))]
        wanted[regions] = True
        return rows[wanted[self.region_index[rows]]]


def map_key(parts: Sequence[tuple[str, str, int]], params: UmapParams) -> str:
    """Hash of (slide_id, feature settings_key, region count) of every slide in the map + UMAP params."""
    payload = json.dumps(
        {"v": CACHE_VERSION, "slides": [list(p) for p in parts], "umap": asdict(params)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cache_path(cohort_root: str | Path, name: str) -> Path:
    from napari_slpd.utils.storage import cohort_file

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]
    return cohort_file(Path(cohort_root) / "embedding" / f"{safe}_umap.npz")  # a read-only cohort's: its cache


def project_2d(
    embeddings: np.ndarray, params: UmapParams = UmapParams(), cancel: threading.Event | Callable | None = None
) -> tuple[np.ndarray, str]:
    """[N, 2] float32 map of ``embeddings`` [N, E] and the method used ("umap", "pca" or "trivial")."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise SlpdError(f"embeddings must be a [N, E] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise SlpdError("the region embeddings contain NaN or infinite values; recompute the features")
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.float32), "trivial"
    if n < 3:
        # One or two points: a line is all there is to show.
        return np.stack([np.arange(n, dtype=np.float32), np.zeros(n, np.float32)], axis=1), "trivial"
    if n < MIN_UMAP_POINTS:
        return _pca_2d(x), "pca"
    _check_cancel(cancel)
    import umap  # noqa: PLC0415  (heavy: numba compiles on first use)

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(params.n_neighbors, n - 1),
        min_dist=params.min_dist,
        metric=params.metric,
        random_state=params.seed,
        # Spectral initialisation fails on tiny, disconnected neighbour graphs; random is robust there.
        init="spectral" if n >= 4 * params.n_neighbors else "random",
        n_jobs=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        xy = reducer.fit_transform(x)
    _check_cancel(cancel)
    return np.asarray(xy, dtype=np.float32), "umap"


def _pca_2d(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    out = centred @ vt[:2].T
    if out.shape[1] < 2:
        out = np.concatenate([out, np.zeros((len(out), 2 - out.shape[1]), out.dtype)], axis=1)
    return out.astype(np.float32)


def _check_cancel(cancel) -> None:
    if is_cancelled(cancel):
        raise MapCancelled("the embedding map was cancelled")


class MapCancelled(Cancelled):
    """Raised when the map computation was cancelled; nothing was written."""


def load_cached(path: Path, key: str) -> EmbeddingMap | None:
    """The cached map at ``path`` if it was computed from exactly ``key``; None otherwise."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return EmbeddingMap(
                xy=data["xy"].astype(np.float32),
                slide_ids=data["slide_ids"].astype(str),
                region_index=data["region_index"].astype(np.int64),
                method=str(data["method"]),
                key=key,
            )
    except Exception as exc:  # noqa: BLE001 - a damaged npz fails in many ways (BadZipFile, EOFError, ...)
        log.warning("ignoring unreadable embedding cache %s (%s); recomputing", path, exc)
        return None


def save(path: Path, emap: EmbeddingMap) -> None:
    with atomic_path(path, suffix=".partial.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                xy=emap.xy,
                slide_ids=np.asarray(emap.slide_ids, dtype=str),
                region_index=emap.region_index,
                method=np.asarray(emap.method),
                key=np.asarray(emap.key),
            )


def load_or_compute_map(
    cohort_root: str | Path,
    name: str,
    slides: Sequence[tuple[str, str, np.ndarray]],
    params: UmapParams = UmapParams(),
    cancel: threading.Event | Callable | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[EmbeddingMap, bool]:
    """The map of ``slides`` = [(slide_id, settings_key, region_embeddings [M, E]), ...] and whether it
    came from the cache. Computed maps are written to ``cache_path(cohort_root, name)`` atomically."""
    if not slides:
        raise SlpdError("no slide with features to map; compute features first")
    dims = {emb.shape[1] for _, _, emb in slides if emb.ndim == 2 and len(emb)}
    if len(dims) > 1:
        raise SlpdError(
            f"the slides' region embeddings have different sizes {sorted(dims)}; they were made with different "
            "region encoders and cannot share one map (recompute their features with the same settings)"
        )
    key = map_key([(sid, skey, int(len(emb))) for sid, skey, emb in slides], params)
    path = cache_path(cohort_root, name)
    cached = load_cached(path, key)
    if cached is not None:
        if progress:
            progress(1, 1)
        return cached, True
    if progress:
        progress(0, 1)
    x = np.concatenate([np.asarray(emb, np.float32).reshape(len(emb), -1) for _, _, emb in slides], axis=0)
    xy, method = project_2d(x, params, cancel)
    emap = EmbeddingMap(
        xy=xy,
        slide_ids=np.concatenate([np.full(len(emb), sid, dtype=object) for sid, _, emb in slides]).astype(str),
        region_index=np.concatenate([np.arange(len(emb), dtype=np.int64) for _, _, emb in slides]),
        method=method,
        key=key,
    )
    _check_cancel(cancel)
    save(path, emap)
    if progress:
        progress(1, 1)
    return emap, False
