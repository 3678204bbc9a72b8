"""Writing a feature file chunk by chunk into ``<final>.partial``, verified resume, atomic completion
(see :mod:`napari_slpd.features.store`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from napari_slpd.errors import FeatureStoreError
from napari_slpd.features.store_format import (FORMAT_VERSION, TOKEN_DTYPES, partial_path_for, read_store_attrs,
                                                 settings_key)
from napari_slpd.utils.h5_attrs import encode_attr, read_attrs

log = logging.getLogger(__name__)


# -- writing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of what a writer will write: fixed for the whole file."""

    n_regions: int  # M, known up front from the region grid
    token_dim: int  # D
    grid_size: int  # G (patches per region side)
    embed_dim: int  # E
    token_dtype: str = "float16"
    patch_features: bool = True  # also write features/coords in the CLAM/TRIDENT layout

    def __post_init__(self):
        if self.token_dtype not in TOKEN_DTYPES:
            raise FeatureStoreError(f"token dtype must be one of {TOKEN_DTYPES}, not {self.token_dtype!r}")
        if min(self.token_dim, self.grid_size, self.embed_dim) < 1 or self.n_regions < 0:
            raise FeatureStoreError(f"invalid feature layout {self}")


@dataclass
class RegionChunk:
    """Consecutive regions to append: ``tokens`` [c, D, G, G], ``embeddings`` [c, E], ``coords`` [c, 2],
    ``coverage`` [c]; with patch features also ``patch_features`` [c*G*G, D], ``patch_coords`` [c*G*G, 2]."""

    tokens: np.ndarray
    embeddings: np.ndarray
    coords: np.ndarray
    coverage: np.ndarray
    patch_features: np.ndarray | None = None
    patch_coords: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def existing_store_is_current(
    final_path: str | os.PathLike, settings: Mapping[str, Any], overwrite: bool = False
) -> bool:
    """Whether a complete feature file made with settings ``key`` already sits at ``final_path``.

    A complete file with other settings raises FeatureStoreError unless ``overwrite`` (then False: the
    caller writes a new one that replaces it on completion). A damaged file raises the same way.
    """
    final_path = Path(final_path)
    key = settings_key(settings)
    if not final_path.exists():
        return False
    try:
        attrs = read_store_attrs(final_path)
    except FeatureStoreError:
        if overwrite:
            return False
        raise
    if not bool(attrs.get("complete", False)):
        if overwrite:
            return False
        raise FeatureStoreError(f"{final_path} is marked incomplete; pass --overwrite (overwrite=True) to redo it")
    if attrs.get("settings_key") == key:
        return not overwrite
    if overwrite:
        return False
    differences = describe_settings_difference(attrs, settings)
    raise FeatureStoreError(
        f"{final_path} was extracted with other settings{differences}; pass --overwrite (overwrite=True) to "
        "replace it, or write to another cohort folder"
    )


def describe_settings_difference(attrs: Mapping[str, Any], new_settings: Mapping[str, Any]) -> str:
    """A short ' (a: x -> y; ...)' text naming the settings that differ between a file and new ones."""
    try:
        old = json.loads(attrs.get("settings", "{}"))
    except (TypeError, json.JSONDecodeError):
        return ""
    changed = [f"{k}: {old.get(k)!r} -> {new_settings.get(k)!r}" for k in sorted(set(old) | set(new_settings))
               if old.get(k) != new_settings.get(k)]
    return f" ({'; '.join(changed[:6])})" if changed else ""


def _chunk_digest(chunk: RegionChunk, token_dtype: str) -> bytes:
    digest = hashlib.sha256()
    for array, dtype in (
        (chunk.tokens, token_dtype),
        (chunk.embeddings, "float32"),
        (chunk.coords, "int64"),
        (chunk.coverage, "float32"),
        (chunk.patch_features, "float32"),
        (chunk.patch_coords, "int64"),
    ):
        if array is not None:
            digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return digest.hexdigest().encode("ascii")


class FeatureStoreWriter:
    """Writes one slide's feature file chunk by chunk into ``<final>.partial``, resuming an earlier run.

    ``n_done`` says how many regions a previous run already finished (0 for a fresh file); the caller
    appends the remaining regions in order with :meth:`append` and then calls :meth:`finish`.
    """

    def __init__(
        self,
        final_path: str | os.PathLike,
        layout: StoreLayout,
        settings: Mapping[str, Any],
        run_settings: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        coords_attrs: Mapping[str, Any] | None = None,
    ):
        self.final_path = Path(final_path)
        self.partial_path = partial_path_for(self.final_path)
        self.layout = layout
        self.settings = dict(settings)
        self.settings_key = settings_key(self.settings)
        self.run_settings = dict(run_settings or {})
        self.run_key = settings_key({"settings_key": self.settings_key, **self.run_settings})
        self.attrs = dict(attrs or {})
        self.coords_attrs = dict(coords_attrs or {})
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _SlideLock(self.final_path)
        try:
            self.n_done = self._resume_or_create()
        except BaseException:
            self._lock.release()
            raise
        self.resumed_from = self.n_done

    def restart(self) -> None:
        """Drop whatever an earlier run left in the partial file and start it empty."""
        self.partial_path.unlink(missing_ok=True)
        self._create()
        self.n_done = self.resumed_from = 0

    def close(self) -> None:
        """Release the slide's lock; an unfinished file stays for the next run to resume."""
        self._lock.release()

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    # -- opening ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _open(self, mode: str = "r+") -> Iterator:
        import h5py

        with h5py.File(self.partial_path, mode) as fh:
            yield fh

    def _resume_or_create(self) -> int:
        if self.partial_path.exists():
            try:
                done = self._verify_partial()
            except Exception as exc:  # a file cut mid-write may fail in any h5py call
                log.warning("%s: the unfinished extraction file is unreadable (%s); starting this slide over",
                            self.partial_path.name, exc)
                done = None
            if done is not None:
                if done:
                    log.info("%s: resuming after %d of %d regions", self.final_path.stem, done,
                             self.layout.n_regions)
                return done
            self.partial_path.unlink()
        self._create()
        return 0

    def _verify_partial(self) -> int | None:
        """Regions of the partial file that are finished and verified, or None when it must be redone."""
        with self._open("r+") as fh:
            attrs = read_attrs(fh)
            if attrs.get("run_key") != self.run_key:
                log.warning(
                    "%s: an unfinished extraction with other settings (or another precision or code version) "
                    "was found; starting this slide over", self.final_path.stem,
                )
                return None
            if int(attrs.get("n_regions_total", -1)) != self.layout.n_regions:
                log.warning("%s: the unfinished extraction planned another number of regions; starting over",
                            self.final_path.stem)
                return None
            ends = fh["_resume/ends"][()].astype(np.int64)
            digests = fh["_resume/sha256"][()]
            recorded = int(attrs.get("n_regions_done", 0))
            n_chunks = int(np.searchsorted(ends, recorded, side="right"))
            good_chunks, start = 0, 0
            for i in range(n_chunks):
                end = int(ends[i])
                chunk = self._read_rows(fh, start, end)
                if _chunk_digest(chunk, self.layout.token_dtype) != bytes(digests[i]):
                    log.warning("%s: regions %d-%d of the unfinished extraction fail their checksum; "
                                "recomputing from region %d", self.final_path.stem, start, end - 1, start)
                    break
                good_chunks, start = i + 1, end
            self._truncate(fh, start, good_chunks)
            return start

    def _read_rows(self, fh, start: int, end: int) -> RegionChunk:
        G2 = self.layout.grid_size ** 2
        return RegionChunk(
            tokens=fh["region_tokens"][start:end],
            embeddings=fh["region_embeddings"][start:end],
            coords=fh["region_coords"][start:end],
            coverage=fh["region_coverage"][start:end],
            patch_features=fh["features"][start * G2 : end * G2] if self.layout.patch_features else None,
            patch_coords=fh["coords"][start * G2 : end * G2] if self.layout.patch_features else None,
        )

    def _datasets(self, fh) -> list[tuple[Any, int]]:
        """(dataset, rows per region) of every per-region dataset."""
        pairs = [(fh[name], 1) for name in ("region_tokens", "region_embeddings", "region_coords", "region_coverage")]
        if self.layout.patch_features:
            pairs += [(fh["features"], self.layout.grid_size ** 2), (fh["coords"], self.layout.grid_size ** 2)]
        return pairs

    def _truncate(self, fh, n_regions: int, n_chunks: int) -> None:
        for ds, rows in self._datasets(fh):
            ds.resize(n_regions * rows, axis=0)
        fh["_resume/ends"].resize(n_chunks, axis=0)
        fh["_resume/sha256"].resize(n_chunks, axis=0)
        fh.attrs["n_regions_done"] = n_regions

    def _create(self) -> None:
        L = self.layout
        D, G, E = L.token_dim, L.grid_size, L.embed_dim
        with self._open("w") as fh:
            fh.create_dataset("region_tokens", (0, D, G, G), dtype=L.token_dtype, maxshape=(None, D, G, G),
                              chunks=(1, D, G, G))
            fh.create_dataset("region_embeddings", (0, E), dtype="float32", maxshape=(None, E),
                              chunks=(max(1, min(256, 65536 // E)), E))
            fh.create_dataset("region_coords", (0, 2), dtype="int64", maxshape=(None, 2), chunks=(1024, 2))
            fh.create_dataset("region_coverage", (0,), dtype="float32", maxshape=(None,), chunks=(1024,))
            if L.patch_features:
                fh.create_dataset("features", (0, D), dtype="float32", maxshape=(None, D),
                                  chunks=(G * G, D))
                coords = fh.create_dataset("coords", (0, 2), dtype="int64", maxshape=(None, 2),
                                           chunks=(max(1024, G * G), 2))
                for key, value in self.coords_attrs.items():
                    coords.attrs[key] = encode_attr(value)
            resume = fh.create_group("_resume")
            resume.create_dataset("ends", (0,), dtype="int64", maxshape=(None,), chunks=(256,))
            resume.create_dataset("sha256", (0,), dtype="S64", maxshape=(None,), chunks=(256,))
            for key, value in self.attrs.items():
                fh.attrs[key] = encode_attr(value)
            for key, value in self.settings.items():
                # Settings are also readable one by one (e.g. attrs["region_px"]) unless attrs says otherwise.
                if key not in self.attrs:
                    fh.attrs[key] = encode_attr(value)
            fh.attrs["settings"] = encode_attr(self.settings)
            fh.attrs["settings_key"] = self.settings_key
            fh.attrs["run_settings"] = encode_attr(self.run_settings)
            fh.attrs["run_key"] = self.run_key
            fh.attrs["format_version"] = FORMAT_VERSION
            fh.attrs["token_dtype"] = L.token_dtype
            fh.attrs["n_regions_total"] = L.n_regions
            fh.attrs["n_regions_done"] = 0
            fh.attrs["complete"] = False

    # -- writing ---------------------------------------------------------------------------------------
    def append(self, chunk: RegionChunk) -> None:
        """Append the next ``len(chunk)`` regions and record them as finished (one open/write/close)."""
        L = self.layout
        c = len(chunk)
        if c == 0:
            return
        if self.n_done + c > L.n_regions:
            raise FeatureStoreError(f"{self.final_path.stem}: more regions written than the {L.n_regions} planned")
        self._check_chunk(chunk)
        with np.errstate(over="ignore"):  # overflow is reported below, with what to do about it
            tokens = np.ascontiguousarray(chunk.tokens, dtype=L.token_dtype)
        if not np.isfinite(tokens).all():
            raise FeatureStoreError(
                f"{self.final_path.stem}: region tokens overflow {L.token_dtype} (or the encoder produced NaN); "
                "extract with token dtype float32"
            )
        chunk = RegionChunk(tokens, chunk.embeddings, chunk.coords, chunk.coverage,
                            chunk.patch_features, chunk.patch_coords)
        digest = _chunk_digest(chunk, L.token_dtype)
        start, end = self.n_done, self.n_done + c
        with self._open("r+") as fh:
            values = [tokens, chunk.embeddings, chunk.coords, chunk.coverage]
            if L.patch_features:
                values += [chunk.patch_features, chunk.patch_coords]
            for (ds, rows), value in zip(self._datasets(fh), values):
                ds.resize(end * rows, axis=0)
                ds[start * rows : end * rows] = value
            ends, digests = fh["_resume/ends"], fh["_resume/sha256"]
            k = ends.shape[0]
            ends.resize(k + 1, axis=0)
            digests.resize(k + 1, axis=0)
            ends[k] = end
            digests[k] = digest
            # Data before bookkeeping: the count moves only once everything it covers is written.
            fh.flush()
            fh.attrs["n_regions_done"] = end
        self.n_done = end

    def _check_chunk(self, chunk: RegionChunk) -> None:
        L, c = self.layout, len(chunk)
        expected = {
            "tokens": (chunk.tokens, (c, L.token_dim, L.grid_size, L.grid_size)),
            "embeddings": (chunk.embeddings, (c, L.embed_dim)),
            "coords": (chunk.coords, (c, 2)),
            "coverage": (chunk.coverage, (c,)),
        }
        if L.patch_features:
            G2 = L.grid_size ** 2
            expected["patch_features"] = (chunk.patch_features, (c * G2, L.token_dim))
            expected["patch_coords"] = (chunk.patch_coords, (c * G2, 2))
        for name, (array, shape) in expected.items():
            if array is None or tuple(np.shape(array)) != shape:
                raise FeatureStoreError(
                    f"{self.final_path.stem}: chunk {name} has shape {None if array is None else np.shape(array)}, "
                    f"expected {shape}"
                )

    def finish(self, extra_attrs: Mapping[str, Any] | None = None) -> Path:
        """Mark the file complete and move it onto its final name (replacing an older file, atomically)."""
        if self.n_done != self.layout.n_regions:
            raise FeatureStoreError(
                f"{self.final_path.stem}: {self.n_done} of {self.layout.n_regions} regions written; cannot finish"
            )
        with self._open("r+") as fh:
            for key, value in (extra_attrs or {}).items():
                fh.attrs[key] = encode_attr(value)
            fh.attrs["n_regions"] = self.n_done
            fh.attrs["complete"] = True
        _fsync_path(self.partial_path)
        os.replace(self.partial_path, self.final_path)
        _fsync_dir(self.final_path.parent)
        self.close()
        return self.final_path


class _SlideLock:
    """An exclusive lock on ``.<final name>.lock`` beside a feature file, held while it is written.

    Two processes extracting one slide into one cohort (two shells, a GUI and a CLI, two SLURM tasks)
    would otherwise append to the same partial file. napari_slpd.utils.locks: flock where it spans the
    machines (released by the kernel when a process dies), an exclusive lock file with host, pid and
    start time where it does not (a dead holder's lock is cleared with a warning).
    """

    def __init__(self, final_path: Path):
        from napari_slpd.utils.locks import FileLock, LockHeld

        self.path = lock_path_for(final_path)
        try:
            self._lock = FileLock(self.path, what=f"the features of {final_path.stem}")
        except LockHeld as exc:
            raise FeatureStoreError(str(exc)) from exc
        self.notes = self._lock.notes

    def release(self) -> None:
        self._lock.release()


def lock_path_for(final_path: Path) -> Path:
    """The lock file of feature file ``final_path`` (held while it is written)."""
    return Path(final_path).with_name(f".{Path(final_path).name}.lock")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be fsynced
        _fsync_path(folder)


def write_store(
    final_path: str | os.PathLike,
    layout: StoreLayout,
    settings: Mapping[str, Any],
    chunk: RegionChunk,
    attrs: Mapping[str, Any] | None = None,
    coords_attrs: Mapping[str, Any] | None = None,
    run_settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write a whole feature file in one go (e.g. imported features); same atomic rules as extraction."""
    with FeatureStoreWriter(final_path, layout, settings, run_settings, attrs, coords_attrs) as writer:
        if writer.n_done:
            writer.restart()
        writer.append(chunk)
        return writer.finish()
