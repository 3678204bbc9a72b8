"""The per-slide feature cache: one HDF5 file holding patch features and region token grids.

Layout (docs/ARCHITECTURE.md, "Features")::

    features          [N, D] float32   patch features (CLAM/TRIDENT layout; optional)
    coords            [N, 2] int64     level-0 top-left of each patch; attrs patch_size, patch_level, ...
    region_tokens     [M, D, G, G]     float16 or float32 token grid of each region
    region_embeddings [M, E] float32   region encoder output
    region_coords     [M, 2] int64     level-0 top-left of each region
    region_coverage   [M] float32      tissue fraction (extraction) or patch coverage (import) of each region
    _resume/ends, _resume/sha256       chunk bookkeeping used to resume and to verify finished chunks

Writing goes to ``<final>.partial`` chunk by chunk (the file is opened, appended to and closed for each
chunk, so a killed process leaves at most the chunk it was writing unfinished). Every finished chunk is
recorded with the sha256 of its rows; a later run with the same settings verifies them, drops anything
after the last verified chunk and goes on from there. When all regions are written the file is marked
``complete`` and renamed onto its final name, atomically.

Two keys decide what may be reused. ``settings_key`` hashes everything that changes what the features
mean (models and their checkpoints, region and patch size, um/px, tissue parameters, ...): a complete
file with the same key is up to date, one with another key is never overwritten without ``overwrite``.
``run_key`` adds what changes the exact numbers (numeric precision, code version): a partial file is only
resumed when it matches, so one slide's regions never mix two precisions.

Versions of region embeddings
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

```python
from napari_slpd.features.store import (load_region_embeddings, region_embedding_versions,
    add_region_embedding_version, select_region_embedding_version, version_key)
region_embedding_versions(store_or_path) -> [RegionEmbeddingVersion(key, region_encoder, sha256, checkpoint,
                                              dim, origin, label, created, settings_key, selected)]
load_region_embeddings(store_or_path, version=None) -> [M, E] float32   # None: the selected version
add_region_embedding_version(path, embeddings, region_encoder=model_id, sha256=..., checkpoint=..., select=True)
select_region_embedding_version(path, key)   # instant; the cohort-wide switch is features.versions
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from napari_slpd.errors import FeatureStoreError
from napari_slpd.utils.h5_attrs import encode_attr, json_default, read_attrs

log = logging.getLogger(__name__)

# Bumped whenever the file layout or the meaning of a dataset changes: part of every settings_key.
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
TOKEN_DTYPES = ("float16", "float32")
REQUIRED_DATASETS = ("region_tokens", "region_embeddings", "region_coords")


def settings_key(settings: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able settings mapping (key order does not matter)."""
    canonical = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=json_default)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def partial_path_for(final_path: str | os.PathLike) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(final_path.name + PARTIAL_SUFFIX)


# -- reading ----------------------------------------------------------------------------------------------


def read_store_attrs(path: str | os.PathLike) -> dict:
    """Root attributes of a feature file (complete or partial) without validating it.

    Raises FeatureStoreError when the file is missing or not readable HDF5.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FeatureStoreError(f"feature file {path} does not exist")
    try:
        with h5py.File(path, "r") as fh:
            return read_attrs(fh)
    except OSError as exc:
        raise FeatureStoreError(
            f"feature file {path} is damaged or not an HDF5 file ({exc}); delete it and extract again"
        ) from exc


class FeatureStore:
    """Read access to one slide's complete feature file. Large arrays stay on disk until indexed.

    ``region_embeddings``, ``region_coords`` and ``region_coverage`` are loaded (small); ``region_tokens``
    and ``features`` are h5py datasets read lazily (``store.region_tokens[i]`` reads one region).
    """

    def __init__(self, path: Path, handle):
        self.path = path
        self._h5 = handle
        self.attrs: dict = read_attrs(handle)
        if VERSIONS_GROUP in handle:
            # The linked version is what readers get: its attributes win over the root's (which a switch
            # interrupted between the link and the attributes would have left behind).
            key = _selected_key(handle)
            if key in handle[VERSIONS_GROUP]:
                version_attrs = read_attrs(handle[VERSIONS_GROUP][key])
                self.attrs.update({k: version_attrs[k] for k in VERSION_ROOT_ATTRS if k in version_attrs})
                self.attrs[VERSION_ATTR] = key
        self._embeddings: np.ndarray | None = None
        self._region_coords: np.ndarray | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expect_token_dim: int | None = None,
        expect_embed_dim: int | None = None,
    ) -> "FeatureStore":
        """Open a complete feature file. ``expect_*_dim`` check that the file fits the model at hand."""
        import h5py

        path = Path(path)
        if not path.exists():
            partial = partial_path_for(path)
            if partial.exists():
                raise FeatureStoreError(
                    f"feature extraction of {path.stem} did not finish ({partial.name} holds the regions done "
                    "so far); run `slpd extract` again with the same settings to resume it"
                )
            raise FeatureStoreError(f"feature file {path} does not exist; run `slpd extract` for this slide first")
        if path.name.endswith(PARTIAL_SUFFIX):
            raise FeatureStoreError(
                f"{path} is an unfinished extraction; run `slpd extract` again with the same settings to finish it"
            )
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise FeatureStoreError(
                f"feature file {path} is damaged or not an HDF5 file ({exc}); delete it and extract again"
            ) from exc
        try:
            store = cls(path, handle)
            store._validate(expect_token_dim, expect_embed_dim)
        except BaseException:
            handle.close()
            raise
        return store

    def _validate(self, expect_token_dim: int | None, expect_embed_dim: int | None) -> None:
        h5, path = self._h5, self.path
        if not bool(self.attrs.get("complete", False)):
            raise FeatureStoreError(
                f"feature file {path} is marked incomplete; run `slpd extract` again with the same settings"
            )
        missing = [name for name in REQUIRED_DATASETS if name not in h5]
        if missing:
            raise FeatureStoreError(
                f"feature file {path} lacks {', '.join(missing)}: it is not a napari-slpd feature file "
                "(import CLAM/TRIDENT patch features with `slpd import-features`)"
            )
        tokens, emb, rc = h5["region_tokens"], h5["region_embeddings"], h5["region_coords"]
        if tokens.ndim != 4 or tokens.shape[2] != tokens.shape[3]:
            raise FeatureStoreError(f"{path}: region_tokens has shape {tokens.shape}, expected [M, D, G, G]")
        if emb.ndim != 2 or rc.ndim != 2 or rc.shape[1] != 2:
            raise FeatureStoreError(
                f"{path}: region_embeddings {emb.shape} / region_coords {rc.shape} are not [M, E] / [M, 2]"
            )
        if not tokens.shape[0] == emb.shape[0] == rc.shape[0]:
            raise FeatureStoreError(
                f"{path}: region counts disagree (tokens {tokens.shape[0]}, embeddings {emb.shape[0]}, "
                f"coords {rc.shape[0]}); the file is damaged, extract it again"
            )
        recorded = self.attrs.get("n_regions")
        if recorded is not None and int(recorded) != tokens.shape[0]:
            raise FeatureStoreError(
                f"{path}: holds {tokens.shape[0]} regions but records {recorded}; the file is damaged"
            )
        if "features" in h5:
            feats = h5["features"]
            if feats.ndim != 2 or "coords" not in h5 or h5["coords"].shape != (feats.shape[0], 2):
                raise FeatureStoreError(
                    f"{path}: patch features {feats.shape} do not match patch coords "
                    f"{h5['coords'].shape if 'coords' in h5 else 'missing'}"
                )
            if feats.shape[1] != tokens.shape[1]:
                raise FeatureStoreError(
                    f"{path}: patch features are {feats.shape[1]}-d but region tokens {tokens.shape[1]}-d"
                )
        if expect_token_dim is not None and tokens.shape[1] != expect_token_dim:
            raise FeatureStoreError(
                f"{path} holds {tokens.shape[1]}-d tokens (patch encoder {self.attrs.get('patch_encoder')!r}) "
                f"but {expect_token_dim}-d are needed; extract with the matching patch encoder"
            )
        if expect_embed_dim is not None and emb.shape[1] != expect_embed_dim:
            raise FeatureStoreError(
                f"{path} holds {emb.shape[1]}-d region embeddings (region encoder "
                f"{self.attrs.get('region_encoder')!r}) but {expect_embed_dim}-d are needed"
            )

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id", self.path.stem))

    @property
    def settings_key(self) -> str:
        return str(self.attrs.get("settings_key", ""))

    @property
    def region_size_level0(self) -> float:
        return float(self.attrs["region_size_level0"])

    @property
    def n_regions(self) -> int:
        return int(self._h5["region_tokens"].shape[0])

    @property
    def token_dim(self) -> int:
        return int(self._h5["region_tokens"].shape[1])

    @property
    def grid_size(self) -> int:
        return int(self._h5["region_tokens"].shape[2])

    @property
    def embed_dim(self) -> int:
        return int(self._h5["region_embeddings"].shape[1])

    # -- data ------------------------------------------------------------------------------------------
    @property
    def region_tokens(self):
        return self._h5["region_tokens"]

    @property
    def region_embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.asarray(self._h5["region_embeddings"][()], dtype=np.float32)
        return self._embeddings

    @property
    def region_coords(self) -> np.ndarray:
        if self._region_coords is None:
            self._region_coords = np.asarray(self._h5["region_coords"][()], dtype=np.int64)
        return self._region_coords

    @property
    def region_coverage(self) -> np.ndarray | None:
        return np.asarray(self._h5["region_coverage"][()], np.float32) if "region_coverage" in self._h5 else None

    @property
    def features(self):
        """[N, D] patch features (h5py dataset) or None when the file was written without them."""
        return self._h5["features"] if "features" in self._h5 else None

    @property
    def coords(self) -> np.ndarray | None:
        return np.asarray(self._h5["coords"][()], np.int64) if "coords" in self._h5 else None

    @property
    def coords_attrs(self) -> dict:
        return read_attrs(self._h5["coords"]) if "coords" in self._h5 else {}

    @property
    def region_embedding_version(self) -> str:
        """Key of the selected version of the region embeddings (see the module docstring)."""
        return _versions_of_handle(self._h5)[1]

    def region_embedding_versions(self) -> list["RegionEmbeddingVersion"]:
        return _versions_of_handle(self._h5)[0]

    def load_region_embeddings(self, version: str | None = None) -> np.ndarray:
        """[M, E] region embeddings of ``version`` (None: the selected one)."""
        if version is None:
            return self.region_embeddings
        return load_region_embeddings(self, version)

    def tokens(self, indices=None, dtype=np.float32) -> np.ndarray:
        """Token grids [k, D, G, G] of the given regions (all when None), as ``dtype``."""
        ds = self._h5["region_tokens"]
        if indices is None:
            return np.asarray(ds[()], dtype=dtype)
        indices = np.asarray(indices, dtype=np.int64)
        # h5py fancy indexing needs increasing unique indices: read sorted, then restore the order asked.
        order = np.argsort(indices, kind="stable")
        unique, inverse = np.unique(indices[order], return_inverse=True)
        rows = np.asarray(ds[unique.tolist()], dtype=dtype) if unique.size else np.empty((0, *ds.shape[1:]), dtype)
        out = np.empty((indices.size, *ds.shape[1:]), dtype)
        out[order] = rows[inverse]
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._h5.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, regions={self.n_regions}, tokens=[{self.token_dim}, "
            f"{self.grid_size}, {self.grid_size}], embed_dim={self.embed_dim})"
        )


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
    if isinstance(store_or_path, FeatureStore):
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


def _touch(path: Path, before_ns: int) -> None:
    """Make the file's mtime move forward even within the file system's clock resolution (caches compare it)."""
    now = max(time.time_ns(), before_ns + 1_000_000)
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


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
    with _open_for_update(path) as fh:
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
    with _open_for_update(path) as fh:
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

    Two processes extracting one slide into one cohort (two shells, a GUI and a CLI) would otherwise
    append to the same partial file. flock is released by the kernel when a process dies, so a killed
    run never leaves a stale lock behind. Without fcntl (Windows) there is no lock.
    """

    def __init__(self, final_path: Path):
        self.path = final_path.with_name(f".{final_path.name}.lock")
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise FeatureStoreError(
                f"another process is writing the features of {final_path.stem} ({self.path.name} is locked); "
                "wait for it to finish or stop it"
            ) from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(fd)  # closing drops the flock


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
