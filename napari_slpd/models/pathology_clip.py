"""The pathology CLIPs in their published folders, from local files only: PLIP (a transformers ``CLIPModel``
folder), QuiltNet and BiomedCLIP (open_clip hub folders).

- PLIP (huggingface.co/vinid/plip): ``config.json`` (CLIPConfig), ``pytorch_model.bin`` or
  ``model.safetensors``, the CLIP tokenizer files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, with
  ``tokenizer_config.json`` / ``special_tokens_map.json``) and ``preprocessor_config.json`` (mean/std, size).
  Loaded with transformers ``CLIPModel.from_pretrained(folder, local_files_only=True)`` (optional extra:
  ``pip install transformers``). Embeddings: ``visual_projection(vision_model(x).pooler_output)`` and
  ``text_projection(text_model(ids).pooler_output)``, 512-d, as ``get_image_features`` / ``get_text_features``.
- QuiltNet (huggingface.co/wisdomik/QuiltNet-B-32): ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``;
  open_clip's own text tower and BPE tokenizer (shipped inside open_clip).
- BiomedCLIP (huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224): the same two files; its
  text tower is PubMedBERT, whose architecture open_clip would fetch from the hub. Here it comes from a BERT
  ``config.json`` in the folder (or in the tokenizer folder) or, failing that, from the checkpoint's own tensor
  shapes; the tokenizer from PubMedBERT's ``vocab.txt`` + ``tokenizer_config.json`` in the folder (or a
  ``--tokenizer`` folder). Nothing is fetched.

The ``*_PRESETS`` list the image towers as patch encoders (512-d joint-space embeddings) for the preset
registry; :mod:`napari_slpd.proalign.vlm` uses both towers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.models.vlm_layouts import describe_checkpoint, resolve_weights_file, wrong_layout_hint

__all__ = ["CLIP_PRESETS", "TransformersClip", "load_plip", "open_clip_folder", "build_plip_image",
           "build_quiltnet_image", "build_biomedclip_image", "PLIP_FILES", "OPEN_CLIP_FILES"]

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PLIP_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors")
_RESAMPLE = {2: "bilinear", 3: "bicubic", 0: "nearest"}


def _need_transformers(what: str):
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise SlpdError(f"{what} needs the optional 'transformers' package: pip install transformers") from exc


def _model_folder(checkpoint: str | os.PathLike, marker: str, what: str, files: str, option: str = "--vlm") -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what}: {path} does not exist. Nothing is downloaded: give the model's local "
                              f"folder ({files})")
    folder = path if path.is_dir() else path.parent
    if not (folder / marker).is_file():
        hint = wrong_layout_hint(path, "", option=option)
        raise CheckpointError(f"{what} needs the model folder with {marker} ({files}); {folder} has no "
                              f"{marker}" + (f"; {hint}" if hint else ""))
    return folder


# ------------------------------------------------------------------------------------------------ PLIP


@dataclass
class TransformersClip:
    """A transformers CLIPModel with its tokenizer and preprocessing, ready for embeddings."""

    model: nn.Module
    tokenizer: Any
    weights: Path
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    embed_dim: int
    context_length: int

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=images)
        return self.model.visual_projection(out.pooler_output)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise SlpdError("this CLIP model was loaded without a tokenizer")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        device = self.model.text_projection.weight.device
        out = self.model.text_model(input_ids=enc["input_ids"].to(device),
                                    attention_mask=enc["attention_mask"].to(device))
        return self.model.text_projection(out.pooler_output)


def _plip_preprocessing(folder: Path, default_size: int) -> tuple[int, tuple, tuple, str]:
    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    crop = cfg.get("crop_size", default_size)
    size = int(crop.get("height", default_size) if isinstance(crop, dict) else crop)
    mean = tuple(float(v) for v in cfg.get("image_mean", OPENAI_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", OPENAI_STD))
    return size, mean, std, _RESAMPLE.get(cfg.get("resample", 3), "bicubic")


def load_plip(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
              with_tokenizer: bool = True) -> TransformersClip:
    """PLIP (or any transformers CLIPModel folder) from local files: config.json, weights, tokenizer files."""
    files = "config.json, model.safetensors or pytorch_model.bin, the tokenizer files"
    folder = _model_folder(checkpoint, "config.json", "PLIP (transformers CLIPModel)", files)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "clip":
        layout = describe_checkpoint(folder)
        raise CheckpointError(f"{folder}/config.json is a {config.get('model_type')!r} model, not a CLIPModel"
                              + (f"; use --vlm {layout.preset}" if layout and layout.preset else ""))
    weights = resolve_weights_file(folder, PLIP_FILES, "PLIP")
    _need_transformers("PLIP")
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"transformers cannot load the CLIPModel in {folder}: {exc}") from exc
    tok = None
    if with_tokenizer:
        tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else folder
        missing = (f"no CLIP tokenizer files in {tok_dir} (vocab.json + merges.txt or tokenizer.json, with "
                   "tokenizer_config.json): copy them from the model's page next to config.json")
        # transformers may build an empty tokenizer from config.json alone: insist on the vocabulary files
        if not ((tok_dir / "tokenizer.json").is_file() or
                ((tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file())):
            raise CheckpointError(missing)
        try:
            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as exc:
            raise CheckpointError(f"{missing} ({exc})") from exc
    size, mean, std, interpolation = _plip_preprocessing(folder, int(model.config.vision_config.image_size))
    return TransformersClip(model.eval().requires_grad_(False), tok, weights, size, mean, std, interpolation,
                            int(model.config.projection_dim), int(model.config.text_config.max_position_embeddings))


class _PlipImage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)


def _seeded(factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def build_plip_image(checkpoint: Path | None, seed: int = 0, allow_pickle: bool = False) -> nn.Module:
    """PLIP's image tower: normalised [B, 3, 224, 224] -> [B, 512] (get_image_features)."""
    _need_transformers("PLIP")
    if checkpoint is None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        model = _seeded(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=32, projection_dim=512)),
                        seed)
        return _PlipImage(model).eval()
    return _PlipImage(load_plip(checkpoint, with_tokenizer=False).model).eval()


# ------------------------------------------------------------------------------------ open_clip folders


def open_clip_folder(checkpoint: str | os.PathLike, preset: str, what: str, option: str = "--vlm") -> Path:
    """The open_clip hub folder of ``checkpoint`` (itself, or the folder of a weights file in it), checked to be
    the ``preset``'s kind (BiomedCLIP has a HuggingFace text tower, QuiltNet open_clip's own)."""
    files = "open_clip_config.json + open_clip_pytorch_model.bin"
    folder = _model_folder(checkpoint, "open_clip_config.json", what, files, option)
    layout = describe_checkpoint(folder)
    if layout is not None and layout.preset and layout.preset != preset:
        raise CheckpointError(f"{folder} is {layout.what}: use {option} {layout.preset}")
    return folder


def _open_clip_image(folder: Path, seed: int, allow_pickle: bool) -> nn.Module:
    from napari_slpd.models.open_clip_loader import load_open_clip

    bundle = load_open_clip(f"local-dir:{folder}", folder, device="cpu", allow_pickle=allow_pickle,
                            with_tokenizer=False)
    return _OpenClipImage(bundle.model)


class _OpenClipImage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=False)


def build_quiltnet_image(checkpoint: Path | None, seed: int = 0, allow_pickle: bool = False) -> nn.Module:
    """QuiltNet's image tower (open_clip ViT-B/32): normalised [B, 3, 224, 224] -> [B, 512]."""
    if checkpoint is None:
        import open_clip

        return _OpenClipImage(_seeded(lambda: open_clip.create_model("ViT-B-32", pretrained=None), seed)).eval()
    folder = open_clip_folder(checkpoint, "quiltnet", "QuiltNet", "--encoder")
    return _open_clip_image(folder, seed, allow_pickle).eval()


def build_biomedclip_image(checkpoint: Path | None, seed: int = 0, allow_pickle: bool = False) -> nn.Module:
    """BiomedCLIP's image tower (timm ViT-B/16 + linear projection): normalised [B, 3, 224, 224] -> [B, 512]."""
    if checkpoint is None:
        from open_clip.timm_model import TimmModel

        visual = _seeded(lambda: TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="",
                                           proj="linear"), seed)
        return _VisualOnly(visual).eval()
    folder = open_clip_folder(checkpoint, "biomedclip", "BiomedCLIP", "--encoder")
    return _open_clip_image(folder, seed, allow_pickle).eval()


class _VisualOnly(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


_CLIP_NOTE = "512-d projected image embeddings (the image-text space ProAlign uses)"
CLIP_PRESETS = [
    {
        "name": "plip", "title": "PLIP (CLIP ViT-B/32 fine-tuned on OpenPath)",
        "builder": "napari_slpd.models.pathology_clip:build_plip_image",
        "input_size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "dim": 512,
        "mpp": 0.5, "weights_source": "huggingface.co/vinid/plip",
        "files": ["config.json", "pytorch_model.bin or model.safetensors", "preprocessor_config.json",
                  "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
        "weight_names": list(PLIP_FILES), "licence": "see the model card (research use)",
        "layouts": ["transformers CLIPModel folder"], "notes": _CLIP_NOTE + "; needs transformers",
    },
    {
        "name": "quiltnet", "title": "QuiltNet-B-32 (open_clip CLIP ViT-B/32 on Quilt-1M)",
        "builder": "napari_slpd.models.pathology_clip:build_quiltnet_image",
        "input_size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "dim": 512,
        "mpp": 0.5, "weights_source": "huggingface.co/wisdomik/QuiltNet-B-32",
        "files": ["open_clip_config.json", "open_clip_pytorch_model.bin"],
        "weight_names": list(OPEN_CLIP_FILES), "licence": "MIT (model card); Quilt-1M data terms apply",
        "layouts": ["open_clip hub folder"], "notes": _CLIP_NOTE,
    },
    {
        "name": "biomedclip", "title": "BiomedCLIP (ViT-B/16 + PubMedBERT, PMC-15M)",
        "builder": "napari_slpd.models.pathology_clip:build_biomedclip_image",
        "input_size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "dim": 512,
        "mpp": 0.5, "weights_source": "huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "files": ["open_clip_config.json", "open_clip_pytorch_model.bin",
                  "PubMedBERT tokenizer: vocab.txt, tokenizer_config.json (text tower only)"],
        "weight_names": list(OPEN_CLIP_FILES), "licence": "MIT (model card); research use",
        "layouts": ["open_clip hub folder"], "notes": _CLIP_NOTE + "; the text tower needs transformers",
    },
]
