"""Intra-slide prototypes: K-means of one slide's region (or patch) embeddings (SPEC sections 2-3).

As in the official SLPD code: embeddings are L2-normalized, clustered by faiss K-means with the L2 metric
(niter 10, nredo 5, seed 0, at most 1000 training points per centroid), each region is assigned to its
nearest K-means centroid, and the centroids are L2-normalized afterwards to become the prototypes.
Prototypes are then numbered by size, largest first, so that "prototype 0" means the same kind of thing
(the dominant tissue) from slide to slide; the numbering carries no other meaning.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from napari_slpd.errors import PrototypeError
from napari_slpd.utils.device import cuda_index

if TYPE_CHECKING:  # pragma: no cover
    from napari_slpd.prototypes.label_map import LabelMap

log = logging.getLogger(__name__)

DEFAULT_K = 4
# Label maps store prototype k as k + 1 and the cohort index packs k into 8 bits of a faiss id.
MAX_K = 255
# Official SLPD K-means settings (Carboxy/SLPD utils.Kmeans_mp).
KMEANS_NITER = 10
KMEANS_NREDO = 5
KMEANS_SEED = 0
MAX_POINTS_PER_CENTROID = 1000
# Below this much work per K-means iteration (points x K x dim multiply-adds) faiss runs on one thread:
# a slide's regions take microseconds per iteration, less than waking OpenMP threads, and idle OpenMP
# workers spin, which on a busy machine (or beside torch's own OpenMP pool) slowed tiny runs 30-fold.
SINGLE_THREAD_WORK = 20_000_000


@dataclass
class SlidePrototypes:
    """K prototypes of one slide and how its regions (or patches) fall into them.

    ``centroids`` [K, E] float32 L2-normalized; ``assignments`` [M] int64 in 0..K-1; ``similarity`` [M]
    float32 cosine of each region to its own prototype; ``sizes`` [K] fraction of the slide's tissue in
    each prototype (sums to 1). ``k_requested`` is the K asked for: ``k`` is smaller when the slide had
    fewer regions (``note`` then says so). The remaining fields describe where the embeddings came from
    and are filled by the cohort cache (``coords``/``tile_size_level0`` make the label map).
    """

    centroids: np.ndarray
    assignments: np.ndarray
    similarity: np.ndarray
    sizes: np.ndarray
    k_requested: int
    seed: int = KMEANS_SEED
    niter: int = KMEANS_NITER
    nredo: int = KMEANS_NREDO
    note: str = ""
    slide_id: str | None = None
    source: str | None = None  # "region_embeddings" or "features"
    coords: np.ndarray | None = None  # [M, 2] level-0 (x, y) top-left of each region / patch
    tile_size_level0: float | None = None  # side of a region / patch in level-0 px
    features_settings_key: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def n_regions(self) -> int:
        return int(self.assignments.shape[0])

    @property
    def distances(self) -> np.ndarray:
        """[M] cosine distance (1 - cosine) of each region to its prototype."""
        return 1.0 - self.similarity

    def counts(self) -> np.ndarray:
        """[K] number of regions in each prototype."""
        return np.bincount(self.assignments, minlength=self.k)

    def label_map(self) -> "LabelMap":
        """The assignments painted on the region (or patch) grid; needs ``coords`` and ``tile_size_level0``."""
        from napari_slpd.prototypes.label_map import label_map

        if self.coords is None or self.tile_size_level0 is None:
            raise PrototypeError(
                "these prototypes carry no region coordinates; load them from the cohort cache "
                "(load_prototypes) or call label_map(assignments, coords, size) yourself"
            )
        return label_map(self.assignments, self.coords, self.tile_size_level0, n_labels=self.k)

    def summary(self) -> str:
        sizes = ", ".join(f"{100 * s:.0f}%" for s in self.sizes)
        text = f"{self.k} prototypes of {self.n_regions} {self.source or 'embeddings'} (sizes {sizes})"
        return f"{text}; {self.note}" if self.note else text


def check_embeddings(embeddings, what: str = "embeddings") -> np.ndarray:
    """Embeddings as a finite float32 [M, E] array with no all-zero row, or a PrototypeError that says which."""
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise PrototypeError(f"{what} must be a 2-D array [regions, dim], got shape {x.shape}")
    if x.shape[1] == 0:
        raise PrototypeError(f"{what} have zero dimensions (shape {x.shape})")
    if x.dtype.kind not in "fiu":
        raise PrototypeError(f"{what} must be numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise PrototypeError(
            f"{what}: {bad.size} of {x.shape[0]} rows contain NaN or infinite values (rows {shown}); "
            "the features are damaged or the encoder diverged: extract them again"
        )
    norms = np.linalg.norm(x, axis=1)
    if x.shape[0] and (norms == 0).any():
        bad = np.flatnonzero(norms == 0)
        raise PrototypeError(
            f"{what}: {bad.size} of {x.shape[0]} rows are all zeros (rows {', '.join(map(str, bad[:5]))}), "
            "so they have no direction to cluster by; extract the features again"
        )
    return x


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32, copy=False)


def import_faiss():
    """faiss, or a message saying which extra installs it (faiss-cpu and faiss-gpu are alternatives)."""
    try:
        import faiss
    except ImportError as exc:
        raise PrototypeError(
            "faiss is not installed: install exactly one of `pip install \"napari-slpd[cpu]\"` (faiss-cpu) "
            "or `pip install \"napari-slpd[gpu]\"` (faiss-gpu)"
        ) from exc
    return faiss


def faiss_uses_gpu(device: str = "auto") -> bool:
    """Whether K-means runs on a GPU: faiss must see one and ``device`` must allow it."""
    device = str(device or "auto").lower()
    if device == "cpu":
        return False
    faiss = import_faiss()

    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus > 0:
        return True
    if device.startswith("cuda"):
        log.info("device %s asked for, but this faiss build sees no GPU (faiss-cpu): K-means runs on the CPU", device)
    return False


_GPU_RESOURCES: dict[int, object] = {}


@contextlib.contextmanager
def faiss_threads(n: int | None):
    """Run the enclosed faiss calls on ``n`` OpenMP threads (None: leave faiss's setting alone)."""
    if n is None:
        yield
        return
    faiss = import_faiss()

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _flat_l2_index(dim: int, device: str):
    faiss = import_faiss()

    if not faiss_uses_gpu(device):
        return faiss.IndexFlatL2(dim)
    gpu = cuda_index(device)
    if gpu not in _GPU_RESOURCES:
        _GPU_RESOURCES[gpu] = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.useFloat16 = False  # as the official code: exact distances
    config.device = gpu
    return faiss.GpuIndexFlatL2(_GPU_RESOURCES[gpu], dim, config)


def compute_prototypes(
    embeddings,
    k: int = DEFAULT_K,
    seed: int = KMEANS_SEED,
    niter: int = KMEANS_NITER,
    nredo: int = KMEANS_NREDO,
    min_regions: int | None = None,
    device: str = "auto",
    weights=None,
    cap_k: bool = True,
    max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
    threads: int | None = None,
) -> SlidePrototypes:
    """K prototypes of one slide's embeddings [M, E] (region embeddings, pooled or patch features).

    ``min_regions``: slides with fewer regions get no prototypes (SLPD's ``min_num_region``): raises
    PrototypeError. A slide with fewer regions than ``k`` gets ``k = M`` prototypes and a ``note`` saying
    so (``cap_k=False`` raises instead). ``weights`` [M] (e.g. each region's tissue fraction) make
    ``sizes`` fractions of tissue rather than of regions. ``device``: "auto" uses a GPU when faiss sees
    one, "cpu" never does. ``threads``: faiss CPU threads (None: one for a slide-sized problem, faiss's
    default for large ones such as hundreds of thousands of patch features).
    """
    faiss = import_faiss()

    k = int(k)
    if not 1 <= k <= MAX_K:
        raise PrototypeError(f"K must be between 1 and {MAX_K}, got {k}")
    x = np.asarray(embeddings)
    if x.ndim == 2 and x.shape[0] == 0:
        raise PrototypeError("the slide has no regions (no tissue region was extracted), so it has no prototypes")
    x = check_embeddings(x)
    M, E = x.shape
    if min_regions is not None and M < int(min_regions):
        raise PrototypeError(
            f"the slide has {M} regions, fewer than the minimum of {int(min_regions)} for prototypes "
            "(SLPD's min_num_region); it is left out"
        )
    note = ""
    k_used = k
    if M < k:
        if not cap_k:
            raise PrototypeError(f"the slide has only {M} regions, fewer than K = {k}; choose K <= {M}")
        k_used = M
        note = f"K capped from {k} to {M}: the slide has only {M} regions"
        log.warning("%s", note)
    if k_used > 1:
        # Regions that are all alike (constant embeddings, e.g. imported from a tool that failed) cannot make
        # K different prototypes: K-means would return copies of one centroid. Say so and use fewer.
        distinct = len(np.unique(np.round(l2_normalize(x), 5), axis=0))
        if distinct < k_used:
            if not cap_k:
                raise PrototypeError(f"the slide's {M} regions have only {distinct} distinct embedding(s), fewer "
                                     f"than K = {k_used}; its features may be degenerate")
            note = (f"K capped from {k} to {distinct}: the slide's {M} regions have only {distinct} distinct "
                    "embedding(s) (constant or duplicated features: check how they were made)")
            log.warning("%s", note)
            k_used = distinct
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != M:
            raise PrototypeError(f"weights has {w.shape[0]} values for {M} regions")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise PrototypeError("weights must be finite, non-negative and not all zero")

    x = l2_normalize(x)
    clus = faiss.Clustering(E, k_used)
    clus.niter = int(niter)
    clus.nredo = int(nredo)
    clus.seed = int(seed)
    clus.max_points_per_centroid = int(max_points_per_centroid)
    clus.min_points_per_centroid = 1  # faiss only uses it to print a warning; small slides are normal here
    clus.verbose = False
    index = _flat_l2_index(E, device)
    if threads is None:
        n_train = min(M, k_used * int(max_points_per_centroid))
        threads = 1 if max(n_train, M) * k_used * E < SINGLE_THREAD_WORK else None
    with faiss_threads(threads):
        clus.train(x, index)
        # After training the index holds the final (best of nredo) centroids: assign as K-means does.
        _, nearest = index.search(x, 1)
    assignments = nearest[:, 0].astype(np.int64)
    raw = faiss.vector_to_array(clus.centroids).reshape(k_used, E)
    centroids = l2_normalize(raw)

    counts = np.bincount(assignments, weights=w, minlength=k_used).astype(np.float64)
    sizes = counts / counts.sum()
    # Largest prototype first (stable for ties): a pure renumbering of the K-means result.
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(k_used)
    centroids = np.ascontiguousarray(centroids[order])
    assignments = rank[assignments]
    sizes = sizes[order]
    similarity = np.einsum("me,me->m", x, centroids[assignments]).astype(np.float32)
    return SlidePrototypes(
        centroids=centroids,
        assignments=assignments,
        similarity=similarity,
        sizes=sizes,
        k_requested=k,
        seed=int(seed),
        niter=int(niter),
        nredo=int(nredo),
        note=note,
    )
