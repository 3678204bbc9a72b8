"""First stage of similar-slide search: a safe upper bound on every slide's prototype set similarity S.

For a query set Q [K, E] and a slide's set X [L, E] (L2-normalized), every one-to-one matching pairs each
query prototype with at most one partner, so S <= sum over k of max_l <q_k, x_l> (the row-max bound;
the sum of the min(K, L) largest terms when K > L). This module computes that bound for every slide of
the cohort with one matrix product of the query against all stored prototypes, in reduced precision,
plus a margin that makes it a rigorous bound on the float32 vectors' S:

    <q, x> <= s_hat + u |s_hat| + ||q - q_hat|| + ||q_hat|| ||x - x_hat|| + 2 E 2^-24

(s_hat: the product as computed, rounded once to the output type of unit roundoff u; q_hat, x_hat: the
rounded inputs; the last term: float32 accumulation of E terms; int8 codes have their own, exact
integer form: int8_codes.py). precision.py verifies the margin on the running machine once per process
and falls back to float32 if it ever fails.

Why this design (100,000 slides x 16 x 192-d, see benchmarks/similar.py): the first stage reads every
stored prototype once per query, so its time is the bytes it reads and the speed of the CPU's units for
the type. On 2 Sapphire Rapids cores with AMX a float32 product took ~140 ms (1.2 GB), bfloat16 ~32 ms,
at the memory bandwidth for its 614 MB, and int8 ~50 ms; on 2 cores without AMX (AVX512-BF16 and VNNI)
bfloat16 ran no faster than float32 (~75 ms per core for half the rows, compute-bound) and int8 (307 MB,
int8_codes.py / int8_stage.py) ~28 ms, at the bandwidth. precision.py picks by the CPU's units. A coarse
first stage (faiss IVF cells with radii, a PCA projection with residual norms) bounds nothing on
unstructured cohorts (uniformly random prototypes: every cell radius or residual is as large as the
vectors), so the worst regime still needs the full product: one reduced-precision pass it is. The
column-max bound (sum over l of max_k) needs a horizontal maximum per stored prototype that costs more
than it saves here (~35 ms); it is applied, with the dual bound, to the candidates (set_search.py).

Layout: slides are grouped by their number of prototypes L; a group's reduced copy is [blocks, L, B, E]
(l-major inside a block of B slides), so the product of one block [L*B, E] @ [E, K] gives L slabs
[B, K] whose element-wise maximum is the row-max of B slides at once (contiguous, SIMD, in cache).
bfloat16 maxima are taken on the raw 16-bit patterns as int16: for non-negative floats the integer
order is the float order, and a negative maximum (all of a slide's cosines negative) becomes 0, still an
upper bound. Removing a slide frees its lane (bound -inf); adding fills free lanes first.
"""

from __future__ import annotations

import logging

import numpy as np

from napari_slpd.similarity import int8_codes, int8_stage
from napari_slpd.similarity.workers import n_workers as _n_workers
from napari_slpd.similarity.workers import pool as _pool
from napari_slpd.similarity.workers import map_runs as _map_runs
from napari_slpd.similarity.workers import thread_buffer as _thread_buffer

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24, "int8": 0.0}
PRECISIONS = ("auto", "int8", "bfloat16", "float16", "float32")
MAX_BLOCK = 2048  # slides per block: a block's product [16 * 2048, 16] bfloat16 (1 MB) stays in L2
# int8 blocks are multiplied whole (``torch._int_mm`` takes 2-D operands): [16 * 256, 192] codes (768 KB)
# and their [4096, 2 K] int32 products (512 KB) stay in L2.
MAX_BLOCK_INT8 = 256
_MAX_RESULT_ELEMENTS = 1 << 24  # per batch of queries: [slides, queries * K] maxima held at once
_CHUNK_BYTES = 1 << 20  # a work item's products [L, lanes, Q * K] (reduced precision) stay in L2
_KEEP_BYTES = 256 << 20  # products kept for the tighter bounds of the candidates (100,000 x 16 x 16: 51 MB)


def _torch():
    import torch

    return torch


class _Group:
    """The reduced copies of all slides with L prototypes: data [blocks, L, B, E] and per lane its slot
    (-1 when free), rounding error (max ||x - x_hat|| over the slide's prototypes) and, for int8 codes,
    the slide's scale."""

    def __init__(self, L: int, dim: int, dtype, device: str):
        torch = _torch()
        self.L, self.dim, self.dtype, self.device = int(L), int(dim), dtype, device
        self.max_block = MAX_BLOCK_INT8 if dtype == torch.int8 else MAX_BLOCK
        self.B = 0
        self.data = torch.zeros((0, self.L, 0, self.dim), dtype=dtype, device=device)
        self.slots = np.empty(0, np.int64)
        self.err = np.empty(0, np.float64)
        self.scale = np.empty(0, np.float64)
        self.used = 0  # lanes handed out so far (high-water mark)
        self.free: list[int] = []
        self._kept = None  # a reused buffer for the last query batch's products (no page faults per query)

    def kept_buffer(self, shape: tuple, dtype):
        torch = _torch()
        if self._kept is None or tuple(self._kept.shape) != tuple(shape) or self._kept.dtype != dtype:
            self._kept = None
            self._kept = torch.empty(shape, dtype=dtype)
        return self._kept

    @property
    def capacity(self) -> int:
        return int(self.data.shape[0]) * self.B

    @property
    def n_blocks_used(self) -> int:
        return 0 if self.B == 0 else -(-self.used // self.B)

    def _grow(self, need: int) -> None:
        torch = _torch()
        if need <= self.capacity:
            return
        target = max(need, 2 * self.capacity, 16)
        if target <= self.max_block:
            B = 1 << (target - 1).bit_length()
            n_blocks = 1
        else:
            B = self.max_block
            n_blocks = -(-target // B)
        data = torch.zeros((n_blocks, self.L, B, self.dim), dtype=self.dtype, device=self.device)
        if self.capacity:
            if B == self.B:
                data[: self.data.shape[0]] = self.data
            else:  # a single smaller block: its lanes are the first lanes of block 0
                data[0, :, : self.B] = self.data[0]
        slots = np.full(n_blocks * B, -1, np.int64)
        slots[: self.slots.size] = self.slots
        err = np.zeros(n_blocks * B, np.float64)
        err[: self.err.size] = self.err
        scale = np.ones(n_blocks * B, np.float64)
        scale[: self.scale.size] = self.scale
        self.data, self.slots, self.err, self.scale, self.B = data, slots, err, scale, B

    def add(self, slots: np.ndarray, low, err: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Store reduced copies ``low`` [N, L, E] (a tensor of this group's dtype) for ``slots``; returns lanes."""
        torch = _torch()
        N = len(slots)
        reuse = [self.free.pop() for _ in range(min(N, len(self.free)))]
        fresh = N - len(reuse)
        lanes = np.array(reuse + list(range(self.used, self.used + fresh)), np.int64)
        self._grow(self.used + fresh)
        self.used += fresh
        block = torch.from_numpy(lanes // self.B).to(self.device)
        lane = torch.from_numpy(lanes % self.B).to(self.device)
        self.data[block, :, lane, :] = low.to(self.device)
        self.slots[lanes] = slots
        self.err[lanes] = err
        if scale is not None:
            self.scale[lanes] = scale
        return lanes

    def remove(self, lane: int) -> None:
        self.slots[lane] = -1
        self.free.append(int(lane))


class BoundStage:
    """Reduced-precision copies of every slide's prototypes, answering upper bounds on S for all slides."""

    def __init__(self, dim: int, precision: str = "float32", device: str = "cpu"):
        torch = _torch()
        self.dim = int(dim)
        self.device = device
        self.precision = precision
        self.dtype = getattr(torch, precision)
        self.u = UNIT_ROUNDOFF[precision]
        self.acc_eps = 2.0 * self.dim * 2.0**-24  # float32 accumulation of dim products of norm <= ~1
        self.groups: dict[int, _Group] = {}
        self.where: dict[int, tuple[int, int]] = {}  # slot -> (L, lane)
        self._slot_L = np.zeros(0, np.int64)  # the same as arrays indexed by slot (0: not stored)
        self._slot_lane = np.zeros(0, np.int64)
        self._kept = None  # the last single query's products (see padded_similarities)

    def __len__(self) -> int:
        return len(self.where)

    @property
    def nbytes(self) -> int:
        return sum(g.data.numel() * g.data.element_size() for g in self.groups.values())

    def add(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Add slides ``slots`` [N] with normalized float32 prototypes [N, L, E] (one L per call)."""
        torch = _torch()
        slots = np.asarray(slots, np.int64)
        self._kept = None
        if slots.size == 0:
            return
        N, L, E = vectors.shape
        for s in slots.tolist():
            if s in self.where:
                self.remove(s)
        scale = None
        if self.precision == "int8":
            codes, scale, err = int8_codes.encode_sets(vectors)
            low = torch.from_numpy(codes)
        else:
            x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
            low = x.to(self.dtype)
            err = (x - low.float()).norm(dim=2).amax(dim=1).numpy().astype(np.float64) if self.u > 2**-20 \
                else np.zeros(N, np.float64)
        group = self.groups.get(L)
        if group is None:
            group = self.groups[L] = _Group(L, E, self.dtype, self.device)
        lanes = group.add(slots, low, err, scale)
        self.where.update(zip(slots.tolist(), ((L, int(lane)) for lane in lanes)))
        top = int(slots.max()) + 1
        if top > self._slot_L.size:
            size = max(top, 2 * self._slot_L.size, 1024)
            self._slot_L = np.concatenate([self._slot_L, np.zeros(size - self._slot_L.size, np.int64)])
            self._slot_lane = np.concatenate([self._slot_lane, np.zeros(size - self._slot_lane.size, np.int64)])
        self._slot_L[slots] = L
        self._slot_lane[slots] = lanes

    def remove(self, slot: int) -> None:
        self._kept = None
        where = self.where.pop(int(slot), None)
        if where is not None:
            self.groups[where[0]].remove(where[1])
            self._slot_L[int(slot)] = 0

    # -- bounds ------------------------------------------------------------------------------------------
    def slot_lanes(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([M] L, [M] lane) of stored ``slots`` (vectorized lookups: the search asks for hundreds)."""
        slots = np.asarray(slots, np.int64)
        return self._slot_L[slots], self._slot_lane[slots]

    def upper_bounds(self, queries: np.ndarray, n_slots: int) -> np.ndarray:
        """[Q, n_slots] float64: for queries [Q, K, E] (normalized float32), an upper bound on
        -(distance) = S - max(K, L) for every stored slot (-inf for slots not stored). On CPU the
        products are kept until the next call (when they fit in ``_KEEP_BYTES``), for
        :meth:`padded_similarities`."""
        queries = np.ascontiguousarray(queries, np.float32)
        self._kept = None
        Q, K, _ = queries.shape
        out = np.full((Q, n_slots), -np.inf)
        per_batch = max(1, _MAX_RESULT_ELEMENTS // max(1, K * max(1, len(self.where))))
        for q0 in range(0, Q, per_batch):
            self._bounds_batch(queries[q0 : q0 + per_batch], out[q0 : q0 + per_batch], keep=per_batch >= Q)
        return out

    def _bounds_batch(self, queries: np.ndarray, out: np.ndarray, keep: bool = True) -> None:
        if self.precision == "int8":
            int8_stage.bounds_batch(self, queries, out, keep)
            return
        Q, K, E = queries.shape
        # The queries' rounding in numpy: torch's element-wise ops on these few hundred rows fork its
        # intra-op threads, and on a busy 2-core machine each fork waited ~10 ms for a descheduled thread.
        qf = queries.reshape(Q * K, E)
        qround = _round_to(qf, self.precision)
        eq = np.linalg.norm((qf - qround).astype(np.float64), axis=1).reshape(Q, K)
        qn = np.linalg.norm(qround.astype(np.float64), axis=1).reshape(Q, K)
        qT = _as_torch(np.ascontiguousarray(qround.T), self.precision).to(self.device)
        keep = keep and self.device == "cpu" and self.n_rows_stored * Q * K * 2 <= _KEEP_BYTES
        kept = {}
        for L, group in self.groups.items():
            if group.used == 0:
                continue
            p = min(K, L)
            if self.device == "cpu":
                sums, maxima, kept_L = self._cpu_bounds(group, qT, Q, K, keep)
                if kept_L is not None:
                    kept[L] = kept_L
            else:
                sums, maxima = None, self._row_maxima(group, qT).reshape(group.used, Q, K)
            if sums is None:  # K > L (or CUDA): only L pairs are matched: the L largest row maxima
                np.maximum(maxima, 0, out=maxima)  # a negative maximum as 0: still an upper bound
                if K > L:
                    maxima = -np.partition(-maxima, L - 1, axis=2)[:, :, :L]
                sums = maxima.sum(axis=2, dtype=np.float64)  # [used, Q]
            total = np.asarray(sums, np.float64)
            # Row maxima were clamped at 0, so |terms| sum to the total. The margin per term (module
            # docstring), summed over the p = min(K, L) terms; the query's terms are taken over all K (a
            # superset when K > L: still an upper bound); float32 summation of p terms <= 1 adds < p^2 2^-24.
            bound = total * (1.0 + self.u * 1.01) + 2.0 * p * p * 2.0**-24
            bound += (eq.sum(axis=1) + p * self.acc_eps - max(K, L))[None, :]
            bound += group.err[: group.used].astype(np.float64)[:, None] * qn.sum(axis=1)[None, :]
            alive = group.slots[: group.used] >= 0
            out[:, group.slots[: group.used][alive]] = bound[alive].T
        if keep and kept:
            self._kept = (kept, eq, qn, K)

    @property
    def n_rows_stored(self) -> int:
        return sum(g.capacity * g.L for g in self.groups.values())

    def padded_similarities(self, slots: np.ndarray, row: int = 0) -> np.ndarray | None:
        """[M, K, L] float32 upper bounds on the similarity matrices of ``slots`` (all with L prototypes)
        against query ``row`` of the last call, from its kept reduced-precision products plus each
        entry's rounding margin; None when nothing is kept. Any bound on S computed from them bounds the
        true S (set_search.py uses them to skip most float32 re-scoring: 512 bytes per slide instead of
        12 KB)."""
        if self._kept is None or len(slots) == 0:
            return None
        if self.precision == "int8":
            return int8_stage.padded_similarities(self, np.asarray(slots, np.int64), row)
        kept, eq, qn, K = self._kept
        Ls, lanes = self.slot_lanes(slots)
        L = int(Ls[0])
        if L not in kept:
            return None
        group = self.groups[L]
        raw, sub = kept[L]  # [chunks, L, sub, Q*K] (numpy view of the products), lanes per chunk
        # (numpy gathers: torch's advanced indexing with a slice between the indices is ~20x slower here)
        sims = raw[lanes // sub, :, lanes % sub, row * K : (row + 1) * K]  # [M, L, K]
        if self.dtype == _torch().bfloat16:  # raw bfloat16 patterns as int16 -> float32
            sims = (sims.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            sims = sims.astype(np.float32, copy=False)
        sims = sims.transpose(0, 2, 1)  # [M, K, L]
        margin = (eq[row] + self.acc_eps)[None, :, None] + group.err[lanes][:, None, None] * qn[row][None, :, None]
        return sims + self.u * 1.01 * np.abs(sims) + margin.astype(np.float32) + np.float32(1e-6)

    def _cpu_bounds(self, group: _Group, qT, Q: int, K: int, keep: bool):
        """Row maxima of every lane of ``group`` against the reduced queries ``qT`` [E, Q*K], fused with the
        products: the worker that multiplies a chunk of lanes also takes its maxima over the L prototypes
        (element-wise maxima of L contiguous slabs, in cache) and, when K <= L, their sums per query.
        Returns ([used, Q] float32 sums or None, [used, Q, K] float32 maxima or None, kept products)."""
        torch = _torch()
        L, B = group.L, group.B
        QK = Q * K
        nb = group.n_blocks_used
        # Lanes per work item: a chunk's products [L, sub, QK] stay within ~1 MB (L2), and there are at
        # least a few items per worker when the group is small (evaluation: 10,000 slides, 16 queries).
        sub = B
        while sub > 64 and (L * sub * QK * 2 > _CHUNK_BYTES or nb * (B // sub) < 4 * _n_workers()):
            sub //= 2
        per_block = B // sub
        n_chunks = -(-group.used // sub)
        reduce_sums = K <= L
        result = np.empty((n_chunks * sub, Q if reduce_sums else QK), np.float32)
        products = None
        if keep:
            products = group.kept_buffer((nb * per_block, L, sub, QK), self.dtype)
        result_t = torch.from_numpy(result)

        def chunk(c: int) -> None:
            b, j0 = divmod(c, per_block)
            j0 *= sub
            x = group.data[b, :, j0 : j0 + sub, :]  # [L, sub, E]
            if products is not None:
                out = products[c]
            else:
                out = _thread_buffer((L, sub, QK), self.dtype)
            if sub == B:
                torch.mm(x.reshape(L * sub, self.dim), qT, out=out.view(L * sub, QK))
            else:
                torch.matmul(x, qT, out=out)
            m = out.amax(dim=0)  # [sub, QK], >= the true row maxima up to the margin
            m.clamp_min_(0)
            dest = result_t[c * sub : (c + 1) * sub]
            if reduce_sums:
                torch.sum(m.view(sub, Q, K).float(), dim=2, out=dest)
            else:
                dest.copy_(m)

        _map_runs(chunk, n_chunks)
        kept = None
        if products is not None:
            raw = products.view(torch.int16) if self.dtype == torch.bfloat16 else products
            kept = (raw.numpy(), sub)
        if reduce_sums:
            return result[: group.used], None, kept
        return None, result[: group.used].reshape(group.used, Q, K), kept

    def _row_maxima(self, group: _Group, qT) -> np.ndarray:
        """[used lanes, QK] float32 row maxima (max over the L prototypes of each lane's slide), on CUDA."""
        torch = _torch()
        L, B = group.L, group.B
        QK = qT.shape[1]
        nb = group.n_blocks_used
        with _no_tf32():
            prod = torch.matmul(group.data[:nb].reshape(nb, L * B, self.dim), qT)  # [nb, L*B, QK]
            m = prod.view(nb, L, B, QK).amax(dim=1).reshape(nb * B, QK)
        return m[: group.used].float().cpu().numpy()


def _round_to(x: np.ndarray, precision: str) -> np.ndarray:
    """float32 ``x`` rounded to ``precision`` (round to nearest even, as torch's conversion), as float32."""
    x = np.ascontiguousarray(x, np.float32)
    if precision == "bfloat16":
        bits = x.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return rounded.view(np.float32)
    if precision == "float16":
        return x.astype(np.float16).astype(np.float32)
    return x


def _as_torch(x: np.ndarray, precision: str):
    """A float32 array already rounded to ``precision`` as a torch tensor of that type (exact)."""
    torch = _torch()
    x = np.ascontiguousarray(x, np.float32)
    if precision == "bfloat16":
        return torch.from_numpy((x.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.int16)).view(
            torch.bfloat16)
    if precision == "float16":
        return torch.from_numpy(x.astype(np.float16))
    return torch.from_numpy(x)


class _no_tf32:
    """Plain float32 products on CUDA for the duration (TF32 would break the rounding margin)."""

    def __enter__(self):
        torch = _torch()
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        _torch().backends.cuda.matmul.allow_tf32 = self.saved
