"""Versions of region embeddings
-----------------------------
Region embeddings depend on the region encoder only; the token grids do not. A file may therefore hold the
region embeddings of several region encoders (the extraction's and each SLPD fine-tune's), next to its
one set of token grids::

    region_embeddings_versions/<key>   [M, E] float32, one per region encoder; attrs region_encoder (model
                                       id), region_encoder_sha256, region_encoder_checkpoint, settings,
                                       settings_key, run_key (the file's keys with this encoder), origin
                                       ("extraction" | "reencoded"), label, created
    region_embeddings                  an HDF5 soft link to the selected version (readers need not know)
    attrs region_embeddings_version    the key of the selected version

The root attributes ``region_encoder``, ``region_encoder_sha256``, ``settings`` and ``settings_key`` are
those of the selected version, so prototypes, the cohort index and the region index (all keyed by the
file's ``settings_key``) follow the selected version. Selecting another version only moves the link and
rewrites those attributes: no data is copied, nothing is recomputed. The key of a version is the first 12
hex digits of its checkpoint's sha256, or a slug of the model id for encoders without a checkpoint (the
seeded random initialisation, "mean"): :func:`version_key`.

Files written before versions existed (a plain ``region_embeddings`` dataset) hold one implicit version,
the region encoder their attributes record; the first version added moves that dataset, unchanged, into
the versions group (:func:`migrate_store`), so nothing is lost.

Adding a version (or migrating) is crash-safe: it is written into a copy of the file that is then renamed
over it, so a process killed at any moment leaves the old file or the new one, and the next update or
opening the cohort says which (:func:`recover_interrupted_updates`). Selecting a version changes a link and
a few attributes in place (instant; a cohort-wide switch is journalled by ``session.versions``).

```python
from napari_slpd.features.store import (load_region_embeddings, region_embedding_versions,
    add_region_embedding_version, select_region_embedding_version, version_key)
region_embedding_versions(store_or_path) -> [RegionEmbeddingVersion(key, region_encoder, sha256, checkpoint,
                                              dim, origin, label, created, settings_key, selected)]
load_region_embeddings(store_or_path, version=None) -> [M, E] float32   # None: the selected version
add_region_embedding_version(path, embeddings, region_encoder=model_id, sha256=..., checkpoint=..., select=True)
select_region_embedding_version(path, key)   # instant; the cohort-wide switch is session.versions
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from napari_slpd.errors import FeatureStoreError
from napari_slpd.features.store_format import settings_key
from napari_slpd.utils.files import atomic_path
from napari_slpd.utils.h5_attrs import encode_attr, json_default, read_attrs

log = logging.getLogger(__name__)


# -- versions of region embeddings -------------------------------------------------------------------------

VERSIONS_GROUP = "region_embeddings_versions"
VERSION_ATTR = "region_embeddings_version"
# Root attributes that belong to the selected version (copied onto the root when a version is selected).
VERSION_ROOT_ATTRS = ("region_encoder", "region_encoder_sha256", "region_encoder_checkpoint", "settings",
                      "settings_key", "run_key")


@dataclass(frozen=True)
class RegionEmbeddingVersion:
    """One version of a file's region embeddings: what encoder made them and whether it is selected."""

    key: str
    region_encoder: str  # model id, e.g. "hipt_vit4k (file sha256:ab12...)"
    sha256: str  # checkpoint sha256 ("" without a checkpoint)
    checkpoint: str  # checkpoint path when known ("" otherwise)
    dim: int
    origin: str  # "extraction" | "reencoded"
    label: str
    created: str
    settings_key: str
    selected: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def version_key(region_encoder: str, sha256: str | None = None) -> str:
    """The key of the region-embedding version made by ``region_encoder`` (model id) / checkpoint ``sha256``."""
    sha = str(sha256 or "").strip().lower()
    if sha:
        return sha.split(":")[-1][:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(region_encoder or "unknown")).strip("-").lower()
    return slug[:60] or "unknown"


def _version_from(key: str, attrs: Mapping[str, Any], dim: int, selected: bool) -> RegionEmbeddingVersion:
    enc = str(attrs.get("region_encoder", "") or "")
    return RegionEmbeddingVersion(
        key=key,
        region_encoder=enc,
        sha256=str(attrs.get("region_encoder_sha256", "") or ""),
        checkpoint=str(attrs.get("region_encoder_checkpoint", "") or ""),
        dim=int(dim),
        origin=str(attrs.get("origin", "extraction") or "extraction"),
        label=str(attrs.get("label", "") or enc),
        created=str(attrs.get("created", "") or ""),
        settings_key=str(attrs.get("settings_key", "") or ""),
        selected=selected,
    )


def _versions_of_handle(h5) -> tuple[list[RegionEmbeddingVersion], str]:
    """(versions, selected key) of an open file; an unversioned file has one implicit version."""
    root = read_attrs(h5)
    if VERSIONS_GROUP not in h5:
        key = version_key(root.get("region_encoder", ""), root.get("region_encoder_sha256", ""))
        dim = int(h5["region_embeddings"].shape[1]) if "region_embeddings" in h5 else 0
        return [_version_from(key, {**root, "origin": "extraction"}, dim, True)], key
    selected = _selected_key(h5)
    group = h5[VERSIONS_GROUP]
    out = [_version_from(key, read_attrs(group[key]), group[key].shape[1], key == selected) for key in group]
    out.sort(key=lambda v: (v.created, v.key))
    return out, selected


def _selected_key(h5) -> str:
    """The selected version: the target of the ``region_embeddings`` link (the data readers get)."""
    import h5py

    link = h5.get("region_embeddings", getlink=True)
    if isinstance(link, h5py.SoftLink):
        return link.path.rstrip("/").rsplit("/", 1)[-1]
    return str(h5.attrs.get(VERSION_ATTR, ""))


def _with_store(store_or_path, fn):
    if getattr(store_or_path, "_h5", None) is not None:  # an open FeatureStore (duck-typed: no import cycle)
        return fn(store_or_path._h5)
    import h5py

    path = Path(store_or_path)
    if not path.exists():
        raise FeatureStoreError(f"feature file {path} does not exist; run `slpd extract` for this slide first")
    try:
        with h5py.File(path, "r") as fh:
            return fn(fh)
    except OSError as exc:
        raise FeatureStoreError(f"feature file {path} is damaged or not an HDF5 file ({exc})") from exc


def region_embedding_versions(store_or_path) -> list[RegionEmbeddingVersion]:
    """Every version of region embeddings a feature file (path or open FeatureStore) holds, oldest first."""
    return _with_store(store_or_path, lambda h5: _versions_of_handle(h5)[0])


def _resolve_version(h5, version: str | None) -> str:
    versions, selected = _versions_of_handle(h5)
    if version is None or version in ("current", "selected"):
        return selected
    keys = [v.key for v in versions]
    if version in keys:
        return version
    # A checkpoint sha256 (full or prefix) or a model id also name a version.
    matches = [v.key for v in versions if (v.sha256 and v.sha256.startswith(str(version).lower()))
               or v.region_encoder == version]
    if len(matches) == 1:
        return matches[0]
    raise FeatureStoreError(
        f"{getattr(h5, 'filename', 'the feature file')} has no region embeddings of version {version!r} "
        f"(it has: {', '.join(keys) or 'none'}); use the checkpoint with `Use checkpoint` (or "
        "napari_slpd.features.reencode.use_checkpoint) to compute them"
    )


def load_region_embeddings(store_or_path, version: str | None = None) -> np.ndarray:
    """[M, E] float32 region embeddings of ``version`` (a key of :func:`region_embedding_versions`, a
    checkpoint sha256 prefix or a model id; None / "current": the selected version) of one feature file
    (a path or an open :class:`FeatureStore`). Raises FeatureStoreError naming the versions there are."""

    def read(h5):
        key = _resolve_version(h5, version)
        if VERSIONS_GROUP in h5 and key in h5[VERSIONS_GROUP]:
            return np.asarray(h5[VERSIONS_GROUP][key][()], dtype=np.float32)
        return np.asarray(h5["region_embeddings"][()], dtype=np.float32)

    return _with_store(store_or_path, read)


@contextlib.contextmanager
def _open_for_update(path: Path):
    """The file opened for an in-place change (r+): for instant changes of a few attributes and a link
    (selecting a version). A change that writes data goes through :func:`_update_copy` instead."""
    import h5py

    try:
        fh = h5py.File(path, "r+")
    except OSError as exc:
        raise FeatureStoreError(
            f"cannot update {path} ({exc}); if another process (a training run, another napari) has it open, "
            "wait for it to finish"
        ) from exc
    try:
        yield fh
    finally:
        fh.close()


# -- crash-safe updates: a copy is changed, then renamed over the file ------------------------------------
# HDF5 rewrites its metadata (B-trees, the free-space list, object headers) in place: a process killed while
# a dataset is added to a file opened "r+" can leave it unreadable. An update that writes data (a new version
# of region embeddings, migrating an old file) is therefore made on a copy, ``<name>.updating``, which is
# synced and renamed over the file (atomic on POSIX): the file holds the old state or the new one, never a
# mix. ``<name>.updating.json`` (written first, removed last) says what was under way and carries a token
# the new file records (root attribute ``update_token``), so that after a kill the next update (or opening the
# cohort: :func:`recover_interrupted_updates`) settles it and says which state the file holds. Readers that
# have the file open keep reading the old one until they reopen it. The copy needs the file's size free in
# its folder (a full disk is reported before anything changes).

UPDATE_SUFFIX = ".updating"
UPDATE_TOKEN_ATTR = "update_token"


def update_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(the copy being changed, the record of what is under way) beside feature file ``path``."""
    path = Path(path)
    return path.with_name(path.name + UPDATE_SUFFIX), path.with_name(path.name + UPDATE_SUFFIX + ".json")


def _update_step(name: str) -> None:
    """Named steps of an update (tests kill a process at each: tests/faults/test_fault_killed.py)."""


def _settle_interrupted(path: Path) -> str | None:
    """Remove what an update killed half-way left beside ``path`` and say which state the file holds (None
    when no update was interrupted). The caller holds the file's lock (no update of it is running)."""
    copy, record = update_paths(path)
    if not record.exists() and not copy.exists():
        return None
    what, token = "an update", None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        info = json.loads(record.read_text(encoding="utf-8"))
        what, token = str(info.get("what") or what), info.get("token")
    new = False
    if not copy.exists() and token:  # renamed over the file already, or killed before the copy existed
        with contextlib.suppress(Exception):
            import h5py

            with h5py.File(path, "r") as fh:
                new = str(fh.attrs.get(UPDATE_TOKEN_ATTR, "")) == str(token)
    copy.unlink(missing_ok=True)
    record.unlink(missing_ok=True)
    if new:
        note = f"{path.name}: {what} was interrupted after it was saved; the file holds the new state"
    else:
        note = (f"{path.name}: {what} was interrupted (the process was stopped) before it was saved; the file "
                "holds its earlier state, unchanged")
    try:
        note += f" (selected region embeddings: {_selected_label(path)})"
    except FeatureStoreError as exc:
        note += f"; but it cannot be read now: {exc}"
    log.warning("%s", note)
    return note


def _selected_label(path: Path) -> str:
    selected = next((v for v in region_embedding_versions(path) if v.selected), None)
    return (selected.label or selected.key) if selected is not None else "none"


def recover_interrupted_updates(features_dir: str | os.PathLike) -> list[str]:
    """Settle every feature file of ``features_dir`` whose update was interrupted (one folder listing when
    there are none); one note each. Files being updated right now (locked) and read-only folders are left."""
    from napari_slpd.features.store_writer import _SlideLock

    folder = Path(features_dir)
    try:
        names = [e.name for e in os.scandir(folder) if e.name.endswith(UPDATE_SUFFIX + ".json")
                 or e.name.endswith(UPDATE_SUFFIX)]
    except OSError:
        return []
    notes = []
    for final in sorted({n[: n.index(UPDATE_SUFFIX)] for n in names}):
        path = folder / final
        try:
            lock = _SlideLock(path)
        except (FeatureStoreError, OSError):  # being updated now, or a folder we cannot write
            continue
        try:
            note = _settle_interrupted(path)
        except OSError as exc:
            note = f"{final}: an interrupted update was found but could not be cleared ({exc})"
        finally:
            lock.release()
        if note:
            notes.append(note)
    return notes


@contextlib.contextmanager
def _update_copy(path: Path, what: str):
    """Yield a copy of feature file ``path`` opened "r+"; when the block ends without an error the copy
    replaces the file (synced, then renamed); on an error or a kill the file is unchanged."""
    import shutil
    import uuid

    import h5py

    from napari_slpd.features.store_writer import _SlideLock, _fsync_dir, _fsync_path

    if not path.exists():
        raise FeatureStoreError(f"feature file {path} does not exist; run `slpd extract` for this slide first")
    try:
        lock = _SlideLock(path)
    except OSError as exc:  # a folder we cannot write in
        from napari_slpd.utils.storage import storage_error

        raise (storage_error(exc, path) or FeatureStoreError(f"cannot update {path} ({exc})")) from exc
    copy, record = update_paths(path)
    try:
        _settle_interrupted(path)
        token = uuid.uuid4().hex
        _write_record(record, {"what": what, "token": token, "pid": os.getpid(),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        _update_step("recorded")
        try:
            shutil.copyfile(path, copy)
            _update_step("copied")
            try:
                fh = h5py.File(copy, "r+")
            except OSError as exc:
                raise FeatureStoreError(f"cannot update {path} ({exc}); its copy {copy.name} is not readable") from exc
            try:
                yield fh
                fh.attrs[UPDATE_TOKEN_ATTR] = token
                _update_step("written")
            finally:
                fh.close()
            _fsync_path(copy)
            _update_step("synced")
            os.replace(copy, path)
            _update_step("renamed")
            _fsync_dir(path.parent)
        except BaseException as exc:
            copy.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                from napari_slpd.utils.storage import storage_error

                err = storage_error(exc, path, needed=path.stat().st_size if path.exists() else None,
                                    kept=f"{path.name} is unchanged (the update is made on a copy) and no partial "
                                         "file was left")
                if err is not None:
                    raise err from exc
                raise FeatureStoreError(f"cannot update {path} ({exc}); the file is unchanged") from exc
            raise
        record.unlink(missing_ok=True)
        _update_step("done")
    finally:
        lock.release()


def _write_record(record: Path, info: dict) -> None:
    with atomic_path(record) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _touch(path: Path, before_ns: int) -> None:
    """Make the file's mtime move forward even within the file system's clock resolution (caches compare it)."""
    now = max(time.time_ns(), before_ns + 1_000_000)
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))
    with contextlib.suppress(OSError):  # and its folder's: a session's cohort stamp (Session._cohort_stamp)
        os.utime(path.parent)


def _migrate_handle(h5) -> str:
    """Move a plain ``region_embeddings`` dataset into the versions group (unchanged); returns its key."""
    import h5py

    if VERSIONS_GROUP in h5:
        return _selected_key(h5)
    root = read_attrs(h5)
    key = version_key(root.get("region_encoder", ""), root.get("region_encoder_sha256", ""))
    group = h5.create_group(VERSIONS_GROUP)
    h5.move("region_embeddings", f"{VERSIONS_GROUP}/{key}")
    ds = group[key]
    for name in VERSION_ROOT_ATTRS:
        if name in root:
            ds.attrs[name] = encode_attr(root[name])
    ds.attrs["origin"] = "extraction"
    ds.attrs["label"] = f"{root.get('region_encoder', '?')} (extraction)"
    ds.attrs["created"] = str(root.get("created", "") or "0000-extraction")
    h5["region_embeddings"] = h5py.SoftLink(f"/{VERSIONS_GROUP}/{key}")
    h5.attrs[VERSION_ATTR] = key
    return key


def migrate_store(path: str | os.PathLike) -> bool:
    """Give an unversioned feature file its versions group (its embeddings become the version of the region
    encoder it records; no data changes). Returns True when the file was migrated, False when it already was."""
    path = Path(path)
    if _with_store(path, lambda fh: VERSIONS_GROUP in fh):
        return False
    with _update_copy(path, "migrating its region embeddings into the versions group") as fh:
        if VERSIONS_GROUP in fh:
            return False
        before = path.stat().st_mtime_ns
        _migrate_handle(fh)
    _touch(path, before)
    return True


def _select_in_handle(h5, key: str) -> None:
    import h5py

    group = h5[VERSIONS_GROUP]
    if key not in group:
        raise FeatureStoreError(f"no region embeddings of version {key!r} (have: {', '.join(group)})")
    attrs = read_attrs(group[key])
    if "region_embeddings" in h5 or h5.get("region_embeddings", getlink=True) is not None:
        del h5["region_embeddings"]
    h5["region_embeddings"] = h5py.SoftLink(f"/{VERSIONS_GROUP}/{key}")
    for name in VERSION_ROOT_ATTRS:
        if name in attrs:
            h5.attrs[name] = encode_attr(attrs[name])
        elif name in h5.attrs and name == "region_encoder_checkpoint":
            del h5.attrs[name]
    h5.attrs[VERSION_ATTR] = key


def select_region_embedding_version(path: str | os.PathLike, version: str) -> RegionEmbeddingVersion:
    """Make ``version`` the file's region embeddings (the link and the root attributes; instant)."""
    path = Path(path)
    with _open_for_update(path) as fh:
        key = _resolve_version(fh, version)
        before = path.stat().st_mtime_ns
        if VERSIONS_GROUP not in fh:  # one implicit version, which is selected already
            return _versions_of_handle(fh)[0][0]
        if _selected_key(fh) != key or fh.attrs.get(VERSION_ATTR) != key:
            _select_in_handle(fh, key)
            changed = True
        else:
            changed = False
        versions, _ = _versions_of_handle(fh)
    if changed:
        _touch(path, before)
    return next(v for v in versions if v.key == key)


def add_region_embedding_version(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    region_encoder: str,
    sha256: str = "",
    checkpoint: str | os.PathLike | None = None,
    label: str = "",
    settings: Mapping[str, Any] | None = None,
    select: bool = True,
) -> RegionEmbeddingVersion:
    """Store ``embeddings`` [M, E] as the version of ``region_encoder`` / ``sha256`` (replacing that version
    if it exists) and, with ``select``, make it the selected one. The file's other versions, token grids and
    patch features stay as they are; an unversioned file is migrated first. ``settings``: the extraction
    settings with this encoder (default: the file's, with region_encoder / region_encoder_sha256 replaced)."""
    path = Path(path)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not np.isfinite(emb).all():
        raise FeatureStoreError(f"{path}: the new region embeddings are not finite; nothing was stored")
    with _update_copy(path, f"adding the region embeddings of {region_encoder}") as fh:
        n = int(fh["region_tokens"].shape[0])
        if emb.ndim != 2 or emb.shape[0] != n:
            raise FeatureStoreError(f"{path}: {emb.shape} embeddings for {n} regions")
        if not np.isfinite(emb).all():
            raise FeatureStoreError(f"{path}: the new region embeddings are not finite; nothing was stored")
        before = path.stat().st_mtime_ns
        _migrate_handle(fh)
        root = read_attrs(fh)
        if settings is None:
            settings = _json_dict(root.get("settings"))
            if not settings:
                raise FeatureStoreError(f"{path} does not record its extraction settings; extract it again")
            settings["region_encoder"] = str(region_encoder)
            settings["region_encoder_sha256"] = str(sha256 or "")
        settings = dict(settings)
        key_new = settings_key(settings)
        run_key = settings_key({"settings_key": key_new, **_json_dict(root.get("run_settings"))})
        key = version_key(region_encoder, sha256)
        group = fh[VERSIONS_GROUP]
        if key in group:
            if _selected_key(fh) == key:
                del fh["region_embeddings"]
            del group[key]
        ds = group.create_dataset(key, data=emb, dtype="float32", maxshape=(None, emb.shape[1]),
                                  chunks=(max(1, min(256, 65536 // max(emb.shape[1], 1))), max(emb.shape[1], 1))
                                  if emb.size else None)
        values = {
            "region_encoder": str(region_encoder),
            "region_encoder_sha256": str(sha256 or ""),
            "region_encoder_checkpoint": str(Path(checkpoint).resolve()) if checkpoint else "",
            "settings": json.dumps(settings, sort_keys=True, default=json_default),
            "settings_key": key_new,
            "run_key": run_key,
            "origin": "reencoded",
            "label": label or str(region_encoder),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        for name, value in values.items():
            ds.attrs[name] = value
        if select or "region_embeddings" not in fh:
            previous = str(root.get("region_encoder", ""))
            _select_in_handle(fh, key)
            if previous != str(region_encoder):
                fh.attrs["reencoded_from"] = previous
        versions, _ = _versions_of_handle(fh)
    _touch(path, before)
    return next(v for v in versions if v.key == key)


def _json_dict(value) -> dict:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str) and value:
        try:
            out = json.loads(value)
        except json.JSONDecodeError:
            return {}
        return out if isinstance(out, dict) else {}
    return {}
