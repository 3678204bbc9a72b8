"""Exact nearest prototype sets at cohort scale: first-stage bounds, float32 re-scoring, Hungarian solves.

A query [K, E] against every stored slide, in three steps, each pruning with a bound that is never below
the true prototype set similarity S (so the top n is exact, not approximate):

1. ``BoundStage.upper_bounds`` (bounds.py): the row-max bound of every slide from one reduced-precision
   product against all stored prototypes, with a rigorous rounding margin.
2. Slides in decreasing order of that bound, in growing batches: their float32 similarity matrices are
   computed from the stored vectors and bounded again, tighter: min(row-max sum, column-max sum), then
   for square sets one round of dual coordinate descent (u_k = row maxima, v_l = max_k (s_kl - u_k),
   u_k = max_l (s_kl - v_l): any u, v with u_k + v_l >= s_kl bound S by sum u + sum v). On uniformly
   random prototypes the row/column bound leaves ~950 of 100,000 slides above the 10th best S, the dual
   round ~120 (measured).
3. Survivors are solved exactly (scipy's Hungarian, ~7 us for 16 x 16) in bound order until the next bound
   cannot beat the n-th best exact value (``matching.TopN``). The batches stop once the next slide's
   first-stage bound is below that value too.

Batch use (evaluation's KNN and retrieval, label propagation, region retrieval's slide neighbours):
``search_many`` answers many queries with one first-stage product for a batch of queries (the reduced
copy is read once per batch, not once per query). ``CohortIndex.query_many`` is its public face.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from napari_slpd.similarity import int8_stage
from napari_slpd.similarity.bounds import BoundStage
from napari_slpd.similarity.matching import (
    _DUAL_SLACK,
    TopMatch,
    TopN,
    candidate_similarities,
    dual_bounds,
    matching_upper_bounds,
)
from napari_slpd.similarity.store import VectorStore
from napari_slpd.similarity.workers import n_workers as _n_workers
from napari_slpd.similarity.workers import pool as _pool

# First-stage bounds are compared with exact values computed in float32: leave room for that rounding.
FIRST_STAGE_SLACK = 1e-4
_QUERY_BATCH = 16  # queries sharing one first-stage product in search_many
# Tight bounds of fewer slots than this run in the calling thread: handing ~1 ms of work to the workers
# cost more than it saved on a busy 2-core machine (each hand-off waits for a time slice).
_PARALLEL_TIGHT = 1024


@dataclass
class SearchStats:
    """How a query was answered: ``exact`` (always True for the bounded search), the first stage's
    ``precision`` and ``device``, how many slides were re-scored in float32 (``rescored``) and solved
    exactly (``solved``), and the time spent (ms)."""

    exact: bool = True
    method: str = "bounded"
    precision: str = "float32"
    device: str = "cpu"
    n_slides: int = 0
    rescored: int = 0
    solved: int = 0
    bound_ms: float = 0.0
    total_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def offer_slots(top: TopN, store: VectorStore, q: np.ndarray, slots: np.ndarray) -> int:
    """Score ``slots`` exactly (grouped by their number of prototypes) into ``top``; returns how many."""
    if slots.size == 0:
        return 0
    counts = store.slot_count[slots]
    for count in np.unique(counts):
        group = slots[counts == count]
        top.offer(candidate_similarities(q, store.vectors[store.gather_rows(group, int(count))]), group)
    return int(slots.size)


def tight_bounds(stage: BoundStage | None, slots: np.ndarray, q_size: int, row: int = 0,
                 threshold: float = -np.inf) -> np.ndarray | None:
    """[M] float64 upper bounds on -(distance) of ``slots``, tighter than the first stage's: row/column
    maxima and (square sets, where that bound still reaches ``threshold``) one dual round, on the kept
    reduced-precision similarities with their rounding margins (bounds.BoundStage.padded_similarities);
    None when the stage kept no products. Thousands of slots are split over the bounds' worker threads
    (numpy releases the GIL inside each operation)."""
    if stage is None or slots.size == 0:
        return None
    out = np.empty(slots.size, np.float64)
    Ls, _ = stage.slot_lanes(slots)
    parts = []
    for L in np.unique(Ls):
        where = np.flatnonzero(Ls == L)
        step = max(_PARALLEL_TIGHT, -(-where.size // _n_workers()))
        parts += [(int(L), where[s0 : s0 + step]) for s0 in range(0, where.size, step)]

    def part(item) -> bool:
        L, where = item
        if q_size == L and stage.precision == "int8":
            bound = int8_stage.tight_bounds(stage, slots[where], row, threshold - FIRST_STAGE_SLACK + L)
            if bound is None:
                return False
            out[where] = bound - L
            return True
        padded = stage.padded_similarities(slots[where], row)
        if padded is None:
            return False
        size = max(q_size, L)
        bound = matching_upper_bounds(padded) - size
        if q_size == L:
            live = np.flatnonzero(bound >= threshold - FIRST_STAGE_SLACK)
            if live.size:
                bound[live] = np.minimum(bound[live], dual_bounds(padded[live]) + _DUAL_SLACK - size)
        out[where] = bound
        return True

    # int8 parts call torch: on the workers always (workers.map_ranges says why); numpy parts of one slot
    # group run here (handing ~1 ms of work over cost more than it saved on a busy machine).
    in_caller = len(parts) == 1 and stage.precision != "int8"
    done = [part(parts[0])] if in_caller else list(_pool().map(part, parts))
    return out if all(done) else None


def prefilter(stage: BoundStage | None, top: TopN, slots: np.ndarray, q_size: int, row: int = 0) -> np.ndarray:
    """The ``slots`` whose tighter bound (:func:`tight_bounds`) can still beat the current n-th best."""
    if not top.full or slots.size == 0:
        return slots
    tight = tight_bounds(stage, slots, q_size, row, top.threshold)
    return slots if tight is None else slots[tight >= top.threshold - FIRST_STAGE_SLACK]


def rerank(store: VectorStore, q: np.ndarray, n: int, bounds: np.ndarray, stats: SearchStats,
           first_batch: int = 256, stage: BoundStage | None = None, row: int = 0) -> list[TopMatch]:
    """The exact top n given first-stage ``bounds`` [n_slots] on -(distance) (-inf: not a candidate).
    ``bounds`` is consumed (scored slots are set to -inf). With a ``stage`` that kept the products of
    this query (``row`` of its last batch), candidates are ordered and pruned by their tighter bounds
    before any float32 re-scoring."""
    top = TopN(n)
    batch = max(first_batch, 8 * n)
    step = max(2 * n, 32)  # exact re-scoring in small steps, so that the threshold rises between them
    while True:
        # The slides whose first-stage bound can still beat the n-th best: after the first batch a few
        # thousand of 100,000 at most, so the next batches are chosen among them, not the whole cohort
        # (an argpartition of 100,000 bounds costs ~1.2 ms, and int8's margin takes 4-5 batches).
        if top.full:
            pool = np.flatnonzero(bounds >= top.threshold - FIRST_STAGE_SLACK)
        else:
            pool = np.flatnonzero(np.isfinite(bounds))
        if pool.size == 0:
            break  # every slide left is bounded below the n-th best
        m = min(pool.size, batch)
        idx = pool[np.argpartition(-bounds[pool], m - 1)[:m]] if m < pool.size else pool
        first = bounds[idx]
        bounds[idx] = -np.inf
        tight = tight_bounds(stage, idx, q.shape[0], row, top.threshold)
        order_by = first if tight is None else np.minimum(first, tight)
        order = np.lexsort((idx, -order_by))
        idx, order_by = idx[order], order_by[order]
        start, size = 0, step
        while start < idx.size:
            if top.full and order_by[start] < top.threshold - FIRST_STAGE_SLACK:
                break  # sorted: the rest of this batch cannot beat the n-th best either
            chunk = idx[start : start + size]
            if top.full:
                chunk = chunk[order_by[start : start + size] >= top.threshold - FIRST_STAGE_SLACK]
            stats.rescored += offer_slots(top, store, q, chunk)
            # Growing steps: the first ones set the threshold; past them each step costs Python overhead
            # (~0.3 ms) that thousands of candidates (int8's looser bounds) would pay 30 times over.
            start, size = start + size, size * 2
        batch *= 4
    stats.solved += top.solved
    return top.results()


def search(store: VectorStore, stage: BoundStage, q: np.ndarray, n: int,
           excluded_slots: np.ndarray | None = None) -> tuple[list[TopMatch], SearchStats]:
    """The exact n nearest slides to the normalized query set ``q`` [K, E] (see the module docstring)."""
    return search_many(store, stage, [q], n, [excluded_slots])[0]


def search_many(store: VectorStore, stage: BoundStage, queries: list[np.ndarray], n: int,
                excluded: list[np.ndarray | None] | None = None) -> list[tuple[list[TopMatch], SearchStats]]:
    """``search`` for many queries (normalized [K_i, E] each); queries with equal K share first-stage
    products in batches of 16. Returns one (matches, stats) per query, in order."""
    excluded = excluded or [None] * len(queries)
    results: list = [None] * len(queries)
    by_k: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        by_k.setdefault(int(q.shape[0]), []).append(i)
    for members in by_k.values():
        for b0 in range(0, len(members), _QUERY_BATCH):
            batch = members[b0 : b0 + _QUERY_BATCH]
            t0 = time.perf_counter()
            bounds = stage.upper_bounds(np.stack([queries[i] for i in batch]), store.n_slots)
            bound_ms = 1000 * (time.perf_counter() - t0) / len(batch)
            for row, i in enumerate(batch):
                t1 = time.perf_counter()
                stats = SearchStats(precision=stage.precision, device=stage.device, n_slides=len(store),
                                    bound_ms=bound_ms)
                b = bounds[row]
                if excluded[i] is not None and len(excluded[i]):
                    b[np.asarray(excluded[i], np.int64)] = -np.inf
                matches = rerank(store, queries[i], n, b, stats, stage=stage, row=row)
                stats.total_ms = bound_ms + 1000 * (time.perf_counter() - t1)
                results[i] = (matches, stats)
    return results


def full_product_search(store: VectorStore, q: np.ndarray, n: int,
                        excluded_slots: np.ndarray | None = None) -> tuple[list[TopMatch], SearchStats]:
    """The reference path (``method="exact"``, ``slpd similar --exact``): float32 similarities of the query
    against every stored prototype, then the same bound-ordered exact solves; no reduced precision."""
    from napari_slpd.similarity.matching import top_matches

    t0 = time.perf_counter()
    stats = SearchStats(method="exact", precision="float32", device="cpu", n_slides=len(store))
    slots = store.live_slots()
    if excluded_slots is not None and len(excluded_slots):
        slots = slots[~np.isin(slots, excluded_slots)]
    if slots.size == 0:
        return [], stats
    all_sims = store.vectors[: store.n_rows] @ q.T  # [rows, K]
    blocks, ids = [], []
    counts = store.slot_count[slots]
    for count in np.unique(counts):
        group = slots[counts == count]
        blocks.append(all_sims[store.gather_rows(group, int(count))].transpose(0, 2, 1))  # [n_g, K, L]
        ids.append(group)
    top = top_matches(blocks, n, ids)
    stats.rescored = int(slots.size)
    stats.total_ms = 1000 * (time.perf_counter() - t0)
    return top, stats


def brute_force_search(store: VectorStore, q: np.ndarray, n: int,
                       excluded_slots: np.ndarray | None = None) -> tuple[list[TopMatch], SearchStats]:
    """The Hungarian algorithm against every slide, then a sort (tests and the benchmark's reference)."""
    from napari_slpd.similarity.matching import _solve

    t0 = time.perf_counter()
    stats = SearchStats(method="bruteforce", n_slides=len(store))
    slots = store.live_slots()
    if excluded_slots is not None and len(excluded_slots):
        slots = slots[~np.isin(slots, excluded_slots)]
    rows = []
    counts = store.slot_count[slots]
    for count in np.unique(counts):
        group = slots[counts == count]
        sims = candidate_similarities(q, store.vectors[store.gather_rows(group, int(count))])
        for j, slot in enumerate(group.tolist()):
            S = _solve(sims[j])[0]
            rows.append((S - max(sims.shape[1:]), slot, S, np.array(sims[j])))
    rows.sort(key=lambda r: (-r[0], r[1]))
    stats.solved = len(rows)
    stats.total_ms = 1000 * (time.perf_counter() - t0)
    return [TopMatch(slot, S, -score, sim) for score, slot, S, sim in rows[:n]], stats
