"""timm architectures of the presets, built from their plain-data kwargs (and CTransPath's stem)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from napari_slpd.errors import SlpdError
from napari_slpd.models.presets import EncoderPreset

__all__ = ["create_timm_model", "ConvStem"]


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 convolutions (BN, ReLU) and a 1x1 to the width.

    Takes timm's ``embed_layer`` arguments, and returns NHWC tokens as timm's Swin expects."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, output_fmt="NHWC",
                 **_ignored):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise SlpdError(f"CTransPath's stem needs patch size 4 and a width divisible by 8, got {patch_size}, "
                            f"{embed_dim}")
        size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.img_size = tuple(size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt = output_fmt
        layers: list[nn.Module] = []
        channels_in, channels_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(channels_out), nn.ReLU(inplace=True)]
            channels_in, channels_out = channels_out, channels_out * 2
        layers.append(nn.Conv2d(channels_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # NHWC
        return self.norm(x)


def _resolve_timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Class names in a preset's kwargs (kept as strings so presets stay plain data) -> the classes."""
    import timm.layers

    out = dict(kwargs)
    if isinstance(out.get("mlp_layer"), str):
        out["mlp_layer"] = getattr(timm.layers, out["mlp_layer"])
    if isinstance(out.get("act_layer"), str):
        out["act_layer"] = getattr(nn, out["act_layer"])
    return out


def create_timm_model(preset: EncoderPreset, extra_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The preset's timm architecture, randomly initialised, without a classifier."""
    import timm

    kwargs = {**dict(extra_kwargs or {}), **preset.arch_kwargs}
    if preset.family == "swin_convstem":
        kwargs["embed_layer"] = ConvStem
    return timm.create_model(preset.architecture, pretrained=False, num_classes=0, **_resolve_timm_kwargs(kwargs))
