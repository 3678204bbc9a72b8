"""Which published layout a local checkpoint is in, and where its weights file lies.

Pathology vision-language models come in a handful of published layouts:

- CONCH v1 (MahmoodLab/CONCH): one ``pytorch_model.bin`` holding a CoCa state dict (``visual.trunk.*``,
  ``visual.attn_pool_contrast.*``, ``text.cls_emb``, ``text_decoder.*``);
- CONCH v1.5 (MahmoodLab/conchv1_5): ``pytorch_model_vision.bin`` with ``trunk.*`` and an attentional pooler
  (``attn_pool_contrast.to_kv``);
- PLIP (vinid/plip): a transformers ``CLIPModel`` folder (``config.json`` + weights + tokenizer files);
- QuiltNet (wisdomik/QuiltNet-B-32), BiomedCLIP: open_clip hub folders (``open_clip_config.json`` +
  ``open_clip_pytorch_model.bin``), BiomedCLIP with a PubMedBERT text tower (``text.transformer.*``).

:func:`describe_checkpoint` names the layout of a file or folder from its config files and key names, so a
checkpoint given to the wrong loader gets "this is a CONCH CoCa checkpoint: use --vlm conch_v1" rather than a
list of missing keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from napari_slpd.errors import CheckpointError

__all__ = ["LayoutGuess", "describe_checkpoint", "describe_keys", "resolve_weights_file", "wrong_layout_hint"]


class LayoutGuess(tuple):
    """(preset name or "", human description): what a checkpoint looks like."""

    __slots__ = ()

    def __new__(cls, preset: str, what: str):
        return super().__new__(cls, (preset, what))

    preset = property(lambda self: self[0])
    what = property(lambda self: self[1])


def _has(keys: Iterable[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def describe_keys(keys: Iterable[str]) -> LayoutGuess | None:
    """Name the published layout of a state dict from its key names (None if nothing familiar)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    if _has(keys, "visual.trunk.") and _has(keys, "visual.attn_pool_contrast.") and _has(keys, "text.cls_emb"):
        return LayoutGuess("conch_v1", "a CONCH v1 CoCa checkpoint (MahmoodLab/CONCH pytorch_model.bin)")
    if _has(keys, "trunk.") and _has(keys, "attn_pool_contrast.to_kv"):
        return LayoutGuess("conch_v15", "a CONCH v1.5 vision checkpoint (MahmoodLab/conchv1_5 "
                                        "pytorch_model_vision.bin)")
    if _has(keys, "vision_model.") and _has(keys, "text_model.") and _has(keys, "visual_projection"):
        return LayoutGuess("plip", "a transformers CLIPModel checkpoint (PLIP layout)")
    if _has(keys, "visual.trunk.") and _has(keys, "text.transformer.embeddings."):
        return LayoutGuess("biomedclip", "an open_clip checkpoint with a timm image tower and a HuggingFace BERT "
                                         "text tower (BiomedCLIP layout)")
    if _has(keys, "visual.conv1.", "visual.transformer.") and _has(keys, "token_embedding.", "text.token_embedding."):
        if _has(keys, "text_decoder."):
            return LayoutGuess("", "an open_clip CoCa checkpoint")
        return LayoutGuess("quiltnet", "an open_clip CLIP checkpoint (QuiltNet / open_clip layout)")
    if _has(keys, "teacher.", "student."):
        return LayoutGuess("hipt_vit256", "a DINO training checkpoint (teacher/student)")
    if _has(keys, "blocks.", "patch_embed.") and not _has(keys, "text.", "visual."):
        return LayoutGuess("", "an image-only timm ViT state dict (a patch encoder, no text tower)")
    if _has(keys, "embeddings.patch_embeddings.", "encoder.layer.") and not _has(keys, "text_model."):
        return LayoutGuess("", "an image-only transformers ViT/Dinov2 checkpoint (no text tower)")
    return None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe_folder(folder: Path) -> LayoutGuess | None:
    if (folder / "open_clip_config.json").is_file():
        cfg = _read_json(folder / "open_clip_config.json")
        text_cfg = (cfg.get("model_cfg") or cfg).get("text_cfg") or {}
        if text_cfg.get("hf_model_name"):
            return LayoutGuess("biomedclip", f"an open_clip hub folder with a HuggingFace text tower "
                                             f"({text_cfg['hf_model_name']}; BiomedCLIP layout)")
        return LayoutGuess("quiltnet", "an open_clip hub folder (QuiltNet layout)")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    model_type = str(config.get("model_type", ""))
    if model_type == "clip" or "CLIPModel" in (config.get("architectures") or []):
        return LayoutGuess("plip", "a transformers CLIPModel folder (PLIP layout)")
    if (folder / "pytorch_model_vision.bin").is_file():
        return LayoutGuess("conch_v15", "a CONCH v1.5 folder (pytorch_model_vision.bin)")
    if model_type:
        return LayoutGuess("", f"a transformers {model_type!r} folder ({', '.join(config.get('architectures') or [])})")
    return None


def _peek_keys(path: Path) -> list[str] | None:
    """Key names of a weights file without keeping its tensors (safetensors: header only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        from napari_slpd.models.checkpoints import extract_state_dict, read_checkpoint

        state, _ = extract_state_dict(read_checkpoint(path), key=None)
        return list(state)
    except Exception:  # unreadable or pickled: the caller's own error says so
        return None


def describe_checkpoint(path: str | Path, keys: Iterable[str] | None = None) -> LayoutGuess | None:
    """Name the layout of a checkpoint file or folder (config files first, then key names)."""
    path = Path(path).expanduser()
    if path.is_dir():
        guess = _describe_folder(path)
        if guess is not None:
            return guess
        for name in ("pytorch_model.bin", "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.pth"):
            if (path / name).is_file():
                return describe_checkpoint(path / name)
        return None
    if keys is None:
        keys = _peek_keys(path) if path.is_file() else None
    return describe_keys(keys) if keys is not None else None


def wrong_layout_hint(path: str | Path, expected_preset: str, keys: Iterable[str] | None = None,
                      option: str = "--vlm") -> str:
    """A sentence naming the layout ``path`` is in and the preset to use, or "" if it is the expected one or
    unknown."""
    guess = describe_checkpoint(path, keys)
    return _hint(guess, expected_preset, option)


IMAGE_ONLY = ("conch_v15", "hipt_vit256")  # presets without a text tower


def _hint(guess: LayoutGuess | None, expected_preset: str, option: str = "--vlm") -> str:
    if guess is None or guess.preset == expected_preset:
        return ""
    if guess.preset in IMAGE_ONLY and option == "--vlm":
        return (f"this is {guess.what}: an image-only encoder (slpd extract --encoder {guess.preset}); ProAlign "
                "needs a vision-language model with a text tower (conch_v1, plip, quiltnet, biomedclip)")
    if guess.preset:
        return f"this is {guess.what}: use {option} {guess.preset}"
    return f"this is {guess.what}, not a {expected_preset} checkpoint"


def folder_layout_hint(path: str | Path, expected_preset: str, option: str = "--vlm") -> str:
    """Like :func:`wrong_layout_hint` from a folder's config files only (no weights read)."""
    path = Path(path).expanduser()
    return _hint(_describe_folder(path), expected_preset, option) if path.is_dir() else ""


def resolve_weights_file(checkpoint: str | Path, names: Sequence[str], what: str, hint: str = "") -> Path:
    """The weights file of ``checkpoint`` (itself, or the first of ``names`` inside the folder)."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what}: {path} does not exist. Nothing is downloaded: give the local folder or "
                              f"file ({' or '.join(names)}){'; ' + hint if hint else ''}")
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    layout = _describe_folder(path)
    seen = sorted(p.name for p in path.iterdir())[:12]
    extra = f"; {_hint(layout, '', '--vlm')}" if layout and layout.preset else ""
    raise CheckpointError(f"{what}: folder {path} has none of {', '.join(names)} (it holds: "
                          f"{', '.join(seen) or 'nothing'}){extra}")


def state_dict_keys(state: Mapping[str, object]) -> list[str]:
    return [str(k) for k in state]
