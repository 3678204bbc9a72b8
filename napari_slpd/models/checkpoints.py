"""Reading and writing model checkpoints safely, in the official DINO / HIPT layout.

An official DINO training checkpoint is ``{"teacher": {...}, "student": {...}, "optimizer": ..., "epoch": ...,
"args": Namespace}``; the state dicts' keys look like ``backbone.blocks.0.attn.qkv.weight`` (teacher) or
``module.backbone.blocks.0...`` (DDP-wrapped student), with ``head.*`` / ``module.head.*`` for the DINO head.
Loading takes ``teacher``, strips ``module.`` and ``backbone.``, drops ``head.*`` and loads the rest strictly:
any missing or unexpected backbone key or shape mismatch is a :class:`CheckpointError` that lists them.

Files are read with ``torch.load(weights_only=True)``: tensors, containers and plain values only.
``argparse.Namespace`` (DINO stores its ``args`` so) is allowed too, since it only holds attributes. Anything
else means unpickling arbitrary code, which happens only when the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from napari_slpd.errors import CheckpointError
from napari_slpd.utils.files import atomic_path, sha256_file

__all__ = [
    "LoadReport",
    "read_checkpoint",
    "extract_state_dict",
    "strip_prefixes",
    "check_state_dict",
    "load_dino_checkpoint",
    "save_dino_checkpoint",
]

log = logging.getLogger(__name__)

# prefixes that wrappers add in front of the backbone's own names: DDP, DINO's MultiCropWrapper, torch.compile
_WRAPPER_PREFIXES = ("module.", "backbone.", "_orig_mod.")
# classes that are plain attribute bags and safe to rebuild without running arbitrary code
_SAFE_EXTRA_GLOBALS = [argparse.Namespace]
# how many names an error message lists before it says "... and N more"
_MAX_LISTED = 20


@dataclass
class LoadReport:
    """What :func:`load_dino_checkpoint` loaded, for logs and for provenance in feature files."""

    path: str
    sha256: str
    source_key: str | None  # "teacher", "state_dict", ... or None for a plain state dict
    stripped_prefixes: tuple[str, ...]
    loaded_keys: int
    ignored_keys: list[str] = field(default_factory=list)  # e.g. the DINO head

    def summary(self) -> str:
        where = f"[{self.source_key!r}]" if self.source_key else "(plain state dict)"
        ignored = f", ignored {len(self.ignored_keys)} head keys" if self.ignored_keys else ""
        return (f"loaded {self.loaded_keys} tensors from {self.path} {where}"
                f"{ignored}; sha256 {self.sha256[:12]}")


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files cannot be scanned; the message then names no classes
        return []


def _unpickler_detail(exc: Exception) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
    return match.group(1).strip() if match else str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False, map_location: str = "cpu") -> Any:
    """Load a checkpoint file (``.pth``/``.pt``/``.bin`` via torch, ``.safetensors`` via safetensors).

    Raises :class:`CheckpointError` when the file is missing, unreadable, or needs unpickling of arbitrary
    objects while ``allow_pickle`` is False.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} does not exist; give the path of a local checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a folder; give the checkpoint file inside it "
                              f"(e.g. {path / 'pytorch_model.bin'})")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with timm
            raise CheckpointError(f"{path} is a safetensors file but the 'safetensors' package is not "
                                  "installed; pip install safetensors") from exc
        try:
            return load_file(str(path), device=map_location)
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_globals(path)
        # a pickled object shows up as a global the safe unpickler does not know; anything else is garbage
        if not found and "unsupported global" not in str(exc).lower():
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): "
                                  f"{_unpickler_detail(exc)}") from exc
        if not allow_pickle:
            what = f" (it contains: {', '.join(found)})" if found else ""
            raise CheckpointError(
                f"{path} contains pickled Python objects other than tensors{what}. Loading it would run code "
                "from the file, so it was refused. If you trust where this file came from, load it with "
                "allow_pickle=True (CLI: --allow-pickle); better, re-save only its state dict.") from exc
        log.warning("unpickling %s with weights_only=False because allow_pickle=True was given", path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): "
                              f"{str(exc) or type(exc).__name__}") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be unpickled: {exc}") from exc


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, key: str | None = "teacher") -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the state dict inside a loaded checkpoint: ``obj[key]``, else common wrappers, else ``obj``."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors "
                              "or a DINO training checkpoint")
    candidates = [key] if key else []
    candidates += ["state_dict", "model", "model_state_dict"]
    for name in candidates:
        inner = obj.get(name)
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return dict(inner), name
    if _is_state_dict(obj):
        return dict(obj), None
    top = sorted(str(k) for k in obj.keys())
    raise CheckpointError(f"no state dict under key {key!r} and the file is not a plain state dict; "
                          f"its top-level keys are: {_list_names(top)}")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor],
                   prefixes: tuple[str, ...] = _WRAPPER_PREFIXES) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Remove leading wrapper prefixes (``module.``, ``backbone.``, ``_orig_mod.``) from every key."""
    out: dict[str, torch.Tensor] = {}
    seen: list[str] = []
    for name, tensor in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    stripped = True
                    if prefix not in seen:
                        seen.append(prefix)
        if name in out:
            raise CheckpointError(f"checkpoint has two tensors named {name!r} once wrapper prefixes are removed")
        out[name] = tensor
    return out, tuple(seen)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     hint: str = "Check that the checkpoint was made for this architecture.") -> None:
    """Raise :class:`CheckpointError` listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not fit {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_list_names(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_list_names(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {_list_names(mismatched)}")
    lines.append(hint)
    raise CheckpointError("\n".join(lines))


def load_dino_checkpoint(model: nn.Module, path: str | os.PathLike, key: str | None = "teacher",
                         allow_pickle: bool = False) -> LoadReport:
    """Load the backbone weights of a DINO checkpoint (official HIPT file, one exported by ``src_training``,
    or a plain state dict) into ``model``, strictly. ``head.*`` keys are ignored."""
    path = Path(path).expanduser()
    obj = read_checkpoint(path, allow_pickle=allow_pickle)
    raw, source_key = extract_state_dict(obj, key)
    state_dict, stripped = strip_prefixes(raw)
    model_keys = set(model.state_dict())
    ignored = sorted(k for k in state_dict if k.startswith("head.") and k not in model_keys)
    for name in ignored:
        del state_dict[name]
    where = f"{path} [{source_key!r}]" if source_key else str(path)
    check_state_dict(model, state_dict, where,
                     hint="Check that the checkpoint was trained for this architecture (ViT-256 vs ViT-4K, "
                          "and for the ViT-4K the dimension of its input tokens).")
    model.load_state_dict(state_dict, strict=True)
    report = LoadReport(path=str(path), sha256=sha256_file(path), source_key=source_key,
                        stripped_prefixes=stripped, loaded_keys=len(state_dict), ignored_keys=ignored)
    log.info(report.summary())
    return report


_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Refuse to write what ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, _PLAIN_TYPES):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"cannot save {where}: key {k!r} is a {type(k).__name__}, not str/int")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"cannot save {where}: a {type(obj).__module__}.{type(obj).__name__} would need "
                          "unpickling to read back; store plain values (e.g. vars(args) for a Namespace)")


def _cpu_state(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_dino_checkpoint(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                         extra: Mapping[str, Any] | None = None, *,
                         head: nn.Module | Mapping[str, torch.Tensor] | None = None,
                         key: str = "teacher") -> Path:
    """Write ``{key: {"backbone.<k>": ..., "head.<k>": ...}, **extra}`` atomically (the official DINO layout).

    ``model`` is a backbone, or a DINO wrapper whose state dict already has ``backbone.``/``head.`` keys.
    ``extra`` adds top-level entries (``"student"``, ``"epoch"``, ``"config"``, ...); every value must be
    readable with ``weights_only=True``. Returns the path written.
    """
    extra = dict(extra or {})
    if key in extra:
        raise CheckpointError(f"extra must not contain {key!r}: the model's weights are stored under it")
    state = _cpu_state(model)
    if not any(k.startswith(("backbone.", "head.")) for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    if head is not None:
        state.update({f"head.{k}": v for k, v in _cpu_state(head).items()})
    checkpoint: dict[str, Any] = {key: state, **extra}
    _check_weights_only_safe(checkpoint, "checkpoint")
    path = Path(path).expanduser()
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path
