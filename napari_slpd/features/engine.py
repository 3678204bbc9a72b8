"""Region feature extraction: slide -> region grid -> patch tokens -> token grids -> region embeddings.

HIPT extracted one region at a time (read a 4096-px region, run its 256 patches, run the ViT-4K), so the
reader and the model waited on each other, and larger batches ran out of memory. Here:

* regions are read and resized by ``num_workers`` background threads (openslide, Pillow and numpy release
  the GIL) into a bounded window of ``queue_size`` regions, so decoding overlaps inference and memory
  does not grow with the slide;
* patches flow to the patch encoder in batches of ``batch_size`` patches whatever the region size, so the
  model's memory is fixed by the batch, not by the region;
* results come back in region order whatever the workers' timing (futures are consumed in submission
  order), and batches never straddle a chunk of ``regions_per_chunk`` regions, so a run resumed at a
  chunk boundary computes exactly the same batches, hence the same numbers, as an uninterrupted run;
* each finished chunk is appended to the slide's FeatureStore, which is how a killed run resumes;
* nothing waits at a chunk's end: its last batch is queued, its token grids are encoded on the lanes once
  its batches are back and it is written when they are, while the next chunk's patches are fed;
* several slides (:mod:`napari_slpd.features.extract_many`): the next slide is prepared (file check,
  tissue, grid: :func:`prepare_slide`) beside the current one, and its reads start in the same window as
  soon as the current one's have all started, so neither the readers nor the model wait at a slide's
  boundary.

Threads on CPU: ``num_workers`` readers (one per core) and, under torch_threads="auto", one lane per core
with one intra-op thread each: never more than one OpenMP thread per lane, so no parallel op waits at a
barrier for a thread that shares its core; readers and lanes are independent threads the OS schedules on
the cores (the window stops the readers when the model is behind). The tile reader's decode pool is not
used by the engine (its reads are one band at a time, already in parallel across readers).

A region is read in horizontal bands of whole patch rows (at most ``BAND_READ_PX`` read-level px each),
each band resized to ``G * patch_px`` wide: a 40x region (8192 px at level 0) then never exists in
memory at full size, only one band per worker does. Reading (region reader, read-ahead stream, torch
thread policy) lives in :mod:`napari_slpd.features.reading`; with the fast tile reader a band shrunk 2x or
more is decoded at reduced scale there (libjpeg's scaled IDCT).

One idea: the extraction pipeline of one slide (batches, lanes, CPU or GPU decode, models, writing);
reading regions, read-ahead and the thread policy are napari_slpd.features.reading's, the config, result
and recorded settings napari_slpd.features.extraction_config's, the writer, disk space and slide-file
checks napari_slpd.features.extraction_storage's.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.features.reading import (  # noqa: F401  (RegionReader, RegionStream: public here too)
    BAND_READ_PX,
    RESAMPLING,
    RegionReader,
    RegionStream,
    _ThreadPolicy,
    available_cores,
    gpu_decode_applies,
    gpu_region_reader,
    grid_decode_scale,
    resampling_id,
)
from napari_slpd.features.extraction_config import (  # noqa: F401  (public here too)
    GPU_DECODE,
    ExtractionConfig,
    ExtractionResult,
    _encoder_device,
    _gpu_decode,
    encoder_input_px,
    extraction_settings,
    run_settings,
)
from napari_slpd.features.extraction_storage import (
    _check_space,
    _file_stamp,
    _open_writer,
    _raise_if_slide_changed,
    _raise_storage_error,
)
from napari_slpd.features.store import FeatureStoreWriter, RegionChunk, existing_store_is_current  # noqa: F401
from napari_slpd.utils.progress import CancelCheck, ProgressFn, is_cancelled

log = logging.getLogger(__name__)


def maybe_compile(patch_encoder, enabled: bool) -> None:
    """torch.compile the encoder's network in place (CUDA only: on CPU compiling costs more than it saves
    for one slide). Falls back to eager with a warning when compilation is unavailable."""
    if not enabled or not _encoder_device(patch_encoder).startswith("cuda"):
        return
    module = getattr(patch_encoder, "module", None)
    if module is None or hasattr(module, "_orig_mod"):  # nothing to compile, or compiled already
        return
    try:
        import torch

        # Batches have one fixed size except a chunk's last: dynamic=False compiles that shape once too.
        patch_encoder.module = torch.compile(module, dynamic=False)
    except Exception as exc:  # compile support varies by platform; extraction must still run
        log.warning("torch.compile is unavailable here (%s); running the encoder eagerly", exc)


class _PatchBatcher:
    """Collects patches of consecutive regions into fixed buffers and runs the encoder on each when full.

    Buffers are allocated once ([batch_size, p, p, 3] uint8, pinned on CUDA, or on the GPU itself when
    the patches were decoded there): memory is set by batch_size, not by the slide or the region size.

    ``lanes`` > 1 (CPU): the batch is cut into ``lanes`` batches of ceil(batch_size / lanes) patches, each
    encoded on its own thread with one intra-op thread while the caller fills the next (``lanes + 1``
    buffers of that size, at most ``lanes`` in flight: the patches in memory stay about one batch). A ViT's
    small per-layer ops barely scale with OpenMP threads, and each op's barrier stalls whenever one thread
    shares its core with a reader or another program; independent batches on independent threads have no
    barrier at all. Batches are cut the same way on every run with the same lanes, so runs repeat.
    """

    def __init__(self, encoder, batch_size: int, patch_px: int, pin: bool, threads: "_ThreadPolicy | None" = None,
                 device=None, lanes: int = 1):
        import torch

        self.encoder = encoder
        self.threads = threads
        self.lanes = max(1, int(lanes)) if device is None and not pin else 1
        self.batch_size = -(-batch_size // self.lanes)  # patches per encoder call
        shape = (self.batch_size, patch_px, patch_px, 3)
        self.device = device
        self._pool = None
        self._inflight: list = []  # (future, buffer index, targets), oldest first
        if device is not None:  # patches arrive decoded on the GPU (CUDA tensors): the batch stays there
            self._tensor = torch.empty(shape, dtype=torch.uint8, device=device)
            self.buffer = None
        elif pin:
            self._tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            self.buffer = self._tensor.numpy()
        else:
            self._tensor = None
            self._buffers = [np.empty(shape, np.uint8) for _ in range(self.lanes + (self.lanes > 1))]
            self._current = 0
            self.buffer = self._buffers[0]
            if self.lanes > 1:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="slpd-encode")
        self.fill = 0
        self.targets: list[tuple[np.ndarray, int, int, bool]] = []  # (output rows, start, n, ends a region)
        self.regions_encoded = 0  # regions whose every patch has been encoded

    def add(self, patches: np.ndarray, out: np.ndarray) -> None:
        """Queue one region's ``patches`` [n, p, p, 3]; their features land in ``out`` [n, D] once encoded
        (with lanes: by the time :meth:`drain` returns)."""
        start = 0
        n = patches.shape[0]
        if self.device is not None and isinstance(patches, np.ndarray):
            import torch

            patches = torch.from_numpy(patches).to(self.device, non_blocking=True)
        while start < n:
            take = min(self.batch_size - self.fill, n - start)
            if self.buffer is None:
                self._tensor[self.fill : self.fill + take].copy_(patches[start : start + take])
            else:
                self.buffer[self.fill : self.fill + take] = patches[start : start + take]
            self.targets.append((out, start, take, start + take == n))
            self.fill += take
            start += take
            if self.fill == self.batch_size:
                self.flush()

    def _encode(self, batch) -> np.ndarray:
        import torch

        with torch.inference_mode():
            feats = self.encoder.encode(batch)
        return feats.detach().to("cpu", torch.float32).numpy()

    def _scatter(self, feats: np.ndarray, targets) -> None:
        pos = 0
        for out, start, n, last in targets:
            out[start : start + n] = feats[pos : pos + n]
            pos += n
            self.regions_encoded += int(last)

    def flush(self) -> None:
        if self.fill == 0:
            return
        import torch

        if self._pool is not None:
            self._reap(block=len(self._inflight) >= self.lanes)  # a free buffer for what comes next
            batch = torch.from_numpy(self.buffer[: self.fill])
            self._inflight.append((self._pool.submit(self._encode, batch), self._current, self.targets))
            busy = {index for _, index, _ in self._inflight}
            self._current = next(i for i in range(len(self._buffers)) if i not in busy)
            self.buffer = self._buffers[self._current]
            self.fill = 0
            self.targets = []
            return
        batch = self._tensor[: self.fill] if self._tensor is not None else torch.from_numpy(self.buffer[: self.fill])
        if self.threads is not None:
            self.threads.before_batch(self.fill)
        t0 = time.perf_counter()
        feats = self._encode(batch)
        if self.threads is not None:
            self.threads.after_batch(self.fill, time.perf_counter() - t0)
        self._scatter(feats, self.targets)
        self.fill = 0
        self.targets = []

    def _reap(self, block: bool) -> None:
        """Write out finished batches, oldest first (with ``block``, wait for the oldest at least)."""
        while self._inflight and (block or self._inflight[0][0].done()):
            future, _, targets = self._inflight.pop(0)
            self._scatter(future.result(), targets)  # a lane's exception is raised here
            block = False

    def drain(self) -> None:
        """Flush and wait until every queued patch is encoded and written to its ``out``."""
        self.flush()
        while self._inflight:
            self._reap(block=True)

    def poll(self) -> None:
        """Write out the batches that have finished, without waiting."""
        self._reap(block=False)

    def wait_for_regions(self, n: int) -> None:
        """Wait until ``regions_encoded`` reaches ``n`` (batches are reaped oldest first, so every patch of
        those regions is then in its ``out``); flush first when what is queued is all that is left."""
        while self.regions_encoded < n:
            if self._inflight:
                self._reap(block=True)
            elif self.fill:
                self.flush()
            else:
                raise RuntimeError(f"{n - self.regions_encoded} regions were never queued for encoding")

    def encode_regions(self, region_encoder, tokens: np.ndarray, batch_size: int) -> np.ndarray:
        """:func:`encode_regions` of a chunk's token grids, split over the lanes (after :meth:`drain`)."""
        return self.submit_regions(region_encoder, tokens, batch_size)()

    def submit_regions(self, region_encoder, tokens: np.ndarray, batch_size: int) -> "_Pending":
        """:func:`encode_regions` of a chunk's token grids, split over the lanes as the lanes' next work
        (behind the patch batches queued already; the split depends on the lanes only, so runs repeat)."""
        parts = np.array_split(np.arange(tokens.shape[0]), min(self.lanes, tokens.shape[0])) if self._pool else []
        if len(parts) < 2:
            return _Pending(result=encode_regions(region_encoder, tokens, batch_size))
        return _Pending([self._pool.submit(encode_regions, region_encoder, tokens[part[0] : part[-1] + 1],
                                           batch_size) for part in parts])

    def close(self) -> None:
        if self._pool is not None:
            for future, _, _ in self._inflight:
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
            self._inflight = []


class _Pending:
    """Region embeddings being computed on the lanes (futures of consecutive parts) or already computed.
    Calling it waits and returns them [M, E]."""

    def __init__(self, futures=(), result: np.ndarray | None = None):
        self.futures = list(futures)
        self.result = result

    def done(self) -> bool:
        return self.result is not None or all(f.done() for f in self.futures)

    def __call__(self) -> np.ndarray:
        if self.result is None:
            self.result = np.concatenate([f.result() for f in self.futures])  # a lane's exception is raised here
            self.futures = []
        return self.result

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


def cpu_lanes(torch_threads, on_cuda: bool, batch_size: int) -> int:
    """Concurrent patch-encoder batches on CPU (see _PatchBatcher): one per available core (at least 32
    patches each) under torch_threads="auto"; 1 on CUDA, or when the thread count is fixed or torch's."""
    if on_cuda or torch_threads != "auto":
        return 1
    return max(1, min(available_cores(), batch_size // 32))


def encode_regions(region_encoder, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Region embeddings [M, E] float32 of token grids [M, D, G, G], ``batch_size`` grids at a time."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(tokens[start : start + batch_size], dtype=np.float32))
            out.append(region_encoder.encode(batch).detach().to("cpu", torch.float32).numpy())
    if not out:
        return np.zeros((0, int(region_encoder.dim)), np.float32)
    return np.concatenate(out, axis=0)


# -- the engine ---------------------------------------------------------------------------------------


def extract_slide(
    slide_path,
    out_path: str | os.PathLike,
    patch_encoder,
    region_encoder,
    config: ExtractionConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelCheck = None,
) -> ExtractionResult:
    """Extract (or resume, or skip) one slide's region features into the FeatureStore at ``out_path``.

    ``slide_path`` is a path or an open :class:`napari_slpd.slides.slide.Slide`. ``progress(done, total)`` is
    called as regions finish (total = regions of the slide); ``cancel`` (Event or callable) stops after
    the current batch, keeping every finished chunk. Bad input raises an SlpdError subclass. Several
    slides: :func:`napari_slpd.features.extract_many.extract_slides` keeps the cores busy between them.
    """
    prepared = prepare_slide(slide_path, out_path, patch_encoder, region_encoder, config)
    return run_prepared(prepared, patch_encoder, region_encoder, progress, cancel)


@dataclass(eq=False)
class PreparedSlide:
    """A slide opened, its settings checked against the file and its region grid built (tissue detection):
    everything before its regions are read. ``result`` is final when nothing is left to compute
    (``grid`` None: skipped, or an empty grid)."""

    slide: Any
    owns_slide: bool
    out_path: Path
    config: ExtractionConfig
    settings: dict
    result: ExtractionResult
    seconds: float  # spent preparing
    stamp: tuple | None = None
    grid: Any = None
    stream: "RegionStream | None" = None  # its reads, started early (extract_many); None: started by the run

    @property
    def final(self) -> bool:
        return self.grid is None or self.grid.is_empty

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.owns_slide:
            self.slide.close()


def prepare_slide(slide_path, out_path, patch_encoder, region_encoder,
                  config: ExtractionConfig | None = None) -> PreparedSlide:
    """The part of :func:`extract_slide` before any region is read: open the slide, check the file (an
    up-to-date file: skipped), detect tissue and build the region grid. ``out_path`` may be a function of
    the open slide (e.g. of its slide id). Thread-safe; touches no file but
    to read it. Raises what extract_slide raises for these steps (the slide is closed then)."""
    from napari_slpd.slides.grid import build_region_grid
    from napari_slpd.slides.slide import Slide, open_slide
    from napari_slpd.slides.tissue import detect_tissue

    config = config or ExtractionConfig()
    t0 = time.perf_counter()
    owns_slide = not isinstance(slide_path, Slide)
    slide = open_slide(slide_path, mpp=config.mpp, mpp_fallback=config.mpp_fallback) if owns_slide else slide_path
    try:
        out_path = Path(out_path(slide) if callable(out_path) else out_path)  # a callable: named by the slide
        settings = extraction_settings(slide, config, patch_encoder, region_encoder)
        result = ExtractionResult(slide.slide_id, Path(slide.path), out_path, "extracted",
                                  mpp=slide.mpp, mpp_source=slide.pixel_size.source)
        prepared = PreparedSlide(slide, owns_slide, out_path, config, settings, result, 0.0)
        if existing_store_is_current(out_path, settings, overwrite=config.overwrite):
            from napari_slpd.features.store import read_store_attrs

            result.status = "skipped"
            result.n_regions = int(read_store_attrs(out_path).get("n_regions", 0))
            result.message = "already extracted with the same settings"
        else:
            prepared.stamp = _file_stamp(slide.path)
            mask = detect_tissue(slide, config.tissue)
            prepared.grid = build_region_grid(slide, mask, config.grid)
            _trace("grid-built", slide.slide_id, len(prepared.grid))
            result.n_regions = len(prepared.grid)
            if prepared.grid.is_empty:
                result.status = "empty"
                result.message = prepared.grid.reason
        prepared.seconds = time.perf_counter() - t0
        return prepared
    except BaseException:
        if owns_slide:
            slide.close()
        raise


def run_prepared(prepared: PreparedSlide, patch_encoder, region_encoder, progress: ProgressFn | None = None,
                 cancel: CancelCheck = None, lookahead=None, reader_pool=None) -> ExtractionResult:
    """The rest of :func:`extract_slide` for a slide :func:`prepare_slide` made ready (closes it).
    ``reader_pool``: reader threads shared across slides; ``lookahead()``: called once this slide's reads
    are all started (extract_many starts the next slide's there)."""
    t0 = time.perf_counter()
    slide, config, result, grid = prepared.slide, prepared.config, prepared.result, prepared.grid
    out_path, stamp = prepared.out_path, prepared.stamp
    try:
        if prepared.final:
            if result.status == "skipped" and progress is not None:
                progress(result.n_regions, result.n_regions)
            result.seconds = prepared.seconds + time.perf_counter() - t0
            return result
        gpu = (gpu_region_reader(slide, grid, encoder_input_px(patch_encoder, grid.config.patch_px),
                                 _encoder_device(patch_encoder)) if _gpu_decode(slide, config, patch_encoder) else None)
        try:
            with _open_writer(slide, grid, out_path, prepared.settings, config, patch_encoder, region_encoder,
                              GPU_DECODE if gpu is not None else None) as writer:
                result.resumed_from = writer.n_done
                maybe_compile(patch_encoder, config.compile)
                stream, prepared.stream = prepared.stream, None
                done = _run_chunks(slide, grid, writer, patch_encoder, region_encoder, config, progress, cancel,
                                   gpu, stream=stream, lookahead=lookahead, reader_pool=reader_pool)
                result.n_computed = done - writer.resumed_from
                if done < len(grid):
                    result.status = "cancelled"
                    result.message = f"cancelled after {done} of {len(grid)} regions; run again to resume"
                else:
                    writer.finish()
        except (OSError, RuntimeError) as exc:
            _raise_storage_error(exc, out_path, grid, patch_encoder, region_encoder, config)
            _raise_if_slide_changed(exc, slide, stamp, out_path)
            raise
        except SlpdError as exc:
            _raise_if_slide_changed(exc, slide, stamp, out_path)
            raise
        result.seconds = prepared.seconds + time.perf_counter() - t0
        return result
    finally:
        prepared.close()


def _chunk_patch_coords(grid, sl: slice) -> np.ndarray:
    """grid.patch_coords() of the regions in ``sl`` only (memory per chunk, not per slide)."""
    import dataclasses

    part = dataclasses.replace(grid, coords=grid.coords[sl], tissue_fraction=grid.tissue_fraction[sl])
    return np.asarray(part.patch_coords(), np.int64)


@dataclass(eq=False)
class _Chunk:
    """Regions [start, start + count) of a slide: their patches queued for encoding, their token grids
    then encoded (``embeddings``), then written; chunks are written in order."""

    start: int
    count: int
    feats: np.ndarray  # [count * G2, D] patch features, filled as the batches finish
    embeddings: "_Pending | None" = None

    @property
    def end(self) -> int:
        return self.start + self.count


# Event hook for tests (None: off): engine._TRACE = [] records (event, slide id, detail) in the order the
# pipeline does things, so a test can check what overlaps what without timing anything.
_TRACE: list | None = None


def _trace(event: str, slide_id: str = "", detail: Any = None) -> None:
    if _TRACE is not None:
        _TRACE.append((event, slide_id, detail))


def _run_chunks(slide, grid, writer, patch_encoder, region_encoder, config, progress, cancel, gpu=None,
                stream: "RegionStream | None" = None, lookahead=None, reader_pool=None) -> int:
    """Extract regions writer.n_done.. in chunks; returns how many regions are finished. ``gpu``: a
    GpuRegionReader (reader threads read tile bytes, this thread decodes them on the GPU). ``stream``: this
    slide's reads already started (used when it starts at writer.n_done); ``reader_pool``: shared reader
    threads; ``lookahead()``: called as regions arrive once every read of this slide has started.

    Nothing waits at a chunk's end: the chunk's last (partial) batch is queued, its token grids are
    encoded on the lanes once its batches are back, and it is written when that is done, while this
    thread already feeds the next chunk's patches (at most one finished chunk waits to be written). A
    batch still never straddles chunks, so a resumed run computes exactly the same batches."""
    G = int(grid.patches_per_side)
    G2 = G * G
    M = len(grid)
    D = int(patch_encoder.dim)
    px = encoder_input_px(patch_encoder, grid.config.patch_px)
    on_cuda = _encoder_device(patch_encoder).startswith("cuda")
    reader = RegionReader(slide, grid, px)
    done = first = writer.n_done
    if progress is not None:
        progress(done, M)
    if stream is not None and (gpu is not None or stream.first != done):
        stream.close()  # started from another region (the file resumed): read anew
        stream = None
    if stream is None:
        pool = reader_pool if gpu is None and config.workers > 0 else None
        stream = RegionStream(gpu if gpu is not None else reader, range(done, M), config.workers, config.window,
                              cancel, pool=pool)
    batch_size = min(config.batch_size, config.regions_per_chunk * G2)
    lanes = cpu_lanes(config.torch_threads, on_cuda, batch_size)
    # With lanes each encoder call runs on one intra-op thread (the lanes are the parallelism).
    threads = _ThreadPolicy(1 if lanes > 1 else config.torch_threads, on_cuda, full_batch=batch_size,
                            readers=stream, patches_per_region=G2)
    batcher = _PatchBatcher(patch_encoder, batch_size, px, on_cuda and gpu is None, threads=threads,
                            device=gpu.device if gpu is not None else None, lanes=lanes)
    pending: collections.deque[_Chunk] = collections.deque()  # fed, not yet written; oldest first
    reported = done
    slide_id = slide.slide_id

    def report(value: int) -> None:
        nonlocal reported
        if progress is not None and value > reported:
            reported = value
            progress(value, M)

    def advance(block: bool) -> None:
        """Encode the token grids of chunks whose patches are back and write finished chunks, in order;
        with ``block``, finish the oldest chunk at least."""
        nonlocal done
        while pending:
            chunk = pending[0]
            if chunk.embeddings is None:
                if first + batcher.regions_encoded < chunk.end:
                    if not block:
                        return
                    batcher.wait_for_regions(chunk.end - first)
                tokens = chunk.feats.reshape(chunk.count, G, G, D).transpose(0, 3, 1, 2)  # [c, D, G, G]
                threads.take_idle_cores()
                chunk.embeddings = batcher.submit_regions(region_encoder, tokens, config.region_batch_size)
                _trace("regions-submitted", slide_id, chunk.start)
            if not block and not chunk.embeddings.done():
                return
            _write_chunk(writer, grid, chunk, chunk.embeddings(), config, M, G, D)
            _trace("chunk-written", slide_id, chunk.start)
            pending.popleft()
            done = chunk.end
            report(done)
            block = False  # the oldest is finished: the rest only when ready

    try:
        start = done
        while start < M:
            c = min(config.regions_per_chunk, M - start)
            chunk = _Chunk(start, c, np.empty((c * G2, D), np.float32))
            for k in range(c):
                t0 = time.perf_counter()
                item = next(stream, None)
                threads.waited_for_region(time.perf_counter() - t0)
                if lookahead is not None and stream.all_started():
                    lookahead(stream)  # the next slide's reads start in this one's window
                if item is None:  # cancelled: chunks not yet written are dropped, as after a batch
                    return done
                index, patches = item
                if gpu is not None:
                    patches = gpu.finish(patches)  # decoded on the GPU: a CUDA tensor
                if index != start + k:
                    raise RuntimeError(f"region {index} arrived where {start + k} was expected")
                batcher.add(patches, chunk.feats[k * G2 : (k + 1) * G2])
                _trace("region-queued", slide_id, index)
                del patches, item  # the window, not this loop, holds decoded regions
                batcher.poll()
                advance(block=False)
                oldest_end = pending[0].end if pending else chunk.end
                report(min(oldest_end - 1, first + batcher.regions_encoded))
            # A batch never straddles chunks: a resumed run then sees exactly the same batches.
            batcher.flush()
            _trace("chunk-fed", slide_id, start)
            pending.append(chunk)
            start += c
            if start >= M and lookahead is not None:
                lookahead(stream, wait=True)  # the next slide's reads run beside this one's last batches
            advance(block=len(pending) > 1)  # at most one fed chunk waits behind the one being written
            if is_cancelled(cancel):
                return done
        while pending:
            advance(block=True)
    finally:
        for chunk in pending:
            if chunk.embeddings is not None:
                chunk.embeddings.cancel()
        stream.close()
        batcher.close()
        threads.restore()
    return done


def _write_chunk(writer, grid, chunk: _Chunk, embeddings: np.ndarray, config, M: int, G: int, D: int) -> None:
    sl = slice(chunk.start, chunk.end)
    tokens = chunk.feats.reshape(chunk.count, G, G, D).transpose(0, 3, 1, 2)  # [c, D, G, G]
    feats = chunk.feats if config.store_patch_features else None
    _check_space(writer, tokens, embeddings, feats, M - chunk.start)
    writer.append(
        RegionChunk(
            tokens=tokens,
            embeddings=embeddings,
            coords=np.asarray(grid.coords[sl], np.int64),
            coverage=np.asarray(grid.tissue_fraction[sl], np.float32),
            patch_features=feats,
            patch_coords=_chunk_patch_coords(grid, sl) if config.store_patch_features else None,
        )
    )


def sequential_extract(slide, grid, patch_encoder, region_encoder) -> tuple[np.ndarray, np.ndarray]:
    """The HIPT-style loop, for comparison and as a reference: read one region, encode its patches as one
    batch, encode its token grid; nothing overlaps. Returns (tokens [M, D, G, G], embeddings [M, E])."""
    import torch

    G = int(grid.patches_per_side)
    px = encoder_input_px(patch_encoder, grid.config.patch_px)
    reader = RegionReader(slide, grid, px)
    tokens, embeddings = [], []
    with torch.inference_mode():
        for i in range(len(grid)):
            patches = torch.from_numpy(reader(i))
            feats = patch_encoder.encode(patches).to("cpu", torch.float32)
            grid_tokens = feats.reshape(1, G, G, -1).permute(0, 3, 1, 2).contiguous()
            embeddings.append(region_encoder.encode(grid_tokens).to("cpu", torch.float32).numpy())
            tokens.append(grid_tokens.numpy())
    if not tokens:
        return (np.zeros((0, int(patch_encoder.dim), G, G), np.float32),
                np.zeros((0, int(region_encoder.dim)), np.float32))
    return np.concatenate(tokens), np.concatenate(embeddings)


__all__ = [
    "ExtractionConfig",
    "ExtractionResult",
    "RegionReader",
    "extract_slide",
    "extraction_settings",
    "RegionStream",
    "encode_regions",
    "sequential_extract",
]
