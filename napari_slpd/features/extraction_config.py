"""What one slide's extraction is told and what it records: :class:`ExtractionConfig` (the knobs),
:class:`ExtractionResult` (what happened), and the settings hashed into a feature file's key
(:func:`extraction_settings`) or kept as its run key (:func:`run_settings`: precision, decoder), so that a
resumed file never mixes runs. The engine (napari_slpd.features.engine) runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_slpd.errors import SlpdError
from napari_slpd.features.reading import available_cores, gpu_decode_applies, grid_decode_scale, resampling_id
from napari_slpd.features.store import FORMAT_VERSION, TOKEN_DTYPES


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
