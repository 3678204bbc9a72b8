"""The first stage on int8 codes (int8_codes.py): bounds of every slide, tighter bounds of candidates.

``bounds_batch``: per block of B slides (runs of blocks per worker, in L2), the int32 products of the
block's codes [L * B, E] with the queries' hi/lo codes [E, 2 Q K] and the maxima over the L prototypes of
H and of Lo; then, for the maxima of a few blocks at once, 254 max H + max Lo clamped at 0 and, for
K <= L, its sum per query: the row-max bound, scaled to cosines with the margin added (int8_codes.py).

Why the candidates' tighter bounds gather their codes again rather than keeping the products: keeping
writes 1 KB per slide per query (100 MB at 100,000 slides) and reads it back; int8's margin (~0.009 per
prototype pair, ~0.15 per slide) lets ~10x more slides through the row-max bound than the exact row
maxima would on uniformly random prototypes (11,000 of 100,000 instead of 1,000-2,000; measured), and
3 KB of codes each is still the cheaper trip. A pilot that computed the tighter bounds in cache during the
first stage (from an estimate of the final threshold made on 1/16 of the cohort) was measured slower:
its selection and per-block calls cost as much as the gather it saved.
"""

from __future__ import annotations

import numpy as np

from napari_slpd.similarity import int8_codes
from napari_slpd.similarity.int8_codes import LO_FACTOR, NORM_SLACK, SLACK
from napari_slpd.similarity.workers import map_ranges, thread_buffer


# Candidates per step of tight_bounds: their codes [1024 L, E] (3 MB) and products (2 MB) stay in cache;
# 256 and 2048 were 10-20% slower on 2 EPYC cores (1 MB L2 each, 32 MB L3), measured.
_TIGHT_CHUNK = 1024
_MAXIMA_BYTES = 2 << 20  # the first stage's row maxima combined and summed per this many bytes (in L2)


def _torch():
    import torch

    return torch


def bounds_batch(stage, queries: np.ndarray, out: np.ndarray, keep: bool) -> None:
    """``BoundStage._bounds_batch`` for int8 codes: fills ``out`` [Q, n_slots]."""
    torch = _torch()
    Q, K, _ = queries.shape
    codes, q_scale, eq, qn = int8_codes.encode_queries(queries)
    qT = torch.from_numpy(codes)
    eq_sum, qn_sum = eq.sum(axis=1) * NORM_SLACK, qn.sum(axis=1)
    for group in stage.groups.values():
        if group.used:
            _group_bounds(stage, group, qT, Q, K, out, q_scale, eq_sum, qn_sum)
    if keep:
        stage._kept = ("int8", codes, q_scale, eq, qn, K)


def _group_bounds(stage, group, qT, Q: int, K: int, out: np.ndarray, q_scale, eq_sum, qn_sum) -> None:
    """Row-max bounds of every slide of ``group`` (all with L prototypes) into ``out``."""
    torch = _torch()
    L, B = group.L, group.B
    QK = Q * K
    reduce_sums = K <= L
    result = np.empty((group.n_blocks_used * B, Q if reduce_sums else QK), np.int64)
    result_t = torch.from_numpy(result)

    # The maxima of a few blocks first, then one combination and sum for all of them: per block, these four
    # small operations cost ~20 ms per query at 100,000 slides in call overhead (10 ms per 2 MB of maxima).
    # Each block is copied into a buffer before its product: the kernel read its operand from memory at
    # about half the speed of a plain copy; copy + product in cache was 10-13% faster (paired, same bounds).
    per_step = max(1, _MAXIMA_BYTES // (B * 2 * QK * 4))

    def run(r0: int, r1: int) -> None:
        prod = thread_buffer((L * B, 2 * QK), torch.int32)
        codes = thread_buffer((L * B, stage.dim), torch.int8, "codes")
        for b0 in range(r0, r1, per_step):
            b1 = min(r1, b0 + per_step)
            maxima = thread_buffer(((b1 - b0) * B, 2 * QK), torch.int32, "maxima")
            for b in range(b0, b1):
                codes.copy_(group.data[b].view(L * B, stage.dim))
                torch._int_mm(codes, qT, out=prod)
                torch.amax(prod.view(L, B, 2 * QK), dim=0, out=maxima[(b - b0) * B : (b - b0 + 1) * B])
            t = maxima[:, :QK].mul(LO_FACTOR).add_(maxima[:, QK:]).clamp_min_(0)  # int32: exact (MAX_DIM)
            dest = result_t[b0 * B : b1 * B]
            if reduce_sums:
                torch.sum(t.view(-1, Q, K), dim=2, out=dest)
            else:
                dest.copy_(t)

    map_ranges(run, group.n_blocks_used)
    n = group.used
    if reduce_sums:
        sums = result[:n].astype(np.float64)
    else:  # K > L: only L pairs are matched: the L largest row maxima
        maxima = -np.partition(-result[:n].reshape(n, Q, K), L - 1, axis=2)[:, :, :L]
        sums = maxima.sum(axis=2, dtype=np.float64)
    # Integer sums of clamped row maxima of 254 H + Lo, to cosines: slide scale x query scale / 254.
    bound = sums * (group.scale[:n, None] * q_scale[None, :] / LO_FACTOR)
    bound = bound * (1 + 1e-12) + min(K, L) * SLACK
    bound += (eq_sum - max(K, L))[None, :] + group.err[:n, None] * qn_sum[None, :]
    slots = group.slots[:n]
    alive = slots >= 0
    out[:, slots[alive]] = bound[alive].T


def _dual_integers(T, U) -> np.ndarray:
    """[M] int64: one dual round on T [M, L, K] int32 (exact integer similarities of each slide's prototypes
    l with the query's k) from its row maxima U [M, K]: any integers U, V with U_k + V_l >= T_lk bound the
    integer matching by sum U + sum V; V_l = max_k (T_lk - U_k) <= 0, then U_k = max_l (T_lk - V_l)."""
    V = (T - U[:, None, :]).amax(dim=2)  # [M, L]
    U = (T - V[:, :, None]).amax(dim=1)
    return (U.sum(dim=1) + V.sum(dim=1)).numpy()


def _code_rows(group, lanes: np.ndarray):
    """[M L] int64 tensor: the rows of ``lanes``' codes in the flat [blocks L B, E] view of ``group.data``
    (slide-major, prototype l inside)."""
    L, B = group.L, group.B
    return _torch().from_numpy((((lanes // B)[:, None] * L + np.arange(L)[None, :]) * B
                                + (lanes % B)[:, None]).reshape(-1))


def _products_into(flat, rows, cols, L: int, K: int, x, prod):
    """T [n, L, K] int32 = 254 H + Lo (exact in int32) of the codes at ``rows`` (n L of them) with the
    query's hi/lo columns ``cols``, gathered into ``x`` and multiplied into ``prod`` (both of n L rows)."""
    torch = _torch()
    torch.index_select(flat, 0, rows, out=x)
    torch._int_mm(x, cols, out=prod)
    return torch.add(prod[:, K:], prod[:, :K], alpha=LO_FACTOR).view(-1, L, K)


def _query_setup(stage, slots: np.ndarray, row: int):
    """(lanes, group, code rows, flat codes, query columns, K) of ``slots`` (one L) and query ``row``."""
    _, codes, _, _, _, K = stage._kept
    Ls, lanes = stage.slot_lanes(slots)
    group = stage.groups[int(Ls[0])]
    cols = _torch().from_numpy(int8_codes.query_columns(codes, row, K))
    return lanes, group, _code_rows(group, lanes), group.data.view(-1, stage.dim), cols, K


def products(stage, slots: np.ndarray, row: int):
    """(T [M, L, K] int32 = 254 H + Lo of the candidates' codes with query ``row`` of the last call,
    their lanes, their group): the candidates' codes are gathered and multiplied again (3 KB per slide)
    instead of keeping every product of the first stage (1 KB per slide per query, written and read)."""
    torch = _torch()
    lanes, group, rows, flat, cols, K = _query_setup(stage, np.asarray(slots, np.int64), row)
    x = torch.empty((rows.numel(), stage.dim), dtype=torch.int8)
    prod = torch.empty((rows.numel(), 2 * K), dtype=torch.int32)
    return _products_into(flat, rows, cols, group.L, K, x, prod), lanes, group


def tight_bounds(stage, slots: np.ndarray, row: int = 0, threshold: float = -np.inf) -> np.ndarray | None:
    """[M] float64 upper bounds on S of ``slots`` (all with L = K prototypes) against query ``row`` of the
    last call: min(row-max sum, column-max sum, one dual round) of the exact integers T, scaled, plus the
    margin; the dual round only where the others still reach ``threshold`` (an S value). Integers U, V with
    U_k + V_l >= T_lk give u_k = a U_k + m_k, v_l = a V_l with u_k + v_l >= a T_lk + m_k >= s_kl (a: the
    slide's and the query's scales / 254, m_k: the entry margin of query prototype k), so
    S <= a (sum U + sum V) + sum m; the column-max sum likewise with max m. None when nothing is kept.

    Why in chunks of ``_TIGHT_CHUNK`` candidates: gathered whole (11,000 candidates on uniformly random
    prototypes at 100,000 slides), the codes (34 MB) and products left the caches between steps and the
    product ran at a third of its in-cache speed; chunked, every step after the gather works in cache
    (35 -> 19-26 ms of one core for 11,000 candidates, same bounds bit for bit, measured)."""
    if stage._kept is None or len(slots) == 0:
        return None
    torch = _torch()
    _, _, q_scale, eq, qn, _ = stage._kept
    lanes, group, rows, flat, cols, K = _query_setup(stage, np.asarray(slots, np.int64), row)
    L, M = group.L, len(lanes)
    a = group.scale[lanes] * (q_scale[row] / LO_FACTOR)
    m = eq[row] * NORM_SLACK + group.err[lanes][:, None] * qn[row][None, :]  # [M, K]
    m_rows, m_cols = m.sum(axis=1), m.max(axis=1) * L
    chunk = min(M, _TIGHT_CHUNK)
    x = torch.empty((chunk * L, stage.dim), dtype=torch.int8)
    prod = torch.empty((chunk * L, 2 * K), dtype=torch.int32)
    bound = np.empty(M, np.float64)
    for c0 in range(0, M, chunk):
        c1 = min(M, c0 + chunk)
        n = c1 - c0
        T = _products_into(flat, rows[c0 * L : c1 * L], cols, L, K, x[: n * L], prod[: n * L])
        U = T.amax(dim=1)  # [n, K] row maxima (over the slide's prototypes l)
        ac = a[c0:c1]
        b = np.minimum(U.sum(dim=1).numpy() * ac + m_rows[c0:c1],
                       T.amax(dim=2).sum(dim=1).numpy() * ac + m_cols[c0:c1])
        live = np.flatnonzero(b * (1 + 1e-12) + L * SLACK >= threshold)
        if live.size:
            pick = torch.from_numpy(live)
            dual = _dual_integers(T.index_select(0, pick), U.index_select(0, pick))
            b[live] = np.minimum(b[live], dual * ac[live] + m_rows[c0:c1][live])
        bound[c0:c1] = b
    return bound * (1 + 1e-12) + L * SLACK


def padded_similarities(stage, slots: np.ndarray, row: int) -> np.ndarray:
    """``BoundStage.padded_similarities`` for int8 codes: [M, K, L] float32 upper bounds on the
    similarity matrices (products of the gathered codes, scaled, plus each entry's margin)."""
    _, _, q_scale, eq, qn, _ = stage._kept
    T, lanes, group = products(stage, slots, row)
    scale = (group.scale[lanes] * (q_scale[row] / LO_FACTOR)).astype(np.float32)
    sims = T.numpy().transpose(0, 2, 1).astype(np.float32) * scale[:, None, None]  # [M, K, L]
    margin = (eq[row] * NORM_SLACK)[None, :, None] + group.err[lanes][:, None, None] * qn[row][None, :, None]
    # float32 rounding of the scaled products (a few ulps of values <= ~1) is covered by the 1e-6.
    return sims + (margin + 1e-6).astype(np.float32)
