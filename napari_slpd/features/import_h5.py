"""Bring your own patch features: CLAM / TRIDENT ``.h5`` files -> region token grids -> FeatureStore.

Users who already ran UNI, CONCH, CTransPath, ... with CLAM or TRIDENT have ``features`` [N, D] and
``coords`` [N, 2] (level-0 top-left) per slide. Their patches lie on a lattice of spacing ``step``
(the patch's level-0 size, smaller when patches overlap). Regions are blocks of G x G lattice cells
starting at the top-left-most patch: a region's token grid holds the feature of each cell (row-major, y then
x, like extraction) and zeros where no patch was kept; its ``coverage`` is the fraction of cells
present, and regions under ``min_coverage`` are dropped. Region embeddings are the mean of the present
patches' features, or a region encoder's output when its input dimension equals D.

Layout variants handled: ``features`` or ``feats``, stored [N, D] or [1, N, D]; attributes on the
``coords`` dataset (CLAM, TRIDENT) or on the root; ``patch_size`` at ``patch_level`` (CLAM) or
``patch_size_level0`` (TRIDENT); none at all (the spacing is then read off the coordinates). CLAM cuts
each tissue contour on its own lattice, so coordinates from different contours may be offset by less
than a step: they are snapped to the nearest cell of one slide-wide lattice (a cell claimed twice keeps
the patch closest to it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from napari_slpd.errors import FeatureStoreError, SlpdError
from napari_slpd.features.store import (FORMAT_VERSION, FeatureStoreWriter, RegionChunk, StoreLayout,
                                        existing_store_is_current)

log = logging.getLogger(__name__)

FEATURE_NAMES = ("features", "feats")


@dataclass
class PatchFeatures:
    """Patch features read from one CLAM/TRIDENT file."""

    path: Path
    features: np.ndarray  # [N, D] float32
    coords: np.ndarray  # [N, 2] int64 level-0 top-left
    patch_size: int | None  # at patch_level, as stated by the file
    patch_level: int | None
    patch_size_level0: float | None  # stated, or computed from patch_size and the level's downsample
    attrs: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class ImportedRegions:
    """Region token grids assembled from patch features."""

    tokens: np.ndarray  # [M, D, G, G] float32, zeros where no patch
    present: np.ndarray  # [M, G, G] bool, True where a patch filled the cell
    coords: np.ndarray  # [M, 2] int64 level-0 top-left
    coverage: np.ndarray  # [M] fraction of the G*G cells with a patch
    step: float  # lattice spacing in level-0 px
    region_size_level0: float
    n_snapped: int = 0  # patches moved onto the lattice by more than 1 px
    n_collisions: int = 0  # patches dropped because their cell was taken by a closer one


def _attr(attrs: dict, *names, default=None):
    for name in names:
        if name in attrs:
            value = attrs[name]
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if isinstance(value, np.ndarray) and value.size == 1:
                value = value.item()
            if isinstance(value, np.generic):
                value = value.item()
            return value
    return default


def _level_downsample(attrs: dict, level: int, slide=None) -> float | None:
    """Downsample of ``level`` from CLAM's ``downsample`` attr or from the slide."""
    if level == 0:
        return 1.0
    ds = attrs.get("downsample")
    if ds is not None:
        ds = np.asarray(ds, dtype=np.float64).ravel()
        if ds.size and np.all(ds > 0):
            return float(ds[0])
    if slide is not None and level < slide.level_count:
        return float(slide.level_downsamples[level])
    return None


def read_patch_features(path: str | os.PathLike, slide=None) -> PatchFeatures:
    """Read a CLAM/TRIDENT patch-feature file. ``slide`` (an open Slide) resolves patch_level > 0 when
    the file does not state its downsample."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FeatureStoreError(f"patch feature file {path} does not exist")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureStoreError(f"{path} is not a readable HDF5 file ({exc})") from exc
    with fh:
        name = next((n for n in FEATURE_NAMES if n in fh), None)
        if name is None or "coords" not in fh:
            raise FeatureStoreError(
                f"{path} is not a CLAM/TRIDENT patch feature file: it needs 'features' and 'coords' datasets "
                f"(it has {', '.join(sorted(fh.keys())) or 'none'})"
            )
        feats = np.asarray(fh[name][()], dtype=np.float32)
        coords = np.asarray(fh["coords"][()])
        # coords attributes win over root attributes (CLAM and TRIDENT write them on coords)
        attrs = {**{k: fh.attrs[k] for k in fh.attrs}, **{k: fh["coords"].attrs[k] for k in fh["coords"].attrs}}
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        raise FeatureStoreError(f"{path}: {name} has shape {feats.shape}; expected [N, D] or [1, N, D]")
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureStoreError(f"{path}: coords has shape {coords.shape}; expected [N, 2]")
    if coords.shape[0] != feats.shape[0]:
        raise FeatureStoreError(f"{path}: {feats.shape[0]} feature rows but {coords.shape[0]} coords")
    if feats.shape[0] == 0:
        raise FeatureStoreError(f"{path} holds no patches")
    if not np.isfinite(feats).all():
        raise FeatureStoreError(f"{path}: the features contain NaN or infinite values")
    coords = np.round(coords).astype(np.int64)
    patch_size = _attr(attrs, "patch_size")
    patch_level = _attr(attrs, "patch_level", default=0)
    size0 = _attr(attrs, "patch_size_level0")
    patch_size = int(patch_size) if patch_size is not None else None
    patch_level = int(patch_level) if patch_level is not None else 0
    if size0 is None and patch_size is not None:
        ds = _level_downsample(attrs, patch_level, slide)
        if ds is None:
            raise FeatureStoreError(
                f"{path}: patches were cut at level {patch_level} but the file does not say that level's "
                "downsample; give the slide (--slides) so it can be read from the slide"
            )
        size0 = patch_size * ds
    clean = {k: _attr(attrs, k) for k in attrs}
    return PatchFeatures(path, feats, coords, patch_size, patch_level,
                         float(size0) if size0 is not None else None, clean)


def lattice_step(coords: np.ndarray, patch_size_level0: float | None) -> float:
    """Spacing of the patch lattice: the most common gap between neighbouring distinct x (or y) values,
    or the patch size when there is a single column and row. Overlapping patches give a step smaller
    than the patch size."""
    gaps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        d = np.diff(values)
        gaps.append(d[d > 0])
    gaps = np.concatenate(gaps)
    if gaps.size == 0:
        if patch_size_level0 is None:
            raise FeatureStoreError("a single patch without a stated patch size: cannot build regions")
        return float(patch_size_level0)
    values, counts = np.unique(gaps, return_counts=True)
    step = float(values[np.argmax(counts)])
    if patch_size_level0 is not None:
        # CLAM's per-contour lattices make some gaps smaller than the step: the patch size, when stated,
        # is the step unless the file's own coordinates say the patches overlap everywhere.
        if step < patch_size_level0 and np.mean(gaps == step) < 0.5:
            step = float(patch_size_level0)
    return step


def assemble_regions(
    coords: np.ndarray,
    features: np.ndarray,
    grid_size: int,
    step: float,
    min_coverage: float = 0.25,
    origin: tuple[float, float] | None = None,
) -> ImportedRegions:
    """Token grids of G x G-patch regions from patch features on a lattice of ``step`` level-0 px."""
    if grid_size < 1:
        raise SlpdError(f"patches per region side must be at least 1, not {grid_size}")
    if not 0.0 <= min_coverage <= 1.0:
        raise SlpdError(f"min_coverage must be a fraction between 0 and 1, not {min_coverage}")
    G = int(grid_size)
    coords = np.asarray(coords, np.float64)
    N, D = features.shape
    if origin is None:
        # Regions start at the top-left-most patch column and row, as extraction's grid starts at the
        # tissue: a slide's own extracted features come back as the same regions.
        origin = (float(coords[:, 0].min()), float(coords[:, 1].min()))
    ox, oy = origin
    cell = np.round((coords - np.array([ox, oy])) / step).astype(np.int64)  # [N, 2] (col, row)
    exact = cell * step + np.array([ox, oy])
    offset = np.abs(coords - exact).max(axis=1)
    n_snapped = int((offset > 1.0).sum())
    # One patch per cell: the closest to the cell wins (stable: ties keep the earlier row).
    order = np.lexsort((np.arange(N), offset, cell[:, 0], cell[:, 1]))
    cell_sorted = cell[order]
    first = np.ones(N, bool)
    first[1:] = np.any(cell_sorted[1:] != cell_sorted[:-1], axis=1)
    keep = order[first]
    n_collisions = N - keep.size
    cell = cell[keep]
    region = cell // G  # (region col, region row)
    local = cell - region * G  # (c, r) inside the region
    keys, inverse = np.unique(region[:, ::-1], axis=0, return_inverse=True)  # sorted by (row, col): row-major
    inverse = inverse.ravel()
    counts = np.bincount(inverse, minlength=keys.shape[0])
    coverage = counts / float(G * G)
    kept_regions = np.flatnonzero(coverage >= min_coverage)
    remap = np.full(keys.shape[0], -1, np.int64)
    remap[kept_regions] = np.arange(kept_regions.size)
    tokens = np.zeros((kept_regions.size, D, G, G), np.float32)
    rows = remap[inverse]
    sel = rows >= 0
    tokens[rows[sel], :, local[sel, 1], local[sel, 0]] = features[keep[sel]]
    present = np.zeros((kept_regions.size, G, G), bool)
    present[rows[sel], local[sel, 1], local[sel, 0]] = True
    region_xy = keys[kept_regions][:, ::-1]  # back to (col, row)
    region_coords = np.round(region_xy * G * step + np.array([ox, oy])).astype(np.int64)
    return ImportedRegions(
        tokens=tokens,
        present=present,
        coords=region_coords.reshape(-1, 2),
        coverage=coverage[kept_regions].astype(np.float32),
        step=float(step),
        region_size_level0=float(G * step),
        n_snapped=n_snapped,
        n_collisions=int(n_collisions),
    )


def mean_of_present(tokens: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Region embeddings [M, D]: the mean of each grid's present cells (empty cells hold zeros)."""
    M, D, G, _ = tokens.shape
    n = np.maximum(present.reshape(M, G * G).sum(axis=1), 1)
    return (tokens.reshape(M, D, G * G).sum(axis=2, dtype=np.float64) / n[:, None]).astype(np.float32)


@dataclass
class ImportResult:
    slide_id: str
    h5_path: Path
    out_path: Path
    status: str  # "imported" | "skipped" | "empty"
    n_patches: int = 0
    n_regions: int = 0
    dim: int = 0
    message: str = ""


def import_patch_features(
    h5_path: str | os.PathLike,
    out_path: str | os.PathLike,
    grid_size: int = 16,
    min_coverage: float = 0.25,
    region_encoder=None,
    slide=None,
    slide_id: str | None = None,
    encoder_name: str | None = None,
    token_dtype: str = "float16",
    overwrite: bool = False,
    patch_features: PatchFeatures | None = None,
    source_sha256: str | None = None,
) -> ImportResult:
    """Import one CLAM/TRIDENT file into a FeatureStore at ``out_path``.

    ``region_encoder``: None or "mean" for mean pooling over present patches, or a RegionEncoder whose
    ``in_dim`` equals the features' dimension. ``slide``: an open Slide (optional) for the pixel size,
    the slide path and CLAM files cut at level > 0. ``encoder_name`` names the patch encoder (e.g. "uni");
    by default the file's own ``encoder`` / ``model`` attribute or "imported". ``patch_features`` (with
    ``source_sha256``, a fingerprint of them) are features read from another layout (a LazySlide table):
    ``h5_path`` then only names their source.
    """
    from napari_slpd import __version__
    from napari_slpd.utils.files import sha256_file

    h5_path, out_path = Path(h5_path), Path(out_path)
    pf = patch_features if patch_features is not None else read_patch_features(h5_path, slide)
    slide_id = slide_id or (slide.slide_id if slide is not None else h5_path.stem)
    step = lattice_step(pf.coords, pf.patch_size_level0)
    size0 = pf.patch_size_level0 if pf.patch_size_level0 is not None else step
    if pf.patch_size_level0 is None:
        log.warning("%s states no patch size; using the coordinate spacing %g level-0 px", h5_path.name, step)
    mean_pool = region_encoder is None or region_encoder == "mean"
    if not mean_pool and int(region_encoder.in_dim) != pf.dim:
        raise SlpdError(
            f"{h5_path.name} holds {pf.dim}-d patch features but the region encoder {region_encoder.model_id!r} "
            f"takes {region_encoder.in_dim}-d tokens; use mean pooling (--region-encoder mean) or a region "
            f"encoder trained on these features"
        )
    source_sha = source_sha256 or sha256_file(h5_path)
    name = encoder_name or _attr(pf.attrs, "encoder", "model", "model_name", "patch_encoder") or "imported"
    mpp = slide.mpp if slide is not None else None
    patch_px = pf.patch_size if pf.patch_size is not None else int(round(size0))
    settings = {
        "format_version": FORMAT_VERSION,
        "source": "import",
        "slide_id": slide_id,
        "source_sha256": source_sha,
        "patch_encoder": str(name),
        "region_encoder": "mean" if mean_pool else str(region_encoder.model_id),
        "region_encoder_sha256": "" if mean_pool else (region_encoder.checkpoint_sha256 or ""),
        "patches_per_side": int(grid_size),
        "min_coverage": float(min_coverage),
        "token_dtype": token_dtype,
    }
    result = ImportResult(slide_id, h5_path, out_path, "imported", n_patches=len(pf), dim=pf.dim)
    if existing_store_is_current(out_path, settings, overwrite=overwrite):
        result.status = "skipped"
        result.message = "already imported from the same file with the same settings"
        return result

    regions = assemble_regions(pf.coords, pf.features, grid_size, step, min_coverage)
    if regions.n_snapped:
        log.info("%s: %d patches were off the slide-wide lattice (CLAM per-contour grids) and were snapped "
                 "to their nearest cell", h5_path.name, regions.n_snapped)
    if regions.n_collisions:
        log.warning("%s: %d patches fell on a cell already taken (overlapping contours) and were left out of "
                    "the token grids", h5_path.name, regions.n_collisions)
    M = regions.tokens.shape[0]
    result.n_regions = M
    if M == 0:
        result.status = "empty"
        result.message = (f"no region of {grid_size} x {grid_size} patches has at least {min_coverage:.0%} of its "
                          f"patches; lower min_coverage or the patches per region")
        return result
    if mean_pool:
        embeddings = mean_of_present(regions.tokens, regions.present)
        embed_dim, region_id, region_sha = pf.dim, "mean", ""
    else:
        from napari_slpd.features.engine import encode_regions

        embeddings = encode_regions(region_encoder, regions.tokens, batch_size=64)
        embed_dim, region_id = int(region_encoder.dim), str(region_encoder.model_id)
        region_sha = region_encoder.checkpoint_sha256 or ""
    layout = StoreLayout(M, pf.dim, int(grid_size), embed_dim, token_dtype, patch_features=True)
    target_mpp = None
    if mpp is not None:
        target_mpp = float(mpp) * size0 / patch_px
    attrs = {
        "slide_id": slide_id,
        "slide_path": str(slide.path) if slide is not None else "",
        "patch_encoder": str(name),
        "patch_encoder_sha256": "",
        "region_encoder": region_id,
        "region_encoder_sha256": region_sha,
        "region_px": int(grid_size * patch_px),
        "patch_px": int(patch_px),
        "target_mpp": target_mpp,
        "mpp": float(mpp) if mpp is not None else None,
        "mpp_source": slide.pixel_size.source if slide is not None else "",
        "region_size_level0": float(regions.region_size_level0),
        "patches_per_side": int(grid_size),
        "patch_size_level0": float(size0),
        "lattice_step_level0": float(step),
        "code_version": __version__,
        "source": f"imported from {h5_path.name}",
        "source_path": str(h5_path.resolve()),
    }
    coords_attrs = {
        "patch_size": int(pf.patch_size if pf.patch_size is not None else round(size0)),
        "patch_level": int(pf.patch_level or 0),
        "patch_size_level0": float(size0),
    }
    chunk = RegionChunk(
        tokens=regions.tokens,
        embeddings=embeddings,
        coords=regions.coords,
        coverage=regions.coverage,
        patch_features=None,
        patch_coords=None,
    )
    # All original patches are kept in the CLAM layout (features/coords), not only those of kept regions.
    _write_import(out_path, layout, settings, chunk, attrs, coords_attrs, pf)
    return result


def _write_import(out_path, layout, settings, chunk, attrs, coords_attrs, pf: PatchFeatures) -> None:
    import h5py

    no_patch_layout = StoreLayout(layout.n_regions, layout.token_dim, layout.grid_size, layout.embed_dim,
                                  layout.token_dtype, patch_features=False)
    with FeatureStoreWriter(out_path, no_patch_layout, settings, None, attrs, None) as writer:
        if writer.n_done:  # an import killed before its rename: redo it whole
            writer.restart()
        writer.append(chunk)
        # The patch-level features have another row count than the regions: written before completion,
        # inside the same partial file, so the final file still appears only once whole.
        with h5py.File(writer.partial_path, "r+") as fh:
            fh.create_dataset("features", data=pf.features, dtype="float32", chunks=True)
            ds = fh.create_dataset("coords", data=pf.coords, dtype="int64", chunks=True)
            for key, value in coords_attrs.items():
                ds.attrs[key] = value
        writer.finish()


__all__ = [
    "PatchFeatures",
    "ImportedRegions",
    "ImportResult",
    "read_patch_features",
    "lattice_step",
    "assemble_regions",
    "mean_of_present",
    "import_patch_features",
]
