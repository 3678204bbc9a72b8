"""The similarity search's worker threads: one per core, each running single-threaded torch products.

Measured on 2 shared cores: one 2-thread product per block took 10-30x longer whenever another process
held a core (every OpenMP barrier waits for the descheduled thread); single-threaded workers degrade
gracefully. Each worker keeps its product buffer between calls (no page faults per query).
"""

from __future__ import annotations

import math
import os
import threading

_POOL = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _torch():
    import torch

    return torch


def pool():
    """The shared thread pool (created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else (os.cpu_count() or 1)))
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="slpd-bounds",
                                       initializer=lambda: _torch().set_num_threads(1))
        return _POOL


def n_workers() -> int:
    return pool()._max_workers


def thread_buffer(shape: tuple, dtype, name: str = "product"):
    """A buffer of ``shape`` reused by the calling worker thread, one per ``name``: the held one when it
    is large enough (a view of its start), else a new one (no page faults per query)."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    size = math.prod(int(n) for n in shape)
    held = buffers.get(name)
    if held is None or held.numel() < size or held.dtype != dtype:
        buffers[name] = None  # the old one is freed before the new one is allocated
        held = buffers[name] = _torch().empty(size, dtype=dtype)
    return held[:size].view(shape)


def map_ranges(fn, n: int, per_worker: int = 4) -> None:
    """fn(i0, i1) over a few runs [i0, i1) of range(n) per worker, on the workers: one hand-off per item
    (400 blocks at 100,000 slides) cost ~15 ms of the calling thread per query, measured; torch calls from
    the calling thread fork its intra-op threads, and on a busy machine each fork waited for a descheduled
    thread (a 16 ms sum of 13,000 x 16 integers, measured); the workers run single-threaded."""
    step = max(1, -(-n // (per_worker * n_workers())))
    list(pool().map(lambda i0: fn(i0, min(n, i0 + step)), range(0, n, step)))


def map_runs(fn, n: int, per_worker: int = 4) -> None:
    """fn(0), ..., fn(n - 1) on the workers, in runs of consecutive items (:func:`map_ranges`)."""

    def run(i0: int, i1: int) -> None:
        for i in range(i0, i1):
            fn(i)

    map_ranges(run, n, per_worker)
