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

Over 600 lines, but one idea: the extraction pipeline of one slide (batches, lanes, CPU or GPU decode,
models, writing); reading regions, read-ahead and the thread policy are napari_slpd.features.reading's.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import asdict, dataclass, field
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
from napari_slpd.features.store import (
    FORMAT_VERSION,
    TOKEN_DTYPES,
    FeatureStoreWriter,
    RegionChunk,
    StoreLayout,
    existing_store_is_current,
)
from napari_slpd.utils.progress import CancelCheck, ProgressFn, is_cancelled

log = logging.getLogger(__name__)


def _grid_config_cls():
    from napari_slpd.slides.grid import GridConfig

    return GridConfig


def _tissue_params_cls():
    from napari_slpd.slides.tissue import TissueParams

    return TissueParams


@dataclass
class ExtractionConfig:
    """How to extract one slide. Settings that change the features are recorded in the store."""

    grid: Any = field(default_factory=lambda: _grid_config_cls()())  # napari_slpd.slides.grid.GridConfig
    tissue: Any = field(default_factory=lambda: _tissue_params_cls()())  # napari_slpd.slides.tissue.TissueParams
    batch_size: int = 256  # patches per patch-encoder batch: bounds the model's memory
    region_batch_size: int = 64  # token grids per region-encoder batch
    num_workers: int | None = None  # region reading/decoding threads; None: one per CPU core (at most 16)
    queue_size: int | None = None  # regions read ahead of the model, at most; None: 2 x num_workers
    regions_per_chunk: int = 16  # regions written (and resumable) at a time
    device: str = "auto"  # where callers build the encoders; extract_slide runs on the encoders' own device
    compile: bool = False  # torch.compile the patch encoder on CUDA
    store_patch_features: bool = True  # also write features/coords in the CLAM/TRIDENT layout
    token_dtype: str = "float16"  # region_tokens storage dtype ("float16" halves the cache)
    mpp: float | None = None  # user pixel size (um/px) overriding the slide's metadata
    mpp_fallback: str = "none"  # "none" | "objective" | "level0": used only when metadata has none
    # torch threads on CPU: "auto" encodes batches in lanes, one per core with one intra-op thread each
    # (see _PatchBatcher; runs repeat on the same machine); an int fixes torch's intra-op thread count
    # with one lane (CPU runs then repeat bit for bit on any machine); None leaves torch's setting.
    torch_threads: int | str | None = "auto"
    overwrite: bool = False  # replace a complete file made with other settings
    # On CUDA, decode JPEG tiles of tile-reader slides with nvJPEG and feed the ViT without a host round
    # trip (named in the run settings, so a resumed file never mixes decoders); False: decode on the CPU.
    gpu_decode: bool = True

    def __post_init__(self):
        if self.batch_size < 1 or self.region_batch_size < 1:
            raise SlpdError(f"batch sizes must be at least 1 (got {self.batch_size}, {self.region_batch_size})")
        if self.num_workers is not None and self.num_workers < 0:
            raise SlpdError(f"num_workers must be 0 (read in the calling thread) or more, not {self.num_workers}")
        if (self.queue_size is not None and self.queue_size < 1) or self.regions_per_chunk < 1:
            raise SlpdError("queue_size and regions_per_chunk must be at least 1")
        threads = self.torch_threads
        if not (threads in (None, "auto") or (isinstance(threads, int) and threads > 0)):
            raise SlpdError(f"torch_threads must be 'auto', None or a positive int, not {self.torch_threads!r}")
        if self.token_dtype not in TOKEN_DTYPES:
            raise SlpdError(f"token_dtype must be one of {TOKEN_DTYPES}, not {self.token_dtype!r}")

    @property
    def workers(self) -> int:
        """Reader threads: num_workers, or one per available core (at most 16)."""
        if self.num_workers is not None:
            return int(self.num_workers)
        return max(1, min(16, available_cores()))

    @property
    def window(self) -> int:
        """Regions read ahead at most: queue_size, or twice the readers (each can hold one finished)."""
        return int(self.queue_size) if self.queue_size is not None else max(2, 2 * self.workers)


@dataclass
class ExtractionResult:
    """What happened to one slide. ``status``: "extracted", "skipped" (already up to date), "empty" (no
    region: see ``message``) or "cancelled" (finished chunks are kept; a rerun resumes)."""

    slide_id: str
    slide_path: Path
    out_path: Path
    status: str
    n_regions: int = 0
    n_computed: int = 0  # regions computed by this run
    resumed_from: int = 0  # regions already finished by an earlier run
    seconds: float = 0.0
    message: str = ""
    mpp: float | None = None  # pixel size used, um/px
    mpp_source: str | None = None  # where it came from (napari_slpd.slides.slide.PixelSize.source)

    @property
    def regions_per_s(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 else 0.0




def encoder_input_px(patch_encoder, patch_px: int) -> int:
    """Side of the patches the encoder is fed: its fixed input size, or the grid's patch size when the
    encoder takes any size (HIPT's ViT-256 interpolates its position embedding)."""
    size = getattr(patch_encoder, "input_size", None)
    if not size or getattr(patch_encoder, "any_input_size", False):
        return int(patch_px)
    return int(size)


def _encoder_device(encoder) -> str:
    device = getattr(encoder, "device", None)
    return str(device) if device is not None else "cpu"


def _precision(patch_encoder) -> str:
    """What numeric precision the encoder runs in: part of the run key (a resumed file never mixes)."""
    if not _encoder_device(patch_encoder).startswith("cuda"):
        return "float32"
    for attr in ("precision", "autocast_dtype", "_autocast"):
        value = getattr(patch_encoder, attr, None)
        if value is not None:
            return str(value).replace("torch.", "")
    return "float32"


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


# -- settings -----------------------------------------------------------------------------------------


def _config_dict(obj) -> dict:
    if obj is None:
        return {}
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    return asdict(obj)


def extraction_settings(slide, config: ExtractionConfig, patch_encoder, region_encoder) -> dict:
    """Everything that decides what the stored features mean; hashed into the store's settings_key."""
    from napari_slpd import __version__  # noqa: F401  (recorded in run settings, not here)

    grid = config.grid
    return {
        "format_version": FORMAT_VERSION,
        "slide_id": slide.slide_id,
        "slide_dimensions": [int(v) for v in slide.dimensions],
        "patch_encoder": str(patch_encoder.model_id),
        "patch_encoder_sha256": patch_encoder.checkpoint_sha256 or "",
        "patch_encoder_input_px": encoder_input_px(patch_encoder, grid.patch_px),
        "patch_mean": [float(v) for v in getattr(patch_encoder, "mean", ())],
        "patch_std": [float(v) for v in getattr(patch_encoder, "std", ())],
        "region_encoder": str(region_encoder.model_id),
        "region_encoder_sha256": region_encoder.checkpoint_sha256 or "",
        "region_px": int(grid.region_px),
        "patch_px": int(grid.patch_px),
        "target_mpp": float(grid.target_mpp),
        "min_tissue": float(grid.min_tissue),
        "mpp": float(slide.mpp) if slide.mpp is not None else None,
        "mpp_source": slide.pixel_size.source,
        "tissue": _config_dict(config.tissue),
        "token_dtype": config.token_dtype,
        "store_patch_features": bool(config.store_patch_features),
        # GPU decoding makes the full-decode patches (see reading.GpuRegionReader): named as such.
        "resampling": resampling_id(1 if _gpu_decode(slide, config, patch_encoder) else
                                    grid_decode_scale(slide, grid, encoder_input_px(patch_encoder, grid.patch_px))),
    }


# How a GPU-decoding run makes patches (nvJPEG, then torch's antialiased bilinear): in its run settings.
GPU_DECODE = "nvjpeg+torch-bilinear-aa"


def _gpu_decode(slide, config, patch_encoder) -> bool:
    return bool(config.gpu_decode) and gpu_decode_applies(slide, config.grid, _encoder_device(patch_encoder))


def run_settings(patch_encoder, region_decode: str | None = None) -> dict:
    from napari_slpd import __version__

    out = {"precision": _precision(patch_encoder), "code_version": __version__}
    if region_decode:  # only GPU decoding is named: CPU runs keep the run key they always had
        out["region_decode"] = region_decode
    return out


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


def _file_stamp(path) -> tuple | None:
    """(size, mtime, inode) of a slide file (of every file of a DICOM folder), None when it is gone."""
    path = Path(path)
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        return tuple((f.name, *(lambda st: (st.st_size, st.st_mtime_ns, st.st_ino))(f.stat())) for f in files)
    except OSError:
        return None


def _raise_if_slide_changed(exc, slide, stamp, out_path: Path) -> None:
    """A read that failed because the slide file went away or changed under the extraction (a share that
    dropped out, a file copied over): say so, and that the finished regions are kept for the next run."""
    from napari_slpd.errors import SlideError, StorageError
    from napari_slpd.features.store import partial_path_for

    if isinstance(exc, StorageError):
        return
    now = _file_stamp(slide.path)
    if now == stamp:
        return
    what = "disappeared" if now is None else "changed (replaced, cut short or rewritten)"
    partial = partial_path_for(out_path)
    kept = (f"the regions finished before are kept in {partial.name} and the next run resumes from them once "
            "the file is back as it was" if partial.exists() else "nothing was written for it")
    raise SlideError(f"slide file {slide.path} {what} during extraction ({exc}); {kept}") from exc


_SPACE_MARGIN = 256 << 10


def _check_space(writer, tokens, embeddings, feats, remaining: int) -> None:
    """Refuse a chunk the disk cannot hold before HDF5 starts writing it: a write that fails half-way leaves
    the HDF5 library with a file it can neither flush nor close (and, reopened, may crash the process)."""
    from napari_slpd.errors import StorageError
    from napari_slpd.utils.storage import free_bytes, human_bytes

    chunk = tokens.size * np.dtype(writer.layout.token_dtype).itemsize + embeddings.nbytes + len(tokens) * 24
    if feats is not None:
        chunk += feats.nbytes + feats.shape[0] * 16
    free = free_bytes(writer.partial_path.parent)
    if free is None or free >= 2 * chunk + _SPACE_MARGIN:
        return
    folder = writer.partial_path.parent
    size = writer.partial_path.stat().st_size if writer.partial_path.exists() else 0
    needed = chunk * max(1, -(-remaining // max(1, len(tokens)))) + _SPACE_MARGIN
    raise StorageError(
        f"not enough space in {folder} to write {writer.final_path.name}: the rest of this slide needs about "
        f"{human_bytes(needed)}, {human_bytes(free)} free (disk full or quota reached). {writer.final_path.name} "
        f"was not written; the {writer.n_done} regions finished so far are kept in {writer.partial_path.name} "
        f"({human_bytes(size)}) and resumed by the next run. Free some space there (or choose a cache folder on "
        "another disk: --cache DIR, $SLPD_CACHE_DIR, or the Cohort panel's cache folder) and run again: finished "
        "work is kept and resumed.", folder=folder, kind="full", needed=needed, free=free)


def _raise_storage_error(exc, out_path: Path, grid, patch_encoder, region_encoder, config) -> None:
    """A full disk (or a read-only folder) while writing: a StorageError naming the folder, the size of the
    slide's file and what is kept (the verified chunks in the .partial file, resumed by the next run)."""
    from napari_slpd.features.store import partial_path_for
    from napari_slpd.utils.storage import human_bytes, storage_error

    G2 = int(grid.patches_per_side) ** 2
    D = int(patch_encoder.dim)
    per_region = G2 * D * (2 if config.token_dtype == "float16" else 4) + int(region_encoder.dim) * 4 + 24
    if config.store_patch_features:
        per_region += G2 * (D * 4 + 16)
    partial = partial_path_for(out_path)
    size = partial.stat().st_size if partial.exists() else 0
    kept = (f"{out_path.name} was not written; the regions finished so far are kept in {partial.name} "
            f"({human_bytes(size)}), checked and resumed by the next run (delete it to give its space back)"
            if size else f"{out_path.name} was not written and no partial file was left")
    error = storage_error(exc, out_path, written=size, needed=len(grid) * per_region, kept=kept)
    if error is not None:
        import gc

        gc.collect()  # h5py handles of the failed write are closed now, not later in another thread
        raise error from exc


def _open_writer(slide, grid, out_path, settings, config, patch_encoder, region_encoder,
                 region_decode: str | None = None) -> FeatureStoreWriter:
    from napari_slpd import __version__

    G = int(grid.patches_per_side)
    layout = StoreLayout(
        n_regions=len(grid),
        token_dim=int(patch_encoder.dim),
        grid_size=G,
        embed_dim=int(region_encoder.dim),
        token_dtype=config.token_dtype,
        patch_features=config.store_patch_features,
    )
    attrs = {
        **grid.to_attrs(),
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path),
        "patch_encoder": str(patch_encoder.model_id),
        "patch_encoder_sha256": patch_encoder.checkpoint_sha256 or "",
        "region_encoder": str(region_encoder.model_id),
        "region_encoder_sha256": region_encoder.checkpoint_sha256 or "",
        "code_version": __version__,
        "source": "napari-slpd extract",
    }
    # CLAM/TRIDENT readers find the patch geometry on the coords dataset: patches are given at level 0
    # (patch_size = their level-0 footprint) since they are resampled, not read 1:1 from a level.
    coords_attrs = {
        "patch_size": int(round(grid.patch_size_level0)),
        "patch_level": 0,
        "patch_size_level0": float(grid.patch_size_level0),
        "patch_px": int(grid.config.patch_px),
        "target_mpp": float(grid.config.target_mpp),
        "read_level": int(grid.read_level),
    }
    return FeatureStoreWriter(out_path, layout, settings, run_settings(patch_encoder, region_decode), attrs,
                              coords_attrs)


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
