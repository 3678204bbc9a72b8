"""Vector storage shared by the cohort index (slide prototypes) and the region index (region embeddings).

``VectorStore``: L2-normalized float32 vectors grouped by owner (a slide), the single source of truth for
exact scores. ``IVFStage``: a faiss IVF over all stored vectors (the region index's large-cohort path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_slpd.errors import PrototypeError
from napari_slpd.prototypes.kmeans import (
    SINGLE_THREAD_WORK,
    faiss_threads,
    import_faiss,
    l2_normalize,
)


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
                    payload_shapes: dict[str, tuple] | None = None) -> VectorStore:
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
    def build(cls, store: VectorStore, nlist: int | None, points_per_cell: int, seed: int) -> IVFStage:
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
    def load(cls, path: Path, trained_on: int) -> IVFStage:
        faiss = import_faiss()

        return cls(faiss.read_index(str(path)), trained_on)
