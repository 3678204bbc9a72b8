"""The cohort index: which slides of a cohort are most similar to a query slide (SPEC section 3).

Slides are compared by the prototype set distance max(K, L) - S (matching.py). Every answer is exact: the
search (set_search.py) bounds every slide's S from one reduced-precision product of the query against
all stored prototypes (bounds.py), re-scores the slides whose bound could reach the top n in float32,
and solves only those that still could exactly. benchmarks/similar.py measures it on five cohort regimes
(recall 1.0 everywhere by construction; the first stage is int8 or bfloat16 by the CPU's units, see
bounds.py and the README's performance table for the figures at 100,000 slides); the earlier faiss IVF
shortlist reached recall@10 of 0.07-0.39 on cohorts whose tissue types are shared by many slides, and is
gone (``method="ivf"`` in saved settings reads as "auto").

Modules: store.py (float32 vectors by slide, the truth), bounds.py (the first stage; int8_codes.py and
int8_stage.py its int8 form, precision.py the choice, workers.py its threads), set_search.py (the
exact top n, one query or many), persistence.py (saving beside the cohort), this module (the index a
cohort, the GUI and the CLI use).

Batch API (evaluation's KNN and retrieval, label propagation, region retrieval's slide neighbours)::

    index.query_many(["s1", "s2", ...], n=10, with_pairs=False)  # -> [[SlideMatch, ...], ...], exact
    ids, distances = index.nearest(["s1", "s2", ...], n=10)    # -> [Q, n] str / float64 arrays (NaN pad)
    index.last_stats                                             # SearchStats of the last query (exact...)

Queries with the same number of prototypes share the first-stage product in batches of 16 (the reduced
copy of the cohort is read once per batch); a query slide is left out of its own results.

Slides can be added and removed at any time; the index is saved as float32 vectors (format version 2)
and the reduced copy is rebuilt at load. Version-1 indexes (with a faiss IVF file) load, and
``CohortIndex.open`` saves them again as version 2.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from napari_slpd.errors import PrototypeError, StorageError
from napari_slpd.prototypes.kmeans import SlidePrototypes, l2_normalize
from napari_slpd.similarity.bounds import BoundStage
from napari_slpd.similarity.matching import (
    as_prototype_set,
    pairs_from_similarity,
)
from napari_slpd.similarity.persistence import FORMAT_VERSION, load_store, save_store
from napari_slpd.similarity.precision import create_stage
from napari_slpd.similarity.set_search import (
    SearchStats,
    brute_force_search,
    full_product_search,
    search_many,
)
from napari_slpd.similarity.slide_search import SlideMatch
from napari_slpd.similarity.store import VectorStore, auto_nlist  # noqa: F401 (auto_nlist: re-exported)
from napari_slpd.utils.progress import is_cancelled

log = logging.getLogger(__name__)

PROTO_ID_BITS = 8  # a stored prototype's id is slot << 8 | prototype index (K <= 255)
METHODS = ("auto", "exact", "bruteforce")


# -- configuration and results ------------------------------------------------------------------------------


@dataclass
class IndexConfig:
    """How queries are answered. ``method``: "auto" (bounded exact search, reduced-precision first stage),
    "exact" (float32 product against every stored prototype, then the same exact solves: the reference,
    ``slpd similar --exact``) or "bruteforce" (the Hungarian algorithm against every slide).
    ``precision`` of the first stage: "auto" (bfloat16 with AMX, int8 with 8-bit dot products, else
    float32 or int8 as timed; precision.py), "int8", "bfloat16", "float16" or "float32"; ``device``: "auto"
    (CUDA when available), "cpu", "cuda".
    Settings of the former IVF stage (nlist, nprobe, depth, ...) are accepted by ``from_dict`` and ignored."""

    method: str = "auto"
    precision: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise PrototypeError(f"index method must be one of {', '.join(METHODS)}, not {self.method!r}")

    @classmethod
    def from_dict(cls, values: dict) -> IndexConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if values.get("method") == "ivf":  # format 1: the approximate stage is gone; auto is exact
            values["method"] = "auto"
        return cls(**values)


# The former name of the one similar-slide result type.
SimilarSlide = SlideMatch


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
        self._stage: BoundStage | None = None  # built at the first bounded query, then kept in step
        self.stamps: dict[str, str] = {}  # slide id -> prototypes file stamp, to notice recomputed prototypes
        self.source: str | None = None  # what the prototypes were computed from (all slides alike)
        self.skipped: dict[str, str] = {}  # slides of the cohort left out, and why
        self.last_stats: SearchStats | None = None
        self.loaded_version: int | None = None  # format version of the file it was loaded from
        self.save_error: str | None = None  # why open() could not save it (full disk, read-only), if so

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
        """Always False: every answer is exact (kept for callers of format 1)."""
        return False

    @property
    def nbytes(self) -> int:
        """Memory held: float32 vectors plus the first stage's reduced copy."""
        store = 0 if self._store is None else self._store.vectors.nbytes
        return store + (0 if self._stage is None else self._stage.nbytes)

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

    def add_many(self, items: Iterable[tuple[str, object]], progress=None, cancel=None) -> int:
        """Add (slide_id, prototypes) pairs; returns how many were added."""
        items = list(items)
        done = 0
        for slide_id, protos in items:
            if is_cancelled(cancel):
                break
            self._add(slide_id, protos, None, None)
            done += 1
            if progress is not None:
                progress(done, len(items))
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
                self.remove(slide_id)
        slots = self._store.add_batch(slide_ids, protos)
        if stamps is not None:
            self.stamps.update(zip(slide_ids, stamps))
        if self._stage is not None:
            start = int(self._store.slot_offset[slots[0]])
            self._stage.add(slots, self._store.vectors[start : start + N * K].reshape(N, K, E))

    def remove(self, slide_id: str) -> bool:
        """Remove a slide; returns whether it was there."""
        if self._store is None:
            return False
        slot = self._store.key_to_slot.get(slide_id)
        if slot is None:
            return False
        if self._stage is not None:
            self._stage.remove(slot)
        self._store.remove(slide_id)
        self.stamps.pop(slide_id, None)
        if self._store.dead_rows > max(1024, self._store.n_rows // 2):
            self._store.compact()  # rows move, slots (the stage's keys) stay
        return True

    def stage(self) -> BoundStage:
        """The first stage (reduced copy of all prototypes), built from the stored vectors when missing."""
        if self._stage is None:
            store = self._store
            stage = create_stage(store.dim, self.config.precision, self.config.device)
            live = store.live_slots()
            counts = store.slot_count[live]
            for count in np.unique(counts):
                group = live[counts == count]
                for g0 in range(0, group.size, 8192):
                    part = group[g0 : g0 + 8192]
                    stage.add(part, store.vectors[store.gather_rows(part, int(count))])
            self._stage = stage
        return self._stage

    # -- queries -----------------------------------------------------------------------------------------
    def _resolve_query(self, query) -> tuple[np.ndarray, str | None]:
        if isinstance(query, str):
            return self.prototypes(query), query
        if isinstance(query, SlidePrototypes):
            protos = as_prototype_set(query.centroids, "query prototypes").astype(np.float32)
            return l2_normalize(protos), query.slide_id
        return l2_normalize(as_prototype_set(query, "query prototypes").astype(np.float32)), None

    def _prepare(self, query, exclude, include_self, memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        q, self_id = self._resolve_query(query)
        if q.shape[1] != self.dim:
            raise PrototypeError(
                f"the query has {q.shape[1]}-d prototypes but the cohort's are {self.dim}-d: it was computed with "
                "another encoder"
            )
        # Queries of a batch often share one exclude list (a KNN fold's test slides): its slots are looked
        # up once per list object, not once per query.
        key = id(exclude) if exclude is not None else None
        if memo is not None and key in memo:
            slots = memo[key][1]
        else:
            slots = np.array(sorted({self._store.key_to_slot[s] for s in (exclude or ()) if s in self}), np.int64)
            if memo is not None:
                memo[key] = (exclude, slots)  # the list is held, so that its id stays unique meanwhile
        if self_id is not None and not include_self and self_id in self:
            slots = np.append(slots, self._store.key_to_slot[self_id])
        return q, slots

    def _check(self, n: int, method: str | None) -> str:
        if len(self) == 0:
            raise PrototypeError(
                "the cohort index is empty: no slide has prototypes yet (run `slpd prototypes COHORT` first)"
            )
        if int(n) < 1:
            raise PrototypeError(f"the number of similar slides asked for must be at least 1, got {n}")
        method = method or self.config.method
        if method == "ivf":
            method = "auto"
        if method not in METHODS:
            raise PrototypeError(f"query method must be one of {', '.join(METHODS)}, not {method!r}")
        return method

    def query(
        self,
        query,
        n: int = 10,
        exclude: Iterable[str] | None = None,
        method: str | None = None,
        include_self: bool = False,
    ) -> list[SlideMatch]:
        """The ``n`` slides most similar to ``query`` (a slide id, SlidePrototypes or [K, E] prototypes),
        best first, each with its distance and matched prototype pairs; the exact ranking (ties by the
        order slides were added). A query slide is left out of its own results unless ``include_self``;
        ``exclude`` leaves out more slides. ``method`` overrides the configured one. How it was answered:
        ``self.last_stats``."""
        return self.query_many([query], n, [exclude] if exclude else None, method, include_self)[0]

    def query_many(
        self,
        queries: list,
        n: int = 10,
        exclude: list[Iterable[str] | None] | None = None,
        method: str | None = None,
        include_self: bool = False,
        with_pairs: bool = True,
    ) -> list[list[SlideMatch]]:
        """``query`` for many queries at once (ids, SlidePrototypes or arrays), exact; ``exclude``: one
        list of slide ids per query (or None). ``with_pairs=False`` skips the matched pairs (one
        assignment solve per result less: for KNN over thousands of slides)."""
        method = self._check(n, method)
        memo: dict = {}
        prepared = [self._prepare(q, (exclude or [None] * len(queries))[i], include_self, memo)
                    for i, q in enumerate(queries)]
        qs = [p[0] for p in prepared]
        ex = [p[1] for p in prepared]
        if method == "auto":
            answers = search_many(self._store, self.stage(), qs, int(n), ex)
        else:
            engine = full_product_search if method == "exact" else brute_force_search
            answers = [engine(self._store, q, int(n), e) for q, e in zip(qs, ex)]
        out = []
        for matches, stats in answers:
            out.append([self._result(m, rank, stats.exact, with_pairs) for rank, m in enumerate(matches, start=1)])
            self.last_stats = stats
        return out

    def nearest(self, queries: list, n: int = 10, exclude: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Arrays for KNN: ([Q, n] slide ids (object, None where fewer remain), [Q, n] float64 distances
        (NaN there)), exact, each query slide left out of its own neighbours."""
        results = self.query_many(queries, n, exclude, with_pairs=False)
        ids = np.full((len(results), int(n)), None, object)
        distances = np.full((len(results), int(n)), np.nan)
        for i, row in enumerate(results):
            for j, r in enumerate(row):
                ids[i, j], distances[i, j] = r.slide_id, r.distance
        return ids, distances

    def _result(self, match, rank: int, exact: bool, with_pairs: bool = True) -> SlideMatch:
        sim = match.sim
        return SlideMatch.from_prototype_pairs(
            self._store.slot_key[match.candidate], match.distance, match.similarity,
            pairs_from_similarity(sim) if with_pairs else [], n_prototypes=int(sim.shape[1]), rank=rank,
            exact=exact,
        )

    # -- cohorts -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cohort, config: IndexConfig | None = None, progress=None, cancel=None) -> CohortIndex:
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
                self.remove(slide_id)
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
            self._store, self._stage, self.source, self.stamps = None, None, None, {}
        for slide_id, centroids, stamp, source in loaded:
            (changes["updated"] if slide_id in previous else changes["added"]).append(slide_id)
            self._add(slide_id, centroids, stamp, source)
        if len(self) == 0:
            raise PrototypeError(
                f"no slide of cohort {cohort.root} has prototypes yet; run `slpd prototypes {cohort.root}` first"
            )
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
        path = save_store(Path(directory), self.NAME, self._store, None, meta)
        self.loaded_version = FORMAT_VERSION
        return path

    @classmethod
    def load(cls, directory, config: IndexConfig | None = None) -> CohortIndex:
        """Load a saved index (format 1 or 2; a format-1 faiss file is ignored: see :meth:`open`)."""
        store, _, manifest = load_store(Path(directory), cls.NAME, load_ivf=False)
        index = cls(config=config or IndexConfig.from_dict(manifest.get("config", {})))
        index._store = store
        index.stamps = dict(manifest.get("stamps", {}))
        index.source = manifest.get("source")
        index.loaded_version = int(manifest.get("version", 1))
        return index

    @classmethod
    def open(cls, cohort, config: IndexConfig | None = None, progress=None, cancel=None,
             save: bool = True) -> CohortIndex:
        """The cohort's saved index brought up to date with its prototype cache (built when missing or
        unreadable), and saved again when anything changed or it was saved in an older format."""
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
            changed = index.loaded_version != FORMAT_VERSION
            if changed:
                log.info("cohort index: migrating format %s to %s", index.loaded_version, FORMAT_VERSION)
        changes = index.sync(cohort, progress=progress, cancel=cancel)
        changed = changed or any(changes.values())
        if save and changed and not is_cancelled(cancel):
            try:
                index.save(cohort.index_dir)
            except StorageError as exc:  # full disk, read-only share: the index in memory still answers
                index.save_error = str(exc)
                log.warning("the cohort index is up to date in memory but could not be saved: %s", exc)
        return index

    def __repr__(self) -> str:
        stage = "" if self._stage is None else f", first stage {self._stage.precision} on {self._stage.device}"
        return f"CohortIndex({len(self)} slides, {self.n_prototypes} prototypes, dim={self.dim}{stage})"
