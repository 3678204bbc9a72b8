"""Reading regions for the extraction engine: the region reader, the read-ahead stream, the thread policy.

* :class:`RegionReader` reads region ``i`` of a grid as patches, in horizontal bands of whole patch rows.
  With the fast tile reader (napari_slpd.slides.readers) a band that is resized down by 2x or more is
  decoded at reduced scale (libjpeg-turbo's scaled IDCT: 1/2, 1/4, 1/8) instead of decoded in full and
  resized: a 40x scan read at 20x decodes a quarter of the pixels. That changes the pixels (slightly), so
  :func:`resampling_id` names it and it is part of the stored settings.
* :class:`RegionStream` runs reads on background threads (openslide, imagecodecs, simplejpeg, Pillow and
  numpy release the GIL) into a bounded window, in order, and records the readers' CPU time.
* :class:`GpuRegionReader` (CUDA, tile-reader slides with JPEG tiles): the reader threads only read the
  tiles' compressed bytes; the model's thread decodes them with nvJPEG, resizes on the GPU and hands the
  CUDA tensor to the patch encoder, with no host round trip.
* :class:`_ThreadPolicy` sets torch's intra-op threads on CPU while readers decode beside the model
  (with one lane; see engine._PatchBatcher for the lanes "auto" uses).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from napari_slpd.utils.cpus import available_cores  # noqa: F401  (re-exported)
from napari_slpd.utils.progress import CancelCheck, is_cancelled

# Largest band of a region read at once, in read-level px (16 MiB of RGBA from openslide).
BAND_READ_PX = 4096 * 1024
# Names the way pixels become patches; part of the settings so that a change never mixes silently.
RESAMPLING = "pil-bilinear-gap3-bands-v1"
REDUCING_GAP = 3.0


# -- reading regions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionReader:
    """Reads region ``i`` of a grid as patches [G*G, p, p, 3] uint8 (row-major, like grid.patch_coords())."""

    slide: Any  # napari_slpd.slides.slide.Slide (thread-safe reads)
    grid: Any  # napari_slpd.slides.grid.RegionGrid
    patch_px: int  # side of each output patch (the patch encoder's input size)
    reduced_decode: bool = True  # False: always decode in full (the GPU path's CPU fallback)

    @property
    def G(self) -> int:
        return int(self.grid.patches_per_side)

    @property
    def scale(self) -> int:
        """1, or the reduced scale bands are decoded at (see decode_scale)."""
        if not self.reduced_decode or not hasattr(self.slide, "read_region_reduced"):
            return 1
        return decode_scale(self.slide, int(self.grid.read_level), int(self.grid.read_size), self.G * self.patch_px)

    def band_rows(self) -> int:
        """Patch rows read per band: bands of equal height, each at most BAND_READ_PX (at least one row)."""
        rs = int(self.grid.read_size)
        fit = max(1, min(self.G, BAND_READ_PX // max(1, rs * math.ceil(rs / self.G))))
        n_bands = math.ceil(self.G / fit)
        return math.ceil(self.G / n_bands)

    def __call__(self, index: int) -> np.ndarray:
        from PIL import Image

        G, p = self.G, self.patch_px
        rs = int(self.grid.read_size)
        level = int(self.grid.read_level)
        ds = float(self.grid.read_downsample)
        x0, y0 = (int(v) for v in self.grid.coords[index])
        out = np.empty((G, G, p, p, 3), np.uint8)
        rows = self.band_rows()
        scale = self.scale
        tiles = getattr(self.slide, "_tiles", None) is not None
        # A slide that hands out PIL images saves a full-size array round trip before resizing (openslide).
        read_image = getattr(self.slide, "read_region_image", None) if scale == 1 and not tiles else None
        for r0 in range(0, G, rows):
            r1 = min(G, r0 + rows)
            # Source rows of this band at the read level: patch-row boundaries rounded to whole px.
            sy0, sy1 = round(r0 * rs / G), round(r1 * rs / G)
            where, size = (x0, int(round(y0 + sy0 * ds))), (rs, sy1 - sy0)
            if tiles:  # the tile reader; at scale > 1 decoded at 1/scale (libjpeg's scaled IDCT)
                # more_below: the next band starts with the tile row this one's bottom edge cuts.
                band, _ = self.slide.read_region_reduced(where, level, size, max_scale=scale, more_below=r1 < G)
                image = None
                size = (band.shape[1], band.shape[0])
            else:
                image = read_image(where, level, size) if read_image is not None else None
                band = self.slide.read_region(where, level, size) if image is None else None
            target = (G * p, (r1 - r0) * p)  # (width, height)
            if size != target:
                # Bilinear in Pillow is area-aware when shrinking (its support grows with the scale); a
                # reducing gap of 3 first box-reduces large shrinks by whole factors, about twice as fast
                # and, per Pillow, indistinguishable from the full filter.
                image = image if image is not None else Image.fromarray(band)
                image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
            if image is not None:
                band = np.asarray(image)
            # [rows*p, G*p, 3] -> [rows, G, p, p, 3]: patch (row, col) holds px (row*p.., col*p..).
            out[r0:r1] = band.reshape(r1 - r0, p, G, p, 3).transpose(0, 2, 1, 3, 4)
        return out.reshape(G * G, p, p, 3)


class GpuRegionReader:
    """Region ``i`` as CUDA patches [G*G, p, p, 3] uint8, decoded on the GPU (see module doc).

    ``__call__`` (reader threads) reads each band's tile bytes; :meth:`finish` (the model's thread)
    decodes them in one nvJPEG batch per band, resizes each band to ``G * p`` wide with torch's
    antialiased bilinear (Pillow's area-aware bilinear, to rounding), and cuts the patches. A region the
    GPU path does not take (a fractional level position) is read by the CPU reader in full (never at
    reduced scale, so one run's patches are made one way) and uploaded in :meth:`finish`.

    The patches are those of the CPU path decoding in full (``resampling_id(1)``; a stand-in decoder on
    the CPU gives them to within 1 level, mean 0.05), not those of its reduced-scale decode, which keeps
    finer detail than an area filter (mean 5 levels apart at 1/4, patch features to cosine 0.875 min with
    a random ViT-256 at 32 px): :func:`gpu_decode_applies` decides, and the stored settings name it.
    nvJPEG's IDCT and upsampling add their rounding: see tests/test_tile_reader.py for the tolerances.
    """

    def __init__(self, cpu: RegionReader, gpu):
        import dataclasses

        self.cpu = dataclasses.replace(cpu, reduced_decode=False)
        self.gpu = gpu  # napari_slpd.slides.readers.gpu.CudaRegionReader
        self.device = gpu.device

    def __call__(self, index: int):
        from napari_slpd.slides.readers.gpu import GpuUnsupported
        from napari_slpd.slides.readers.tiles import TileDecodeError, tile_error

        G, p = self.cpu.G, self.cpu.patch_px
        rs = int(self.cpu.grid.read_size)
        level = int(self.cpu.grid.read_level)
        ds = float(self.cpu.grid.read_downsample)
        x0, y0 = (int(v) for v in self.cpu.grid.coords[index])
        rows = self.cpu.band_rows()
        bands = []
        for r0 in range(0, G, rows):
            r1 = min(G, r0 + rows)
            sy0, sy1 = round(r0 * rs / G), round(r1 * rs / G)
            where, size = (x0, int(round(y0 + sy0 * ds))), (rs, sy1 - sy0)
            try:
                bands.append((self.gpu.prepare(where, level, size), (G * p, (r1 - r0) * p), r1 - r0))
            except GpuUnsupported:
                return ("cpu", self.cpu(index))
            except TileDecodeError as exc:
                raise tile_error(self.cpu.slide.path, where, level, size, exc) from exc
        return ("gpu", bands)

    def finish(self, item):
        """CUDA uint8 [G*G, p, p, 3] of what ``__call__`` returned (call in the model's thread)."""
        import torch
        import torch.nn.functional as F

        from napari_slpd.slides.readers.tiles import TileDecodeError, tile_error

        kind, payload = item
        if kind == "cpu":
            return torch.from_numpy(payload).to(self.device, non_blocking=True)
        G, p = self.cpu.G, self.cpu.patch_px
        parts = []
        for prepared, (tw, th), nrows in payload:
            try:
                band = self.gpu.decode(prepared)
            except TileDecodeError as exc:
                raise tile_error(self.cpu.slide.path, prepared.origin, prepared.level, prepared.size, exc) from exc
            if (band.shape[1], band.shape[0]) != (tw, th):
                x = band.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, h, w)
                shrink = x.shape[-1] > tw or x.shape[-2] > th
                x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=shrink, align_corners=False)
                band = x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
            # [rows*p, G*p, 3] -> [rows, G, p, p, 3] -> [rows*G, p, p, 3]: row-major patches, as on the CPU
            parts.append(band.reshape(nrows, p, G, p, 3).permute(0, 2, 1, 3, 4).reshape(nrows * G, p, p, 3))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def gpu_decode_applies(slide, grid_config, device) -> bool:
    """True when extraction on ``device`` decodes this slide on the GPU: CUDA, the tile reader, and JPEG
    tiles at the level the grid of ``grid_config`` reads (the level :func:`grid_decode_scale` finds), and
    a torchvision that decodes JPEG on that device (probed once). Imports nothing GPU-related off CUDA."""
    tiles = getattr(slide, "_tiles", None)
    if not str(device).startswith("cuda") or tiles is None:
        return False
    if slide.mpp is None:
        level = 0
    else:
        size0 = int(round(grid_config.region_px * grid_config.target_mpp / float(slide.mpp)))
        level = slide.best_level_for_downsample(size0 / grid_config.region_px)
    if tiles.levels[level].codec != "jpeg":
        return False
    from napari_slpd.slides.readers.gpu import nvjpeg_works

    return nvjpeg_works(str(device))


def gpu_region_reader(slide, grid, patch_px: int, device) -> "GpuRegionReader | None":
    """A GpuRegionReader for extraction on ``device`` when :func:`gpu_decode_applies`, else None."""
    if not gpu_decode_applies(slide, grid.config, device):
        return None
    from napari_slpd.slides.readers.gpu import cuda_reader_for

    gpu = cuda_reader_for(slide, device=str(device))  # errors propagate: the settings already say GPU
    if gpu is None:
        raise RuntimeError(f"no CUDA region reader for {slide.path} although GPU decoding applies")
    return GpuRegionReader(RegionReader(slide, grid, patch_px), gpu)


class RegionStream:
    """Iterates (index, read(index)) in the order of ``indices``; up to ``queue_size`` reads run ahead on
    ``num_workers`` threads (0: read in the calling thread). Stops early, without error, once ``cancel``
    is set. A worker's exception is raised by the iteration that reaches its region.

    ``pool``: an executor shared with other streams (the engine's readers across the slides of a run),
    which :meth:`close` then leaves running. :meth:`chain` makes another stream (the next slide's) start
    its reads as soon as this one has none left to start, inside the same window of ``queue_size``
    regions: the readers go from one slide to the next without a pause and memory stays bounded."""

    def __init__(self, read: Callable[[int], np.ndarray], indices, num_workers: int, queue_size: int,
                 cancel: CancelCheck = None, pool: ThreadPoolExecutor | None = None, start: bool = True):
        self.read = read
        self.cancel = cancel
        self.num_workers = int(num_workers)
        self.queue_size = max(1, int(queue_size))
        self._pending = collections.deque(indices)
        self.first = self._pending[0] if self._pending else None  # the first index it reads
        self._window: collections.deque[tuple[int, Future]] = collections.deque()
        self._cpu_lock = threading.Lock()
        self._read_cpu = 0.0  # CPU seconds the reader threads spent reading
        self._reads = 0
        self._owns_pool = pool is None
        self._ahead: RegionStream | None = None  # a stream whose reads go first, sharing the window
        self._next: RegionStream | None = None  # the stream chained after this one
        self._closed = False
        if self.num_workers <= 0:
            self._pool = None
        elif pool is not None:
            self._pool = pool
        else:
            self._pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="slpd-read")
        if self._pool is not None and start:  # start=False: reads start at chain() or the first next()
            self._fill()

    @property
    def pool(self) -> ThreadPoolExecutor | None:
        return self._pool

    def _fill(self) -> None:
        if self._closed or self._pool is None:
            return
        room = self.queue_size - (len(self._ahead._window) if self._ahead is not None else 0)
        if self._ahead is not None and self._ahead._pending:
            room = 0  # the stream ahead still has reads to start: they go first
        while self._pending and len(self._window) < room:
            i = self._pending.popleft()
            self._window.append((i, self._pool.submit(self._timed_read, i)))
        if self._next is not None and not self._pending:
            self._next._fill()

    def all_started(self) -> bool:
        """True once every read has been started (or done, reading in the calling thread)."""
        return not self._pending

    def chain(self, other: "RegionStream") -> None:
        """Let ``other`` (on the same pool) start its reads as this stream's window frees up, once this one
        has none left to start; it takes the whole window once this stream is closed."""
        if other._pool is None or other._pool is not self._pool:
            raise ValueError("only a stream on the same reader pool can be chained")
        self._next, other._ahead = other, self
        other._fill()

    def _timed_read(self, i):
        start = time.thread_time()  # this thread's CPU: what the read costs, whatever else runs
        try:
            return self.read(i)
        finally:
            with self._cpu_lock:
                self._read_cpu += time.thread_time() - start
                self._reads += 1

    def read_cpu_per_item(self) -> float | None:
        """Mean CPU seconds of one finished read on the reader threads (None before the first)."""
        with self._cpu_lock:
            return self._read_cpu / self._reads if self._reads else None

    def reads_finished(self) -> bool:
        """True once no read is left to start or still running: the readers no longer need the CPU."""
        if self._pool is None:
            return True  # reads happen in the caller's thread, never beside the model
        if self._pending:
            return False
        if self._next is not None and not self._next.reads_finished():
            return False  # the next slide's reads run on the same threads now
        return all(future.done() for _, future in self._window)

    def __iter__(self) -> "RegionStream":
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        if is_cancelled(self.cancel):
            raise StopIteration
        if self._pool is None:
            if not self._pending:
                raise StopIteration
            i = self._pending.popleft()
            return i, self.read(i)
        if not self._window:
            self._fill()
        if not self._window:
            raise StopIteration
        i, future = self._window.popleft()
        result = future.result()
        self._fill()
        return i, result

    def close(self) -> None:
        """Stop: reads not started are dropped and this stream waits for those still running (they may use
        the slide); a chained stream then has the whole window."""
        self._closed = True
        self._pending.clear()
        for _, future in self._window:
            future.cancel()
        running = [future for _, future in self._window]
        self._window.clear()
        if self._pool is not None:
            if self._owns_pool:
                self._pool.shutdown(wait=True, cancel_futures=True)
            else:
                wait(running)
        if self._ahead is not None and self._ahead._next is self:
            self._ahead._next = None
        self._ahead = None
        follower, self._next = self._next, None
        if follower is not None:
            follower._ahead = None
            follower._fill()


class _ThreadPolicy:
    """Torch intra-op threads on CPU while readers decode beside the model.

    Under "auto" the engine now encodes in lanes (engine._PatchBatcher, engine.cpu_lanes: one batch per
    core, one intra-op thread each) and hands this policy a fixed 1; the "auto" mode below remains for a
    single lane (one core, or batches under 64 patches). Measured on the busy 2-core machine (36
    2048-px regions, ViT-256 at 16 px, medians of 3): this policy 6.09 s wall and 5.0 CPU-s, lanes 3.50 s
    and 2.5 CPU-s, one fixed thread 2.72 s and 2.2 CPU-s; its timed 2-thread batches are what cost.

    More OpenMP threads are not always faster: a thread that shares its core with a busy reader, with
    another program, or with a container's CPU quota stalls every parallel op at its barrier (a ViT runs
    hundreds per batch); on a busy 2-core machine, 2 threads ran 2.5x slower than 1. No core count says
    which case holds, so "auto" decides from what it sees:

    * at the start, and whenever no read is left to run beside the model (the readers are done, or
      read in the calling thread): torch's own setting, as a plain loop would run; nothing is timed, so
      a short run pays no probe;
    * decode-bound: one thread, since more would only take cores from the readers the model waits
      for. It is decode-bound when it waited for regions more than a quarter of the time it computed,
      or when a region's reading costs the readers more CPU than the cores left beside a one-thread
      model can give in the time that model encodes it (both measured, nothing guessed);
    * model-bound: full batches alternate between one thread and torch's own setting until each has been
      timed twice, then the faster runs, and every ``EXPLORE_EVERY`` batches the other is timed again in
      case the load changed.

    An int fixes the count (CPU runs then repeat bit for bit); None leaves torch's setting. Torch's
    setting is restored afterwards.
    """

    EXPLORE_EVERY = 12
    HISTORY = 3  # timings kept per thread count (the median decides)
    DECODE_BOUND = 0.25  # waiting / computing above which the readers, not the model, limit the pace

    def __init__(self, setting: int | str | None, on_cuda: bool, full_batch: int,
                 readers: "RegionStream | None" = None, patches_per_region: int = 1):
        import torch

        self._torch = torch
        self.before = torch.get_num_threads()
        self.mode = None if on_cuda else setting
        self.current = self.before
        self.full_batch = full_batch
        self.candidates = sorted({1, self.before})
        self.timings: dict[int, list[float]] = {n: [] for n in self.candidates}
        self.batches = 0
        self.waited = 0.0  # seconds the model waited for regions
        self.computed = 0.0  # seconds spent encoding
        self.readers = readers
        self.patches_per_region = max(1, int(patches_per_region))
        if isinstance(self.mode, int):
            self._set(self.mode)

    def _set(self, n: int) -> None:
        if n != self.current:
            self._torch.set_num_threads(n)
            self.current = n

    def _best(self) -> int:
        return min(self.candidates, key=lambda n: float(np.median(self.timings[n])))

    def waited_for_region(self, seconds: float) -> None:
        self.waited += seconds

    def take_idle_cores(self) -> bool:
        """Under "auto", give the model torch's own thread count once no read runs beside it."""
        if self.mode == "auto" and (self.readers is None or self.readers.reads_finished()):
            self._set(self.before)
            return True
        return False

    def decode_bound(self) -> bool:
        if self.waited > self.DECODE_BOUND * self.computed:
            return True
        read_cpu = self.readers.read_cpu_per_item() if self.readers is not None else None
        if read_cpu is None or not self.timings[1]:
            return False
        model_per_region = float(np.median(self.timings[1])) / self.full_batch * self.patches_per_region
        return read_cpu > model_per_region * max(0, available_cores() - 1)

    def before_batch(self, n_patches: int) -> None:
        if self.mode != "auto" or len(self.candidates) == 1:
            return
        if self.take_idle_cores() or n_patches != self.full_batch or self.batches == 0:
            return  # the first full batch is not timed (one-off costs): it keeps torch's setting
        if self.decode_bound():
            self._set(1)
            return
        untimed = [n for n in self.candidates if len(self.timings[n]) < 2]
        if untimed:
            choice = untimed[0]  # one thread first: it also tells whether the readers limit the pace
        elif self.batches % self.EXPLORE_EVERY == 0:
            choice = next(n for n in self.candidates if n != self._best())
        else:
            choice = self._best()
        self._set(choice)

    def after_batch(self, n_patches: int, seconds: float) -> None:
        self.computed += seconds
        if self.mode != "auto" or n_patches != self.full_batch:
            return
        self.batches += 1
        if self.batches == 1:
            return  # the first full batch pays one-off costs (kernel selection, allocations)
        history = self.timings[self.current]
        history.append(seconds)
        del history[: -self.HISTORY]

    def restore(self) -> None:
        self._set(self.before)


def decode_scale(slide, read_level: int, read_size: int, target_px: int) -> int:
    """The largest of 1, 2, 4, 8 at which a ``read_size``-px band of ``read_level`` still holds at least
    ``target_px`` px (never upsampled) and the slide's tiles decode at that scale; 1 with openslide."""
    check = getattr(getattr(slide, "_tiles", None), "level_scale_ok", None)
    scale = 1
    while check is not None and scale < 8 and read_size // (2 * scale) >= target_px and check(read_level, 2 * scale):
        scale *= 2
    return scale


def resampling_id(scale: int) -> str:
    """How pixels become patches, for the stored settings: a reduced-scale decode is named in it."""
    return RESAMPLING if scale == 1 else f"{RESAMPLING}+dct-1/{scale}"


def grid_decode_scale(slide, grid_config, input_px: int) -> int:
    """decode_scale of the region grid ``grid_config`` would build on ``slide`` (before any tissue mask):
    lets the settings name the resampling before the grid exists."""
    if slide.mpp is None:
        return 1
    size0 = int(round(grid_config.region_px * grid_config.target_mpp / float(slide.mpp)))
    level = slide.best_level_for_downsample(size0 / grid_config.region_px)
    read_size = max(1, int(round(size0 / slide.level_downsamples[level])))
    return decode_scale(slide, level, read_size, grid_config.patches_per_side * int(input_px))
