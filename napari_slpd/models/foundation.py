"""Build a named preset (:mod:`napari_slpd.models.presets`) from a local checkpoint in its published layout.

Each family is built by the library its publisher used: timm for the ViTs published as timm weights (UNI,
Virchow, H-optimus, GigaPath, kaiko, Lunit; timm's own checkpoint filters convert layouts and resample
position embeddings), transformers (``local_files_only=True``, never remote code) for the transformers
folders (Phikon, Phikon-v2, Hibou, Midnight), and timm's Swin with CTransPath's convolutional stem for
CTransPath (the 2022 layout converted by timm's Swin filter). The returned module takes normalised images
[B, 3, S, S] and returns the preset's published embedding [B, dim].
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.models.checkpoints import check_state_dict, extract_state_dict, read_checkpoint, strip_prefixes
from napari_slpd.models.layouts import (CheckpointSource, identify_folder, identify_state_dict,
                                        locate_checkpoint, vit_signature)
from napari_slpd.models.presets import EncoderPreset
from napari_slpd.models.timm_build import create_timm_model
from napari_slpd.utils.files import sha256_file

__all__ = ["build_preset_module", "TokenPooling"]

log = logging.getLogger(__name__)


class TokenPooling(nn.Module):
    """A ViT's token sequence [B, N, D] -> one embedding: the class token, or class token + patch mean."""

    def __init__(self, backbone: nn.Module, pooling: str, num_prefix_tokens: int,
                 features: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.num_prefix_tokens = num_prefix_tokens
        self._features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._features(self.backbone, x)
        if self.pooling in ("cls", "pooler"):
            return tokens[:, 0]
        # "cls+mean": registers are prefix tokens too, and are left out of the mean (Virchow2's card)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)


# --------------------------------------------------------------------------------------------------- timm


def _timm_filter(model: nn.Module) -> Callable | None:
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _folder_model_args(preset: EncoderPreset, source: CheckpointSource) -> dict[str, Any]:
    """A timm hub folder's ``model_args`` the preset leaves open (its own kwargs always win)."""
    if source.layout != "timm_folder":
        return {}
    arch = source.config.get("architecture")
    if arch != preset.architecture:
        raise CheckpointError(f"{source.folder} is a timm folder for {arch!r}, but {preset.name} is "
                              f"{preset.architecture!r}" + _presets_hint(identify_folder(source)[1]))
    args = source.config.get("model_args") or {}
    return {k: v for k, v in args.items() if k not in preset.arch_kwargs and not isinstance(v, (dict, list))}


def _presets_hint(presets) -> str:
    if not presets:
        return ""
    return "; try " + " or ".join(f"--encoder {name}" for name in presets)


def _mismatch_error(preset: EncoderPreset, where: str, state_dict, original: CheckpointError) -> CheckpointError:
    identity = identify_state_dict(state_dict)
    others = tuple(p for p in identity.presets if p != preset.name)
    head = f"{where} does not fit {preset.name} ({preset.title}): it looks like {identity.description}"
    if others:
        return CheckpointError(head + _presets_hint(others) + ".")
    if preset.name in identity.presets and identity.signature.get("depth"):
        detail = str(original).splitlines()
        return CheckpointError(head + f", the architecture of {preset.name} but not its depth or sizes:\n"
                               + "\n".join(detail[1:4]))
    return CheckpointError(head + ".\n" + "\n".join(str(original).splitlines()[1:4]))


def _state_dict_of(source: CheckpointSource, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], str]:
    if source.weights is None or source.weights.suffix == ".json":
        raise CheckpointError(f"{source.folder}: sharded weights are only read for transformers models")
    raw, key = extract_state_dict(read_checkpoint(source.weights, allow_pickle=allow_pickle), key=None)
    state_dict, _ = strip_prefixes(raw, prefixes=("module.", "_orig_mod."))
    where = f"{source.weights}" + (f" [{key!r}]" if key else "")
    return state_dict, where


# what makes two ViTs different architectures (depth aside, which the key listing shows)
_ARCHITECTURE_TRAITS = ("width", "patch", "reg_tokens", "swiglu", "layer_scale")


def _load_timm(preset: EncoderPreset, source: CheckpointSource | None, seed_build, allow_pickle: bool):
    extra = _folder_model_args(preset, source) if source else {}
    if source is None:
        return seed_build(lambda: create_timm_model(preset, extra))
    state_dict, where = _state_dict_of(source, allow_pickle)
    if identify_state_dict(state_dict).family not in ("timm_vit", "swin", "unknown"):
        raise _mismatch_error(preset, where, state_dict, CheckpointError(""))
    # the architecture is checked against the weights on the meta device first: a wrong checkpoint for a
    # giant fails in a second, and the random initialisation the weights would overwrite is never computed
    with torch.device("meta"):
        model = create_timm_model(preset, {**extra, "weight_init": "skip"})
    model_keys = set(model.state_dict())
    state_dict = {k: v for k, v in state_dict.items() if k in model_keys or not k.startswith(("head.", "fc_norm."))}
    found, expected = vit_signature(state_dict), vit_signature(model.state_dict())
    if found and expected and any(found[k] != expected[k] for k in _ARCHITECTURE_TRAITS):
        differences = ", ".join(f"{k} {found[k]} vs {expected[k]}" for k in _ARCHITECTURE_TRAITS
                                if found[k] != expected[k])
        raise _mismatch_error(preset, where, state_dict, CheckpointError(f"\n  checkpoint vs preset: {differences}"))
    filter_fn = _timm_filter(model)
    try:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)  # timm's own layout conversion and pos-embed resampling
        check_state_dict(model, state_dict, where)
    except (CheckpointError, RuntimeError) as exc:
        raise _mismatch_error(preset, where, state_dict, CheckpointError(f"\n  {exc}")) from None
    if any(True for _ in model.buffers()):  # buffers computed at construction (Swin's indices): build for real
        model = seed_build(lambda: create_timm_model(preset, extra))
        model.load_state_dict(state_dict, strict=True)
    else:
        params = model.state_dict()
        state_dict = {k: v.to(params[k].dtype).contiguous() for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def _timm_module(preset: EncoderPreset, model: nn.Module) -> nn.Module:
    if preset.pooling == "model":
        return model
    return TokenPooling(model, preset.pooling, int(getattr(model, "num_prefix_tokens", 1)),
                        lambda backbone, x: backbone.forward_features(x))


# ------------------------------------------------------------------------------------------- transformers


def _transformers_class(preset: EncoderPreset):
    try:
        import transformers
    except ImportError as exc:
        raise SlpdError(f"{preset.name} is a transformers model: install the optional dependency with "
                        "pip install 'napari-slpd[models]' (or pip install transformers)") from exc
    return getattr(transformers, preset.architecture)


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or INFO lines from transformers while a preset loads (its problems are raised as ours)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


_TRANSFORMERS_TYPES = {"ViTModel": ("vit",), "Dinov2Model": ("dinov2",),
                       "Dinov2WithRegistersModel": ("dinov2_with_registers", "dinov2")}


def _load_transformers(preset: EncoderPreset, source: CheckpointSource | None, seed: int):
    cls = _transformers_class(preset)
    if source is None:
        raise CheckpointError(f"{preset.name} is built from its published folder (config.json + weights); "
                              f"give --checkpoint FOLDER ({preset.weights_source})")
    if source.layout != "transformers_folder":
        hint = ""
        if source.weights is not None and source.layout == "weights_file":
            state_dict, where = _state_dict_of(source, allow_pickle=False)
            identity = identify_state_dict(state_dict)
            hint = f": it looks like {identity.description}" + _presets_hint(
                tuple(p for p in identity.presets if p != preset.name))
            if identity.family == "transformers_vit":
                hint += f". {preset.name} needs the whole folder: config.json beside the weights"
        raise CheckpointError(f"{source.given} is {source.describe()}, but {preset.name} ({preset.title}) is "
                              f"published as a transformers folder ({' + '.join(preset.files)}){hint}")
    model_type = source.config.get("model_type")
    allowed = _TRANSFORMERS_TYPES.get(preset.architecture, ())
    if model_type not in allowed:
        others = tuple(p for p in identify_folder(source)[1] if p != preset.name)
        raise CheckpointError(f"{source.folder} is {source.describe()}, not the {preset.architecture} of "
                              f"{preset.name}" + _presets_hint(others))
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        # Hibou's config says model_type "dinov2": read into DINOv2-with-registers on purpose, so no warning
        config = cls.config_class.from_pretrained(str(source.folder), local_files_only=True)
        config.auto_map = None  # a folder's custom code is never run; its weights load into transformers' class
        torch.manual_seed(seed)
        try:
            model, info = cls.from_pretrained(str(source.folder), config=config, local_files_only=True,
                                              trust_remote_code=False, output_loading_info=True,
                                              **dict(preset.arch_kwargs))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{source.folder} could not be loaded as {preset.architecture}: {exc}") from exc
    _check_transformers_loading(preset, source, info)
    width = int(config.hidden_size)
    expected = preset.dim // 2 if preset.pooling == "cls+mean" else preset.dim
    if width != expected:
        raise CheckpointError(f"{source.folder} holds a {preset.architecture} of width {width}; {preset.name} "
                              f"has width {expected} (output {preset.dim})"
                              + _presets_hint(tuple(p for p in identify_folder(source)[1] if p != preset.name)))
    prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    trained_size = int(getattr(config, "image_size", preset.input_size))

    told = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def features(backbone, x):  # a ViTModel must be told to resample its position embeddings, DINOv2 always does
        extra = {"interpolate_pos_encoding": True} if told and x.shape[-1] != trained_size else {}
        return backbone(pixel_values=x, **extra).last_hidden_state

    return TokenPooling(model, preset.pooling, prefix, features)


def _check_transformers_loading(preset: EncoderPreset, source: CheckpointSource, info: Mapping) -> None:
    """transformers only warns about weights it did not find; a preset must not run half random."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    mismatched = [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", ())]
    if not (missing or mismatched):
        return
    detail = CheckpointError("\n" + (f"  missing keys ({len(missing)}): {', '.join(missing[:8])}" if missing else "")
                             + (f"  shape mismatches: {', '.join(mismatched[:8])}" if mismatched else ""))
    if source.weights is not None:
        state_dict, where = _state_dict_of(source, allow_pickle=False)
        raise _mismatch_error(preset, where, state_dict, detail)
    raise CheckpointError(f"{source.folder} does not fit {preset.name}:{detail}")


# ----------------------------------------------------------------------------------------------- custom


def _load_custom(preset: EncoderPreset, checkpoint, seed: int, allow_pickle: bool):
    """A preset with a builder of its own (CONCH, the pathology CLIPs): the builder reads the weights."""
    from napari_slpd.models.vlm_layouts import resolve_weights_file

    module_name, _, function = preset.architecture.partition(":")
    builder = getattr(importlib.import_module(module_name), function)
    path = None if checkpoint is None else Path(checkpoint).expanduser()
    module = builder(path, seed, allow_pickle)
    weights = None if path is None else resolve_weights_file(path, tuple(preset.arch_kwargs["weight_names"]),
                                                             preset.title)
    return module, weights


# --------------------------------------------------------------------------------------------------- entry


def _seeded(seed: int):
    def build(factory):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return factory()
    return build


def build_preset_module(preset: EncoderPreset, checkpoint, seed: int = 0,
                        allow_pickle: bool = False) -> tuple[nn.Module, Path | None, str | None]:
    """The preset's module (normalised images -> [B, dim]), its weights file and that file's sha256 (both None
    for random init)."""
    source = locate_checkpoint(checkpoint) if checkpoint is not None and preset.family != "custom" else None
    if preset.family in ("timm", "swin_convstem"):
        module = _timm_module(preset, _load_timm(preset, source, _seeded(seed), allow_pickle))
        weights = source.weights if source else None
    elif preset.family == "transformers":
        module, weights = _load_transformers(preset, source, seed), source.weights
    elif preset.family == "custom":
        module, weights = _load_custom(preset, checkpoint, seed, allow_pickle)
    else:
        raise SlpdError(f"{preset.name}: family {preset.family!r} is built elsewhere")
    if preset.family != "custom":
        _check_output_dim(preset, module)
    return module, weights, (sha256_file(weights) if weights is not None else None)


def _output_dim(preset: EncoderPreset, module: nn.Module) -> int:
    if isinstance(module, TokenPooling):
        backbone = module.backbone
        width = int(getattr(backbone, "embed_dim", 0) or getattr(getattr(backbone, "config", None), "hidden_size"))
        return 2 * width if module.pooling == "cls+mean" else width
    return int(getattr(module, "head_hidden_size", None) or getattr(module, "num_features", 0) or preset.dim)


def _check_output_dim(preset: EncoderPreset, module: nn.Module) -> None:
    """The published dimension is a promise of the preset: a model that would break it is refused."""
    dim = _output_dim(preset, module)
    if dim != preset.dim:
        raise CheckpointError(f"{preset.name} would produce embeddings of dimension {dim}, not the published "
                              f"{preset.dim}: the checkpoint is not {preset.title}")
