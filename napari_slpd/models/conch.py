"""CONCH v1 (image and text towers, tokenizer) and CONCH v1.5 (image tower) from local files, in their
published layouts.

CONCH v1 (MahmoodLab/CONCH ``pytorch_model.bin``) is a CoCa model:

- ``visual.trunk``: a timm ViT-B/16 at 448 px (class token, LayerNorm eps 1e-6, final norm), all tokens out;
- ``visual.attn_pool_contrast``: one learned query (512-d) attending over the 785 tokens (``nn.MultiheadAttention``
  with 768-d keys/values, 8 heads, LayerNorms on query and keys), then ``visual.ln_contrast``; the contrastive
  image embedding is that times ``visual.proj_contrast`` [512, 512]. ``visual.attn_pool_caption`` (256 queries)
  and ``text_decoder`` serve captioning only and are not built here;
- ``text``: a 12-layer causal transformer (width 768) over 127 tokens plus a learned ``cls_emb`` appended last,
  whose output (``ln_final``, ``text_projection`` [768, 512]) is the text embedding.

open_clip cannot express this model (its ViT has no patch-embedding bias and pools differently), so the towers
are built here: the trunk is timm's VisionTransformer with CONCH's arguments, the rest our own modules whose
parameter names are CONCH's, so the published state dict loads strictly.

The tokenizer is CONCH's byte-level BPE (uncased; 32,000 merges + 7 special tokens = 32,007 ids) read from
``conch_byte_level_bpe_uncased.json``: that file ships in CONCH's code repository
(``conch/open_clip_custom/tokenizers/``), not with the weights, so put it next to ``pytorch_model.bin`` (or give
its path); an installed ``conch`` package is found too. It needs the ``tokenizers`` package (installed with
``transformers``). Nothing is ever downloaded.

Features: ``build_conch_v1_image`` gives what TRIDENT's ``conch_v1`` gives (``encode_image(proj_contrast=False,
normalize=False)``: the 512-d pooled, normalised embedding before the contrastive projection). ProAlign needs
the joint image-text space, i.e. those features times ``proj_contrast``: :class:`ConchV1` applies it (a linear
map), so features cached by ``--encoder conch_v1`` serve ProAlign directly.

CONCH v1.5 (MahmoodLab/conchv1_5 ``pytorch_model_vision.bin``, TITAN's patch encoder): a ViT-L/16 (layer scale,
qkv bias) with ``trunk.*`` keys, an attentional pooler with one 768-d query (``to_q``/``to_kv``/``to_out``, 8
heads) and ``ln_contrast``: 768-d features, ImageNet mean/std, 448 px bilinear. As in TRIDENT, the published
position embedding is taken on a 14 x 14 grid and resampled to the 448-px grid the way TRIDENT's forward pass
does (bicubic, scale factor (28 + 0.1) / 14), once at load time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.models.checkpoints import check_state_dict, extract_state_dict, read_checkpoint, strip_prefixes
from napari_slpd.models.vlm_layouts import folder_layout_hint, resolve_weights_file, wrong_layout_hint

__all__ = ["CONCH_PRESETS", "ConchV1", "ConchTokenizer", "build_conch_v1_image", "build_conch_v15_image",
           "load_conch_v1", "find_conch_tokenizer", "CONCH_V1_WEIGHTS", "CONCH_V15_WEIGHTS",
           "CONCH_TOKENIZER_FILES"]

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CONCH_V1_WEIGHTS = ("pytorch_model.bin", "conch.bin", "model.safetensors")
CONCH_V15_WEIGHTS = ("pytorch_model_vision.bin", "model.safetensors")
CONCH_TOKENIZER_FILES = ("conch_byte_level_bpe_uncased.json", "tokenizer.json")
_CONCH_REPO = "MahmoodLab/CONCH"
_CONCH_V15_REPO = "MahmoodLab/conchv1_5"


@dataclass(frozen=True)
class ConchV1Arch:
    """CONCH v1's published configuration (conch_ViT-B-16.json); depths are read from the checkpoint."""

    embed_dim: int = 512
    image_size: int = 448
    patch_size: int = 16
    vision_width: int = 768
    vision_heads: int = 12
    vision_layers: int = 12
    pooler_heads: int = 8
    context_length: int = 128
    vocab_size: int = 32007
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 12
    pad_id: int = 0


@dataclass(frozen=True)
class ConchV15Arch:
    """CONCH v1.5's published vision tower (TRIDENT's conchv1_5.py)."""

    dim: int = 768
    image_size: int = 448
    patch_size: int = 16
    width: int = 1024
    heads: int = 16
    layers: int = 24
    pooler_heads: int = 8
    trained_grid: int = 14  # the position-embedding grid TRIDENT builds the trunk with (224 px)


# --------------------------------------------------------------------------------------------- modules


def _timm_vit(image_size: int, patch_size: int, width: int, depth: int, heads: int, **kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                             num_heads=heads, mlp_ratio=4.0, num_classes=0, dynamic_img_size=True, **kwargs)


class _QueryPool(nn.Module):
    """Learned queries attending over tokens (CONCH v1's AttentionalPooler parameter layout)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, dim) * dim ** -0.5)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:          # [B, N, C] -> [B, Q, dim]
        kv = self.ln_k(tokens).transpose(0, 1)                       # sequence-first for nn.MultiheadAttention
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, tokens.shape[0], -1)
        out = self.attn(q, kv, kv, need_weights=False)[0]
        return out.transpose(0, 1)


class ConchV1Visual(nn.Module):
    """CONCH v1 image tower: normalised [B, 3, 448, 448] -> pooled [B, 512] (``project`` -> joint space)."""

    def __init__(self, arch: ConchV1Arch):
        super().__init__()
        self.trunk = _timm_vit(arch.image_size, arch.patch_size, arch.vision_width, arch.vision_layers,
                               arch.vision_heads)
        self.attn_pool_contrast = _QueryPool(arch.embed_dim, arch.vision_width, arch.pooler_heads, 1)
        self.ln_contrast = nn.LayerNorm(arch.embed_dim)
        self.proj_contrast = nn.Parameter(torch.randn(arch.embed_dim, arch.embed_dim) * arch.vision_width ** -0.5)

    def forward(self, x: torch.Tensor, project: bool = False) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return pooled @ self.proj_contrast if project else pooled


class _TextBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:   # x: [L, B, W]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _TextStack(nn.Module):
    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_TextBlock(width, heads) for _ in range(layers))


class ConchV1Text(nn.Module):
    """CONCH v1 text tower: token ids [B, 128] (CONCH's tokenizer) -> text embeddings [B, 512]."""

    def __init__(self, arch: ConchV1Arch):
        super().__init__()
        self.heads = arch.text_heads
        self.pad_id = arch.pad_id
        self.token_embedding = nn.Embedding(arch.vocab_size, arch.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(arch.context_length, arch.text_width) * 0.01)
        self.cls_emb = nn.Parameter(torch.randn(arch.text_width) * 0.01)
        self.transformer = _TextStack(arch.text_width, arch.text_heads, arch.text_layers)
        self.ln_final = nn.LayerNorm(arch.text_width)
        self.text_projection = nn.Parameter(torch.randn(arch.text_width, arch.embed_dim) * arch.text_width ** -0.5)

    def _mask(self, text: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Causal mask; the appended class token (last row) sees column 0 and column j >= 1 where token j - 1
        is not padding: the offset is CoCa's as CONCH was trained with it, kept so embeddings match."""
        b, n = text.shape
        seq = n + 1
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=text.device).tril().expand(b, seq, seq).clone()
        last = torch.ones(b, seq, dtype=torch.bool, device=text.device)
        last[:, 1:] = text != self.pad_id
        allowed[:, -1, :] = last
        mask = torch.zeros(b, seq, seq, dtype=dtype, device=text.device).masked_fill(~allowed, float("-inf"))
        return mask.repeat_interleave(self.heads, dim=0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        text = tokens[:, :-1]            # the last position is reserved for the class token
        x = self.token_embedding(text)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        mask = self._mask(text, x.dtype)
        x = x.transpose(0, 1)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        pooled = self.ln_final(x[-1])
        return pooled @ self.text_projection


class ConchV1(nn.Module):
    """CONCH v1's image and text towers (no captioning decoder)."""

    def __init__(self, arch: ConchV1Arch):
        super().__init__()
        self.arch = arch
        self.visual = ConchV1Visual(arch)
        self.text = ConchV1Text(arch)

    def encode_image(self, images: torch.Tensor, project: bool = True) -> torch.Tensor:
        return self.visual(images, project=project)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled image features (``conch_v1`` patch features) -> the joint image-text space."""
        return pooled @ self.visual.proj_contrast.to(pooled.dtype)


class _ConchV1ImageEncoder(nn.Module):
    """normalised images -> CONCH v1 pooled image features [B, 512] (TRIDENT's conch_v1 features)."""

    def __init__(self, visual: ConchV1Visual):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x, project=False)


class _HeadsPool(nn.Module):
    """CONCH v1.5's attentional pooler: one learned query, bias-free q / kv / out projections."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, dim) * dim ** -0.5)
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:          # [B, N, C] -> [B, dim]
        b, n, _ = tokens.shape
        q = self.to_q(self.ln_q(self.query))                          # [1, dim]
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)         # [B, N, dim] each
        split = lambda t: t.reshape(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(q.expand(b, -1, -1)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, -1))


class ConchV15Vision(nn.Module):
    """CONCH v1.5 image tower: normalised [B, 3, 448, 448] -> [B, 768]."""

    def __init__(self, arch: ConchV15Arch, layers: int | None = None):
        super().__init__()
        self.trunk = _timm_vit(arch.image_size, arch.patch_size, arch.width, layers or arch.layers, arch.heads,
                               init_values=1.0, qkv_bias=True)
        self.attn_pool_contrast = _HeadsPool(arch.dim, arch.width, arch.pooler_heads)
        self.ln_contrast = nn.LayerNorm(arch.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x)))


# ------------------------------------------------------------------------------------------- tokenizer


class ConchTokenizer:
    """CONCH's tokenizer: texts -> ids [N, 128] (<start_of_text> ... <end_of_text>, padded, one slot for the
    class token), as CONCH's ``tokenize`` (max_length 127, truncation, padding, one extra pad)."""

    SPECIALS = {"<pad>": 0, "<start_of_text>": 1, "<end_of_text>": 2}

    def __init__(self, path: str | os.PathLike, context_length: int = 128, vocab_size: int = 32007):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise SlpdError("CONCH's tokenizer needs the 'tokenizers' package (pip install tokenizers, or "
                            "transformers which brings it)") from exc
        self.path = Path(path)
        try:
            tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:
            raise CheckpointError(f"{self.path} is not a tokenizers JSON file: {exc}") from exc
        wrong = {name: tok.token_to_id(name) for name, i in self.SPECIALS.items() if tok.token_to_id(name) != i}
        size = tok.get_vocab_size(with_added_tokens=True)
        if wrong or size != vocab_size:
            raise CheckpointError(
                f"{self.path} is not CONCH's tokenizer (vocabulary {size} ids, CONCH has {vocab_size}; special "
                f"tokens {wrong or 'as expected'}); use conch_byte_level_bpe_uncased.json from CONCH's code "
                "repository (conch/open_clip_custom/tokenizers/)")
        self.context_length = context_length
        tok.enable_truncation(max_length=context_length - 1)
        tok.enable_padding(length=context_length - 1, pad_id=0, pad_token="<pad>")
        self._tok = tok

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = [enc.ids for enc in self._tok.encode_batch([str(t) for t in texts], add_special_tokens=True)]
        tokens = torch.tensor(ids, dtype=torch.long).reshape(len(ids), self.context_length - 1)
        return F.pad(tokens, (0, 1), value=0)


def find_conch_tokenizer(checkpoint: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> Path:
    """CONCH's tokenizer file: ``tokenizer`` (a file, or a folder holding one of CONCH_TOKENIZER_FILES), else
    next to the checkpoint, else inside an installed ``conch`` package. Raises with the file to provide."""
    candidates: list[Path] = []
    if tokenizer is not None:
        tok = Path(tokenizer).expanduser()
        if tok.is_file():
            return tok
        if not tok.is_dir():
            raise CheckpointError(f"CONCH tokenizer {tok} does not exist")
        candidates += [tok / name for name in CONCH_TOKENIZER_FILES]
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser()
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        candidates += [folder / name for name in CONCH_TOKENIZER_FILES]
        candidates += [folder / "tokenizers" / CONCH_TOKENIZER_FILES[0]]
    spec = importlib.util.find_spec("conch") if tokenizer is None else None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "open_clip_custom" / "tokenizers" / CONCH_TOKENIZER_FILES[0])
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates[:4]) or "nowhere"
    raise CheckpointError(
        "CONCH v1's text tower needs its tokenizer file conch_byte_level_bpe_uncased.json, which is not among the "
        f"files of {_CONCH_REPO} on HuggingFace: copy it from CONCH's code repository "
        "(github.com/mahmoodlab/CONCH, conch/open_clip_custom/tokenizers/) next to pytorch_model.bin, or give "
        f"its path. Looked at: {looked}")


# -------------------------------------------------------------------------------------------- loading


def _state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    raw, _ = extract_state_dict(read_checkpoint(path, allow_pickle=allow_pickle), key=None)
    state, _ = strip_prefixes(raw, prefixes=("module.", "_orig_mod."))
    return state


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _layout_error(path: Path, state: Mapping[str, torch.Tensor], expected: str, what: str) -> CheckpointError:
    hint = wrong_layout_hint(path, expected, keys=list(state))
    return CheckpointError(f"{path} is not {what}" + (f"; {hint}" if hint else
                           f" (its keys start with: {', '.join(sorted({k.split('.')[0] for k in state})[:8])})"))


def _expect_width(state, key: str, dim: int, expected: int, path: Path, what: str) -> None:
    if key in state and state[key].shape[dim] != expected:
        raise CheckpointError(f"{path}: {key} is {state[key].shape[dim]} wide but {what} is {expected}; the "
                              "published architecture is fixed")


def _conch_v1_arch(path: Path, state: Mapping[str, torch.Tensor], need_text: bool) -> ConchV1Arch:
    if not any(k.startswith("visual.attn_pool_contrast.") for k in state) or "visual.proj_contrast" not in state:
        raise _layout_error(path, state, "conch_v1", "a CONCH v1 checkpoint (no visual.attn_pool_contrast / "
                                                     "visual.proj_contrast)")
    if need_text and "text.cls_emb" not in state:
        raise _layout_error(path, state, "conch_v1", "a CONCH v1 checkpoint with its text tower (no text.cls_emb)")
    arch = ConchV1Arch()
    _expect_width(state, "visual.trunk.cls_token", 2, arch.vision_width, path, "CONCH v1's ViT-B")
    _expect_width(state, "visual.proj_contrast", 1, arch.embed_dim, path, "CONCH v1's embedding")
    _expect_width(state, "text.token_embedding.weight", 1, arch.text_width, path, "CONCH v1's text width")
    return ConchV1Arch(vision_layers=_count_blocks(state, "visual.trunk.blocks."),
                       text_layers=_count_blocks(state, "text.transformer.resblocks.") or arch.text_layers)


def _resample_v1_pos_embed(state: dict, model: ConchV1Visual, prefix: str) -> None:
    from timm.layers import resample_abs_pos_embed

    key = prefix + "trunk.pos_embed"
    target = model.trunk.pos_embed
    if key in state and state[key].shape != target.shape:  # CONCH's own loader resamples bilinearly
        state[key] = resample_abs_pos_embed(state[key], new_size=list(model.trunk.patch_embed.grid_size),
                                            num_prefix_tokens=1, interpolation="bilinear", antialias=False)


def _load_v1(path: Path, allow_pickle: bool, with_text: bool) -> tuple[ConchV1Arch, dict]:
    state = _state_dict(path, allow_pickle)
    arch = _conch_v1_arch(path, state, need_text=with_text)
    return arch, state


def load_conch_v1(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  allow_pickle: bool = False, with_tokenizer: bool = True):
    """CONCH v1's image and text towers from a local folder or ``pytorch_model.bin``, and its tokenizer.

    Returns ``(model, tokenizer or None, weights_path)``; the model is in eval mode on the CPU."""
    hint = folder_layout_hint(checkpoint, "conch_v1")
    if hint:
        raise CheckpointError(f"{checkpoint}: {hint}")
    path = resolve_weights_file(checkpoint, CONCH_V1_WEIGHTS, "CONCH v1",
                                f"download pytorch_model.bin from huggingface.co/{_CONCH_REPO}")
    arch, state = _load_v1(path, allow_pickle, with_text=True)
    tok = ConchTokenizer(find_conch_tokenizer(checkpoint, tokenizer)) if with_tokenizer else None
    model = ConchV1(arch)
    _resample_v1_pos_embed(state, model.visual, "visual.")
    # the captioning pooler and decoder and the temperature are not needed for embeddings
    unused = ("visual.attn_pool_caption.", "visual.ln_caption.", "text_decoder.", "logit_scale")
    wanted = {k: v for k, v in state.items() if not k.startswith(unused)}
    check_state_dict(model, wanted, str(path), hint=wrong_layout_hint(path, "conch_v1", keys=list(state)) or
                     "Check that this is MahmoodLab/CONCH's pytorch_model.bin.")
    model.load_state_dict(wanted, strict=True)
    return model.eval().requires_grad_(False), tok, path


def _seeded(factory, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def build_conch_v1_image(checkpoint: Path | None, seed: int = 0, allow_pickle: bool = False) -> nn.Module:
    """CONCH v1 image tower as a patch encoder: normalised [B, 3, 448, 448] -> [B, 512] pooled features
    (TRIDENT's conch_v1: before proj_contrast). ``checkpoint`` None gives the architecture with seeded random
    weights."""
    if checkpoint is None:
        return _ConchV1ImageEncoder(_seeded(lambda: ConchV1Visual(ConchV1Arch()), seed)).eval()
    path = resolve_weights_file(checkpoint, CONCH_V1_WEIGHTS, "CONCH v1",
                                f"download pytorch_model.bin from huggingface.co/{_CONCH_REPO}")
    arch, state = _load_v1(path, allow_pickle, with_text=False)
    visual = ConchV1Visual(arch)
    _resample_v1_pos_embed(state, visual, "visual.")
    wanted = {k[len("visual."):]: v for k, v in state.items()
              if k.startswith("visual.") and not k.startswith(("visual.attn_pool_caption.", "visual.ln_caption."))}
    check_state_dict(visual, wanted, str(path), hint="Check that this is MahmoodLab/CONCH's pytorch_model.bin.")
    visual.load_state_dict(wanted, strict=True)
    return _ConchV1ImageEncoder(visual).eval()


def _v15_pos_embed(pos: torch.Tensor, arch: ConchV15Arch, grid: tuple[int, int]) -> torch.Tensor:
    """TRIDENT's two steps: the stored embedding onto the 14 x 14 trunk grid (bilinear), then onto the input
    grid as its forward pass does it (bicubic with scale factor (g + 0.1) / 14)."""
    from timm.layers import resample_abs_pos_embed

    base = arch.trained_grid
    if pos.shape[1] != base * base + 1:
        pos = resample_abs_pos_embed(pos, new_size=[base, base], num_prefix_tokens=1, interpolation="bilinear",
                                     antialias=False)
    if tuple(grid) == (base, base):
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    dim = pos.shape[-1]
    patches = patches.reshape(1, base, base, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / base, (grid[1] + 0.1) / base),
                            mode="bicubic")
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise CheckpointError(f"CONCH v1.5 position embedding resampled to {tuple(patches.shape[-2:])}, "
                              f"expected {tuple(grid)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    return torch.cat([cls, patches], dim=1)


def build_conch_v15_image(checkpoint: Path | None, seed: int = 0, allow_pickle: bool = False) -> nn.Module:
    """CONCH v1.5 image tower: normalised [B, 3, 448, 448] -> [B, 768] (TRIDENT's conch_v15)."""
    arch = ConchV15Arch()
    if checkpoint is None:
        return _seeded(lambda: ConchV15Vision(arch), seed).eval()
    path = resolve_weights_file(checkpoint, CONCH_V15_WEIGHTS, "CONCH v1.5",
                                f"download pytorch_model_vision.bin from huggingface.co/{_CONCH_V15_REPO}")
    state = _state_dict(path, allow_pickle)
    if "attn_pool_contrast.to_kv.weight" not in state or "trunk.pos_embed" not in state:
        raise _layout_error(path, state, "conch_v15", "a CONCH v1.5 vision checkpoint (no trunk.pos_embed / "
                                                      "attn_pool_contrast.to_kv)")
    _expect_width(state, "trunk.cls_token", 2, arch.width, path, "CONCH v1.5's ViT-L")
    model = ConchV15Vision(arch, layers=_count_blocks(state, "trunk.blocks."))
    state["trunk.pos_embed"] = _v15_pos_embed(state["trunk.pos_embed"], arch,
                                              tuple(model.trunk.patch_embed.grid_size))
    check_state_dict(model, state, str(path), hint="Check that this is MahmoodLab/conchv1_5's "
                                                   "pytorch_model_vision.bin.")
    model.load_state_dict(state, strict=True)
    return model.eval()


CONCH_PRESETS = [
    {
        "name": "conch_v1",
        "title": "CONCH v1 (image tower; ViT-B/16 CoCa, 448 px)",
        "builder": "napari_slpd.models.conch:build_conch_v1_image",
        "input_size": 448, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
        "dim": 512, "mpp": 0.5,
        "weights_source": f"huggingface.co/{_CONCH_REPO}",
        "files": ["pytorch_model.bin"], "weight_names": list(CONCH_V1_WEIGHTS),
        "licence": "CC-BY-NC-ND 4.0, gated (accept the terms on HuggingFace); non-commercial research only",
        "layouts": ["folder holding pytorch_model.bin", "the pytorch_model.bin file (CoCa state dict)"],
        "notes": "features = TRIDENT's conch_v1 (pooled, before proj_contrast); `slpd proalign --vlm conch_v1` "
                 "projects them into the image-text space; the text tower also needs "
                 "conch_byte_level_bpe_uncased.json from CONCH's code repository next to pytorch_model.bin",
    },
    {
        "name": "conch_v15",
        "title": "CONCH v1.5 (TITAN's patch encoder; ViT-L/16, 448 px)",
        "builder": "napari_slpd.models.conch:build_conch_v15_image",
        "input_size": 448, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
        "dim": 768, "mpp": 0.5,
        "weights_source": f"huggingface.co/{_CONCH_V15_REPO}",
        "files": ["pytorch_model_vision.bin"], "weight_names": list(CONCH_V15_WEIGHTS),
        "licence": "CC-BY-NC-ND 4.0, gated (accept the terms on HuggingFace); non-commercial research only",
        "layouts": ["folder holding pytorch_model_vision.bin", "the pytorch_model_vision.bin file"],
        "notes": "image only (no text tower published); TITAN tiles 512 px at 20x and resizes to 448",
    },
]
