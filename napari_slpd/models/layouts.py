"""Which published layout a checkpoint path is in, and what a state dict looks like it was made for.

Publishers ship weights in a handful of layouts: a single weights file (``pytorch_model.bin``, ``.pth``,
``.safetensors``, sometimes wrapped as ``{'model': ...}`` or ``{'state_dict': ...}``), a timm hub folder
(``config.json`` with ``architecture`` + weights), a transformers folder (``config.json`` with
``model_type`` + weights) or an open_clip hub folder (``open_clip_config.json`` + weights). A user gives
the folder or a file in it; :func:`locate_checkpoint` finds the weights and the config.

When weights do not fit the chosen preset, :func:`identify_state_dict` says what they look like (a
transformers DINOv2, CONCH's CoCa, a ViT-L/16 with layer scale, ...) and which presets would take them, so
the error names the right ``--encoder`` instead of listing keys.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from napari_slpd.errors import CheckpointError

__all__ = ["CheckpointSource", "locate_checkpoint", "StateDictIdentity", "identify_state_dict",
           "identify_folder", "WEIGHT_FILE_NAMES"]

# weights a folder may hold, most specific first
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                     "open_clip_pytorch_model.bin", "pytorch_model_vision.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


@dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint path resolved to its weights file and, for folders, its config."""

    given: Path                       # what the user gave (file or folder)
    weights: Path | None              # the weights file (a sharded transformers folder: its index)
    layout: str                       # "weights_file" | "timm_folder" | "transformers_folder" | "open_clip_folder"
    folder: Path                      # the folder holding the weights (and config)
    config: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.layout == "transformers_folder":
            kind = self.config.get("model_type", "?")
            archs = ", ".join(self.config.get("architectures") or []) or "no architectures listed"
            return f"a transformers folder (model_type {kind!r}, {archs})"
        if self.layout == "timm_folder":
            return f"a timm hub folder (architecture {self.config.get('architecture')!r})"
        if self.layout == "open_clip_folder":
            return "an open_clip hub folder (open_clip_config.json)"
        return f"a single weights file ({self.weights.name})" if self.weights else "a weights file"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _folder_weights(folder: Path) -> Path | None:
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return found[0] if len(found) == 1 else None


def locate_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Resolve a checkpoint file or folder; raise :class:`CheckpointError` saying what is missing."""
    given = Path(path).expanduser()
    if not given.exists():
        raise CheckpointError(f"checkpoint {given} does not exist; give a local weights file or the folder "
                              "you downloaded the model into (nothing is downloaded at run time)")
    folder = given if given.is_dir() else given.parent
    weights = given if given.is_file() else _folder_weights(given)
    if given.is_file() and given.suffix not in _WEIGHT_SUFFIXES and given.name != "config.json":
        raise CheckpointError(f"{given} is not a weights file (expected one of {', '.join(_WEIGHT_SUFFIXES)})")
    if given.is_file() and given.name == "config.json":
        weights = _folder_weights(folder)
    config_path, open_clip_config = folder / "config.json", folder / "open_clip_config.json"
    if open_clip_config.is_file():
        return CheckpointSource(given, weights, "open_clip_folder", folder, _read_json(open_clip_config))
    if config_path.is_file():
        config = _read_json(config_path)
        if "architecture" in config:  # timm hub layout (pretrained_cfg + architecture)
            return CheckpointSource(given, weights, "timm_folder", folder, config)
        if "model_type" in config or "architectures" in config:
            index = next((folder / name for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                          if (folder / name).is_file()), None)
            if weights is None and index is None:
                raise CheckpointError(f"{folder} has a transformers config.json but no weights "
                                      f"(expected model.safetensors or pytorch_model.bin beside it)")
            weights = weights or index  # sharded weights are identified by their index
            return CheckpointSource(given, weights, "transformers_folder", folder, config)
    if weights is None:
        names = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        raise CheckpointError(f"no weights file found in {folder} (it holds: {names}); expected one of "
                              f"{', '.join(WEIGHT_FILE_NAMES)} or a single *.pth / *.bin / *.safetensors")
    return CheckpointSource(given, weights, "weights_file", folder, {})


# ------------------------------------------------------------------------------------- what is this state dict


@dataclass(frozen=True)
class StateDictIdentity:
    """What a state dict looks like it was made for."""

    family: str                                  # "timm_vit", "transformers_vit", "conch_coca", ...
    description: str                             # "a timm ViT (width 1024, patch 16, layer scale, 24 blocks)"
    presets: tuple[str, ...] = ()                # presets that would take it
    signature: Mapping[str, Any] = field(default_factory=dict)


def _count_blocks(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def vit_signature(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Width, patch size, register tokens, SwiGLU and layer scale of a timm-named ViT state dict."""
    if "patch_embed.proj.weight" not in state_dict or "blocks.0.attn.qkv.weight" not in state_dict:
        return None
    width = int(state_dict["patch_embed.proj.weight"].shape[0])
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    fc2 = state_dict.get("blocks.0.mlp.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    reg = state_dict.get("reg_token")
    return {"width": width, "patch": int(state_dict["patch_embed.proj.weight"].shape[-1]),
            "reg_tokens": int(reg.shape[1]) if reg is not None else 0, "swiglu": bool(swiglu),
            "layer_scale": "blocks.0.ls1.gamma" in state_dict,
            "depth": _count_blocks(state_dict, r"blocks\.(\d+)\.")}


def _describe_vit(sig: Mapping[str, Any]) -> str:
    parts = [f"width {sig['width']}", f"patch {sig['patch']}"]
    if sig["reg_tokens"]:
        parts.append(f"{sig['reg_tokens']} register tokens")
    if sig["swiglu"]:
        parts.append("SwiGLU MLP")
    if sig["layer_scale"]:
        parts.append("layer scale")
    parts.append(f"{sig['depth']} blocks")
    return "a timm ViT (" + ", ".join(parts) + ")"


def _matching_vit_presets(sig: Mapping[str, Any]) -> tuple[str, ...]:
    from napari_slpd.models.presets import PRESETS

    found = []
    for preset in PRESETS.values():
        if preset.family == "hipt" and sig["width"] == 384 and sig["patch"] == 16 and not sig["reg_tokens"]:
            found.append(preset.name)
        if preset.family != "timm":
            continue
        other = preset_vit_signature(preset.name)
        if other and all(other[k] == sig[k] for k in ("width", "patch", "reg_tokens", "swiglu", "layer_scale")):
            found.append(preset.name)
    return tuple(found)


_PRESET_SIGNATURES: dict[str, dict[str, Any] | None] = {}


def preset_vit_signature(name: str) -> dict[str, Any] | None:
    """The ViT signature of a timm preset, from a model built on the meta device (no memory, no time)."""
    if name not in _PRESET_SIGNATURES:
        from napari_slpd.models.timm_build import create_timm_model
        from napari_slpd.models.presets import get_preset

        with torch.device("meta"):
            model = create_timm_model(get_preset(name), {"weight_init": "skip"})
        _PRESET_SIGNATURES[name] = vit_signature(model.state_dict())
    return _PRESET_SIGNATURES[name]


def identify_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDictIdentity:
    """Say what a (prefix-stripped) state dict was made for, and which presets take it."""
    keys = list(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("visual.trunk.") and has("text."):
        if has("visual.attn_pool_contrast") or has("visual.attn_pool"):
            return StateDictIdentity("conch_coca", "CONCH's CoCa (image and text towers)", ("conch_v1",))
        return StateDictIdentity("open_clip_timm", "an open_clip model with a timm image tower", ())
    if has("trunk.") and has("attn_pool_contrast"):
        return StateDictIdentity("conch_v15", "CONCH v1.5's image tower (TITAN's patch encoder)", ("conch_v15",))
    if has("vision_model.") and has("text_model."):
        return StateDictIdentity("transformers_clip", "a transformers CLIPModel (e.g. PLIP)", ("plip",))
    if has("visual.") and (has("transformer.resblocks") or has("token_embedding")):
        return StateDictIdentity("open_clip", "an open_clip CLIP model (e.g. QuiltNet)", ("quiltnet",))
    if has("embeddings.patch_embeddings.projection") or has("encoder.layer.0."):
        registers = "embeddings.register_tokens" in state_dict
        dinov2 = has("encoder.layer.0.layer_scale1") or "embeddings.mask_token" in state_dict
        width = int(state_dict["embeddings.cls_token"].shape[-1]) if "embeddings.cls_token" in state_dict else 0
        depth = _count_blocks(keys, r"encoder\.layer\.(\d+)\.")
        if registers:
            kind, presets = "Dinov2WithRegistersModel", ("hibou_b",) if width == 768 else ("hibou_l",)
        elif dinov2:
            kind = "Dinov2Model"
            presets = {1024: ("phikon_v2",), 1536: ("midnight",)}.get(width, ("phikon_v2", "midnight"))
        else:
            kind, presets = "ViTModel", ("phikon",)
        return StateDictIdentity("transformers_vit", f"transformers {kind} weights (width {width}, {depth} "
                                 "layers)", presets, {"width": width, "depth": depth})
    if has("layers.0.blocks.0.attn.relative_position_bias_table"):
        conv_stem = "patch_embed.proj.0.weight" in state_dict
        return StateDictIdentity("swin", "a Swin transformer" + (" with a convolutional stem (CTransPath)"
                                                                 if conv_stem else ""),
                                 ("ctranspath",) if conv_stem else ())
    sig = vit_signature(state_dict)
    if sig is not None:
        return StateDictIdentity("timm_vit", _describe_vit(sig), _matching_vit_presets(sig), sig)
    shown = ", ".join(keys[:5])
    return StateDictIdentity("unknown", f"an unrecognised state dict ({len(keys)} tensors: {shown}, ...)")


def identify_folder(source: CheckpointSource) -> tuple[str, tuple[str, ...]]:
    """What a folder's config says it is, and the presets that take it (from the config alone)."""
    config = source.config
    if source.layout == "transformers_folder":
        model_type = config.get("model_type")
        width = config.get("hidden_size")
        if model_type == "vit":
            return source.describe(), ("phikon",)
        if model_type in ("dinov2", "dinov2_with_registers"):
            if config.get("num_register_tokens") or model_type == "dinov2_with_registers":
                return source.describe(), ("hibou_b",) if width == 768 else ("hibou_l",)
            return source.describe(), {1024: ("phikon_v2",), 1536: ("midnight",)}.get(width, ("phikon_v2",))
        if model_type == "clip":
            return source.describe(), ("plip",)
        return source.describe(), ()
    if source.layout == "timm_folder":
        from napari_slpd.models.presets import PRESETS

        arch = config.get("architecture")
        return source.describe(), tuple(p.name for p in PRESETS.values() if p.architecture == arch)
    if source.layout == "open_clip_folder":
        return source.describe(), ("quiltnet", "biomedclip")
    return source.describe(), ()
