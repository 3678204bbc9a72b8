"""Extracting several slides with the cores busy end to end: the next slide is prepared (opened, its file
checked, tissue detected, region grid built) on a background thread while the current one is encoded,
and its regions start being read, in the same bounded window, as soon as the current slide's reads have
all started, so that the readers never wait for a slide boundary and the model never waits for a tissue
mask. Each slide still ends the way :func:`napari_slpd.features.engine.extract_slide` ends it: the same
features bit for bit (the same batches), resume and caching, progress, cancellation, atomic writes, and
an error of its own that leaves the other slides going.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from napari_slpd.features.engine import (
    ExtractionConfig,
    ExtractionResult,
    PreparedSlide,
    RegionReader,
    RegionStream,
    _gpu_decode,
    _trace,
    encoder_input_px,
    prepare_slide,
    run_prepared,
)
from napari_slpd.features.store import partial_path_for
from napari_slpd.utils.progress import CancelCheck, ProgressFn, is_cancelled


@dataclass
class SlideJob:
    """One slide of :func:`extract_slides`: what :func:`extract_slide` takes for it."""

    slide: Any  # a path, or an open Slide (left open)
    out_path: Any  # str | os.PathLike, or a function of the open Slide giving it
    config: ExtractionConfig | None = None
    progress: ProgressFn | None = None


def extract_slides(jobs: Iterable[SlideJob], patch_encoder, region_encoder, cancel: CancelCheck = None,
                   prefetch: bool = True) -> Iterator[tuple[SlideJob, ExtractionResult | None, Exception | None]]:
    """Extract ``jobs`` in order; yields ``(job, result, None)`` or ``(job, None, error)`` per slide, the
    error being what :func:`extract_slide` would have raised for it (the caller decides which errors stop
    the run). Stops once ``cancel`` is set (a cancelled slide's result says so; later slides are not
    yielded). ``prefetch=False``: one slide after the other, as extract_slide in a loop.
    """
    jobs = iter(jobs)
    preparer = ThreadPoolExecutor(1, thread_name_prefix="slpd-prepare") if prefetch else None
    pools: dict[int, ThreadPoolExecutor] = {}  # reader threads by count, shared by the slides of this run

    def reader_pool(config: ExtractionConfig) -> ThreadPoolExecutor | None:
        n = config.workers
        if not prefetch or n <= 0:
            return None
        if n not in pools:
            pools[n] = ThreadPoolExecutor(n, thread_name_prefix="slpd-read")
        return pools[n]

    def prepare(job: SlideJob) -> PreparedSlide:
        return prepare_slide(job.slide, job.out_path, patch_encoder, region_encoder, job.config)

    def submit(job: SlideJob | None) -> Future | None:
        if job is None or preparer is None:
            return None
        return preparer.submit(prepare, job)

    current, future = next(jobs, None), None
    future = submit(current)
    upcoming: list = []  # (job, future) of the next slide, once pulled from jobs
    previous_out = None  # the file of the slide run last
    try:
        while current is not None:
            if is_cancelled(cancel):
                return
            nxt = next(jobs, None)
            same_file = nxt is not None and _same_path(nxt.out_path, current.out_path)
            nxt_future = None if same_file else submit(nxt)  # same file: prepared once this one is written
            upcoming[:] = [(nxt, nxt_future)]
            try:
                prepared = future.result() if future is not None else prepare(current)
                if future is not None and previous_out is not None and _same_path(prepared.out_path, previous_out):
                    # the file the slide before wrote (two slides with one id): checked again now it is written
                    future = None
                    prepared.close()
                    prepared = prepare(current)
            except Exception as exc:
                yield current, None, exc
                current, future = nxt, nxt_future if nxt_future is not None else submit(nxt)
                continue
            previous_out = prepared.out_path
            lookahead = _Lookahead(nxt, nxt_future, patch_encoder, reader_pool, cancel) if nxt_future else None
            try:
                config = prepared.config
                result = run_prepared(prepared, patch_encoder, region_encoder, current.progress, cancel,
                                      lookahead=lookahead, reader_pool=reader_pool(config))
            except Exception as exc:
                yield current, None, exc
            else:
                yield current, result, None
                if result.status == "cancelled":
                    return
            current, future = nxt, nxt_future if nxt_future is not None else submit(nxt)
    finally:
        for _, pending in upcoming:
            _discard(pending)
        if future is not None and current is not None:
            _discard(future)
        if preparer is not None:
            preparer.shutdown(wait=True)
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


def _discard(future: Future | None) -> None:
    """Close a slide prepared for a turn that never came (the run stopped)."""
    if future is None or future.cancel():
        return
    try:
        prepared = future.result()
    except Exception:
        return
    prepared.close()


def _same_path(a, b) -> bool:
    if callable(a) or callable(b):
        return False  # known once the slide is open (checked again then)
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return str(a) == str(b)


class _Lookahead:
    """Called by the current slide's run once all its reads have started: when the next slide is
    prepared (never waits for it), starts its reads chained behind the current slide's in the same window.
    Not for a slide that resumes a partial file, decodes on the GPU or reads in the calling thread: its run
    starts its reads itself, as extract_slide does."""

    def __init__(self, job: SlideJob, future: Future, patch_encoder, reader_pool, cancel):
        self.job, self.future, self.patch_encoder = job, future, patch_encoder
        self.reader_pool, self.cancel = reader_pool, cancel
        self.settled = False

    def __call__(self, stream: RegionStream, wait: bool = False) -> None:
        """``wait``: the current slide has no region left to feed; waiting for the next slide's grid costs
        it nothing then (its last batches run on the lanes meanwhile)."""
        if self.settled or not (wait or self.future.done()) or not stream.all_started():
            return
        self.settled = True
        try:
            prepared = self.future.result()
        except Exception:
            return  # its error is reported at its turn
        config = prepared.config
        pool = self.reader_pool(config)
        if (prepared.final or pool is None or pool is not stream.pool
                or partial_path_for(prepared.out_path).exists()
                or _gpu_decode(prepared.slide, config, self.patch_encoder)):
            return
        grid = prepared.grid
        reader = RegionReader(prepared.slide, grid, encoder_input_px(self.patch_encoder, grid.config.patch_px))
        prepared.stream = RegionStream(reader, range(len(grid)), config.workers, config.window, self.cancel,
                                       pool=pool, start=False)
        stream.chain(prepared.stream)
        _trace("next-reads-started", prepared.slide.slide_id, None)


__all__ = ["SlideJob", "extract_slides"]
