"""The vision-language patch-encoder presets (CONCH v1/v1.5, PLIP, QuiltNet, BiomedCLIP) as patch encoders.

Each preset is a plain dict (see :data:`napari_slpd.models.conch.CONCH_PRESETS` and
:data:`napari_slpd.models.pathology_clip.CLIP_PRESETS`) whose ``builder`` is the import path of
``builder(checkpoint, seed, allow_pickle) -> nn.Module`` (normalised [B, 3, S, S] -> [B, dim]).
:func:`preset_patch_encoder` turns one into a :class:`~napari_slpd.models.encoders.PatchEncoder` recording
``model_id = "<name> (<weights file> sha256:<12 hex>)"``, the spec ProAlign checks cached features against.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from napari_slpd.errors import SlpdError
from napari_slpd.models.vlm_layouts import resolve_weights_file

__all__ = ["VLM_IMAGE_PRESETS", "import_builder", "preset_weights_file", "preset_model_id", "preset_patch_encoder"]


def _presets() -> dict[str, dict[str, Any]]:
    from napari_slpd.models.conch import CONCH_PRESETS
    from napari_slpd.models.pathology_clip import CLIP_PRESETS

    return {p["name"]: p for p in CONCH_PRESETS + CLIP_PRESETS}


VLM_IMAGE_PRESETS: dict[str, dict[str, Any]] = _presets()


def import_builder(path: str) -> Callable[..., torch.nn.Module]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def preset_weights_file(preset: dict[str, Any], checkpoint: str | os.PathLike) -> Path:
    """The file whose sha256 identifies the preset's weights (the checkpoint itself, or its weights file)."""
    return resolve_weights_file(checkpoint, tuple(preset["weight_names"]), preset["title"])


def preset_model_id(preset: dict[str, Any], checkpoint: str | os.PathLike | None, seed: int = 0
                    ) -> tuple[str, str | None]:
    """(model_id, sha256) the features engine records for this preset and checkpoint."""
    from napari_slpd.utils.files import sha256_file

    if checkpoint is None:
        return f"{preset['name']} (random-init seed {seed})", None
    weights = preset_weights_file(preset, checkpoint)
    sha = sha256_file(weights)
    return f"{preset['name']} ({weights.name} sha256:{sha[:12]})", sha


def preset_patch_encoder(name: str, checkpoint: str | os.PathLike | None, device: str | torch.device = "auto",
                         seed: int = 0, allow_pickle: bool = False):
    """The preset's image tower as a PatchEncoder with the preset's input size, mean/std and interpolation."""
    from napari_slpd.models.encoders import build_patch_encoder

    if name not in VLM_IMAGE_PRESETS:
        raise SlpdError(f"unknown vision-language preset {name!r}; use one of {', '.join(VLM_IMAGE_PRESETS)}")
    return build_patch_encoder(name, checkpoint=checkpoint, device=device, seed=seed, allow_pickle=allow_pickle)
