"""A pathology vision-language model (open_clip) as ProAlign needs it: both towers, one joint space.

Loaded from a local checkpoint by :func:`napari_slpd.models.open_clip_loader.load_open_clip` (never
downloaded). Text embeddings and image embeddings come out L2-normalized, float32, on the CPU.

Patch features are usually already in the cohort cache, extracted by the same model's image tower
(``slpd extract --encoder open_clip:NAME --checkpoint SAME``); then only the text tower runs here and
:meth:`VisionLanguageModel.check_feature_store` makes sure the cached features live in this model's space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from napari_slpd.errors import CheckpointError, FeatureStoreError, SlpdError

log = logging.getLogger(__name__)

SPEC_PREFIX = "open_clip:"


class _ImageTower(nn.Module):
    """Normalized images [B, 3, S, S] -> joint-space image embeddings [B, D] (normalized later)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x, normalize=False)


def parse_encoder_attr(value: str) -> str:
    """The spec part of a recorded patch encoder, e.g. ``"open_clip:ViT-B-16 (x.pt sha256:..)"`` ->
    ``"open_clip:ViT-B-16"``."""
    return str(value).split(" (", 1)[0].strip()


class VisionLanguageModel:
    """Image and text towers of one open_clip model, with its tokenizer and preprocessing."""

    def __init__(self, bundle, model_name: str, device: torch.device):
        self.bundle = bundle
        self.model_name = model_name
        self.device = device
        self.model = bundle.model.eval().requires_grad_(False)
        if bundle.tokenizer is None:
            raise CheckpointError(f"open_clip model {model_name!r} was loaded without a tokenizer")
        self.tokenizer = bundle.tokenizer
        self._patch_encoder = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_name: str, checkpoint: str | os.PathLike, device: str | torch.device = "auto",
             model_cfg: dict | None = None, allow_pickle: bool = False) -> "VisionLanguageModel":
        """Load ``model_name`` (an open_clip architecture, e.g. ``coca_ViT-B-16`` style for CONCH or
        ``ViT-B-32`` for PLIP/QuiltNet; a leading ``open_clip:`` is accepted) from a local checkpoint."""
        from napari_slpd.utils.device import resolve_device
        from napari_slpd.models.open_clip_loader import load_open_clip

        if model_name.startswith(SPEC_PREFIX):
            model_name = model_name[len(SPEC_PREFIX):]
        if not model_name:
            raise SlpdError("give the open_clip model name of the vision-language model (e.g. --vlm ViT-B-32)")
        if checkpoint is None:
            raise CheckpointError(
                f"the vision-language model {model_name!r} needs a local checkpoint (--checkpoint PATH): the "
                "open_clip weights file of the model (e.g. CONCH's pytorch_model.bin, PLIP/QuiltNet "
                "open_clip_pytorch_model.bin); nothing is downloaded"
            )
        dev = resolve_device(device)
        bundle = load_open_clip(model_name, checkpoint, device=dev, model_cfg=model_cfg, allow_pickle=allow_pickle)
        return cls(bundle, model_name, dev)

    # -- identity -------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """The patch-encoder spec whose features live in this model's space: ``open_clip:<name>``."""
        return f"{SPEC_PREFIX}{self.model_name}"

    @property
    def checkpoint_sha256(self) -> str | None:
        return getattr(self.bundle, "checkpoint_sha256", None)

    @property
    def checkpoint(self) -> Path | None:
        ckpt = getattr(self.bundle, "checkpoint", None)
        return Path(ckpt) if ckpt else None

    @property
    def model_id(self) -> str:
        """``open_clip:<name> (<checkpoint file> sha256:<12 hex>)``: what the features engine records."""
        model_id = getattr(self.bundle, "model_id", None)
        return str(model_id) if model_id else self.spec

    @property
    def embed_dim(self) -> int:
        return int(self.bundle.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.bundle.image_size)

    # -- text tower -----------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalized text embeddings [T, D], float32 on the CPU."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.bundle.encode_text(list(texts), normalize=True, batch_size=batch_size)
        if out.ndim != 2 or (len(out) and out.shape[1] != self.embed_dim):
            raise CheckpointError(f"{self.model_id}: text embeddings have shape {tuple(out.shape)}, "
                                  f"expected [T, {self.embed_dim}]")
        return out

    # -- image tower ----------------------------------------------------------------------------------
    def patch_encoder(self):
        """The image tower as a :class:`~napari_slpd.models.encoders.PatchEncoder` with the model's own
        preprocessing (input size, mean/std, interpolation from its config): the same features the
        features engine writes for ``--encoder open_clip:<name>``, before normalization."""
        if self._patch_encoder is None:
            from napari_slpd.models.encoders import ModelCard, PatchEncoder

            b = self.bundle
            card = ModelCard(self.spec, int(b.image_size), tuple(b.mean), tuple(b.std), int(b.embed_dim),
                             getattr(b, "interpolation", "bicubic"))
            self._patch_encoder = PatchEncoder(_ImageTower(self.model), card, self.device, self.model_id,
                                               self.checkpoint_sha256)
        return self._patch_encoder

    def encode_images(self, batch) -> torch.Tensor:
        """uint8 RGB patches [B, H, W, 3] -> L2-normalized image embeddings [B, D], float32 on the CPU."""
        return torch.nn.functional.normalize(self.patch_encoder().encode(batch), dim=-1)

    # -- cached features -------------------------------------------------------------------------------
    def check_feature_store(self, store) -> None:
        """Raise FeatureStoreError unless ``store``'s patch features come from this model's image tower."""
        attrs = getattr(store, "attrs", {}) or {}
        where = getattr(store, "path", "the feature file")
        fix = (f"extract the features with `slpd extract COHORT --encoder {self.spec} --checkpoint "
               f"{self.checkpoint or 'SAME_CHECKPOINT'}` (the same model and checkpoint as --vlm/--checkpoint); "
               f"CLAM/TRIDENT features that are this model's projected image embeddings can be imported with "
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
