"""How every HDF5 cache of the project stores attributes: h5py takes neither None nor nested containers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def json_default(value):
    """JSON for the numpy scalars, arrays and paths that settings and attributes contain."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def encode_attr(value):
    """None -> "", dicts/lists/tuples -> JSON text, paths -> str; everything else as h5py takes it."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=json_default)
    if isinstance(value, Path):
        return str(value)
    return value


def decode_attr(value):
    """Python values back from what h5py returns (bytes, numpy scalars, arrays of strings)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_attrs(obj) -> dict:
    """All attributes of an h5py file, group or dataset, decoded."""
    return {key: decode_attr(obj.attrs[key]) for key in obj.attrs.keys()}
