"""The first stage on int8 codes (int8_codes.py): bounds of every slide, tighter bounds of candidates.

``bounds_batch``: per block of B slides (one worker each, in L2), the int32 products of the block's codes
[L * B, E] with the queries' hi/lo codes [E, 2 Q K], maxima over the L prototypes of H and of Lo,
254 max H + max Lo clamped at 0 and, for K <= L, its sum per query: the row-max bound, scaled to cosines
with the margin added (int8_codes.py).

Why a pilot (one query, K = L): int8's margin (~0.009 per prototype pair, ~0.15 per slide) lets ~10x more
slides through the row-max bound than the exact row maxima would on uniformly random prototypes (11,000
of 100,000 instead of 1,000-2,000; measured), and gathering those candidates' codes again for the
tighter bounds cost more than the first stage saved. So the first 1/16 of the blocks goes first; the
caller solves the best of them exactly and returns the n-th best -(distance) among them (a value the
final n-th best reaches); the other blocks then compute, while their products are still in cache, the
column-max and one-dual-round bounds (``tight_bounds``' integers) of the slides whose row bound reaches
that value, and mark them in ``stage.tight_done``.
"""

from __future__ import annotations

import numpy as np

from napari_slpd.similarity import int8_codes
from napari_slpd.similarity.int8_codes import LO_FACTOR, NORM_SLACK, SLACK
from napari_slpd.similarity.workers import pool, thread_buffer

PILOT_MIN_BLOCKS = 32  # below this many blocks (~8,000 slides) the whole cohort is cheap: no pilot
PILOT_FRACTION = 16  # the pilot runs on 1/16 of the blocks


def _torch():
    import torch

    return torch


def bounds_batch(stage, queries: np.ndarray, out: np.ndarray, keep: bool, pilot=None) -> None:
    """``BoundStage._bounds_batch`` for int8 codes: fills ``out`` [Q, n_slots]."""
    torch = _torch()
    Q, K, _ = queries.shape
    codes, q_scale, eq, qn = int8_codes.encode_queries(queries)
    qT = torch.from_numpy(codes)
    eq_sum, qn_sum = eq.sum(axis=1) * NORM_SLACK, qn.sum(axis=1)
    work = [g for g in stage.groups.values() if g.used]
    use_pilot = pilot is not None and Q == 1 and sum(g.n_blocks_used for g in work) >= PILOT_MIN_BLOCKS
    if use_pilot:
        stage.tight_done = np.zeros(out.shape[1], bool)
    first, rest = [], []
    for group in work:
        nb = group.n_blocks_used
        cut = max(1, nb // PILOT_FRACTION) if use_pilot and group.L == K else 0
        first.append((group, range(cut)))
        rest.append((group, range(cut, nb)))
    floor = None
    if use_pilot:
        for group, blocks in first:
            _run_blocks(stage, group, qT, Q, K, blocks, out, q_scale, eq, qn, eq_sum, qn_sum, None)
        floor = pilot(out[0])
        work_items = rest
    else:
        work_items = [(g, range(g.n_blocks_used)) for g in work]
    for group, blocks in work_items:
        _run_blocks(stage, group, qT, Q, K, blocks, out, q_scale, eq, qn, eq_sum, qn_sum,
                    floor if group.L == K else None)
    if keep:
        stage._kept = ("int8", codes, q_scale, eq, qn, K)


def _run_blocks(stage, group, qT, Q, K, blocks, out, q_scale, eq, qn, eq_sum, qn_sum, floor) -> None:
    """Bounds of the slides in ``blocks`` of ``group`` into ``out``; with a ``floor`` (one query, K = L),
    in-cache tight bounds of those whose row bound reaches it."""
    torch = _torch()
    if len(blocks) == 0:
        return
    L, B = group.L, group.B
    QK = Q * K
    reduce_sums = K <= L
    lanes = np.arange(blocks.start * B, min(blocks.stop * B, group.used))
    result = np.zeros((blocks.stop * B - blocks.start * B, Q if reduce_sums else QK), np.int64)
    result_t = torch.from_numpy(result)
    size = max(K, L)
    a = group.scale[lanes] * (q_scale[0] / LO_FACTOR) if floor is not None else None
    m_rows = eq_sum[0] + group.err[lanes] * qn_sum[0] if floor is not None else None
    tight_rows = tight_cols = picked = None
    if floor is not None and np.isfinite(floor):
        # The integer row-sum each lane needs for its bound to reach the floor (a little lower: picking more
        # slides only costs time; the bounds stay valid whichever slides get the tighter ones).
        need = np.full(result.shape[0], np.inf)
        need[: lanes.size] = (floor + size - m_rows - L * SLACK) / a * (1 - 1e-9) - 1
        need_t = torch.from_numpy(need)
        tight_rows = np.zeros(result.shape[0], np.int64)
        tight_cols = np.zeros(result.shape[0], np.int64)
        picked = np.zeros(result.shape[0], bool)

    def block(b: int) -> None:
        prod = thread_buffer((L * B, 2 * QK), torch.int32)
        torch._int_mm(group.data[b].view(L * B, stage.dim), qT, out=prod)
        m = prod.view(L, B, 2 * QK).amax(dim=0)  # [B, 2 QK]
        t = m[:, :QK].mul_(LO_FACTOR).add_(m[:, QK:]).clamp_min_(0)  # int32: MAX_DIM keeps it exact
        r0 = (b - blocks.start) * B
        dest = result_t[r0 : r0 + B]
        if reduce_sums:
            torch.sum(t.view(B, Q, K), dim=2, out=dest)
        else:
            dest.copy_(t)
        if picked is None:
            return
        sel = torch.nonzero(dest[:, 0] >= need_t[r0 : r0 + B]).flatten()
        if sel.numel() == 0:
            return
        p = prod.view(L, B, 2 * K).index_select(1, sel)  # [L, n, 2K], still in cache
        T = p[..., :K].mul(LO_FACTOR).add_(p[..., K:])  # exact 254 H + Lo [L, n, K]
        rows, cols = _tight_integers(T.transpose(0, 1))
        idx = sel.numpy() + r0
        tight_rows[idx], tight_cols[idx], picked[idx] = rows, cols, True

    list(pool().map(block, blocks))
    n = lanes.size
    if reduce_sums:
        sums = result[:n].astype(np.float64)
    else:  # K > L: only L pairs are matched: the L largest row maxima
        maxima = -np.partition(-result[:n].reshape(n, Q, K), L - 1, axis=2)[:, :, :L]
        sums = maxima.sum(axis=2, dtype=np.float64)
    # Integer sums of clamped row maxima of 254 H + Lo, to cosines: slide scale x query scale / 254.
    bound = sums * (group.scale[lanes, None] * q_scale[None, :] / LO_FACTOR)
    bound = bound * (1 + 1e-12) + min(K, L) * SLACK
    bound += (eq_sum - size)[None, :] + group.err[lanes, None] * qn_sum[None, :]
    slots = group.slots[lanes]
    alive = slots >= 0
    if picked is not None:
        got = np.flatnonzero(picked[:n] & alive)
        m_cols = (eq[0] * NORM_SLACK).max() + group.err[lanes[got]] * qn[0].max()
        tight = np.minimum(tight_rows[got] * a[got] + m_rows[got], tight_cols[got] * a[got] + L * m_cols)
        bound[got, 0] = np.minimum(bound[got, 0], tight * (1 + 1e-12) + L * SLACK - size)
        stage.tight_done[slots[got]] = True
    out[:, slots[alive]] = bound[alive].T


def _tight_integers(T) -> tuple[np.ndarray, np.ndarray]:
    """For T [M, L, K] int32 (exact integer similarities of each slide's prototypes l with the query's k):
    ([M] min(row-max sum, one dual round), [M] column-max sum), int64. Any integers U, V with
    U_k + V_l >= T_lk bound the integer matching by sum U + sum V: U = row maxima, V_l = max_k (T_lk - U_k)
    <= 0, then U_k = max_l (T_lk - V_l)."""
    U = T.amax(dim=1)  # [M, K] row maxima (over the slide's prototypes l)
    row_sum, col_sum = U.sum(dim=1), T.amax(dim=2).sum(dim=1)
    V = (T - U[:, None, :]).amax(dim=2)  # [M, L]
    U = (T - V[:, :, None]).amax(dim=1)
    dual = U.sum(dim=1) + V.sum(dim=1)
    return np.minimum(row_sum.numpy(), dual.numpy()), col_sum.numpy()


def products(stage, slots: np.ndarray, row: int):
    """(T [M, L, K] int32 = 254 H + Lo of the candidates' codes with query ``row`` of the last call,
    their lanes, their group): the candidates' codes are gathered and multiplied again (3 KB per slide)
    instead of keeping every product of the first stage (1 KB per slide per query, written and read)."""
    torch = _torch()
    _, codes, _, _, _, K = stage._kept
    Ls, lanes = stage.slot_lanes(slots)
    group = stage.groups[int(Ls[0])]
    L, M = group.L, len(slots)
    x = group.data.numpy()[lanes // group.B, :, lanes % group.B, :]  # [M, L, E]
    cols = torch.from_numpy(int8_codes.query_columns(codes, row, K))
    prod = torch._int_mm(torch.from_numpy(x.reshape(M * L, stage.dim)), cols)  # [M L, 2 K] int32
    return prod[:, :K].mul_(LO_FACTOR).add_(prod[:, K:]).view(M, L, K), lanes, group


def tight_bounds(stage, slots: np.ndarray, row: int = 0) -> np.ndarray | None:
    """[M] float64 upper bounds on S of ``slots`` (all with L = K prototypes) against query ``row`` of the
    last call: :func:`_tight_integers` scaled, plus the margin. Integers U, V with U_k + V_l >= T_lk give
    u_k = a U_k + m_k, v_l = a V_l with u_k + v_l >= a T_lk + m_k >= s_kl (a: the slide's and the query's
    scales / 254, m_k: the entry margin of query prototype k), so S <= a (sum U + sum V) + sum m; the
    column-max sum likewise with max m. None when nothing is kept."""
    if stage._kept is None or len(slots) == 0:
        return None
    _, _, q_scale, eq, qn, _ = stage._kept
    T, lanes, group = products(stage, np.asarray(slots, np.int64), row)
    rows, cols = _tight_integers(T)
    a = group.scale[lanes] * (q_scale[row] / LO_FACTOR)
    m = eq[row] * NORM_SLACK + group.err[lanes][:, None] * qn[row][None, :]  # [M, K]
    bound = np.minimum(rows * a + m.sum(axis=1), cols * a + m.max(axis=1) * group.L)
    return bound * (1 + 1e-12) + group.L * SLACK


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
