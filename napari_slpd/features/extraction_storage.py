"""The extraction's dealings with the disk and the slide file: opening a slide's feature writer, refusing a
chunk the disk cannot hold, a full disk or read-only folder as a StorageError that says what is kept, and
a slide file that disappeared or changed under the run. Used by napari_slpd.features.engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_slpd.features.extraction_config import run_settings
from napari_slpd.features.store import FeatureStoreWriter, StoreLayout


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
