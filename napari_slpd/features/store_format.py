"""The feature file's layout constants and keys: the format version, the partial-file name, what a
complete file must hold, the settings key, and reading a file's attributes without opening it as a store."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping


from napari_slpd.errors import FeatureStoreError
from napari_slpd.utils.h5_attrs import json_default, read_attrs

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
