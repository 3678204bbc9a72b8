"""A pathology vision-language model as ProAlign needs it: both towers, one joint space.

Presets load the published layouts from local files (never downloaded): ``conch_v1`` (CONCH's CoCa
``pytorch_model.bin`` + its tokenizer file, :mod:`napari_slpd.models.conch`), ``plip`` (a transformers
CLIPModel folder), ``quiltnet`` and ``biomedclip`` (open_clip hub folders,
:mod:`napari_slpd.models.pathology_clip`); any other name is an open_clip architecture loaded by
:func:`napari_slpd.models.open_clip_loader.load_open_clip`. Text and image embeddings come out
L2-normalized, float32, on the CPU.

Patch features are usually already in the cohort cache, extracted by the same model's image tower
(``slpd extract --encoder <preset or open_clip:NAME> --checkpoint SAME``); then only the text tower runs here
and :meth:`VisionLanguageModel.check_feature_store` makes sure the cached features live in this model's space.
CONCH v1's cached features are TRIDENT's (before the contrastive projection): :meth:`joint_features`
projects them, chunk by chunk.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from napari_slpd.errors import CheckpointError, FeatureStoreError, SlpdError

log = logging.getLogger(__name__)

SPEC_PREFIX = "open_clip:"


_PRESET_HELP = {
    "conch_v1": "CONCH v1: folder with pytorch_model.bin (huggingface.co/MahmoodLab/CONCH) and "
                "conch_byte_level_bpe_uncased.json (CONCH's code repository)",
    "plip": "PLIP: transformers CLIPModel folder (huggingface.co/vinid/plip)",
    "quiltnet": "QuiltNet: open_clip folder (huggingface.co/wisdomik/QuiltNet-B-32)",
    "biomedclip": "BiomedCLIP: open_clip folder (huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-"
                  "vit_base_patch16_224) with PubMedBERT's vocab.txt and tokenizer_config.json",
}
VLM_PRESETS = tuple(_PRESET_HELP)


class _Towers:
    """What one vision-language model offers ProAlign (a backend per published layout).

    ``feature_module``: normalised images -> the patch features ``slpd extract --encoder <spec>`` caches;
    ``to_joint``: those features -> the joint image-text space (identity unless the cached features are taken
    before a linear projection, as CONCH v1's are)."""

    spec: str
    weights: Path
    sha256: str | None
    embed_dim: int
    image_size: int
    mean: tuple
    std: tuple
    interpolation: str

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def feature_module(self) -> nn.Module:
        raise NotImplementedError

    def to_joint(self, features: torch.Tensor) -> torch.Tensor:
        return features

    @property
    def projects(self) -> bool:
        return False


class _ModuleCall(nn.Module):
    def __init__(self, fn, owner: nn.Module):
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class _OpenClipTowers(_Towers):
    def __init__(self, bundle, spec: str):
        self.bundle, self.spec = bundle, spec
        self.weights = Path(bundle.checkpoint)
        self.sha256 = bundle.checkpoint_sha256
        self.embed_dim, self.image_size = int(bundle.embed_dim), int(bundle.image_size)
        self.mean, self.std = tuple(bundle.mean), tuple(bundle.std)
        self.interpolation = getattr(bundle, "interpolation", "bicubic")

    def encode_text(self, texts):
        return self.bundle.encode_text(texts, normalize=False)

    def feature_module(self):
        model = self.bundle.model
        return _ModuleCall(lambda x: model.encode_image(x, normalize=False), model)


class _ConchTowers(_Towers):
    def __init__(self, model, tokenizer, weights: Path, device: torch.device):
        from napari_slpd.models.conch import OPENAI_MEAN, OPENAI_STD
        from napari_slpd.utils.files import sha256_file

        self.model, self.tokenizer, self.weights, self.device = model.to(device), tokenizer, weights, device
        self.spec, self.sha256 = "conch_v1", sha256_file(weights)
        self.embed_dim, self.image_size = model.arch.embed_dim, model.arch.image_size
        self.mean, self.std, self.interpolation = OPENAI_MEAN, OPENAI_STD, "bicubic"

    def encode_text(self, texts):
        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()

    def feature_module(self):
        visual = self.model.visual
        return _ModuleCall(lambda x: visual(x, project=False), visual)

    def to_joint(self, features):
        return self.model.project(features.to(self.model.visual.proj_contrast.device)).to(features.device)

    @property
    def projects(self) -> bool:
        return True


class _TransformersClipTowers(_Towers):
    def __init__(self, clip, spec: str, device: torch.device):
        from napari_slpd.utils.files import sha256_file

        clip.model.to(device)
        self.clip, self.spec, self.weights, self.sha256 = clip, spec, clip.weights, sha256_file(clip.weights)
        self.embed_dim, self.image_size = clip.embed_dim, clip.image_size
        self.mean, self.std, self.interpolation = clip.mean, clip.std, clip.interpolation

    def encode_text(self, texts):
        with torch.inference_mode():
            return self.clip.encode_text(texts).float().cpu()

    def feature_module(self):
        return _ModuleCall(self.clip.encode_image, self.clip.model)


class _JointView:
    """Cached patch features [N, F] read as joint-space embeddings [N, D], chunk by chunk (for align_slide)."""

    def __init__(self, features, towers: _Towers):
        self.features, self.towers = features, towers
        self.shape = (int(features.shape[0]), towers.embed_dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        block = self.features[index]
        block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block, np.float32))
        with torch.inference_mode():
            return self.towers.to_joint(block.float()).clone()


def parse_encoder_attr(value: str) -> str:
    """The spec part of a recorded patch encoder, e.g. ``"open_clip:ViT-B-16 (x.pt sha256:..)"`` ->
    ``"open_clip:ViT-B-16"``."""
    return str(value).split(" (", 1)[0].strip()


def _load_towers(name: str, checkpoint, device: torch.device, tokenizer, allow_pickle: bool) -> _Towers:
    from napari_slpd.models import pathology_clip as clips

    if name == "conch_v1":
        from napari_slpd.models.conch import load_conch_v1

        model, tok, weights = load_conch_v1(checkpoint, tokenizer=tokenizer, allow_pickle=allow_pickle)
        return _ConchTowers(model, tok, weights, device)
    if name == "plip":
        return _TransformersClipTowers(clips.load_plip(checkpoint, tokenizer=tokenizer), "plip", device)
    from napari_slpd.models.open_clip_loader import load_open_clip

    what = "QuiltNet" if name == "quiltnet" else "BiomedCLIP"
    folder = clips.open_clip_folder(checkpoint, name, what)
    bundle = load_open_clip(f"local-dir:{folder}", folder, device=device, allow_pickle=allow_pickle,
                            tokenizer_dir=tokenizer)
    return _OpenClipTowers(bundle, name)


class VisionLanguageModel:
    """Image and text towers of one vision-language model, with its tokenizer and preprocessing."""

    def __init__(self, towers: _Towers, device: torch.device):
        self.towers = towers
        self.device = device
        self.bundle = getattr(towers, "bundle", None)
        self._patch_encoder = None

    @property
    def model_name(self) -> str:
        return self.spec[len(SPEC_PREFIX):] if self.spec.startswith(SPEC_PREFIX) else self.spec

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_name: str, checkpoint: str | os.PathLike, device: str | torch.device = "auto",
             model_cfg: dict | None = None, allow_pickle: bool = False,
             tokenizer: str | os.PathLike | None = None) -> "VisionLanguageModel":
        """Load a preset (``conch_v1``, ``plip``, ``quiltnet``, ``biomedclip``: ``checkpoint`` is the model's
        folder as published) or an open_clip architecture (e.g. ``ViT-B-32``; a leading ``open_clip:`` is
        accepted; ``local-dir:FOLDER``) from local files. ``tokenizer``: a folder or file with the tokenizer
        when it is not in the model folder."""
        from napari_slpd.utils.device import resolve_device

        if not model_name:
            raise SlpdError(f"give the vision-language model: one of {', '.join(VLM_PRESETS)} or an open_clip "
                            "architecture (e.g. --vlm ViT-B-32)")
        preset = model_name if model_name in _PRESET_HELP else None
        if checkpoint is None:
            what = _PRESET_HELP[preset] if preset else (
                "the open_clip weights file of the model (e.g. a QuiltNet open_clip_pytorch_model.bin)")
            raise CheckpointError(f"the vision-language model {model_name!r} needs local weights (--checkpoint "
                                  f"PATH): {what}; nothing is downloaded")
        dev = resolve_device(device)
        if preset:
            return cls(_load_towers(preset, checkpoint, dev, tokenizer, allow_pickle), dev)
        from napari_slpd.models.open_clip_loader import load_open_clip

        name = model_name[len(SPEC_PREFIX):] if model_name.startswith(SPEC_PREFIX) else model_name
        bundle = load_open_clip(name, checkpoint, device=dev, model_cfg=model_cfg, allow_pickle=allow_pickle,
                                tokenizer_dir=tokenizer)
        if bundle.tokenizer is None:
            raise CheckpointError(f"open_clip model {name!r} was loaded without a tokenizer")
        return cls(_OpenClipTowers(bundle, f"{SPEC_PREFIX}{name}"), dev)

    # -- identity -------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The patch-encoder spec whose features live in this model's space (``--encoder`` of slpd extract):
        the preset name, or ``open_clip:<name>``."""
        return self.towers.spec

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.towers.sha256

    @property
    def checkpoint(self) -> Path | None:
        return self.towers.weights

    @property
    def model_id(self) -> str:
        """``<spec> (<weights file> sha256:<12 hex>)``: what the features engine records."""
        sha = self.checkpoint_sha256
        return f"{self.spec} ({self.checkpoint.name} sha256:{sha[:12]})" if sha else self.spec

    @property
    def embed_dim(self) -> int:
        return int(self.towers.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.towers.image_size)

    # -- text tower -----------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalized text embeddings [T, D], float32 on the CPU."""
        if isinstance(texts, str):
            texts = [texts]
        texts = [str(t) for t in texts]
        chunks = [self.towers.encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        out = torch.cat(chunks).float().cpu() if chunks else torch.empty(0, self.embed_dim)
        if out.ndim != 2 or (len(out) and out.shape[1] != self.embed_dim):
            raise CheckpointError(f"{self.model_id}: text embeddings have shape {tuple(out.shape)}, "
                                  f"expected [T, {self.embed_dim}]")
        return torch.nn.functional.normalize(out, dim=-1).clone()

    # -- image tower ----------------------------------------------------------------------------------
    def patch_encoder(self):
        """The image tower as a :class:`~napari_slpd.models.encoders.PatchEncoder` with the model's own
        preprocessing: the features the features engine writes for ``--encoder <spec>`` (for CONCH v1 those
        are taken before its contrastive projection; :meth:`joint_features` applies it)."""
        if self._patch_encoder is None:
            from napari_slpd.models.encoders import ModelCard, PatchEncoder

            t = self.towers
            card = ModelCard(self.spec, int(t.image_size), tuple(t.mean), tuple(t.std), int(t.embed_dim),
                             t.interpolation)
            self._patch_encoder = PatchEncoder(t.feature_module(), card, self.device, self.model_id,
                                               self.checkpoint_sha256)
        return self._patch_encoder

    def joint_features(self, features):
        """Cached patch features of this model -> its joint image-text space (a lazy view for CONCH v1)."""
        return _JointView(features, self.towers) if self.towers.projects else features

    def encode_images(self, batch) -> torch.Tensor:
        """uint8 RGB patches [B, H, W, 3] -> L2-normalized image embeddings [B, D], float32 on the CPU."""
        feats = self.patch_encoder().encode(batch)
        return torch.nn.functional.normalize(self.joint_features(feats)[:], dim=-1)

    # -- cached features -------------------------------------------------------------------------------
    def check_feature_store(self, store) -> None:
        """Raise FeatureStoreError unless ``store``'s patch features come from this model's image tower."""
        attrs = getattr(store, "attrs", {}) or {}
        where = getattr(store, "path", "the feature file")
        fix = (f"extract the features with `slpd extract COHORT --encoder {self.spec} --checkpoint "
               f"{self.checkpoint or 'SAME_CHECKPOINT'}` (the same model and weights as --vlm/--checkpoint); "
               f"features made elsewhere (TRIDENT/CLAM) by the same model's image tower can be imported with "
               f"`slpd import-features ... --encoder-name {self.spec}`")
        features = getattr(store, "features", None)
        if features is None:
            raise FeatureStoreError(f"{where} holds no patch features; {fix}")
        recorded = parse_encoder_attr(attrs.get("patch_encoder", ""))
        if recorded != self.spec:
            raise FeatureStoreError(
                f"{where}: patch features were made by {recorded or 'an unknown encoder'!r}, not by the image "
                f"tower of {self.spec!r}, so they do not live in its text-image space; {fix}"
            )
        recorded_sha = str(attrs.get("patch_encoder_sha256", "") or "")
        if self.checkpoint_sha256 and recorded_sha and recorded_sha != self.checkpoint_sha256:
            raise FeatureStoreError(
                f"{where}: patch features were made with another checkpoint of {self.spec} "
                f"(sha256 {recorded_sha[:12]}, this one {self.checkpoint_sha256[:12]}); {fix}"
            )
        dim = int(features.shape[1])
        if dim != self.embed_dim:
            raise FeatureStoreError(
                f"{where}: patch features are {dim}-d but {self.spec} embeds into {self.embed_dim}-d; {fix}"
            )

    def __repr__(self) -> str:
        return f"VisionLanguageModel({self.model_id!r}, dim={self.embed_dim}, device={self.device})"
