"""The two vision transformers of HIPT: ViT-256 (patch level) and ViT-4K (region level).

Parameter names and shapes follow the official DINO / HIPT modules exactly, so the released DINO checkpoints
(``vit256_small_dino.pth``, ``vit4k_xs_dino.pth``) load without renaming:

- ViT-256 (DINO ViT-S/16): ``cls_token`` [1,1,384], ``pos_embed`` [1,197,384] (a 14 x 14 grid: DINO builds the
  model for 224-px crops), ``patch_embed.proj`` (Conv2d 3->384, k=s=16), ``blocks.N.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``.
- ViT-4K (vit4k_xs): ``phi.0`` (Linear 384->192), ``cls_token`` [1,1,192], ``pos_embed`` [1,197,192],
  6 blocks with the same names, ``norm``.

Both interpolate the position embedding bicubically for other grids. By default this reproduces the
official DINO arithmetic (a scale factor of ``(G + 0.1) / 14``, facebookresearch/dino#8), so features from
official checkpoints match the original code; ``interpolate_offset=0`` uses the exact target size instead.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DropPath",
    "Mlp",
    "Attention",
    "Block",
    "PatchEmbed",
    "VisionTransformer",
    "VisionTransformer4K",
    "interpolate_pos_embed",
    "vit256_small",
    "vit4k_xs",
]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth per sample: zero a whole residual branch for some samples, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        # the fused kernel computes softmax(q k^T * scale) v like the explicit form, without the N x N matrix
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights [B, heads, N, N] (for visualisation; not used in forward)."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.attention_map(self.norm1(x))


class PatchEmbed(nn.Module):
    """Image [B, 3, H, W] -> tokens [B, (H/p)*(W/p), dim] by a strided convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int,
                          offset: float = 0.1) -> torch.Tensor:
    """Resize a [1, 1 + n*n, D] position embedding (class token first) to a grid_h x grid_w patch grid.

    ``offset > 0`` reproduces DINO/HIPT: ``interpolate(scale_factor=(g + offset) / n, mode="bicubic")``. The
    scale factor, not the output size, sets the sampling positions, so this is what the official checkpoints
    saw at inference. ``offset == 0`` samples for the exact size (timm's convention).
    """
    n_tokens = pos_embed.shape[1] - 1
    side = int(round(math.sqrt(n_tokens)))
    if side * side != n_tokens:
        raise ValueError(f"position embedding has {n_tokens} patch tokens, not a square grid")
    if grid_h == side and grid_w == side:
        return pos_embed
    cls_pos = pos_embed[:, :1]
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # bicubic on float32 even under autocast: the embedding is tiny and half precision would shift it
    grid = grid.float()
    if offset > 0:
        grid = F.interpolate(grid, scale_factor=((grid_h + offset) / side, (grid_w + offset) / side),
                             mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"position embedding interpolated to {tuple(grid.shape[-2:])}, "
                           f"expected ({grid_h}, {grid_w})")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((cls_pos, grid), dim=1)


def _trunc_normal_(tensor: torch.Tensor, std: float = 0.02, bound: float = 2.0) -> torch.Tensor:
    """DINO's ``trunc_normal_(std=0.02, a=-2, b=2)``: the bounds are absolute, 100 std away, so this is a normal
    draw with a clamp as a guard; the inverse-CDF sampler of nn.init is ~20x slower on CPU for the same law."""
    with torch.no_grad():
        return tensor.normal_(0.0, std).clamp_(-bound, bound)


def _init_vit_weights(module: nn.Module) -> None:
    # DINO's initialisation: truncated normal (std 0.02) for linear weights, zero biases, unit LayerNorm
    if isinstance(module, nn.Linear):
        _trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _TransformerTrunk(nn.Module):
    """What both ViTs share: [CLS] + position embedding, the blocks, the final norm, and the read-outs."""

    embed_dim: int
    interpolate_offset: float

    def _build_trunk(self, embed_dim: int, num_patches: int, depth: int, num_heads: int, mlp_ratio: float,
                     qkv_bias: bool, drop_rate: float, attn_drop_rate: float, drop_path_rate: float,
                     norm_layer: Callable[[int], nn.Module]) -> None:
        self.num_features = self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # stochastic depth grows linearly with depth (DINO's rule)
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rates[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)

    def _init_trunk_weights(self) -> None:
        _trunc_normal_(self.pos_embed, std=0.02)
        _trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Input -> patch tokens [B, N, D] and the grid (h, w) they came from."""
        raise NotImplementedError

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid_h, grid_w = self._embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        pos = interpolate_pos_embed(self.pos_embed, grid_h, grid_w, offset=self.interpolate_offset)
        return self.pos_drop(tokens + pos.to(tokens.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: [B, 1 + h*w, D], the [CLS] first."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The [CLS] embedding [B, D]."""
        return self.forward_features(x)[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block [B, heads, 1 + h*w, 1 + h*w] (DINO's attention maps)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attention_map(x)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normed outputs of the last ``n`` blocks."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


class VisionTransformer(_TransformerTrunk):
    """DINO ViT on images: [B, 3, H, W] -> [CLS] [B, embed_dim]. H and W must be multiples of patch_size."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 interpolate_offset: float = 0.1):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.patch_size = patch_size
        self.interpolate_offset = interpolate_offset
        self._build_trunk(embed_dim, self.patch_embed.num_patches, depth, num_heads, mlp_ratio, qkv_bias,
                          drop_rate, attn_drop_rate, drop_path_rate, norm_layer)
        self._init_trunk_weights()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h} x {w} is not a multiple of the patch size {self.patch_size}")
        return self.patch_embed(x), h // self.patch_size, w // self.patch_size


class VisionTransformer4K(_TransformerTrunk):
    """HIPT ViT-4K on token grids: [B, input_embed_dim, G_h, G_w] -> [CLS] [B, output_embed_dim].

    ``phi`` (Linear, GELU, Dropout) projects each ViT-256 token to the region width; the position embedding
    is a 14 x 14 grid (the 3584-px global crops of HIPT's DINO pre-training) interpolated for other grids.
    """

    def __init__(self, input_embed_dim: int = 384, output_embed_dim: int = 192, pos_grid: int = 14,
                 depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 phi_drop: float = 0.25, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 interpolate_offset: float = 0.1):
        super().__init__()
        self.input_embed_dim = input_embed_dim
        self.interpolate_offset = interpolate_offset
        # Dropout has no parameters, so phi_drop never affects which checkpoints load (only training)
        self.phi = nn.Sequential(nn.Linear(input_embed_dim, output_embed_dim), nn.GELU(), nn.Dropout(phi_drop))
        self._build_trunk(output_embed_dim, pos_grid * pos_grid, depth, num_heads, mlp_ratio, qkv_bias,
                          drop_rate, attn_drop_rate, drop_path_rate, norm_layer)
        self._init_trunk_weights()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if x.ndim != 4 or x.shape[1] != self.input_embed_dim:
            raise ValueError(f"expected token grids [B, {self.input_embed_dim}, G, G], got shape {tuple(x.shape)}")
        grid_h, grid_w = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # row-major over the grid, like the patch order of a region
        return self.phi(tokens), grid_h, grid_w


def vit256_small(drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    """HIPT ViT-256 = DINO ViT-S/16: dim 384, depth 12, 6 heads, MLP 4x, qkv bias, LayerNorm eps 1e-6.

    Built for 224 px like DINO (pos_embed [1, 197, 384], the official checkpoint's shape); 256-px patches
    interpolate the embedding to 16 x 16 exactly as the official code does.
    """
    kwargs.setdefault("img_size", 224)
    return VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
                             drop_path_rate=drop_path_rate, **kwargs)


def vit4k_xs(drop_path_rate: float = 0.0, input_embed_dim: int = 384, **kwargs) -> VisionTransformer4K:
    """HIPT ViT-4K xs: phi 384->192, dim 192, depth 6, 6 heads, MLP 768, qkv bias, pos_embed [1, 197, 192]."""
    return VisionTransformer4K(input_embed_dim=input_embed_dim, output_embed_dim=192, pos_grid=14, depth=6,
                               num_heads=6, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop_path_rate,
                               **kwargs)
