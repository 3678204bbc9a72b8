"""Comparing two slides by their prototype sets (SPEC section 2, "Similar slides").

S(n, m) = max over one-to-one matchings pi of sum_k <c(n, k), c(m, pi(k))>. The official SLPD code
enumerates all K! permutations; the Hungarian algorithm (scipy's ``linear_sum_assignment``) finds the
same maximum in O(K^3). Prototypes are L2-normalized, so every inner product is a cosine in [-1, 1].
The distance shown to users is ``K - S``: the sum over matched pairs of (1 - cosine).

Slides with different numbers of prototypes (K != L, e.g. a small slide whose K was capped) are matched
rectangularly: S is the best partial one-to-one matching of min(K, L) pairs (the maximum over injective
maps of the smaller set into the larger one, which is what the permutation definition becomes). The
distance is ``max(K, L) - S``: a prototype left without a partner counts as a partner at cosine 0
(orthogonal). So a one-region slide that resembles one of the query's four prototypes is at distance
>= 3, not 0, and when K == L this is the SPEC's K - S. Rankings are by this distance.

Ranking many candidate slides against one query (the cohort index's re-ranking) uses a bound: for any
matching, S <= the sum of the row maxima of the similarity matrix (every query prototype gets at most its
best partner) and <= the sum of the column maxima. Candidates are solved exactly in decreasing order of
that bound and the search stops once the bound cannot beat the n-th best exact value found, so the top n
are exact while only a few dozen assignment problems are solved, however many candidates there are.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from napari_slpd.errors import PrototypeError

# Enumerating permutations is only a reference for tests: 9! = 362,880 sums is already slow.
BRUTE_FORCE_MAX = 9
# Float slack when comparing a bound with exact sums computed in another order.
_BOUND_SLACK = 1e-9
# The dual bound's differences s_kl - u_k are rounded to float32: 2K roundings of ~6e-8 each, and more.
_DUAL_SLACK = 1e-5
# Up to this many candidates, similarity matrices are computed as a stack of small products.
_BATCHED_MATMUL_MAX = 4096


class PrototypePair(NamedTuple):
    """One matched pair: prototype ``k`` of the query set and ``l`` of the other set, and their cosine."""

    k: int
    l: int
    similarity: float


def as_prototype_set(protos, name: str = "prototype set") -> np.ndarray:
    """``protos`` as a finite 2-D float array [K, E] with K >= 1, or PrototypeError saying what is wrong."""
    array = np.asarray(protos)
    if array.ndim != 2:
        raise PrototypeError(f"{name} must be a 2-D array [K, E] of prototypes, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise PrototypeError(f"{name} is empty (shape {array.shape}); a slide needs at least one prototype")
    if array.dtype.kind not in "fiu":
        raise PrototypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise PrototypeError(f"{name} has {bad} prototype(s) with NaN or infinite values")
    return array


def _check_dims(A: np.ndarray, B: np.ndarray) -> None:
    if A.shape[1] != B.shape[1]:
        raise PrototypeError(
            f"cannot compare prototype sets of different embedding sizes ({A.shape[1]}-d and {B.shape[1]}-d): "
            "they come from different encoders; compute both slides' features with the same region encoder"
        )


def similarity_matrix(A, B) -> np.ndarray:
    """[K, L] inner products <A_k, B_l> in float64 (cosines for L2-normalized prototypes)."""
    A = as_prototype_set(A, "first prototype set")
    B = as_prototype_set(B, "second prototype set")
    _check_dims(A, B)
    return A.astype(np.float64) @ B.astype(np.float64).T


def _solve(sim: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Optimal matching of a [K, L] similarity matrix: (S, rows, cols), min(K, L) pairs, rows ascending."""
    rows, cols = linear_sum_assignment(sim, maximize=True)
    return float(sim[rows, cols].sum(dtype=np.float64)), rows, cols


def prototype_set_similarity(A, B) -> tuple[float, list[tuple[int, int]]]:
    """S = the best one-to-one matching of prototype sets A [K, E] and B [L, E], and its pairs (k, l).

    Equals the maximum over all permutations (K == L) or injective maps (K != L) of the summed cosines.
    """
    S, rows, cols = _solve(similarity_matrix(A, B))
    return S, [(int(k), int(l)) for k, l in zip(rows, cols)]


def prototype_set_distance(A, B) -> float:
    """max(K, L) - S(A, B) (= K - S for sets of equal size): 0 for identical sets; an unmatched prototype
    of the larger set counts as a partner at cosine 0."""
    sim = similarity_matrix(A, B)
    S, _, _ = _solve(sim)
    return float(max(sim.shape) - S)


def match_prototypes(A, B) -> list[PrototypePair]:
    """The optimal pairs with their cosines, most similar pair first: the explanation of a match."""
    sim = similarity_matrix(A, B)
    _, rows, cols = _solve(sim)
    pairs = [PrototypePair(int(k), int(l), float(sim[k, l])) for k, l in zip(rows, cols)]
    pairs.sort(key=lambda p: (-p.similarity, p.k))
    return pairs


def cross_assignment(A, B) -> np.ndarray:
    """[K] int: l* = argmax_l <A_k, B_l> for each prototype of A (SLPD's inter-slide target; not one-to-one)."""
    return np.argmax(similarity_matrix(A, B), axis=1).astype(np.int64)


def brute_force_set_similarity(A, B) -> tuple[float, list[tuple[int, int]]]:
    """Reference S by enumerating every injective map of the smaller set into the larger one.

    Only for tests and small sets (max(K, L) <= 9): this is what the official code computes.
    """
    sim = similarity_matrix(A, B)
    K, L = sim.shape
    if max(K, L) > BRUTE_FORCE_MAX:
        raise PrototypeError(
            f"brute force over permutations is limited to {BRUTE_FORCE_MAX} prototypes, got {max(K, L)}"
        )
    transposed = K > L
    if transposed:
        sim = sim.T
        K, L = L, K
    best, best_cols = -math.inf, None
    rows = np.arange(K)
    for cols in itertools.permutations(range(L), K):
        value = float(sim[rows, list(cols)].sum())
        if value > best:
            best, best_cols = value, cols
    pairs = [(int(r), int(c)) for r, c in zip(rows, best_cols)]
    if transposed:
        pairs = sorted((c, r) for r, c in pairs)
    return best, pairs


# -- many candidates at once -------------------------------------------------------------------------------


def candidate_similarities(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[N, K, L] similarity matrices of a query set [K, E] against N candidate sets [N, L, E]."""
    N, L, E = candidates.shape
    qt = np.ascontiguousarray(np.asarray(query, dtype=candidates.dtype).T)  # [E, K]
    if N <= _BATCHED_MATMUL_MAX:
        # Many tiny products: each runs single-threaded inside BLAS, which avoids waking a thread pool for
        # microseconds of work (that wake-up dominated re-ranking latency on a busy machine).
        return np.matmul(candidates, qt).transpose(0, 2, 1)
    flat = candidates.reshape(N * L, E) @ qt  # one large GEMM, worth its threads
    return flat.reshape(N, L, -1).transpose(0, 2, 1)


def _max_along(a: np.ndarray, axis: int) -> np.ndarray:
    """``a.max(axis)`` for a 3-D array, as a loop of element-wise maxima over the reduced axis: numpy's own
    reduction over a short axis costs a few hundred ns per output element; this runs at memory speed."""
    lead = (slice(None),) * axis
    out = np.array(a[lead + (0,)], copy=True)
    for i in range(1, a.shape[axis]):
        np.maximum(out, a[lead + (i,)], out=out)  # a view: no copy of the slice
    return out


def matching_upper_bounds(sims: np.ndarray, both_sides: bool = True) -> np.ndarray:
    """[N] float64 upper bounds on S for similarity matrices [N, K, L]: the sum of row maxima (every query
    prototype gets at most its best partner) and, with ``both_sides``, at most the sum of column maxima;
    each over the min(K, L) largest maxima, since only that many pairs are matched."""
    N, K, L = sims.shape
    p = min(K, L)
    row_max = _max_along(sims, 2)  # [N, K]
    if K > p:
        row_max = -np.partition(-row_max, p - 1, axis=1)[:, :p]
    bound = row_max.sum(axis=1, dtype=np.float64)
    if both_sides:
        col_max = _max_along(sims, 1)  # [N, L]
        if L > p:
            col_max = -np.partition(-col_max, p - 1, axis=1)[:, :p]
        bound = np.minimum(bound, col_max.sum(axis=1, dtype=np.float64))
    return bound


def dual_bounds(sims: np.ndarray) -> np.ndarray:
    """[N] upper bounds on S for square similarity matrices [N, K, K], at least as tight as the row-max
    bound: one round of coordinate descent on the assignment problem's dual (u_k + v_l >= s_kl for all
    k, l implies S <= sum u + sum v): u = row maxima, v_l = max_k (s_kl - u_k) <= 0, then
    u_k = max_l (s_kl - v_l). A column that is no row's favourite gets v_l < 0: the bound drops by how
    much the rows would lose by sharing their favourites. Add ``_DUAL_SLACK`` for float32 rounding."""
    u = _max_along(sims, 2)  # [N, K]
    v = _max_along(sims - u[:, :, None], 1)  # [N, L]
    u = _max_along(sims - v[:, None, :], 2)
    return u.sum(axis=1, dtype=np.float64) + v.sum(axis=1, dtype=np.float64)


def _greedy_values(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the greedy partners are already one-to-one, S needs no solve: ([N] bool, [N] float64 S there).

    With K <= L every row is matched, each at most to its best column, so if the rows' best columns are
    distinct that matching is optimal and S = the sum of row maxima (K > L: the same with columns).
    """
    N, K, L = sims.shape
    if N == 0:
        return np.zeros(0, bool), np.zeros(0, np.float64)
    axis = 2 if K <= L else 1
    best = np.sort(sims.argmax(axis=axis), axis=1)
    easy = (np.diff(best, axis=1) != 0).all(axis=1) if best.shape[1] > 1 else np.ones(N, bool)
    return easy, sims.max(axis=axis).sum(axis=1, dtype=np.float64)


def batch_set_similarity(query, candidates) -> np.ndarray:
    """Exact S of a query set [K, E] against each of N candidate sets [N, L, E]: [N] float64.

    One GEMM gives all similarity matrices; candidates whose greedy best partners are already one-to-one
    need no assignment solve; the others are solved one by one (about 6 us each for K = 16).
    """
    query = as_prototype_set(query, "query prototype set")
    candidates = np.asarray(candidates)
    if candidates.ndim != 3 or candidates.shape[2] != query.shape[1]:
        raise PrototypeError(
            f"candidate sets must be [N, L, {query.shape[1]}] to match the query, got shape {candidates.shape}"
        )
    sims = candidate_similarities(query.astype(np.float32), candidates.astype(np.float32, copy=False))
    return _exact_all(sims)


def _exact_all(sims: np.ndarray) -> np.ndarray:
    N, K, L = sims.shape
    out = np.empty(N, np.float64)
    easy, greedy = _greedy_values(sims)
    out[easy] = greedy[easy]
    for j in np.flatnonzero(~easy):
        out[j] = _solve(sims[j])[0]
    return out


class TopMatch(NamedTuple):
    candidate: int  # the id the candidate was offered with
    similarity: float  # exact S
    distance: float  # max(K, L) - S
    sim: np.ndarray  # its [K, L] similarity matrix (for the matched pairs)


class TopN:
    """Collects the n candidates with the smallest exact distance max(K, L) - S, from blocks of similarity
    matrices [N, K, L] offered one after another (one block per L, so candidates with different numbers of
    prototypes are ranked together).

    Exact: within a block, candidates are solved in decreasing order of their upper bound on S until the
    bound can no longer beat the n-th best found so far; that only gets better, so every candidate left
    unsolved provably ranks below the final top n. Ties are broken by the smaller candidate id.
    """

    def __init__(self, n: int):
        self.n = int(n)
        # Min-heap on (-distance, -id): the worst kept candidate (largest distance, then largest id) on top.
        self._heap: list[tuple[float, int, float, int, np.ndarray]] = []
        self.solved = 0

    @property
    def full(self) -> bool:
        return len(self._heap) >= self.n

    @property
    def threshold(self) -> float:
        """The n-th best -distance so far (-inf until n candidates were seen): what a candidate must beat."""
        return self._heap[0][0] if self.full else -math.inf

    def offer(self, sims: np.ndarray, ids: np.ndarray, bound: np.ndarray | None = None) -> None:
        """Offer candidates ``ids`` [N] with similarity matrices ``sims`` [N, K, L] (and upper bounds on
        their S, computed here when not given)."""
        if self.n <= 0 or sims.shape[0] == 0:
            return
        N, K, L = sims.shape
        size = max(K, L)
        ids = np.asarray(ids, np.int64)
        if bound is None:
            # The column-side bound prunes more but costs a strided pass: worth it for shortlists only.
            bound = matching_upper_bounds(sims, both_sides=N <= _BATCHED_MATMUL_MAX)
        if K == L and N <= _BATCHED_MATMUL_MAX:
            # Shortlists: tighten the bounds that could still matter with the dual bound (on uniformly
            # random 16 x 16 sets it leaves ~8x fewer Hungarian solves than the row/column bound).
            live = np.flatnonzero(bound - size >= self.threshold - _BOUND_SLACK)
            if live.size:
                bound = np.array(bound, np.float64)
                bound[live] = np.minimum(bound[live], dual_bounds(sims[live]) + _DUAL_SLACK)
        for j in np.lexsort((ids, -bound)):
            if self.full and bound[j] - size < self.threshold - _BOUND_SLACK:
                break
            S = _solve(sims[j])[0]
            self.solved += 1
            item = (S - size, -int(ids[j]), S, int(ids[j]), np.array(sims[j]))
            if not self.full:
                heapq.heappush(self._heap, item)
            elif item[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, item)

    def results(self) -> list[TopMatch]:
        best = sorted(self._heap, key=lambda t: (-t[0], t[3]))
        return [TopMatch(cid, S, -score, sim) for score, _, S, cid, sim in best]


def top_matches(blocks: Sequence[np.ndarray], n: int, candidate_ids: Sequence[np.ndarray]) -> list[TopMatch]:
    """The n nearest candidates (exact distance, nearest first) of one or more blocks of similarity
    matrices [N_b, K, L_b] whose candidates have ids ``candidate_ids[b]`` [N_b]."""
    top = TopN(n)
    bounds = [matching_upper_bounds(b, both_sides=b.shape[0] <= _BATCHED_MATMUL_MAX) for b in blocks]
    # Most promising blocks first, so that the threshold rises early and prunes the rest.
    best = [(bd.max() - max(b.shape[1:])) if bd.size else -math.inf for b, bd in zip(blocks, bounds)]
    for b in np.argsort(best, kind="stable")[::-1]:
        top.offer(blocks[b], candidate_ids[b], bounds[b])
    return top.results()


def pairs_from_similarity(sim: np.ndarray) -> list[PrototypePair]:
    """Optimal pairs of one [K, L] similarity matrix, most similar first (explanations for ranked results)."""
    _, rows, cols = _solve(np.asarray(sim, dtype=np.float64))
    pairs = [PrototypePair(int(k), int(l), float(sim[k, l])) for k, l in zip(rows, cols)]
    pairs.sort(key=lambda p: (-p.similarity, p.k))
    return pairs
