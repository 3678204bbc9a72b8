"""Region features: extraction engine, per-slide feature cache, and import of CLAM/TRIDENT patch features.

``extract_slide`` turns a slide into region token grids [M, D, G, G] and region embeddings [M, E] and
writes them, chunk by chunk and resumably, into a :class:`FeatureStore` (one HDF5 file per slide in the
CLAM/TRIDENT patch layout plus region datasets). ``import_patch_features`` builds the same from patch
features other tools computed (UNI, CONCH, ...). Nothing here imports torch until a model runs.
"""

from napari_slpd.features.engine import (
    ExtractionConfig,
    ExtractionResult,
    extract_slide,
    extraction_settings,
    sequential_extract,
)
from napari_slpd.features.import_h5 import ImportResult, assemble_regions, import_patch_features, read_patch_features
from napari_slpd.features.store import (
    FeatureStore,
    FeatureStoreWriter,
    RegionChunk,
    StoreLayout,
    existing_store_is_current,
    partial_path_for,
    read_store_attrs,
    settings_key,
)

__all__ = [
    "ExtractionConfig",
    "ExtractionResult",
    "extract_slide",
    "extraction_settings",
    "sequential_extract",
    "FeatureStore",
    "FeatureStoreWriter",
    "RegionChunk",
    "StoreLayout",
    "existing_store_is_current",
    "partial_path_for",
    "read_store_attrs",
    "settings_key",
    "ImportResult",
    "assemble_regions",
    "import_patch_features",
    "read_patch_features",
]
