"""Saving and loading vector stores (cohort and region indexes) beside a cohort, atomically.

An index is a manifest ``<name>.json`` plus data files named by a generation; the manifest is replaced
last, atomically, so a reader sees either the old index or the new one, never half of one.

Format versions: 1 (napari-slpd <= 0.x: the cohort index also saved a faiss IVF file, ``ivf``), 2 (the
cohort index saves only its vectors; its bound stage is derived from them at load). Version-1 cohort
indexes load (their faiss file is ignored) and are rewritten as version 2 by ``CohortIndex.open``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from napari_slpd.errors import PrototypeError
from napari_slpd.similarity.store import IVFStage, VectorStore
from napari_slpd.utils.files import atomic_path, atomic_write_json

FORMAT = "napari-slpd-vector-index"
FORMAT_VERSION = 2


def _new_generation() -> str:
    return f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:8]}"


def save_store(directory: Path, name: str, store: VectorStore, ivf: IVFStage | None, meta: dict) -> Path:
    """Write ``<name>.json`` (manifest) and its generation's data files into ``directory``, atomically.

    Savers hold an exclusive lock (``.<name>.lock`` in ``directory``, napari_slpd.utils.locks: flock on a
    file opened read-write, or a lock file where flock does not span machines) for the whole save, so files
    of this index that are not referenced by the manifest when the lock is held (a killed save's data or
    temporary files) belong to no running save and are removed."""
    from napari_slpd.utils.locks import FileLock, LockHeld
    from napari_slpd.utils.storage import write_target

    directory = write_target(Path(directory))  # a read-only cohort's index is saved in its cache folder
    directory.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(directory / f".{name}.lock", what=f"the {name} index in {directory}", wait_s=600.0)
    except LockHeld as exc:
        raise PrototypeError(str(exc)) from exc
    try:
        path = _save_store_locked(directory, name, store, ivf, meta)
        _remove_orphans(directory, name, path)
    finally:
        lock.release()
    return path


def _remove_orphans(directory: Path, name: str, manifest_path: Path) -> None:
    try:
        keep = {v for k, v in _read_manifest(manifest_path).items() if k in ("arrays", "ivf") and v}
    except PrototypeError:
        return
    for entry in directory.iterdir():
        data = entry.name.startswith(f"{name}-") and entry.suffix in (".npz", ".faiss")
        temp = entry.name.startswith((f".{name}-", f".{name}.json.")) and entry.name.endswith(".partial")
        if (data and entry.name not in keep) or temp:
            try:
                entry.unlink()
            except OSError:
                pass


def _save_store_locked(directory: Path, name: str, store: VectorStore, ivf: IVFStage | None, meta: dict) -> Path:
    manifest_path = directory / f"{name}.json"
    try:
        previous = _read_manifest(manifest_path) if manifest_path.exists() else None
    except PrototypeError:  # a damaged manifest is replaced; its data files are not known, left alone
        previous = None
    generation = _new_generation()
    arrays_name = f"{name}-{generation}.npz"
    ivf_name = f"{name}-{generation}.faiss" if ivf is not None else None
    try:
        with atomic_path(directory / arrays_name) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **store.to_arrays())
        if ivf is not None:
            with atomic_path(directory / ivf_name) as tmp:
                ivf.save(tmp)
    except BaseException:
        # A failed save (full disk, killed) leaves no file of its generation: the old index stays whole.
        for new_file in (arrays_name, ivf_name):
            if new_file:
                (directory / new_file).unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": name,
        "generation": generation,
        "dim": store.dim,
        "id_bits": store.id_bits,
        "arrays": arrays_name,
        "ivf": ivf_name,
        "ivf_trained_on": ivf.trained_on if ivf is not None else 0,
        "n_owners": len(store),
        "n_vectors": store.n_live_rows,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **meta,
    }
    try:
        atomic_write_json(manifest_path, manifest)
    except BaseException:
        for new_file in (arrays_name, ivf_name):
            if new_file:
                (directory / new_file).unlink(missing_ok=True)
        raise
    # The new manifest is in place: the previous generation's files are no longer referenced.
    if previous is not None and previous.get("generation") != generation:
        for key in ("arrays", "ivf"):
            old = previous.get(key)
            if old and old not in (arrays_name, ivf_name):
                try:
                    (directory / old).unlink()
                except OSError:  # gone already, or not ours to delete: only unreferenced
                    pass
    return manifest_path


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PrototypeError(
            f"index manifest {path} is unreadable ({exc}); delete the index folder to rebuild it"
        ) from exc
    if manifest.get("format") != FORMAT:
        raise PrototypeError(f"{path} is not a napari-slpd index manifest")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise PrototypeError(f"{path} was written by a newer napari-slpd (format {manifest.get('version')}); upgrade")
    return manifest


def load_store(directory: Path, name: str, payload_shapes: dict[str, tuple] | None = None, load_ivf: bool = True):
    """(store, ivf or None, manifest) saved by :func:`save_store`; ``load_ivf=False`` ignores a saved faiss
    file (a version-1 cohort index's, which version 2 no longer uses)."""
    directory = Path(directory)
    manifest_path = directory / f"{name}.json"
    if not manifest_path.exists():
        raise PrototypeError(f"no saved index {name!r} in {directory}")
    manifest = _read_manifest(manifest_path)
    arrays_path = directory / manifest["arrays"]
    try:
        with np.load(arrays_path, allow_pickle=False) as arrays:
            store = VectorStore.from_arrays(arrays, int(manifest["dim"]), int(manifest["id_bits"]), payload_shapes)
    except (OSError, KeyError, ValueError) as exc:
        raise PrototypeError(
            f"saved index data {arrays_path} is unreadable ({exc}); delete {directory} to rebuild"
        ) from exc
    ivf = None
    if load_ivf and manifest.get("ivf"):
        try:
            ivf = IVFStage.load(directory / manifest["ivf"], int(manifest.get("ivf_trained_on", 0)))
        except RuntimeError as exc:
            raise PrototypeError(
                f"saved faiss index {manifest['ivf']} is unreadable ({exc}); delete {directory} to rebuild"
            ) from exc
    return store, ivf, manifest
