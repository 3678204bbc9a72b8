"""Region retrieval: the regions of a cohort most similar (cosine) to a clicked region or any vector.

All regions' embeddings (or all patches' features) of the cohort are kept L2-normalized in one array;
up to ``exact_max_vectors`` a query is one exact matrix-vector product, beyond that a faiss IVF index
(the same first stage as the cohort index) answers it. Saved beside the cohort index, one per source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_slpd.errors import PrototypeError
from napari_slpd.prototypes.kmeans import check_embeddings, l2_normalize
from napari_slpd.similarity.persistence import load_store, save_store
from napari_slpd.similarity.store import IVFStage, VectorStore
from napari_slpd.utils.progress import is_cancelled

log = logging.getLogger(__name__)

REGION_ID_BITS = 24  # a faiss id is slot << 24 | region index (up to 16.7M regions or patches per slide)


@dataclass
class RegionHit:
    """A retrieved region: its slide, its index in that slide's features, its level-0 (x, y) top-left."""

    slide_id: str
    region_index: int
    coords: tuple[int, int]
    similarity: float

    def to_dict(self) -> dict:
        return {"slide_id": self.slide_id, "region_index": self.region_index,
                "coords": list(self.coords), "similarity": round(self.similarity, 6)}


class RegionIndex:
    """Nearest regions across a cohort. ``source``: "region_embeddings" or "features" (patches)."""

    def __init__(self, dim: int | None = None, source: str = "region_embeddings",
                 exact_max_vectors: int = 1_000_000, nprobe: int = 16, seed: int = 0):
        self.source = source
        self.exact_max_vectors = int(exact_max_vectors)
        self.nprobe = int(nprobe)
        self.seed = int(seed)
        self._store: VectorStore | None = (
            VectorStore(dim, REGION_ID_BITS, {"coords": (2,)}) if dim else None
        )
        self._ivf: IVFStage | None = None
        self.settings_keys: dict[str, str] = {}  # slide id -> features settings key it was indexed from

    @property
    def name(self) -> str:
        return f"regions-{self.source}"

    @property
    def dim(self) -> int | None:
        return None if self._store is None else self._store.dim

    def __len__(self) -> int:
        return 0 if self._store is None else self._store.n_live_rows

    @property
    def slide_ids(self) -> list[str]:
        return [] if self._store is None else self._store.keys()

    def __contains__(self, slide_id: str) -> bool:
        return self._store is not None and slide_id in self._store.key_to_slot

    # -- changes -----------------------------------------------------------------------------------------
    def add(self, slide_id: str, embeddings, coords, settings_key: str | None = None) -> None:
        """Add (or replace) a slide's regions: embeddings [M, E], level-0 top-left coords [M, 2]."""
        x = check_embeddings(embeddings, f"embeddings of slide {slide_id!r}")
        coords = np.asarray(coords, np.int64)
        if coords.shape != (x.shape[0], 2):
            raise PrototypeError(f"slide {slide_id!r}: {x.shape[0]} embeddings but coords of shape {coords.shape}")
        if x.shape[0] == 0:
            raise PrototypeError(f"slide {slide_id!r} has no regions to index")
        if self._store is None:
            self._store = VectorStore(x.shape[1], REGION_ID_BITS, {"coords": (2,)})
        elif x.shape[1] != self._store.dim:
            raise PrototypeError(
                f"slide {slide_id!r} has {x.shape[1]}-d embeddings but the region index holds {self._store.dim}-d "
                "ones; they come from different encoders"
            )
        self.remove(slide_id, _update=False)
        slot = self._store.add(slide_id, x, {"coords": coords})
        if settings_key is not None:
            self.settings_keys[slide_id] = settings_key
        if self._ivf is not None:
            self._ivf.add(self._store.vectors[self._store.rows(slot)], self._store.ids(slot))
        self._after_change()

    def remove(self, slide_id: str, _update: bool = True) -> bool:
        if self._store is None or slide_id not in self._store.key_to_slot:
            return False
        slot = self._store.key_to_slot[slide_id]
        if self._ivf is not None:
            self._ivf.remove(self._store.ids(slot))
        self._store.remove(slide_id)
        self.settings_keys.pop(slide_id, None)
        if _update:
            self._after_change()
        return True

    def _after_change(self) -> None:
        if len(self) <= self.exact_max_vectors:
            self._ivf = None
        elif self._ivf is None or len(self) > 4 * self._ivf.trained_on:
            self._ivf = IVFStage.build(self._store, None, 64, self.seed)

    # -- queries -----------------------------------------------------------------------------------------
    def vector(self, slide_id: str, region_index: int) -> np.ndarray:
        slot = self._slot(slide_id)
        count = int(self._store.slot_count[slot])
        if not 0 <= int(region_index) < count:
            raise PrototypeError(f"slide {slide_id!r} has {count} regions; there is no region {region_index}")
        return self._store.vectors[self._store.rows(slot).start + int(region_index)].copy()

    def _slot(self, slide_id: str) -> int:
        if slide_id not in self:
            raise PrototypeError(f"slide {slide_id!r} is not in the region index")
        return self._store.key_to_slot[slide_id]

    def query(self, slide_id: str | None = None, region_index: int | None = None, vector=None, n: int = 10,
              exclude_same_slide: bool = False) -> list[RegionHit]:
        """The ``n`` regions most similar to region ``region_index`` of ``slide_id`` (itself excluded) or to
        ``vector``, best first. ``exclude_same_slide`` keeps only other slides' regions."""
        if len(self) == 0:
            raise PrototypeError("the region index is empty: extract features for the cohort first")
        if vector is None:
            if slide_id is None or region_index is None:
                raise PrototypeError("give a slide id and region index, or a query vector")
            q = self.vector(slide_id, region_index)
            self_id = (np.int64(self._slot(slide_id)) << REGION_ID_BITS) | np.int64(region_index)
        else:
            q = check_embeddings(np.asarray(vector).reshape(1, -1), "query vector")[0]
            if q.shape[0] != self.dim:
                raise PrototypeError(f"the query vector is {q.shape[0]}-d but the region index is {self.dim}-d")
            q = l2_normalize(q)
            self_id = None
        n = int(n)
        if n < 1:
            raise PrototypeError(f"the number of regions asked for must be at least 1, got {n}")
        skip_slot = self._slot(slide_id) if (exclude_same_slide and slide_id is not None) else None
        ids, sims = self._search(q, n, self_id, skip_slot)
        slots, items = self._store.decode(ids)
        hits = []
        for slot, item, sim in zip(slots.tolist(), items.tolist(), sims.tolist()):
            row = self._store.rows(slot).start + item
            x, y = self._store.payload["coords"][row]
            hits.append(RegionHit(self._store.slot_key[slot], int(item), (int(x), int(y)), float(sim)))
        return hits

    def _search(self, q: np.ndarray, n: int, self_id, skip_slot) -> tuple[np.ndarray, np.ndarray]:
        store = self._store
        if self._ivf is None:
            sims = store.vectors[: store.n_rows] @ q
            row_ids = store.row_ids()
            valid = row_ids >= 0
            if self_id is not None:
                valid &= row_ids != self_id
            if skip_slot is not None:
                valid &= (row_ids >> REGION_ID_BITS) != skip_slot
            candidates = np.flatnonzero(valid)
            if candidates.size == 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            m = min(n, candidates.size)
            top = candidates[np.argpartition(-sims[candidates], m - 1)[:m]]
            top = top[np.lexsort((row_ids[top], -sims[top]))]
            return row_ids[top], sims[top]
        depth = n + 1
        while True:
            D, I = self._ivf.search(q[None], min(depth, len(self)), self.nprobe)
            D, I = D[0], I[0]
            keep = I >= 0
            if self_id is not None:
                keep &= I != self_id
            if skip_slot is not None:
                keep &= (I >> REGION_ID_BITS) != skip_slot
            if keep.sum() >= n or depth >= len(self):
                break
            depth *= 4
        # Exact similarities for what the quantized index found.
        ids = I[keep][: max(n, 1) * 4]
        slots, items = store.decode(ids)
        rows = store.slot_offset[slots] + items
        exact = store.vectors[rows] @ q
        order = np.lexsort((ids, -exact))[:n]
        return ids[order], exact[order]

    # -- cohorts and persistence ----------------------------------------------------------------------------
    @classmethod
    def build(cls, cohort, source: str = "region_embeddings", progress=None, cancel=None, **kwargs) -> RegionIndex:
        index = cls(source=source, **kwargs)
        index.sync(cohort, progress=progress, cancel=cancel)
        return index

    def sync(self, cohort, progress=None, cancel=None) -> bool:
        """Index every slide of the cohort with complete features (re-index re-extracted ones); returns
        whether anything changed."""
        from napari_slpd.errors import FeatureStoreError
        from napari_slpd.features.store import FeatureStore, read_store_attrs
        from napari_slpd.prototypes.cache import embeddings_of

        slide_ids = cohort.slide_ids()
        if not slide_ids:
            raise PrototypeError(f"cohort {cohort.root} has no slides")
        changed = False
        present = {}
        for slide_id in slide_ids:
            path = cohort.features_path(slide_id)
            if path.exists():
                try:
                    present[slide_id] = str(read_store_attrs(path).get("settings_key", ""))
                except FeatureStoreError as exc:
                    log.warning("%s: %s", slide_id, exc)
        for slide_id in self.slide_ids:
            if slide_id not in present:
                self.remove(slide_id)
                changed = True
        todo = [s for s in present if self.settings_keys.get(s) != present[s] or s not in self]
        for i, slide_id in enumerate(todo):
            if is_cancelled(cancel):
                break
            try:
                with FeatureStore.open(cohort.features_path(slide_id)) as store:
                    embeddings, coords, _, _ = embeddings_of(store, self.source)
                    self.add(slide_id, embeddings, coords, settings_key=present[slide_id])
                changed = True
            except (FeatureStoreError, PrototypeError) as exc:
                log.warning("region index: %s left out: %s", slide_id, exc)
            if progress is not None:
                progress(i + 1, len(todo))
        if len(self) == 0:
            raise PrototypeError(f"no slide of cohort {cohort.root} has extracted features; run `slpd extract` first")
        return changed

    def save(self, directory) -> Path:
        if self._store is None:
            raise PrototypeError("nothing to save: the region index is empty")
        meta = {"source": self.source, "settings_keys": self.settings_keys,
                "exact_max_vectors": self.exact_max_vectors, "nprobe": self.nprobe}
        return save_store(Path(directory), self.name, self._store, self._ivf, meta)

    @classmethod
    def load(cls, directory, source: str = "region_embeddings") -> RegionIndex:
        index = cls(source=source)
        store, ivf, manifest = load_store(Path(directory), index.name, {"coords": (2,)})
        index._store, index._ivf = store, ivf
        index.settings_keys = dict(manifest.get("settings_keys", {}))
        index.exact_max_vectors = int(manifest.get("exact_max_vectors", index.exact_max_vectors))
        index.nprobe = int(manifest.get("nprobe", index.nprobe))
        return index

    @classmethod
    def open(cls, cohort, source: str = "region_embeddings", progress=None, cancel=None,
             save: bool = True) -> RegionIndex:
        """The cohort's saved region index brought up to date (built when missing), saved when changed."""
        index = None
        if (cohort.index_dir / f"regions-{source}.json").exists():
            try:
                index = cls.load(cohort.index_dir, source=source)
            except PrototypeError as exc:
                log.warning("rebuilding the region index: %s", exc)
        fresh = index is None
        if fresh:
            index = cls(source=source)
        changed = index.sync(cohort, progress=progress, cancel=cancel) or fresh
        if save and changed and not is_cancelled(cancel):
            index.save(cohort.index_dir)
        return index
