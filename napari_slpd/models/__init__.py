"""Models: HIPT's ViT-256 / ViT-4K, safe checkpoint loading, and pluggable patch / region encoders.

``open_clip_loader`` is imported on use (open_clip is slow to import and only some workflows need it).
"""

from napari_slpd.models.checkpoints import LoadReport, load_dino_checkpoint, read_checkpoint, save_dino_checkpoint
from napari_slpd.models.encoders import (ModelCard, PatchEncoder, RegionEncoder, build_patch_encoder,
                                         build_region_encoder, resolve_device)
from napari_slpd.models.vit import VisionTransformer, VisionTransformer4K, vit4k_xs, vit256_small

__all__ = [
    "LoadReport",
    "ModelCard",
    "PatchEncoder",
    "RegionEncoder",
    "VisionTransformer",
    "VisionTransformer4K",
    "build_patch_encoder",
    "build_region_encoder",
    "load_dino_checkpoint",
    "read_checkpoint",
    "resolve_device",
    "save_dino_checkpoint",
    "vit256_small",
    "vit4k_xs",
]
