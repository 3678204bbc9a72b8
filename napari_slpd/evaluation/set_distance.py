"""The one place where evaluation asks the similarity engine for nearest prototype sets.

KNN and retrieval on the ``prototype_set`` representation rank slides by the prototype set distance
(SPEC section 2: max(K, L) - S, S the optimal one-to-one matching of cosines). They go through
:class:`napari_slpd.similarity.CohortIndex`, built in memory over the evaluated slides only, with its
default (bounded, exact) search and batch queries (``query_many``), so that an engine change reaches
evaluation through :func:`build_set_index` and :func:`nearest_sets_many` alone.
:func:`exact_distance_matrix` is the reference: the Hungarian solution for every pair, one by one.

Ties (equal distances) are broken by slide order in ``slide_ids`` in the reference; the index breaks
them its own way, so near-tied neighbours can differ (benchmarks/evaluate.py measures how often that
changes a fold's AUC).
"""

from __future__ import annotations

import numpy as np


def build_set_index(slide_ids: list[str], sets: list[np.ndarray]):
    """A CohortIndex (exact queries) over the prototype sets [K_i, E] of ``slide_ids``."""
    from napari_slpd.similarity.index import CohortIndex, IndexConfig

    index = CohortIndex(config=IndexConfig())
    sizes = {s.shape[0] for s in sets}
    if len(sizes) == 1:
        index.add_arrays(slide_ids, np.stack(sets).astype(np.float32))
    else:
        index.add_many(zip(slide_ids, sets))
    return index


def nearest_sets_many(index, query_ids: list[str], n: int, excludes: list) -> list[list[tuple[str, float]]]:
    """For each query slide of ``index``, the ``n`` nearest other slides by the prototype set distance,
    leaving out the query itself and its ``excludes[i]``: [[(slide_id, distance)], ...], nearest first
    (fewer when fewer remain)."""
    n = max(1, min(int(n), len(index) - 1))
    if hasattr(index, "query_many"):
        # One list object per distinct exclude (a KNN fold passes the same one for all its queries): the
        # index looks each up once.
        same: dict[int, list] = {}
        lists = [same.setdefault(id(e), list(e)) for e in excludes]
        answers = index.query_many(list(query_ids), n=n, exclude=lists, with_pairs=False)
    else:  # an engine without batch queries
        answers = [index.query(q, n=n, exclude=e) for q, e in zip(query_ids, excludes)]
    return [[(h.slide_id, float(h.distance)) for h in hits] for hits in answers]


def nearest_sets(index, query_id: str, n: int, exclude) -> list[tuple[str, float]]:
    """:func:`nearest_sets_many` for one query."""
    return nearest_sets_many(index, [query_id], n, [exclude])[0]


def exact_distance_matrix(sets: list[np.ndarray], progress=None) -> np.ndarray:
    """[N, N] float64 prototype set distances, every pair solved with the Hungarian algorithm (scipy)."""
    from scipy.optimize import linear_sum_assignment

    n = len(sets)
    sets64 = [np.asarray(s, np.float64) for s in sets]
    stacked = np.stack(sets64) if len({s.shape for s in sets64}) == 1 else None
    out = np.zeros((n, n), np.float64)
    for i in range(n):
        a = sets64[i]
        # One product for all later slides when the sets have one shape; the solves stay one per pair.
        block = np.matmul(stacked[i + 1 :], a.T).transpose(0, 2, 1) if stacked is not None else None
        for j in range(i + 1, n):
            sim = block[j - i - 1] if block is not None else a @ sets64[j].T
            rows, cols = linear_sum_assignment(sim, maximize=True)
            out[i, j] = out[j, i] = max(sim.shape) - float(sim[rows, cols].sum())
        if progress is not None:
            progress(i + 1, n)
    return out
