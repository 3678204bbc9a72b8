"""Load an open_clip vision-language model (CONCH, PLIP, QuiltNet style) from a local checkpoint, offline.

``open_clip.create_model(name, pretrained=None)`` builds the architecture from a config (built-in, or a custom
one given here as a dict / ``open_clip_config.json``); the weights then come from a local file in open_clip's own
format (a state dict or ``{"state_dict": ...}``, optionally with a ``module.`` prefix), read with
``weights_only=True``. Nothing is ever downloaded: model names with ``hf-hub:`` and configs whose text tower or
tokenizer lives on the HuggingFace hub are refused unless their files are local.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.utils.device import resolve_device
from napari_slpd.utils.files import sha256_file
from napari_slpd.models.checkpoints import check_state_dict, extract_state_dict, read_checkpoint, strip_prefixes

__all__ = ["OpenClipBundle", "load_open_clip", "CHECKPOINT_FILE_NAMES"]

log = logging.getLogger(__name__)

# names under which open_clip / HF snapshots store the weights, most specific first
CHECKPOINT_FILE_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)
_LOCAL_DIR = "local-dir:"
_CFG_LOCK = threading.Lock()
_CFG_DIR: Path | None = None


@dataclass
class OpenClipBundle:
    """An open_clip model ready for inference, with what is needed to feed it."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor] | None   # texts -> token ids [N, context_length]; None if not built
    model_name: str
    checkpoint: str
    checkpoint_sha256: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str                                # "bicubic" / "bilinear", for resizing patches
    embed_dim: int                                    # joint image-text space
    context_length: int | None
    device: torch.device
    model_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return f"open_clip:{self.model_name} ({Path(self.checkpoint).name} sha256:{self.checkpoint_sha256[:12]})"

    def encode_text(self, texts: Sequence[str], normalize: bool = True, batch_size: int = 64) -> torch.Tensor:
        """Texts -> float32 CPU embeddings [N, embed_dim] in the joint space (L2-normalised by default)."""
        if self.tokenizer is None:
            raise SlpdError("this open_clip bundle was loaded without a tokenizer (with_tokenizer=False)")
        texts = [str(t) for t in texts]
        if not texts:
            return torch.empty(0, self.embed_dim, dtype=torch.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start:start + batch_size]).to(self.device)
                emb = self.model.encode_text(tokens, normalize=False).float()
                out.append(torch.nn.functional.normalize(emb, dim=-1) if normalize else emb)
            result = torch.cat(out).cpu()
        return result.clone()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Already normalised images [B, 3, S, S] -> float32 CPU embeddings [B, embed_dim]."""
        with torch.inference_mode():
            emb = self.model.encode_image(images.to(self.device), normalize=False).float()
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            result = emb.cpu()
        return result.clone()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SlpdError(f"cannot read open_clip model config {path}: {exc}") from exc


def _split_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model config, or an ``open_clip_config.json`` ({"model_cfg": ..., "preprocess_cfg": ...})."""
    cfg = dict(cfg)
    if "model_cfg" in cfg:
        return dict(cfg["model_cfg"]), dict(cfg.get("preprocess_cfg") or {})
    return cfg, {}


def _check_config(name: str, cfg: Mapping[str, Any]) -> None:
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise SlpdError(f"open_clip model config for {name!r} lacks {', '.join(missing)}; a config needs "
                        "embed_dim, vision_cfg and text_cfg (see open_clip/model_configs/*.json)")


def _register_config(name: str, cfg: Mapping[str, Any]) -> None:
    """Make ``cfg`` known to open_clip under ``name`` through its public add_model_config (a JSON file)."""
    import open_clip

    global _CFG_DIR
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise SlpdError(f"custom open_clip model name {name!r} must be letters, digits, '-', '_', '.', '+'")
    with _CFG_LOCK:
        if _CFG_DIR is None:
            _CFG_DIR = Path(tempfile.mkdtemp(prefix="slpd-open-clip-cfg-"))
            atexit.register(shutil.rmtree, _CFG_DIR, True)
        cfg_file = _CFG_DIR / f"{name}.json"
        cfg_file.write_text(json.dumps(dict(cfg)), encoding="utf-8")
        open_clip.add_model_config(cfg_file)


def _find_checkpoint(path: Path) -> Path:
    if path.is_dir():
        for file_name in CHECKPOINT_FILE_NAMES:
            if (path / file_name).is_file():
                return path / file_name
        raise CheckpointError(f"no open_clip weights in folder {path}; expected one of "
                              f"{', '.join(CHECKPOINT_FILE_NAMES)}")
    return path


def _missing_checkpoint_message(model_name: str, path: Path | None) -> str:
    what = (f"checkpoint file {path} does not exist" if path
            else f"no checkpoint given for open_clip model {model_name!r}")
    return (f"{what}. Nothing is downloaded: provide the model's local open_clip weights file, e.g. "
            f"'open_clip_pytorch_model.bin' (QuiltNet, open_clip ports of PLIP) or 'pytorch_model.bin' (CONCH) "
            f"from the model's page, or a folder containing one of: {', '.join(CHECKPOINT_FILE_NAMES)}.")


_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def _refuse_hub(model_cfg: Mapping[str, Any], model_name: str, with_tokenizer: bool,
                tokenizer_dir: Path | None, local_text_tower: bool = False) -> None:
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") and not local_text_tower:
        raise SlpdError(
            f"open_clip model {model_name!r} has a HuggingFace text tower ({text_cfg['hf_model_name']!r}), whose "
            "architecture would be fetched from the HuggingFace hub. Give the model's open_clip hub folder instead "
            "(local-dir:FOLDER, or --vlm biomedclip --checkpoint FOLDER): the text tower is then built from local "
            "files.")
    needs_hf_tokenizer = bool(text_cfg.get("hf_tokenizer_name")) or "siglip" in model_name.lower()
    if with_tokenizer and needs_hf_tokenizer and tokenizer_dir is None:
        raise SlpdError(
            f"open_clip model {model_name!r} uses a HuggingFace tokenizer "
            f"({text_cfg.get('hf_tokenizer_name') or 'SigLIP'}), which would be downloaded from the hub. Put its "
            "tokenizer files (for a BERT tokenizer: vocab.txt and tokenizer_config.json, from the tokenizer's "
            "HuggingFace page) in the model folder or give tokenizer_dir= (CLI: --tokenizer FOLDER); needs the "
            "'transformers' package. Or load with with_tokenizer=False to use only the image tower.")


def _bert_config_from_state(state: Mapping[str, torch.Tensor], prefix: str = "text.transformer.") -> dict:
    """A BERT config with the shapes of the text tower in ``state`` (BiomedCLIP's PubMedBERT is a standard
    BERT-base: every other field is BertConfig's default). Attention heads: width / 64, as in BERT-base/large."""
    words = state.get(prefix + "embeddings.word_embeddings.weight")
    if words is None or (prefix + "encoder.layer.0.attention.self.query.weight") not in state:
        raise CheckpointError("the HuggingFace text tower in this checkpoint is not a BERT; put the text model's "
                              "config.json in the folder (or the tokenizer folder)")
    layers = {int(k[len(prefix + "encoder.layer."):].split(".", 1)[0]) for k in state
              if k.startswith(prefix + "encoder.layer.")}
    hidden = int(words.shape[1])
    return {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": int(words.shape[0]),
        "hidden_size": hidden, "num_hidden_layers": max(layers) + 1, "num_attention_heads": max(hidden // 64, 1),
        "intermediate_size": int(state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(state[prefix + "embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state[prefix + "embeddings.token_type_embeddings.weight"].shape[0]),
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }


def _text_config_dir(folders: Sequence[Path | None], state_dict_fn: Callable[[], Mapping[str, torch.Tensor]],
                     key: str) -> Path:
    """A local folder whose config.json describes the HuggingFace text tower: one of ``folders`` holding a
    non-CLIP config.json, else one written from the checkpoint's shapes."""
    for folder in folders:
        cfg_file = folder / "config.json" if folder is not None else None
        if cfg_file is not None and cfg_file.is_file():
            model_type = _read_json(cfg_file).get("model_type")
            if model_type and model_type not in ("clip", "open_clip"):
                return folder
    cfg = _bert_config_from_state(state_dict_fn())
    global _CFG_DIR
    with _CFG_LOCK:
        if _CFG_DIR is None:
            _CFG_DIR = Path(tempfile.mkdtemp(prefix="slpd-open-clip-cfg-"))
            atexit.register(shutil.rmtree, _CFG_DIR, True)
        out = _CFG_DIR / f"text-{key}"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    log.info("HuggingFace text tower config inferred from the checkpoint's shapes: %s", cfg)
    return out


def _build_tokenizer(model_name: str, context_length: int | None, tokenizer_dir: Path | None,
                     text_cfg: Mapping[str, Any] | None = None):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir():
            raise SlpdError(f"tokenizer_dir {tokenizer_dir} is not a folder")
        text_cfg = dict(text_cfg or {})
        try:  # the arguments open_clip.get_tokenizer passes for a local-dir model
            return HFTokenizer(str(tokenizer_dir), context_length=context_length,
                               tokenizer_mode=text_cfg.get("tokenizer_mode"),
                               **dict(text_cfg.get("tokenizer_kwargs") or {}))
        except Exception as exc:  # transformers missing, or files missing in the folder
            raise SlpdError(f"cannot build a HuggingFace tokenizer from {tokenizer_dir} (it needs e.g. vocab.txt and "
                            f"tokenizer_config.json, or tokenizer.json): {exc}") from exc
    # SimpleTokenizer: its BPE vocabulary ships inside the open_clip package, so this works offline
    return open_clip.get_tokenizer(model_name, context_length=context_length)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns (on the root logger) that the model is random: true only until our own load below."""
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _read_state(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    obj = read_checkpoint(path, allow_pickle=allow_pickle)
    raw, _ = extract_state_dict(obj, key="state_dict")
    state_dict, _ = strip_prefixes(raw, prefixes=("module.", "_orig_mod."))
    return state_dict


def _foreign_layout(model: nn.Module, path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse, naming the right preset, a checkpoint of another family (CONCH, PLIP, BiomedCLIP into a model
    without a HuggingFace text tower, a DINO checkpoint) before open_clip's converters misread it."""
    from napari_slpd.models.vlm_layouts import describe_keys

    guess = describe_keys(state_dict)
    if guess is None or guess.preset in ("", "quiltnet"):
        return
    if guess.preset == "biomedclip" and any(k.startswith("text.transformer.embeddings.") for k in model.state_dict()):
        return
    raise CheckpointError(f"{path} is {guess.what}, not weights for this open_clip architecture: use "
                          f"--vlm {guess.preset} (or --encoder {guess.preset}) with the model's folder")


def _load_weights(model: nn.Module, path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    _foreign_layout(model, path, state_dict)
    # the same adaptations open_clip's own loader makes (3rd-party layouts, old text layout, scalar logit_scale,
    # position embeddings trained at another size)
    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if name in state_dict and isinstance(param, torch.Tensor) and param.ndim != state_dict[name].ndim:
            state_dict[name] = state_dict[name].reshape(param.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None \
            and "logit_scale" in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    state_dict.pop("text.transformer.embeddings.position_ids", None)
    try:
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
    except Exception as exc:
        raise CheckpointError(f"position embeddings in {path} cannot be resized for this model: {exc}") from exc
    from napari_slpd.models.vlm_layouts import wrong_layout_hint

    # an open_clip CLIP of another architecture looks like QuiltNet's layout: no hint then
    hint = wrong_layout_hint(path, "quiltnet", keys=list(state_dict))
    check_state_dict(model, state_dict, str(path), hint=(hint + ".") if hint else
                     "Check that the checkpoint was made for this architecture.")
    model.load_state_dict(state_dict, strict=True)


def load_open_clip(model_name: str, checkpoint: str | os.PathLike | None, device: str | torch.device = "auto",
                   model_cfg: Mapping[str, Any] | str | os.PathLike | None = None, *,
                   preprocess_cfg: Mapping[str, Any] | None = None, allow_pickle: bool = False,
                   with_tokenizer: bool = True, tokenizer_dir: str | os.PathLike | None = None) -> OpenClipBundle:
    """Build ``model_name`` (a built-in open_clip config, ``model_cfg`` registered under that name, or
    ``local-dir:<folder>`` holding ``open_clip_config.json``) and load its weights from ``checkpoint``.

    ``model_cfg`` is a model config dict, an ``open_clip_config.json`` dict, or the path of either as JSON.
    ``preprocess_cfg`` overrides mean / std / size / interpolation (e.g. {"mean": [...], "std": [...]}).
    """
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    dev = resolve_device(device)
    if model_name.startswith("hf-hub:"):
        raise SlpdError(f"{model_name!r} would download from the HuggingFace hub; download the model's folder "
                        f"once and use 'local-dir:<folder>' or the architecture name with a local checkpoint")
    config_preprocess: dict[str, Any] = {}
    if model_name.startswith(_LOCAL_DIR):
        folder = Path(model_name[len(_LOCAL_DIR):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise SlpdError(f"{folder} has no open_clip_config.json; it is not an open_clip model folder")
        cfg, config_preprocess = _split_config(_read_json(folder / "open_clip_config.json"))
        if checkpoint is None:
            checkpoint = folder
    elif model_cfg is not None:
        if isinstance(model_cfg, (str, os.PathLike)):
            model_cfg = _read_json(Path(model_cfg).expanduser())
        cfg, config_preprocess = _split_config(model_cfg)
        _check_config(model_name, cfg)
        _register_config(model_name, cfg)
    else:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise SlpdError(f"open_clip has no model config named {model_name!r}; give model_cfg= (the model's "
                            "open_clip_config.json or model config) or one of open_clip.list_models()")
    tok_dir = Path(tokenizer_dir).expanduser() if tokenizer_dir is not None else None
    local_folder = Path(model_name[len(_LOCAL_DIR):]).expanduser() if model_name.startswith(_LOCAL_DIR) else None
    if tok_dir is None and local_folder is not None and cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        if any((local_folder / f).is_file() for f in _HF_TOKENIZER_FILES):
            tok_dir = local_folder  # an HF snapshot keeps its tokenizer files beside the config
    _refuse_hub(cfg, model_name, with_tokenizer, tok_dir, local_text_tower=local_folder is not None)

    if checkpoint is None:
        raise CheckpointError(_missing_checkpoint_message(model_name, None))
    ckpt_path = Path(checkpoint).expanduser()
    if not ckpt_path.exists():
        raise CheckpointError(_missing_checkpoint_message(model_name, ckpt_path))
    ckpt_path = _find_checkpoint(ckpt_path)
    state_dict = _read_state(ckpt_path, allow_pickle)

    build_name = model_name
    if local_folder is not None and cfg.get("text_cfg", {}).get("hf_model_name"):
        # the HuggingFace text tower is built from a local config.json, never from the hub
        import hashlib

        key = hashlib.sha256(str(local_folder.resolve()).encode()).hexdigest()[:16]
        text_dir = _text_config_dir([local_folder, tok_dir], lambda: state_dict, key)
        cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "hf_model_name": str(text_dir),
                                   "hf_tokenizer_name": str(tok_dir or text_dir)}}
        build_name = f"slpd-local-{key}"
        _register_config(build_name, cfg)

    force_preprocess = {**config_preprocess, **dict(preprocess_cfg or {})}
    try:
        # load_weights=False and no pretrained tags: open_clip builds the architecture and never fetches weights
        with _quiet_random_init_warning():
            model = open_clip.create_model(build_name, pretrained=None, load_weights=False, device="cpu",
                                           pretrained_image=False, pretrained_text=False,
                                           force_preprocess_cfg=force_preprocess or None)
    except Exception as exc:
        raise SlpdError(f"open_clip cannot build {model_name!r}: {exc}") from exc
    _load_weights(model, ckpt_path, state_dict)
    del state_dict
    model.eval().requires_grad_(False).to(dev)

    pp = get_model_preprocess_cfg(model)
    size = pp.get("size", 224)
    if isinstance(size, (tuple, list)):
        if size[0] != size[-1]:
            raise SlpdError(f"open_clip model {model_name!r} expects non-square {tuple(size)} images; "
                            "patches are square")
        size = size[0]
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        interpolation = "bicubic"
    context_length = cfg.get("text_cfg", {}).get("context_length")
    tokenizer = (_build_tokenizer(model_name, context_length, tok_dir, cfg.get("text_cfg"))
                 if with_tokenizer else None)
    bundle = OpenClipBundle(
        model=model, tokenizer=tokenizer, model_name=model_name, checkpoint=str(ckpt_path),
        checkpoint_sha256=sha256_file(ckpt_path), image_size=int(size),
        mean=tuple(float(v) for v in pp["mean"]), std=tuple(float(v) for v in pp["std"]),
        interpolation=interpolation, embed_dim=int(cfg["embed_dim"]), context_length=context_length,
        device=dev, model_cfg=dict(cfg))
    log.info("loaded %s on %s", bundle.model_id, dev)
    return bundle
