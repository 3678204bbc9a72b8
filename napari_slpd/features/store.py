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

Versions of region embeddings (one set per region encoder next to one set of token grids) are described in
:mod:`napari_slpd.features.store_versions`; writing in :mod:`napari_slpd.features.store_writer`; the
layout's constants and keys in :mod:`napari_slpd.features.store_format`. Every public name of the three is
importable from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np

from napari_slpd.errors import FeatureStoreError
from napari_slpd.features.store_format import (FORMAT_VERSION, PARTIAL_SUFFIX, REQUIRED_DATASETS, TOKEN_DTYPES,
                                                 partial_path_for, read_store_attrs, settings_key)
from napari_slpd.features.store_versions import (VERSION_ATTR, VERSION_ROOT_ATTRS, VERSIONS_GROUP,
                                                   RegionEmbeddingVersion, _selected_key, _versions_of_handle,
                                                   add_region_embedding_version, load_region_embeddings,
                                                   migrate_store, region_embedding_versions,
                                                   select_region_embedding_version, version_key)
from napari_slpd.features.store_writer import (FeatureStoreWriter, RegionChunk, StoreLayout,
                                               describe_settings_difference, existing_store_is_current,
                                               write_store)
from napari_slpd.utils.h5_attrs import read_attrs

log = logging.getLogger(__name__)

__all__ = [  # the feature file's whole API, from one place
    "FORMAT_VERSION", "PARTIAL_SUFFIX", "REQUIRED_DATASETS", "TOKEN_DTYPES", "VERSIONS_GROUP", "VERSION_ATTR",
    "VERSION_ROOT_ATTRS", "FeatureStore", "FeatureStoreWriter", "RegionChunk", "RegionEmbeddingVersion",
    "StoreLayout", "add_region_embedding_version", "describe_settings_difference", "existing_store_is_current",
    "load_region_embeddings", "migrate_store", "partial_path_for", "read_store_attrs", "region_embedding_versions",
    "select_region_embedding_version", "settings_key", "version_key", "write_store",
]


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
