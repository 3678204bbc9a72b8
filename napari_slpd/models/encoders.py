"""Pluggable patch and region encoders behind one small interface.

Patch encoders turn uint8 RGB patches [B, H, W, 3] into features [B, dim]:

- ``"hipt_vit256"``: HIPT's DINO ViT-S/16 (random init, or an official / trained DINO checkpoint);
- a named preset of a published pathology foundation model (``"uni_v1"``, ``"virchow2"``, ``"phikon_v2"``,
  ... see :mod:`napari_slpd.models.presets`): architecture, normalisation, input size and pooling fixed,
  weights from the local file or folder in the publisher's layout;
- ``"timm:<model_name>"``: any timm model, weights from a local checkpoint (UNI, CTransPath-style ports, ...);
- ``"open_clip:<model_name>"``: the image tower of an open_clip model (CONCH, PLIP, QuiltNet style).

Region encoders turn token grids [B, D, G, G] into region embeddings [B, E]:

- ``"hipt_vit4k"``: HIPT's ViT-4K (random init, the official checkpoint, or one trained by ``src_training``);
- ``"mean"``: the mean of the grid's tokens (no parameters).

Every encoder records a ``model_id`` (what produced the features, for caches and papers) and the sha256 of
its checkpoint (None for random init or parameter-free encoders). Random init is seeded, so two runs give
identical features. Inference runs under ``torch.inference_mode``; on CUDA with bf16 autocast and
channels_last. Outputs are float32 CPU tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.utils.device import resolve_device  # re-exported: napari_slpd.models.resolve_device
from napari_slpd.utils.files import sha256_file
from napari_slpd.models.checkpoints import (check_state_dict, extract_state_dict, load_dino_checkpoint,
                                            read_checkpoint, strip_prefixes)
from napari_slpd.models.foundation import build_preset_module
from napari_slpd.models.presets import PRESETS
from napari_slpd.models.vit import vit4k_xs, vit256_small

__all__ = [
    "NORMALIZATION_PRESETS",
    "ModelCard",
    "PatchEncoder",
    "RegionEncoder",
    "MeanPool",
    "resolve_device",
    "build_patch_encoder",
    "build_region_encoder",
    "PATCH_ENCODER_KINDS",
    "REGION_ENCODER_KINDS",
]

log = logging.getLogger(__name__)

# Patch normalisation presets. "hipt" (0.5/0.5) is HIPT's evaluation transform and the hipt_vit256 default;
# "imagenet" (ImageNet mean/std) is what SLPD's own feature extraction used (Carboxy/SLPD, SPEC section 1):
# choose it (`slpd extract --normalize imagenet`) to reproduce SLPD's token grids with the HIPT ViT-256.
NORMALIZATION_PRESETS: dict[str, tuple[float, float, float]] = {
    "hipt_mean": (0.5, 0.5, 0.5),
    "hipt_std": (0.5, 0.5, 0.5),
    "imagenet_mean": (0.485, 0.456, 0.406),
    "imagenet_std": (0.229, 0.224, 0.225),
    "openai_clip_mean": (0.48145466, 0.4578275, 0.40821073),
    "openai_clip_std": (0.26862954, 0.26130258, 0.27577711),
}

PATCH_ENCODER_KINDS = ("hipt_vit256", "timm:<model_name>", "open_clip:<model_name>")
REGION_ENCODER_KINDS = ("hipt_vit4k", "mean")

DEFAULT_SEED = 0


def _forward(module, x, device, autocast_dtype):
    """Run ``module`` (under autocast when a dtype is set, i.e. bf16 on CUDA); float32 on the CPU."""
    if autocast_dtype is None:
        return module(x).float().cpu()
    with torch.autocast(device_type=device.type, dtype=autocast_dtype):
        return module(x).float().cpu()


@dataclass(frozen=True)
class ModelCard:
    """How a patch encoder expects its input, and what it outputs."""

    name: str                              # the spec it was built from, e.g. "hipt_vit256", "timm:resnet50"
    input_size: int                        # side in px the model sees; other patch sizes are resized to it
    mean: tuple[float, float, float]       # per-channel normalisation of [0, 1] RGB
    std: tuple[float, float, float]
    dim: int                               # feature dimension
    interpolation: str = "bilinear"        # used when resizing patches to input_size

    def with_overrides(self, input_size: int | None = None, mean=None, std=None) -> "ModelCard":
        """A copy with the given fields replaced (None keeps the card's value); values are validated."""
        card = self
        if input_size is not None:
            card = replace(card, input_size=_check_input_size(input_size))
        if mean is not None:
            card = replace(card, mean=_rgb_triple(mean, "mean"))
        if std is not None:
            std = _rgb_triple(std, "std")
            if min(std) <= 0:
                raise SlpdError(f"std must be positive per channel, got {std}")
            card = replace(card, std=std)
        return card


HIPT_VIT256_CARD = ModelCard("hipt_vit256", 256, NORMALIZATION_PRESETS["hipt_mean"],
                             NORMALIZATION_PRESETS["hipt_std"], 384)


def _check_input_size(size: int) -> int:
    if int(size) != size or size < 8:
        raise SlpdError(f"input_size must be an integer >= 8 px, got {size!r}")
    return int(size)


def _rgb_triple(value, what: str) -> tuple[float, float, float]:
    """A preset name ("imagenet", "hipt", "openai_clip") or three floats."""
    if isinstance(value, str):
        key = f"{value.lower()}_{what}"
        if key not in NORMALIZATION_PRESETS:
            names = sorted({k.rsplit("_", 1)[0] for k in NORMALIZATION_PRESETS})
            raise SlpdError(f"unknown normalisation preset {value!r} for {what}; use one of {names} or 3 floats")
        return NORMALIZATION_PRESETS[key]
    triple = tuple(float(v) for v in value)
    if len(triple) != 3:
        raise SlpdError(f"{what} needs one value per RGB channel, got {value!r}")
    return triple  # type: ignore[return-value]


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _seeded_build(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with a fixed seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _short_id(path: Path, sha256: str) -> str:
    return f"{path.name} sha256:{sha256[:12]}"


def _prepare_module(module: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    module.eval().requires_grad_(False)
    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    if compile:
        module = torch.compile(module)
    return module


class PatchEncoder:
    """uint8 RGB patches [B, H, W, 3] -> float32 CPU features [B, dim].

    ``module`` takes normalised images [B, 3, S, S] (S = ``card.input_size``) and returns [B, dim].
    """

    def __init__(self, module: nn.Module, card: ModelCard, device: torch.device, model_id: str,
                 checkpoint_sha256: str | None, compile: bool = False):
        self.card = card
        self.device = device
        self.model_id = model_id
        self.checkpoint_sha256 = checkpoint_sha256
        self.module = _prepare_module(module, device, compile)
        self._autocast = _autocast_dtype(device)
        # normalisation folded into one multiply-add on [0, 255] values
        mean = torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(device)
        self._shift = (mean / std).to(device)

    name = property(lambda self: self.card.name)
    input_size = property(lambda self: self.card.input_size)
    mean = property(lambda self: self.card.mean)
    std = property(lambda self: self.card.std)
    dim = property(lambda self: self.card.dim)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the features: for cache keys and provenance attributes."""
        return {**asdict(self.card), "model_id": self.model_id, "checkpoint_sha256": self.checkpoint_sha256}

    def _to_tensor(self, batch) -> torch.Tensor:
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        if not isinstance(batch, torch.Tensor):
            raise SlpdError(f"patch batch must be a numpy array or torch tensor, got {type(batch).__name__}")
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise SlpdError(f"patch batch must be [B, H, W, 3] RGB, got shape {tuple(batch.shape)}")
        if batch.dtype != torch.uint8:
            raise SlpdError(f"patch batch must be uint8 (0-255), got {batch.dtype}")
        return batch

    def preprocess(self, batch) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float32 [B, 3, S, S] on the encoder's device."""
        batch = self._to_tensor(batch)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)  # copy uint8: 4x less than float
        else:
            batch = batch.to(self.device)
        # NHWC -> NCHW view; on CUDA this already is channels_last memory
        x = batch.permute(0, 3, 1, 2).float()
        size = self.card.input_size
        if x.shape[-2:] != (size, size):
            antialias = self.card.interpolation in ("bilinear", "bicubic") and x.shape[-1] > size
            x = F.interpolate(x, size=(size, size), mode=self.card.interpolation, antialias=antialias,
                              align_corners=False if self.card.interpolation != "nearest" else None)
            if self.card.interpolation == "bicubic":
                x = x.clamp_(0.0, 255.0)
        x = x * self._scale - self._shift
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        return x

    def encode(self, batch) -> torch.Tensor:
        if len(batch) == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        with torch.inference_mode():
            out = _forward(self.module, self.preprocess(batch), self.device, self._autocast)
        if out.ndim != 2 or out.shape[1] != self.dim:
            raise RuntimeError(f"{self.model_id} returned shape {tuple(out.shape)}, expected [B, {self.dim}]")
        return out.clone()  # a normal tensor, usable outside inference mode

    def __repr__(self) -> str:
        return f"PatchEncoder({self.model_id!r}, dim={self.dim}, input_size={self.input_size}, device={self.device})"


class MeanPool(nn.Module):
    """Region embedding = mean of the grid's tokens: [B, D, G, G] -> [B, D]."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float().mean(dim=(-2, -1))


class RegionEncoder:
    """Token grids [B, in_dim, G, G] (numpy or torch, float16/32) -> float32 CPU embeddings [B, dim]."""

    def __init__(self, module: nn.Module, name: str, in_dim: int, dim: int, device: torch.device, model_id: str,
                 checkpoint_sha256: str | None, compile: bool = False):
        self.name = name
        self.in_dim = in_dim
        self.dim = dim
        self.device = device
        self.model_id = model_id
        self.checkpoint_sha256 = checkpoint_sha256
        self.module = _prepare_module(module, device, compile and not isinstance(module, MeanPool))
        # mean pooling stays in float32: half precision would only lose digits, it saves nothing
        self._autocast = None if isinstance(module, MeanPool) else _autocast_dtype(device)

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "in_dim": self.in_dim, "dim": self.dim, "model_id": self.model_id,
                "checkpoint_sha256": self.checkpoint_sha256}

    def encode(self, tokens) -> torch.Tensor:
        if isinstance(tokens, np.ndarray):
            tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        if not isinstance(tokens, torch.Tensor):
            raise SlpdError(f"token grids must be a numpy array or torch tensor, got {type(tokens).__name__}")
        if tokens.ndim != 4 or tokens.shape[1] != self.in_dim:
            raise SlpdError(f"token grids must be [B, {self.in_dim}, G, G] for {self.model_id}, "
                            f"got shape {tuple(tokens.shape)}")
        if not tokens.is_floating_point():
            raise SlpdError(f"token grids must be floating point, got {tokens.dtype}")
        if tokens.shape[0] == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        with torch.inference_mode():
            out = _forward(self.module, tokens.to(self.device, non_blocking=True).float(), self.device, self._autocast)
        return out.clone()

    def __repr__(self) -> str:
        return f"RegionEncoder({self.model_id!r}, in_dim={self.in_dim}, dim={self.dim}, device={self.device})"


# ---------------------------------------------------------------------------------------------- patch encoders


def _build_hipt_vit256(checkpoint, seed: int, allow_pickle: bool) -> tuple[nn.Module, str, str | None]:
    model = _seeded_build(vit256_small, seed)
    if checkpoint is None:
        return model, f"hipt_vit256 (random-init seed {seed})", None
    report = load_dino_checkpoint(model, checkpoint, key="teacher", allow_pickle=allow_pickle)
    return model, f"hipt_vit256 ({_short_id(Path(report.path), report.sha256)})", report.sha256


def _load_timm_weights(model: nn.Module, checkpoint: str | os.PathLike, allow_pickle: bool) -> str:
    path = Path(checkpoint).expanduser()
    raw, _ = extract_state_dict(read_checkpoint(path, allow_pickle=allow_pickle), key=None)
    state_dict, _ = strip_prefixes(raw, prefixes=("module.", "_orig_mod."))
    # the model is built without a classifier (num_classes=0): drop the checkpoint's classifier weights
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model_keys = set(model.state_dict())
    for name in [k for k in state_dict if k not in model_keys and k.startswith(tuple(c + "." for c in classifiers))]:
        del state_dict[name]
    check_state_dict(model, state_dict, str(path))
    model.load_state_dict(state_dict, strict=True)
    return sha256_file(path)


def _build_timm(model_name: str, checkpoint, seed: int, allow_pickle: bool,
                model_kwargs: Mapping[str, Any] | None) -> tuple[nn.Module, ModelCard, str, str | None]:
    import timm
    from timm.data import resolve_model_data_config

    try:
        model = _seeded_build(lambda: timm.create_model(model_name, pretrained=False, num_classes=0,
                                                        **dict(model_kwargs or {})), seed)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise SlpdError(f"timm has no model named {model_name!r}; see timm.list_models()") from exc
        raise
    data_cfg = resolve_model_data_config(model)
    input_size = int(data_cfg["input_size"][-1])
    dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    interpolation = data_cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    card = ModelCard(f"timm:{model_name}", input_size, tuple(data_cfg["mean"]), tuple(data_cfg["std"]), dim,
                     interpolation)
    if checkpoint is None:
        return model, card, f"timm:{model_name} (random-init seed {seed})", None
    sha = _load_timm_weights(model, checkpoint, allow_pickle)
    return model, card, f"timm:{model_name} ({_short_id(Path(checkpoint).expanduser(), sha)})", sha


class _OpenClipImageTower(nn.Module):
    """The image side of an open_clip model: normalised images -> joint-space embeddings (not L2-normalised)."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.clip = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x, normalize=False)


def build_patch_encoder(spec: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto",
                        input_size: int | None = None, mean: Sequence[float] | str | None = None,
                        std: Sequence[float] | str | None = None, compile: bool = False, *,
                        seed: int = DEFAULT_SEED, allow_pickle: bool = False,
                        model_kwargs: Mapping[str, Any] | None = None,
                        open_clip_cfg: Mapping[str, Any] | None = None) -> PatchEncoder:
    """Build a patch encoder from a spec string (see the module docstring).

    ``input_size``, ``mean`` and ``std`` override the model card (e.g. ``mean="imagenet", std="imagenet"``
    for the normalisation SLPD's extraction script used). ``model_kwargs`` go to ``timm.create_model``
    (e.g. ``{"init_values": 1e-5}`` for UNI); ``open_clip_cfg`` is a custom open_clip model config.
    """
    dev = resolve_device(device)
    # validate the overrides before building anything: a typo should not cost a model build
    HIPT_VIT256_CARD.with_overrides(input_size=input_size, mean=mean, std=std)
    if spec in PRESETS and PRESETS[spec].family != "hipt":
        if model_kwargs or open_clip_cfg:
            raise SlpdError(f"{spec} is a preset: its architecture is fixed (model_kwargs / open_clip_cfg do not "
                            "apply); use timm:<name> for a custom timm architecture")
        preset = PRESETS[spec]
        module, weights, sha = build_preset_module(preset, checkpoint, seed=seed, allow_pickle=allow_pickle)
        card = ModelCard(spec, preset.input_size, preset.mean, preset.std, preset.dim, preset.interpolation)
        if mean is not None or std is not None or input_size is not None:
            log.warning("%s: the preset's input (%d px, %s normalisation) is overridden; its features then differ "
                        "from the published model's", spec, preset.input_size, preset.normalisation)
        model_id = f"{spec} (random-init seed {seed})" if sha is None else f"{spec} ({_short_id(weights, sha)})"
    elif spec == "hipt_vit256":
        if model_kwargs or open_clip_cfg:
            raise SlpdError("model_kwargs / open_clip_cfg do not apply to hipt_vit256")
        module, model_id, sha = _build_hipt_vit256(checkpoint, seed, allow_pickle)
        card = HIPT_VIT256_CARD
    elif spec.startswith("timm:") and len(spec) > 5:
        module, card, model_id, sha = _build_timm(spec[5:], checkpoint, seed, allow_pickle, model_kwargs)
    elif spec.startswith("open_clip:") and len(spec) > 10:
        from napari_slpd.models.open_clip_loader import load_open_clip

        bundle = load_open_clip(spec[10:], checkpoint, device="cpu", model_cfg=open_clip_cfg,
                                allow_pickle=allow_pickle, with_tokenizer=False)
        module = _OpenClipImageTower(bundle.model)
        card = ModelCard(spec, bundle.image_size, bundle.mean, bundle.std, bundle.embed_dim,
                         bundle.interpolation)
        model_id = f"{spec} ({_short_id(Path(bundle.checkpoint), bundle.checkpoint_sha256)})"
        sha = bundle.checkpoint_sha256
    else:
        raise SlpdError(f"unknown patch encoder {spec!r}; use a preset ({', '.join(PRESETS)}; `slpd encoders` "
                        f"describes them) or one of {', '.join(PATCH_ENCODER_KINDS[1:])}")
    card = card.with_overrides(input_size=input_size, mean=mean, std=std)
    encoder = PatchEncoder(module, card, dev, model_id, sha, compile=compile)
    log.info("patch encoder: %r", encoder)
    return encoder


# --------------------------------------------------------------------------------------------- region encoders


def build_region_encoder(spec: str, checkpoint: str | os.PathLike | None = None,
                         device: str | torch.device = "auto", in_dim: int = 384, compile: bool = False, *,
                         seed: int = DEFAULT_SEED, allow_pickle: bool = False) -> RegionEncoder:
    """Build ``"hipt_vit4k"`` (random init seeded, official or src_training checkpoint) or ``"mean"``."""
    dev = resolve_device(device)
    if int(in_dim) != in_dim or in_dim < 1:
        raise SlpdError(f"in_dim must be a positive integer, got {in_dim!r}")
    in_dim = int(in_dim)
    if spec == "mean":
        if checkpoint is not None:
            raise SlpdError("the 'mean' region encoder has no weights; do not give a checkpoint")
        return RegionEncoder(MeanPool(), "mean", in_dim, in_dim, dev, "mean", None)
    if spec == "hipt_vit4k":
        model = _seeded_build(lambda: vit4k_xs(input_embed_dim=in_dim), seed)
        if checkpoint is None:
            model_id, sha = f"hipt_vit4k (random-init seed {seed})", None
        else:
            try:
                report = load_dino_checkpoint(model, checkpoint, key="teacher", allow_pickle=allow_pickle)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}\n(ViT-4K built for token grids of dimension {in_dim}: "
                                      "the patch encoder's output dimension)") from exc
            model_id, sha = f"hipt_vit4k ({_short_id(Path(report.path), report.sha256)})", report.sha256
        return RegionEncoder(model, "hipt_vit4k", in_dim, model.embed_dim, dev, model_id, sha, compile=compile)
    raise SlpdError(f"unknown region encoder {spec!r}; use one of {', '.join(REGION_ENCODER_KINDS)}")
