"""The cohort index: which slides of a cohort are most similar to a query slide (SPEC section 3).

Slides are compared by the prototype set similarity S (matching.py). Exact over N slides costs one GEMM
of the query's K prototypes against all N*L stored prototypes plus a bound-pruned handful of assignment
solves (matching.top_matches); that is the ``exact`` path, used up to ``exact_max_prototypes`` stored
prototypes. Beyond that the GEMM itself (reading every stored vector per query) is too slow, so a faiss
IVF index over all prototypes (8-bit scalar quantized, inner product) is the first stage: each query
prototype fetches its ``depth`` nearest stored prototypes, the slides owning them are shortlisted
(ranked by the sum over query prototypes of their best retrieved similarity), and the shortlist is
re-ranked exactly with the float32 prototypes. Results are always exact values of S; only the shortlist
can miss a slide (benchmarks/similar.py measures how often, against the exact ranking).

Slides can be added and removed at any time (faiss ids encode a never-reused slot number and the
prototype's index, so removing one slide touches nothing else). The index is saved beside the cohort
(``Cohort.index_dir``) as a manifest plus data files named by a generation; the manifest is replaced
last, atomically, so a reader sees either the old index or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np

from napari_slpd.errors import PrototypeError
from napari_slpd.utils.files import atomic_path, atomic_write_json
from napari_slpd.utils.progress import is_cancelled
from napari_slpd.prototypes.kmeans import (
    SINGLE_THREAD_WORK,
    SlidePrototypes,
    faiss_threads,
    import_faiss,
    l2_normalize,
)
from napari_slpd.similarity.matching import (
    PrototypePair,
    TopMatch,
    TopN,
    as_prototype_set,
    candidate_similarities,
    pairs_from_similarity,
    top_matches,
)

log = logging.getLogger(__name__)

FORMAT = "napari-slpd-vector-index"
FORMAT_VERSION = 1
PROTO_ID_BITS = 8  # a faiss id is slot << 8 | prototype index (K <= 255)
# Largest error of an inner product computed from 8-bit scalar-quantized unit vectors (measured: < 0.008).
_QUANTIZATION_SLACK = 0.01


# -- configuration and results ------------------------------------------------------------------------------


@dataclass
class IndexConfig:
    """How queries are answered. ``method``: "auto" (exact up to ``exact_max_prototypes`` stored prototypes,
    IVF beyond), "exact" or "ivf". IVF: ``nlist`` coarse cells (None: a power of two near sqrt(prototypes)),
    ``nprobe`` cells visited per query prototype, ``depth`` stored prototypes fetched per query prototype
    (at least 8 per slide asked for), at most ``max_candidates`` slides re-ranked exactly.
    ``search_threads``: faiss threads for one query's search; 1 by default because a query's 16 searches
    are microseconds each and OpenMP's thread wake-ups cost more than they save (much more on a busy
    machine); raise it for very large nprobe."""

    method: str = "auto"
    exact_max_prototypes: int = 262_144
    nlist: int | None = None
    nprobe: int = 8
    depth: int = 128
    max_candidates: int = 4096
    train_points_per_cell: int = 64
    search_threads: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("auto", "exact", "ivf"):
            raise PrototypeError(f"index method must be 'auto', 'exact' or 'ivf', not {self.method!r}")
        for name in ("exact_max_prototypes", "nprobe", "depth", "max_candidates", "train_points_per_cell",
                     "search_threads"):
            if int(getattr(self, name)) < 1:
                raise PrototypeError(f"index setting {name} must be at least 1")

    @classmethod
    def from_dict(cls, values: dict) -> "IndexConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class SimilarSlide:
    """One ranked slide: ``distance`` = max(K, L) - S (K - S for equal K), ``similarity`` = S, ``pairs`` the
    matched prototypes (query prototype k, this slide's prototype l, cosine), most similar pair first."""

    slide_id: str
    distance: float
    similarity: float
    pairs: list[PrototypePair]
    n_prototypes: int
    rank: int = 0

    def to_dict(self) -> dict:
        return {
            "rank": self.rank,
            "slide_id": self.slide_id,
            "distance": round(self.distance, 6),
            "similarity": round(self.similarity, 6),
            "n_prototypes": self.n_prototypes,
            "pairs": [{"query": p.k, "match": p.l, "similarity": round(p.similarity, 6)} for p in self.pairs],
        }


# -- storage shared with the region index -------------------------------------------------------------------


def auto_nlist(n_vectors: int) -> int:
    """A power of two near sqrt(n) (at least 16): cells of ~sqrt(n) vectors keep both the coarse search
    and the list scans short."""
    return int(max(16, 2 ** round(np.log2(max(1.0, np.sqrt(n_vectors))))))


class VectorStore:
    """L2-normalized vectors grouped by owner (a slide), in one growable float32 array.

    Every owner gets a slot number that is never reused, so an item's id ``slot << id_bits | item`` stays
    valid for the faiss index however other owners come and go. Removed owners leave dead rows until
    :meth:`compact`. ``payload`` arrays (e.g. region coordinates) are kept row-aligned with the vectors.
    """

    def __init__(self, dim: int, id_bits: int, payload_shapes: dict[str, tuple] | None = None):
        self.dim = int(dim)
        self.id_bits = int(id_bits)
        self.vectors = np.empty((0, self.dim), np.float32)
        self.payload_shapes = dict(payload_shapes or {})
        self.payload = {name: np.empty((0, *shape), np.int64) for name, shape in self.payload_shapes.items()}
        self.n_rows = 0  # used rows (live and dead)
        self.dead_rows = 0
        self.slot_key: list[str | None] = []
        self._offset = np.empty(0, np.int64)
        self._count = np.empty(0, np.int64)
        self._alive = np.empty(0, bool)
        self.key_to_slot: dict[str, int] = {}

    # -- bookkeeping -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.key_to_slot)

    @property
    def n_slots(self) -> int:
        return len(self.slot_key)

    @property
    def slot_offset(self) -> np.ndarray:
        return self._offset[: self.n_slots]

    @property
    def slot_count(self) -> np.ndarray:
        return self._count[: self.n_slots]

    @property
    def slot_alive(self) -> np.ndarray:
        return self._alive[: self.n_slots]

    @property
    def n_live_rows(self) -> int:
        return self.n_rows - self.dead_rows

    def keys(self) -> list[str]:
        return sorted(self.key_to_slot)

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.slot_alive)

    def rows(self, slot: int) -> slice:
        start = int(self._offset[slot])
        return slice(start, start + int(self._count[slot]))

    def ids(self, slot: int) -> np.ndarray:
        return (np.int64(slot) << self.id_bits) | np.arange(self._count[slot], dtype=np.int64)

    def decode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        return ids >> self.id_bits, ids & ((1 << self.id_bits) - 1)

    def _reserve(self, extra_rows: int, extra_slots: int) -> None:
        need = self.n_rows + extra_rows
        if need > self.vectors.shape[0]:
            capacity = max(need, int(self.vectors.shape[0] * 1.5) + 1024)
            grown = np.empty((capacity, self.dim), np.float32)
            grown[: self.n_rows] = self.vectors[: self.n_rows]
            self.vectors = grown
            for name, shape in self.payload_shapes.items():
                array = np.empty((capacity, *shape), np.int64)
                array[: self.n_rows] = self.payload[name][: self.n_rows]
                self.payload[name] = array
        need = self.n_slots + extra_slots
        if need > self._offset.shape[0]:
            capacity = max(need, int(self._offset.shape[0] * 1.5) + 256)
            for name in ("_offset", "_count", "_alive"):
                old = getattr(self, name)
                grown = np.zeros(capacity, old.dtype)
                grown[: self.n_slots] = old[: self.n_slots]
                setattr(self, name, grown)

    def add_batch(self, keys: list[str], vectors: np.ndarray,
                  payload: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Store ``vectors`` [N, n, dim] (normalized here) for N new keys holding n vectors each; returns
        their slots. Keys must not be stored already (remove them first)."""
        N, n = int(vectors.shape[0]), int(vectors.shape[1])
        if n >= (1 << self.id_bits):
            raise PrototypeError(f"{n} vectors per owner exceed the {(1 << self.id_bits) - 1} allowed")
        if len(set(keys)) != N or any(k in self.key_to_slot for k in keys):
            raise PrototypeError("duplicate or already stored ids in one batch")
        self._reserve(N * n, N)
        start, first = self.n_rows, self.n_slots
        self.vectors[start : start + N * n] = l2_normalize(np.asarray(vectors, np.float32).reshape(N * n, self.dim))
        for name, shape in self.payload_shapes.items():
            values = np.asarray((payload or {})[name], np.int64)
            self.payload[name][start : start + N * n] = values.reshape(N * n, *shape)
        slots = np.arange(first, first + N, dtype=np.int64)
        self._offset[slots] = start + n * np.arange(N, dtype=np.int64)
        self._count[slots] = n
        self._alive[slots] = True
        self.slot_key.extend(keys)
        self.key_to_slot.update(zip(keys, slots.tolist()))
        self.n_rows += N * n
        return slots

    def add(self, key: str, vectors: np.ndarray, payload: dict[str, np.ndarray] | None = None) -> int:
        """Store ``vectors`` [n, dim] (normalized here) under a new ``key``; returns its slot."""
        vectors = np.asarray(vectors)
        batch_payload = {k: np.asarray(v)[None] for k, v in (payload or {}).items()}
        return int(self.add_batch([key], vectors[None], batch_payload)[0])

    def remove(self, key: str) -> int | None:
        """Forget ``key``; returns its former slot (None when absent)."""
        slot = self.key_to_slot.pop(key, None)
        if slot is None:
            return None
        self._alive[slot] = False
        self.slot_key[slot] = None
        self.dead_rows += int(self._count[slot])
        return slot

    def compact(self) -> None:
        """Drop dead rows and spare capacity (slot numbers, hence faiss ids, are unchanged); afterwards the
        live slots' rows are contiguous and in slot order."""
        if self.dead_rows == 0 and self.vectors.shape[0] == self.n_rows:
            return
        live = self.live_slots()
        counts = self._count[live]
        total = int(counts.sum())
        offsets = np.zeros(live.size, np.int64)
        if live.size:
            offsets[1:] = np.cumsum(counts)[:-1]
        # Source row of every kept row: the slot's old start plus the position inside the slot.
        src = np.repeat(self._offset[live] - offsets, counts) + np.arange(total, dtype=np.int64)
        self.vectors = np.ascontiguousarray(self.vectors[src])
        for name in self.payload_shapes:
            self.payload[name] = np.ascontiguousarray(self.payload[name][src])
        self._offset[live] = offsets
        self.n_rows, self.dead_rows = total, 0

    def row_ids(self) -> np.ndarray:
        """[n_rows] id of every stored row, -1 for the dead rows of removed owners."""
        out = np.full(self.n_rows, -1, np.int64)
        live = self.live_slots()
        counts = self._count[live]
        total = int(counts.sum())
        first = np.zeros(live.size, np.int64)
        if live.size:
            first[1:] = np.cumsum(counts)[:-1]
        item = np.arange(total, dtype=np.int64) - np.repeat(first, counts)
        out[np.repeat(self._offset[live], counts) + item] = (np.repeat(live, counts) << self.id_bits) | item
        return out

    def gather_rows(self, slots: np.ndarray, count: int) -> np.ndarray:
        """[len(slots), count] row numbers of slots that each hold ``count`` vectors."""
        return self.slot_offset[slots][:, None] + np.arange(count, dtype=np.int64)[None, :]

    # -- persistence -------------------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        self.compact()
        live = self.live_slots()
        arrays = {
            "vectors": self.vectors[: self.n_rows],
            "slot_numbers": live.astype(np.int64),
            "slot_keys": np.array([self.slot_key[s] for s in live], dtype=str) if live.size else np.array([], "U1"),
            "slot_offsets": self.slot_offset[live],
            "slot_counts": self.slot_count[live],
            "n_slots_ever": np.array([len(self.slot_key)], np.int64),
        }
        for name in self.payload_shapes:
            arrays[f"payload_{name}"] = self.payload[name][: self.n_rows]
        return arrays

    @classmethod
    def from_arrays(cls, arrays, dim: int, id_bits: int,
                    payload_shapes: dict[str, tuple] | None = None) -> "VectorStore":
        store = cls(dim, id_bits, payload_shapes)
        store.vectors = np.ascontiguousarray(arrays["vectors"], np.float32)
        if store.vectors.ndim != 2 or store.vectors.shape[1] != store.dim:
            raise PrototypeError(f"saved index vectors have shape {store.vectors.shape}, expected [n, {dim}]")
        store.n_rows = store.vectors.shape[0]
        for name in store.payload_shapes:
            store.payload[name] = np.ascontiguousarray(arrays[f"payload_{name}"], np.int64)
        n_slots = int(arrays["n_slots_ever"][0])
        numbers = np.asarray(arrays["slot_numbers"], np.int64)
        store.slot_key = [None] * n_slots
        store._offset = np.zeros(n_slots, np.int64)
        store._count = np.zeros(n_slots, np.int64)
        store._alive = np.zeros(n_slots, bool)
        store._offset[numbers] = arrays["slot_offsets"]
        store._count[numbers] = arrays["slot_counts"]
        store._alive[numbers] = True
        for slot, key in zip(numbers.tolist(), arrays["slot_keys"].tolist()):
            store.slot_key[slot] = key
            store.key_to_slot[key] = slot
        if int(store.slot_count.sum()) != store.n_rows:
            raise PrototypeError("saved index is inconsistent (slot counts do not add up to the stored vectors)")
        return store


class IVFStage:
    """A faiss IVF (8-bit scalar quantizer, inner product) over all stored vectors, keyed by store ids."""

    def __init__(self, index, trained_on: int):
        self.index = index
        self.trained_on = int(trained_on)

    @classmethod
    def build(cls, store: VectorStore, nlist: int | None, points_per_cell: int, seed: int) -> "IVFStage":
        faiss = import_faiss()

        n = store.n_live_rows
        nlist = int(nlist or auto_nlist(n))
        nlist = max(1, min(nlist, n // 4 if n >= 64 else 1))
        quantizer = faiss.IndexFlatIP(store.dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, store.dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.niter = 10
        index.cp.seed = int(seed)
        index.cp.max_points_per_centroid = int(points_per_cell)
        index.cp.min_points_per_centroid = 1
        store.compact()
        vectors = store.vectors[: store.n_rows]
        # A deterministic sample: faiss would subsample the same way, but copying 1.6M vectors first is waste.
        n_train = min(n, nlist * int(points_per_cell))
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, n_train, replace=False))] if n_train < n else vectors
        # Small indexes train and fill faster on one thread (see kmeans.SINGLE_THREAD_WORK).
        threads = 1 if n * nlist * store.dim < SINGLE_THREAD_WORK else None
        with faiss_threads(threads):
            index.train(np.ascontiguousarray(sample))
            # After compact() the live slots' rows are contiguous and in slot order, as their ids are.
            live = store.live_slots()
            if live.size:
                ids = np.concatenate([store.ids(s) for s in live])
                index.add_with_ids(np.ascontiguousarray(vectors), ids)
        stage = cls(index, n)
        return stage

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        threads = 1 if vectors.shape[0] * self.nlist * vectors.shape[1] < SINGLE_THREAD_WORK else None
        with faiss_threads(threads):
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))

    def remove(self, ids: np.ndarray) -> None:
        faiss = import_faiss()

        ids = np.ascontiguousarray(ids, np.int64)
        with faiss_threads(1):  # a scan of the lists: memory-bound, and usually a handful of ids
            self.index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))

    def search(self, queries: np.ndarray, depth: int, nprobe: int, threads: int | None = None):
        """(similarities, ids) [nq, depth] of the nearest stored vectors (ids -1 where fewer exist)."""
        self.index.nprobe = int(min(nprobe, self.nlist))
        with faiss_threads(threads):
            return self.index.search(np.ascontiguousarray(queries, np.float32), int(depth))

    def save(self, path: Path) -> None:
        faiss = import_faiss()

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, trained_on: int) -> "IVFStage":
        faiss = import_faiss()

        return cls(faiss.read_index(str(path)), trained_on)


def _new_generation() -> str:
    return f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:8]}"


def save_store(directory: Path, name: str, store: VectorStore, ivf: IVFStage | None, meta: dict) -> Path:
    """Write ``<name>.json`` (manifest) and its generation's data files into ``directory``, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / f"{name}.json"
    previous = _read_manifest(manifest_path) if manifest_path.exists() else None
    generation = _new_generation()
    arrays_name = f"{name}-{generation}.npz"
    with atomic_path(directory / arrays_name) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **store.to_arrays())
    ivf_name = None
    if ivf is not None:
        ivf_name = f"{name}-{generation}.faiss"
        with atomic_path(directory / ivf_name) as tmp:
            ivf.save(tmp)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "generation": generation,
        "dim": store.dim,
        "id_bits": store.id_bits,
        "arrays": arrays_name,
        "ivf": ivf_name,
        "ivf_trained_on": ivf.trained_on if ivf is not None else 0,
        "n_owners": len(store),
        "n_vectors": store.n_live_rows,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **meta,
    }
    atomic_write_json(manifest_path, manifest)
    # The new manifest is in place: the previous generation's files are no longer referenced.
    if previous is not None and previous.get("generation") != generation:
        for key in ("arrays", "ivf"):
            old = previous.get(key)
            if old and old not in (arrays_name, ivf_name):
                try:
                    (directory / old).unlink()
                except FileNotFoundError:
                    pass
    return manifest_path


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PrototypeError(
            f"index manifest {path} is unreadable ({exc}); delete the index folder to rebuild it"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise PrototypeError(f"{path} is not a napari-slpd index manifest")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise PrototypeError(f"{path} was written by a newer napari-slpd (format {manifest.get('version')}); upgrade")
    return manifest


def load_store(directory: Path, name: str, payload_shapes: dict[str, tuple] | None = None):
    """(store, ivf or None, manifest) saved by :func:`save_store`."""
    directory = Path(directory)
    manifest_path = directory / f"{name}.json"
    if not manifest_path.exists():
        raise PrototypeError(f"no saved index {name!r} in {directory}")
    manifest = _read_manifest(manifest_path)
    arrays_path = directory / manifest["arrays"]
    try:
        with np.load(arrays_path, allow_pickle=False) as arrays:
            store = VectorStore.from_arrays(arrays, int(manifest["dim"]), int(manifest["id_bits"]), payload_shapes)
    except (OSError, KeyError, ValueError) as exc:
        raise PrototypeError(
            f"saved index data {arrays_path} is unreadable ({exc}); delete {directory} to rebuild"
        ) from exc
    ivf = None
    if manifest.get("ivf"):
        try:
            ivf = IVFStage.load(directory / manifest["ivf"], int(manifest.get("ivf_trained_on", 0)))
        except RuntimeError as exc:
            raise PrototypeError(
                f"saved faiss index {manifest['ivf']} is unreadable ({exc}); delete {directory} to rebuild"
            ) from exc
    return store, ivf, manifest


# -- the cohort index -------------------------------------------------------------------------------------


class CohortIndex:
    """Prototype sets of a cohort's slides, queried for the most similar slides.

    Build it from a cohort's cached prototypes (:meth:`build`, :meth:`open`) or fill it yourself
    (:meth:`add`). ``query`` takes a slide id of the index, a SlidePrototypes or a [K, E] array.
    """

    NAME = "cohort"

    def __init__(self, dim: int | None = None, config: IndexConfig | None = None):
        self.config = config or IndexConfig()
        self._store: VectorStore | None = VectorStore(dim, PROTO_ID_BITS) if dim else None
        self._ivf: IVFStage | None = None
        self.stamps: dict[str, str] = {}  # slide id -> prototypes file stamp, to notice recomputed prototypes
        self.source: str | None = None  # what the prototypes were computed from (all slides alike)
        self.skipped: dict[str, str] = {}  # slides of the cohort left out, and why

    # -- contents ----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return None if self._store is None else self._store.dim

    def __len__(self) -> int:
        return 0 if self._store is None else len(self._store)

    def __contains__(self, slide_id: str) -> bool:
        return self._store is not None and slide_id in self._store.key_to_slot

    @property
    def slide_ids(self) -> list[str]:
        return [] if self._store is None else self._store.keys()

    @property
    def n_prototypes(self) -> int:
        return 0 if self._store is None else self._store.n_live_rows

    @property
    def uses_ivf(self) -> bool:
        return self._ivf is not None

    def prototypes(self, slide_id: str) -> np.ndarray:
        """The stored (normalized) prototypes [K, E] of a slide."""
        slot = self._slot(slide_id)
        return self._store.vectors[self._store.rows(slot)].copy()

    def _slot(self, slide_id: str) -> int:
        if slide_id not in self:
            known = ", ".join(self.slide_ids[:8]) + (", ..." if len(self) > 8 else "")
            raise PrototypeError(f"slide {slide_id!r} is not in the cohort index (indexed: {known or 'none'})")
        return self._store.key_to_slot[slide_id]

    # -- changes -----------------------------------------------------------------------------------------
    def add(self, slide_id: str, prototypes, stamp: str | None = None, source: str | None = None) -> None:
        """Add (or replace) a slide's prototype set [K, E] (or SlidePrototypes)."""
        self._add(slide_id, prototypes, stamp, source)
        self._after_change()

    def add_many(self, items: Iterable[tuple[str, object]], progress=None, cancel=None) -> int:
        """Add (slide_id, prototypes) pairs with one index update at the end; returns how many were added."""
        items = list(items)
        done = 0
        for slide_id, protos in items:
            if is_cancelled(cancel):
                break
            self._add(slide_id, protos, None, None)
            done += 1
            if progress is not None:
                progress(done, len(items))
        self._after_change()
        return done

    def add_arrays(self, slide_ids, prototypes, source: str | None = None, progress=None, cancel=None) -> None:
        """Add (or replace) N slides holding K prototypes each, given as one array [N, K, E]."""
        slide_ids = [str(s) for s in slide_ids]
        prototypes = np.asarray(prototypes)
        if prototypes.ndim != 3 or prototypes.shape[0] != len(slide_ids):
            raise PrototypeError(f"prototypes must be [N, K, E] for {len(slide_ids)} slides, got {prototypes.shape}")
        step = 8192
        for start in range(0, len(slide_ids), step):
            if is_cancelled(cancel):
                break
            self._add_batch(slide_ids[start : start + step], prototypes[start : start + step], None, source)
            if progress is not None:
                progress(min(start + step, len(slide_ids)), len(slide_ids))
        self._after_change()

    def _add(self, slide_id: str, prototypes, stamp: str | None, source: str | None) -> None:
        if isinstance(prototypes, SlidePrototypes):
            source = source or prototypes.source
            prototypes = prototypes.centroids
        protos = as_prototype_set(prototypes, f"prototypes of slide {slide_id!r}")
        self._add_batch([slide_id], protos[None], None if stamp is None else [stamp], source)

    def _add_batch(self, slide_ids: list[str], protos: np.ndarray, stamps: list[str] | None,
                   source: str | None) -> None:
        N, K, E = protos.shape
        if K == 0 or E == 0:
            raise PrototypeError(f"prototype sets must be non-empty, got shape {protos.shape}")
        if K >= (1 << PROTO_ID_BITS):
            raise PrototypeError(f"slides with {K} prototypes cannot be indexed; at most {(1 << PROTO_ID_BITS) - 1}")
        if protos.dtype.kind not in "fiu" or not np.isfinite(protos).all():
            bad = [slide_ids[i] for i in np.flatnonzero(~np.isfinite(protos).all(axis=(1, 2)))[:5]]
            raise PrototypeError(
                f"prototypes of slide(s) {', '.join(bad)} contain NaN or infinite values; recompute them"
            )
        if self._store is None:
            self._store = VectorStore(E, PROTO_ID_BITS)
        elif E != self._store.dim:
            raise PrototypeError(
                f"slide {slide_ids[0]!r} has {E}-d prototypes but the cohort index holds {self._store.dim}-d ones: "
                "its features were computed with another encoder; extract it again with the cohort's encoder "
                "(or rebuild the index if the whole cohort changed)"
            )
        if source is not None:
            if self.source is not None and source != self.source and len(self):
                raise PrototypeError(
                    f"slide {slide_ids[0]!r} has prototypes of {source} but the cohort index holds prototypes of "
                    f"{self.source}; compute all slides' prototypes from the same source"
                )
            self.source = source
        for slide_id in slide_ids:
            if slide_id in self:
                self.remove(slide_id, _update=False)
        slots = self._store.add_batch(slide_ids, protos)
        if stamps is not None:
            self.stamps.update(zip(slide_ids, stamps))
        if self._ivf is not None:
            start = int(self._store.slot_offset[slots[0]])
            ids = np.concatenate([self._store.ids(int(s)) for s in slots])
            self._ivf.add(self._store.vectors[start : start + N * K], ids)

    def remove(self, slide_id: str, _update: bool = True) -> bool:
        """Remove a slide; returns whether it was there."""
        if self._store is None:
            return False
        slot = self._store.key_to_slot.get(slide_id)
        if slot is None:
            return False
        if self._ivf is not None:
            self._ivf.remove(self._store.ids(slot))
        self._store.remove(slide_id)
        self.stamps.pop(slide_id, None)
        if self._store.dead_rows > max(1024, self._store.n_rows // 2):
            self._store.compact()
        if _update:
            self._after_change()
        return True

    def _wants_ivf(self) -> bool:
        if self.config.method == "ivf":
            return self.n_prototypes > 0
        if self.config.method == "exact":
            return False
        return self.n_prototypes > self.config.exact_max_prototypes

    def _after_change(self) -> None:
        """Build, rebuild or drop the IVF stage as the cohort's size requires."""
        wants = self._wants_ivf()
        if not wants:
            self._ivf = None
            return
        grown = self._ivf is not None and self.n_prototypes > 4 * max(1, self._ivf.trained_on)
        if self._ivf is None or grown:
            self.rebuild_ivf()

    def rebuild_ivf(self) -> None:
        """(Re)train the IVF stage on the current prototypes."""
        t0 = time.perf_counter()
        self._ivf = IVFStage.build(self._store, self.config.nlist, self.config.train_points_per_cell, self.config.seed)
        log.info("cohort index: IVF with %d cells over %d prototypes built in %.1f s",
                 self._ivf.nlist, self.n_prototypes, time.perf_counter() - t0)

    # -- queries -----------------------------------------------------------------------------------------
    def _resolve_query(self, query) -> tuple[np.ndarray, str | None]:
        if isinstance(query, str):
            return self.prototypes(query), query
        if isinstance(query, SlidePrototypes):
            protos = as_prototype_set(query.centroids, "query prototypes").astype(np.float32)
            return l2_normalize(protos), query.slide_id
        return l2_normalize(as_prototype_set(query, "query prototypes").astype(np.float32)), None

    def query(
        self,
        query,
        n: int = 10,
        exclude: Iterable[str] | None = None,
        method: str | None = None,
        include_self: bool = False,
    ) -> list[SimilarSlide]:
        """The ``n`` slides most similar to ``query`` (a slide id, SlidePrototypes or [K, E] prototypes),
        best first, each with its distance and matched prototype pairs. A query slide is left out of its
        own results unless ``include_self``; ``exclude`` leaves out more slides. ``method`` overrides the
        configured one ("exact" for a guaranteed exact ranking)."""
        if len(self) == 0:
            raise PrototypeError(
                "the cohort index is empty: no slide has prototypes yet (run `slpd prototypes COHORT` first)"
            )
        q, self_id = self._resolve_query(query)
        if q.shape[1] != self.dim:
            raise PrototypeError(
                f"the query has {q.shape[1]}-d prototypes but the cohort's are {self.dim}-d: it was computed with "
                "another encoder"
            )
        n = int(n)
        if n < 1:
            raise PrototypeError(f"the number of similar slides asked for must be at least 1, got {n}")
        excluded = set(exclude or ())
        if self_id is not None and not include_self:
            excluded.add(self_id)
        excluded_slots = np.array([self._store.key_to_slot[s] for s in excluded if s in self], np.int64)
        method = method or self.config.method
        if method not in ("auto", "exact", "ivf"):
            raise PrototypeError(f"query method must be 'auto', 'exact' or 'ivf', not {method!r}")
        use_ivf = method == "ivf" or (method == "auto" and self._ivf is not None)
        if use_ivf and self._ivf is None:
            self.rebuild_ivf()
        matches = self._query_ivf(q, n, excluded_slots) if use_ivf else self._query_exact(q, n, excluded_slots)
        return [self._result(match, rank) for rank, match in enumerate(matches, start=1)]

    def _result(self, match, rank: int) -> SimilarSlide:
        sim = match.sim
        return SimilarSlide(
            slide_id=self._store.slot_key[match.candidate],
            distance=float(match.distance),
            similarity=float(match.similarity),
            pairs=pairs_from_similarity(sim),
            n_prototypes=int(sim.shape[1]),
            rank=rank,
        )

    def _offer(self, top: TopN, q: np.ndarray, slots: np.ndarray) -> None:
        """Score ``slots`` exactly (grouped by their number of prototypes) into ``top``."""
        store = self._store
        counts = store.slot_count[slots]
        for count in np.unique(counts):
            group = slots[counts == count]
            top.offer(candidate_similarities(q, store.vectors[store.gather_rows(group, int(count))]), group)

    def _query_exact(self, q: np.ndarray, n: int, excluded_slots: np.ndarray) -> list[TopMatch]:
        """Every slide scored: one GEMM against all stored prototypes, then the bound-pruned exact top n."""
        store = self._store
        slots = store.live_slots()
        if excluded_slots.size:
            slots = slots[~np.isin(slots, excluded_slots)]
        if slots.size == 0:
            return []
        all_sims = store.vectors[: store.n_rows] @ q.T  # [rows, K]
        blocks, ids = [], []
        counts = store.slot_count[slots]
        for count in np.unique(counts):
            group = slots[counts == count]
            L = int(count)
            if group.size * L == store.n_rows and store.slot_offset[group[0]] == 0 and \
                    np.array_equal(store.slot_offset[group], np.arange(group.size) * L):
                block = all_sims.reshape(group.size, L, -1)  # all rows, in order: no gather needed
            else:
                block = all_sims[store.gather_rows(group, L)]
            blocks.append(block.transpose(0, 2, 1))  # [n_g, K, L] view
            ids.append(group)
        return top_matches(blocks, n, ids)

    def _query_ivf(self, q: np.ndarray, n: int, excluded_slots: np.ndarray) -> list[TopMatch]:
        """First stage: each query prototype's ``depth`` nearest stored prototypes (IVF). Their owners are
        the candidates; each gets an estimated upper bound on S: the best similarity retrieved for each
        query prototype, or that prototype's ``depth``-th similarity where nothing of the slide was
        retrieved (its prototypes are all further away). Candidates are scored exactly in decreasing
        order of the estimate, in growing batches, until the estimate of the next one cannot reach the
        n-th best exact S."""
        cfg = self.config
        K = q.shape[0]
        depth = min(max(cfg.depth, 8 * n), self.n_prototypes)
        while True:
            D, I = self._ivf.search(q, depth, cfg.nprobe, cfg.search_threads)
            hit = I >= 0
            slots, _ = self._store.decode(I[hit])
            krow = np.nonzero(hit)[0]
            keep = self._store.slot_alive[slots]
            if excluded_slots.size:
                keep &= ~np.isin(slots, excluded_slots)
            slots, krow, sims = slots[keep], krow[keep], D[hit][keep]
            unique, inverse = np.unique(slots, return_inverse=True)
            if unique.size >= n or depth >= self.n_prototypes:
                break
            depth = min(depth * 4, self.n_prototypes)  # too few distinct slides near the query: look further
        top = TopN(n)
        if unique.size == 0:
            return []
        # Where a query prototype retrieved fewer than depth prototypes, everything else is further than
        # anything: -1 is a safe floor for cosines.
        floor = np.where(hit.all(axis=1), D[:, -1], -1.0).astype(np.float32)
        best = np.full((unique.size, K), -np.inf, np.float32)
        np.maximum.at(best, (inverse, krow), sims)
        estimate = np.where(np.isfinite(best), best, floor[None, :]).sum(axis=1) + K * _QUANTIZATION_SLACK
        estimate -= np.maximum(K, self._store.slot_count[unique])  # an estimate of -distance
        order = np.argsort(-estimate, kind="stable")[: max(cfg.max_candidates, 20 * n)]
        start, batch = 0, max(64, 4 * n)
        while start < order.size:
            if top.full and estimate[order[start]] < top.threshold:
                break
            self._offer(top, q, unique[order[start : start + batch]])
            start += batch
            batch *= 2
        return top.results()

    # -- cohorts -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cohort, config: IndexConfig | None = None, progress=None, cancel=None) -> "CohortIndex":
        """An index of every slide of ``cohort`` with cached prototypes (slides without are in ``skipped``)."""
        index = cls(config=config)
        index.sync(cohort, progress=progress, cancel=cancel)
        return index

    def sync(self, cohort, progress=None, cancel=None) -> dict[str, list[str]]:
        """Bring the index up to date with the cohort's prototype cache: add new slides, re-add slides whose
        prototypes were recomputed, remove slides gone from the cohort or its cache. Returns the changes."""
        from napari_slpd.prototypes.cache import prototypes_stamp, read_centroids

        slide_ids = cohort.slide_ids()
        if not slide_ids:
            raise PrototypeError(f"cohort {cohort.root} has no slides; add slides with `slpd extract` first")
        changes = {"added": [], "updated": [], "removed": []}
        self.skipped = {}
        wanted: dict[str, str] = {}
        for slide_id in slide_ids:
            stamp = prototypes_stamp(cohort, slide_id)
            if stamp is None:
                self.skipped[slide_id] = "no prototypes (run `slpd prototypes`)"
            else:
                wanted[slide_id] = stamp
        for slide_id in list(self.slide_ids):
            if slide_id not in wanted:
                self.remove(slide_id, _update=False)
                changes["removed"].append(slide_id)
        todo = [s for s in wanted if self.stamps.get(s) != wanted[s] or s not in self]
        loaded: list[tuple[str, np.ndarray, str, str]] = []
        for i, slide_id in enumerate(todo):
            if is_cancelled(cancel):
                break
            try:
                centroids, attrs = read_centroids(cohort.prototypes_path(slide_id))
            except PrototypeError as exc:
                self.skipped[slide_id] = str(exc)
            else:
                loaded.append((slide_id, centroids, wanted[slide_id], attrs.get("source")))
            if progress is not None:
                progress(i + 1, len(todo))
        replaced = {item[0] for item in loaded}
        kept = [s for s in self.slide_ids if s not in replaced]
        self._check_consistent(loaded, kept)
        previous = set(self.slide_ids)
        if not kept and self._store is not None:
            # Every slide is re-read (e.g. prototypes recomputed from another source or encoder): start
            # afresh, so that the new prototypes need not match the dims or source of the old ones.
            self._store, self._ivf, self.source, self.stamps = None, None, None, {}
        for slide_id, centroids, stamp, source in loaded:
            (changes["updated"] if slide_id in previous else changes["added"]).append(slide_id)
            self._add(slide_id, centroids, stamp, source)
        if len(self) == 0:
            raise PrototypeError(
                f"no slide of cohort {cohort.root} has prototypes yet; run `slpd prototypes {cohort.root}` first"
            )
        self._after_change()
        return changes

    def _check_consistent(self, loaded, kept: list[str]) -> None:
        """One clear message for a cohort whose slides' prototypes cannot be compared with each other
        (``loaded``: slides about to be (re-)added; ``kept``: indexed slides that stay as they are)."""
        by_dim: dict[int, list[str]] = {}
        by_source: dict[str, list[str]] = {}
        if kept:
            by_dim[self._store.dim] = list(kept)
            if self.source is not None:
                by_source[self.source] = list(kept)
        for slide_id, centroids, _, source in loaded:
            by_dim.setdefault(int(centroids.shape[1]), []).append(slide_id)
            if source:
                by_source.setdefault(source, []).append(slide_id)
        if len(by_dim) > 1:
            parts = [f"{d}-d: {len(ids)} slide(s) ({', '.join(sorted(ids)[:4])}{', ...' if len(ids) > 4 else ''})"
                     for d, ids in sorted(by_dim.items(), key=lambda item: -len(item[1]))]
            raise PrototypeError(
                "the cohort's slides have embeddings of different sizes, so they cannot be compared: "
                + "; ".join(parts) + ". Extract every slide with the same encoders (slpd extract --overwrite)"
            )
        if len(by_source) > 1:
            parts = [f"{src}: {', '.join(sorted(ids)[:4])}{', ...' if len(ids) > 4 else ''}"
                     for src, ids in by_source.items()]
            raise PrototypeError(
                "the cohort's prototypes were computed from different sources (" + "; ".join(parts)
                + "); recompute them all with the same --source"
            )

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """Save into ``directory`` (e.g. ``cohort.index_dir``); atomic: readers see the old or the new index."""
        if self._store is None:
            raise PrototypeError("nothing to save: the cohort index is empty")
        meta = {"config": asdict(self.config), "stamps": self.stamps, "source": self.source}
        return save_store(Path(directory), self.NAME, self._store, self._ivf, meta)

    @classmethod
    def load(cls, directory, config: IndexConfig | None = None) -> "CohortIndex":
        store, ivf, manifest = load_store(Path(directory), cls.NAME)
        index = cls(config=config or IndexConfig.from_dict(manifest.get("config", {})))
        index._store, index._ivf = store, ivf
        index.stamps = dict(manifest.get("stamps", {}))
        index.source = manifest.get("source")
        if index._ivf is not None and not index._wants_ivf():
            index._ivf = None
        elif index._ivf is None and index._wants_ivf():
            index.rebuild_ivf()
        return index

    @classmethod
    def open(cls, cohort, config: IndexConfig | None = None, progress=None, cancel=None,
             save: bool = True) -> "CohortIndex":
        """The cohort's saved index brought up to date with its prototype cache (built when missing or
        unreadable), and saved again when anything changed."""
        index = None
        manifest = cohort.index_dir / f"{cls.NAME}.json"
        if manifest.exists():
            try:
                index = cls.load(cohort.index_dir, config=config)
            except PrototypeError as exc:
                log.warning("rebuilding the cohort index: %s", exc)
        if index is None:
            index = cls(config=config)
            changed = True
        else:
            changed = False
        changes = index.sync(cohort, progress=progress, cancel=cancel)
        changed = changed or any(changes.values())
        if save and changed and not is_cancelled(cancel):
            index.save(cohort.index_dir)
        return index

    def __repr__(self) -> str:
        mode = f"IVF{self._ivf.nlist}" if self._ivf is not None else "exact"
        return f"CohortIndex({len(self)} slides, {self.n_prototypes} prototypes, dim={self.dim}, {mode})"

