"""First stage of similar-slide search: a safe upper bound on every slide's prototype set similarity S.

For a query set Q [K, E] and a slide's set X [L, E] (L2-normalized), every one-to-one matching pairs each
query prototype with at most one partner, so S <= sum over k of max_l <q_k, x_l> (the row-max bound;
the sum of the min(K, L) largest terms when K > L). This module computes that bound for every slide of
the cohort with one matrix product of the query against all stored prototypes, in reduced precision,
plus a margin that makes it a rigorous bound on the float32 vectors' S:

    <q, x> <= s_hat + u |s_hat| + ||q - q_hat|| + ||q_hat|| ||x - x_hat|| + 2 E 2^-24

(s_hat: the product as computed, rounded once to the output type of unit roundoff u; q_hat, x_hat: the
rounded inputs; the last term: float32 accumulation of E terms). ``_self_check`` verifies this margin on
the running machine once per process and falls back to float32 if it ever fails.

Why this design (measured on 2 Sapphire Rapids cores, 100,000 slides x 16 x 192-d, see
benchmarks/similar.py): a float32 product against all 1.6M prototypes takes ~140 ms and reads 1.2 GB;
bfloat16 through oneDNN/AMX takes ~32 ms, at the memory bandwidth (~20 GB/s) for its 614 MB, and int8
(torch._int_mm) ~50 ms with a 5x larger rounding margin. A coarse first stage (faiss IVF cells with
radii, a PCA projection with residual norms) bounds nothing on unstructured cohorts (uniformly random
prototypes: every cell radius or residual is as large as the vectors), so the worst regime still needs
the full product: one bfloat16 pass it is. The column-max bound (sum over l of max_k) needs a horizontal
maximum per stored prototype that costs more than it saves here (~35 ms); it is applied, with the dual
bound, to the few hundred candidates re-scored in float32 (set_search.py).

Layout: slides are grouped by their number of prototypes L; a group's reduced copy is [blocks, L, B, E]
(l-major inside a block of B slides), so the product of one block [L*B, E] @ [E, K] gives L slabs
[B, K] whose element-wise maximum is the row-max of B slides at once (contiguous, SIMD, in cache).
bfloat16 maxima are taken on the raw 16-bit patterns as int16: for non-negative floats the integer
order is the float order, and a negative maximum (all of a slide's cosines negative) becomes 0, still an
upper bound. Removing a slide frees its lane (bound -inf); adding fills free lanes first.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import numpy as np

from napari_slpd.errors import PrototypeError

log = logging.getLogger(__name__)

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
MAX_BLOCK = 2048  # slides per block: a block's product [16 * 2048, 16] bfloat16 (1 MB) stays in L2
_MAX_RESULT_ELEMENTS = 1 << 24  # per batch of queries: [slides, queries * K] maxima held at once
_checked: dict[tuple[str, str], bool] = {}
_check_lock = threading.Lock()


def _torch():
    import torch

    return torch


def resolve_device(device: str | None) -> str:
    """"cuda" when asked or ("auto") when available, else "cpu"."""
    torch = _torch()
    device = device or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrototypeError("the similarity index was asked to use CUDA but no CUDA device is available")
    return device


def choose_precision(precision: str | None, device: str, dim: int) -> str:
    """The storage type of the reduced copy. "auto": float32 on CUDA (the product costs microseconds
    there; no TF32), on CPU bfloat16 when a timed product shows it at least 1.5x faster than float32
    (AMX / AVX512-BF16 machines) and the rounding margin checks out, else float32."""
    precision = precision or "auto"
    if precision not in ("auto", "bfloat16", "float16", "float32"):
        raise PrototypeError(f"index precision must be auto, bfloat16, float16 or float32, not {precision!r}")
    if precision != "auto":
        return precision if _self_check(precision, device, dim) else "float32"
    if device != "cpu":
        return "float32"
    key = ("auto", str(dim))
    if key not in _checked:
        fast = _cpu_has_bf16()
        if fast is None:  # not Linux: time it (minimum of several runs: robust to a busy machine)
            fast = _bf16_speedup(dim) >= 1.5
        _checked[key] = fast
        log.info("similarity bounds: first stage in %s", "bfloat16" if fast else "float32")
    if _checked[key] and _self_check("bfloat16", device, dim):
        return "bfloat16"
    return "float32"


def _cpu_has_bf16() -> bool | None:
    """Whether the CPU multiplies bfloat16 natively (AMX or AVX512-BF16; oneDNN uses them), None if unknown.
    A timed comparison on a shared machine picked float32 once in ten runs; the flags do not flicker."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        return None
    return None


def _bf16_speedup(dim: int) -> float:
    torch = _torch()
    rng = np.random.default_rng(0)
    X = torch.from_numpy(rng.standard_normal((65536, dim), dtype=np.float32))
    q = torch.from_numpy(rng.standard_normal((dim, 16), dtype=np.float32))

    def timed(dtype):
        a, b = X.to(dtype), q.to(dtype).contiguous()
        out = torch.empty(a.shape[0], 16, dtype=dtype)
        best = math.inf
        for _ in range(7):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
        return best

    return timed(torch.float32) / max(timed(torch.bfloat16), 1e-9)


def _self_check(precision: str, device: str, dim: int) -> bool:
    """Whether the margin above holds for this machine's products (random and near-parallel vectors)."""
    if precision == "float32":
        return True
    key = (precision, f"{device}:{dim}")
    with _check_lock:
        if key in _checked:
            return _checked[key]
        torch = _torch()
        rng = np.random.default_rng(1)
        X = rng.standard_normal((4096, dim)).astype(np.float32)
        Q = rng.standard_normal((16, dim)).astype(np.float32)
        X[:16] = Q + 1e-3 * rng.standard_normal((16, dim)).astype(np.float32)  # cosines near 1
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
        stage = BoundStage(dim, precision=precision, device=device)
        dtype = stage.dtype
        Xt = torch.from_numpy(X)
        Qt = torch.from_numpy(Q)
        Xl, Ql = Xt.to(dtype), Qt.to(dtype)
        ex = (Xt - Xl.float()).norm(dim=1).numpy()
        eq = (Qt - Ql.float()).norm(dim=1).numpy()
        qn = Ql.float().norm(dim=1).numpy()
        got = torch.mm(Xl.to(device), Ql.T.contiguous().to(device)).float().cpu().numpy()
        true = X.astype(np.float64) @ Q.astype(np.float64).T
        margin = stage.u * 1.01 * np.abs(got) + eq[None, :] + qn[None, :] * ex[:, None] + stage.acc_eps
        ok = bool((true <= got + margin).all())
        if not ok:
            log.warning("similarity bounds: %s products on %s exceed the rounding margin; using float32",
                        precision, device)
        _checked[key] = ok
        return ok


class _Group:
    """The reduced copies of all slides with L prototypes: data [blocks, L, B, E] and per lane its slot
    (-1 when free) and rounding error (max ||x - x_hat|| over the slide's prototypes)."""

    def __init__(self, L: int, dim: int, dtype, device: str):
        torch = _torch()
        self.L, self.dim, self.dtype, self.device = int(L), int(dim), dtype, device
        self.B = 0
        self.data = torch.zeros((0, self.L, 0, self.dim), dtype=dtype, device=device)
        self.slots = np.empty(0, np.int64)
        self.err = np.empty(0, np.float32)
        self.used = 0  # lanes handed out so far (high-water mark)
        self.free: list[int] = []

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
        if target <= MAX_BLOCK:
            B = 1 << (target - 1).bit_length()
            n_blocks = 1
        else:
            B = MAX_BLOCK
            n_blocks = -(-target // B)
        data = torch.zeros((n_blocks, self.L, B, self.dim), dtype=self.dtype, device=self.device)
        if self.capacity:
            if B == self.B:
                data[: self.data.shape[0]] = self.data
            else:  # a single smaller block: its lanes are the first lanes of block 0
                data[0, :, : self.B] = self.data[0]
        slots = np.full(n_blocks * B, -1, np.int64)
        slots[: self.slots.size] = self.slots
        err = np.zeros(n_blocks * B, np.float32)
        err[: self.err.size] = self.err
        self.data, self.slots, self.err, self.B = data, slots, err, B

    def add(self, slots: np.ndarray, low, err: np.ndarray) -> np.ndarray:
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
        self._kept = None  # the last single query's products (see padded_similarities)

    @classmethod
    def create(cls, dim: int, precision: str | None = "auto", device: str | None = "auto") -> BoundStage:
        device = resolve_device(device)
        return cls(dim, choose_precision(precision, device, dim), device)

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
        x = torch.from_numpy(np.ascontiguousarray(vectors, np.float32))
        low = x.to(self.dtype)
        err = (x - low.float()).norm(dim=2).amax(dim=1).numpy().astype(np.float32) if self.u > 2**-20 \
            else np.zeros(N, np.float32)
        group = self.groups.get(L)
        if group is None:
            group = self.groups[L] = _Group(L, E, self.dtype, self.device)
        lanes = group.add(slots, low, err)
        self.where.update(zip(slots.tolist(), ((L, int(lane)) for lane in lanes)))

    def remove(self, slot: int) -> None:
        self._kept = None
        where = self.where.pop(int(slot), None)
        if where is not None:
            self.groups[where[0]].remove(where[1])

    # -- bounds ------------------------------------------------------------------------------------------
    def upper_bounds(self, queries: np.ndarray, n_slots: int) -> np.ndarray:
        """[Q, n_slots] float64: for queries [Q, K, E] (normalized float32), an upper bound on
        -(distance) = S - max(K, L) for every stored slot (-inf for slots not stored). For a single
        query the products are kept until the next call, for :meth:`padded_similarities`."""
        queries = np.ascontiguousarray(queries, np.float32)
        self._kept = None
        Q, K, _ = queries.shape
        out = np.full((Q, n_slots), -np.inf)
        per_batch = max(1, _MAX_RESULT_ELEMENTS // max(1, K * max(1, len(self.where))))
        for q0 in range(0, Q, per_batch):
            self._bounds_batch(queries[q0 : q0 + per_batch], out[q0 : q0 + per_batch])
        return out

    def _bounds_batch(self, queries: np.ndarray, out: np.ndarray) -> None:
        torch = _torch()
        Q, K, E = queries.shape
        qf = torch.from_numpy(queries.reshape(Q * K, E))
        qlow = qf.to(self.dtype)
        eq = (qf - qlow.float()).norm(dim=1).numpy().astype(np.float64).reshape(Q, K)
        qn = qlow.float().norm(dim=1).numpy().astype(np.float64).reshape(Q, K)
        qT = qlow.T.contiguous().to(self.device)
        keep = Q == 1 and self.device == "cpu"
        kept = {}
        for L, group in self.groups.items():
            if group.used == 0:
                continue
            products = None
            if keep:
                products = kept[L] = torch.empty((group.n_blocks_used, L * group.B, K), dtype=self.dtype)
            maxima = self._row_maxima(group, qT, products).reshape(group.used, Q, K)  # >= true row maxima
            err = group.err[: group.used].astype(np.float64)[:, None]
            if K > L:  # only L pairs are matched: the L largest row maxima
                maxima = -np.partition(-maxima, L - 1, axis=2)[:, :, :L]
            total = maxima.sum(axis=2, dtype=np.float64)  # [used, Q]
            absolute = total if self.precision == "bfloat16" else np.abs(maxima).sum(axis=2, dtype=np.float64)
            # The margin per term (module docstring), summed over the p = min(K, L) terms; the query's
            # terms are taken over all K (a superset when K > L: still an upper bound).
            bound = total + self.u * 1.01 * absolute
            bound += (eq.sum(axis=1) + min(K, L) * self.acc_eps - max(K, L))[None, :]
            bound += err * qn.sum(axis=1)[None, :]
            alive = group.slots[: group.used] >= 0
            out[:, group.slots[: group.used][alive]] = bound[alive].T
        if keep:
            self._kept = (kept, eq[0], qn[0])

    def padded_similarities(self, slots: np.ndarray) -> np.ndarray | None:
        """[M, K, L] float32 upper bounds on the similarity matrices of ``slots`` (all with L prototypes)
        against the last single query, from its kept reduced-precision products plus each entry's
        rounding margin; None when nothing is kept. Any bound on S computed from them bounds the true S
        (set_search.py uses them to skip most float32 re-scoring: 512 bytes per slide instead of 12 KB)."""
        if self._kept is None or len(slots) == 0:
            return None
        torch = _torch()
        # (numpy gathers: torch's advanced indexing with a slice between the indices is ~20x slower here)
        kept, eq, qn = self._kept
        L, _ = self.where[int(slots[0])]
        group = self.groups[L]
        if L not in kept:
            return None
        lanes = np.array([self.where[int(s)][1] for s in slots], np.int64)
        raw = kept[L]
        K = raw.shape[2]
        if raw.dtype == torch.bfloat16:
            products = raw.view(torch.int16).numpy().reshape(-1, L, group.B, K)
            sims = products[lanes // group.B, :, lanes % group.B, :]  # [M, L, K] bfloat16 patterns
            sims = (sims.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            sims = raw.numpy().reshape(-1, L, group.B, K)[lanes // group.B, :, lanes % group.B, :]
            sims = sims.astype(np.float32, copy=False)
        sims = sims.transpose(0, 2, 1)  # [M, K, L]
        margin = (eq + self.acc_eps)[None, :, None] + group.err[lanes][:, None, None] * qn[None, :, None]
        return sims + self.u * 1.01 * np.abs(sims) + margin.astype(np.float32) + np.float32(1e-6)

    def _row_maxima(self, group: _Group, qT, products=None) -> np.ndarray:
        """[used lanes, QK] float32 row maxima (max over the L prototypes of each lane's slide)."""
        torch = _torch()
        L, B = group.L, group.B
        QK = qT.shape[1]
        nb = group.n_blocks_used
        if self.device != "cpu":
            with _no_tf32():
                prod = torch.matmul(group.data[:nb].reshape(nb, L * B, self.dim), qT)  # [nb, L*B, QK]
                m = prod.view(nb, L, B, QK).amax(dim=1).reshape(nb * B, QK)
            return m[: group.used].float().cpu().numpy()
        bf16 = self.dtype == torch.bfloat16
        acc = np.empty((nb, B * QK), np.int16 if bf16 else torch.empty(0, dtype=self.dtype).numpy().dtype)

        def block(b: int) -> None:
            out = _thread_buffer((L * B, QK), self.dtype) if products is None else products[b]
            torch.mm(group.data[b].view(L * B, self.dim), qT, out=out)
            # Maxima of the raw bfloat16 patterns as int16, see the module docstring; negatives clamp to +0.
            raw = (out.view(torch.int16) if bf16 else out).numpy().reshape(L, B * QK)
            a = acc[b]
            np.copyto(a, raw[0])
            for l in range(1, L):
                np.maximum(a, raw[l], out=a)

        list(_pool().map(block, range(nb)))
        acc = acc.reshape(nb * B, QK)[: group.used]
        if bf16:
            np.maximum(acc, 0, out=acc)
            return (acc.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return acc.astype(np.float32, copy=False)


# Blocks are spread over one worker per core, each running single-threaded products: measured on 2 shared
# cores, one 2-thread product per block took 10-30x longer whenever another process held a core (every
# OpenMP barrier waits for the descheduled thread), single-threaded workers degrade gracefully.
_POOL = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else (os.cpu_count() or 1)))
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="slpd-bounds",
                                       initializer=lambda: _torch().set_num_threads(1))
        return _POOL


def _thread_buffer(shape: tuple, dtype):
    """A product buffer reused by the calling worker thread."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    key = (shape, dtype)
    if key not in buffers:
        buffers.clear()
        buffers[key] = _torch().empty(shape, dtype=dtype)
    return buffers[key]


class _no_tf32:
    """Plain float32 products on CUDA for the duration (TF32 would break the rounding margin)."""

    def __enter__(self):
        torch = _torch()
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        _torch().backends.cuda.matmul.allow_tf32 = self.saved
