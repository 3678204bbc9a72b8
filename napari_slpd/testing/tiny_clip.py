"""A tiny open_clip vision-language model with random weights, for tests and demos.

The real pathology VLMs (CONCH: open_clip CoCa ViT-B/16; PLIP, QuiltNet: CLIP ViT-B/32) cannot be
downloaded here, so tests build a model of the same family, small enough to run in milliseconds on a CPU,
register its architecture with open_clip's model-config mechanism, and save its ``state_dict`` in
open_clip's checkpoint format. Loading it back goes through exactly the code path a user's checkpoint
takes (``napari_slpd.models.open_clip_loader.load_open_clip(name, path)``).

The tokenizer is the real one: open_clip's ``SimpleTokenizer`` with the BPE vocabulary bundled in the
open_clip wheel (49408 tokens), so text handling is not faked.

Usage::

    from napari_slpd.testing.tiny_clip import write_tiny_clip
    tiny = write_tiny_clip(tmp_path)                 # registers "slpd-tiny-clip", writes the checkpoint
    bundle = load_open_clip(tiny.model_name, tiny.checkpoint, model_cfg=tiny.model_cfg)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

TINY_CLIP_NAME = "slpd-tiny-clip"
TINY_COCA_NAME = "slpd-tiny-coca"

_REGISTER_LOCK = threading.Lock()
_REGISTERED: dict[str, str] = {}  # model name -> hash of the registered config


def tiny_clip_config(embed_dim: int = 32, image_size: int = 32, patch_size: int = 16, width: int = 64,
                     layers: int = 2, heads: int = 2, context_length: int = 77) -> dict:
    """A CLIP ViT config in open_clip's JSON schema (same keys as ViT-B-32.json, tiny sizes)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,  # the bundled BPE vocabulary: the real tokenizer must fit the embedding table
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def tiny_coca_config(embed_dim: int = 32, image_size: int = 32, patch_size: int = 16, width: int = 64,
                     layers: int = 2, heads: int = 2, context_length: int = 76) -> dict:
    """A CoCa config (the CONCH family) in open_clip's JSON schema, tiny sizes: the CLIP config plus an
    attentional pooler, token outputs and a one-layer multimodal decoder."""
    cfg = tiny_clip_config(embed_dim, image_size, patch_size, width, layers, heads, context_length)
    cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_heads=heads, output_tokens=True)
    cfg["text_cfg"].update(embed_cls=True, output_tokens=True)
    cfg["multimodal_cfg"] = {
        "context_length": context_length,
        "vocab_size": cfg["text_cfg"]["vocab_size"],
        "width": width,
        "heads": heads,
        "layers": 1,
        "attn_pooler_heads": heads,
    }
    cfg["custom_text"] = True
    return cfg


def register_open_clip_config(model_name: str, model_cfg: dict, config_dir: str | os.PathLike) -> Path:
    """Register ``model_cfg`` under ``model_name`` with open_clip (``open_clip.add_model_config``).

    open_clip keeps a process-wide registry filled from JSON files; the config is written to
    ``config_dir/<model_name>.json`` and that file is added. Registering the same name again with the
    same config is a no-op; with a different config it replaces the entry (the newest file wins).
    """
    import open_clip

    config_dir = Path(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / f"{model_name}.json"
    text = json.dumps(model_cfg, indent=2, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    with _REGISTER_LOCK:
        path.write_text(text, encoding="utf-8")
        if _REGISTERED.get(model_name) != digest or model_name not in open_clip.list_models():
            open_clip.add_model_config(path)
            _REGISTERED[model_name] = digest
    return path


@dataclass(frozen=True)
class TinyClip:
    model_name: str      # registered open_clip architecture name
    model_cfg: dict      # the architecture (open_clip JSON schema)
    checkpoint: Path     # state_dict saved with torch.save (open_clip's checkpoint format)
    config_path: Path    # the registered JSON file
    embed_dim: int
    image_size: int


def write_tiny_clip(folder: str | os.PathLike, kind: str = "clip", seed: int = 0, model_name: str | None = None,
                    wrap_state_dict: bool = False, **cfg_kwargs) -> TinyClip:
    """Create a tiny CLIP (``kind="clip"``) or CoCa (``kind="coca"``) with random weights and save it.

    ``wrap_state_dict=True`` saves ``{"state_dict": ...}`` (the layout of open_clip training checkpoints)
    instead of the bare state dict (the layout of released weights); open_clip loads both.
    Deterministic for a given ``seed``.
    """
    import open_clip
    import torch

    if kind == "clip":
        cfg = tiny_clip_config(**cfg_kwargs)
        name = model_name or TINY_CLIP_NAME
    elif kind == "coca":
        cfg = tiny_coca_config(**cfg_kwargs)
        name = model_name or TINY_COCA_NAME
    else:
        raise ValueError(f"kind must be 'clip' or 'coca', not {kind!r}")
    folder = Path(folder)
    config_path = register_open_clip_config(name, cfg, folder / "open_clip_configs")

    # Random init must not depend on (or disturb) the global RNG state of the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = folder / f"{name}.pt"
    torch.save({"state_dict": state} if wrap_state_dict else state, checkpoint)
    return TinyClip(
        model_name=name,
        model_cfg=copy.deepcopy(cfg),
        checkpoint=checkpoint,
        config_path=config_path,
        embed_dim=int(cfg["embed_dim"]),
        image_size=int(cfg["vision_cfg"]["image_size"]),
    )
