"""Training checkpoints (atomic, resumable) and the export of the teacher ViT-4K.

A run folder holds::

    RUN_DIR/
      checkpoint.pth             latest training state (written at every epoch end, every N steps, on stop)
      checkpoint_epoch0010.pth   numbered copies, if keep_every_epochs > 0
      teacher_vit4k.pth          exported teacher in the official DINO layout (features engine loads it)
      config.json                the run's settings, for people
      events.jsonl               the event stream, if the launcher chose this path

The training checkpoint keeps the official key names (``student``, ``teacher``, ``optimizer``, ``epoch``,
``dino_loss``) with backbone/head state dicts free of the ``module.`` prefix of DDP, plus what an exact
resume needs: the step inside the epoch, the centers of the prototype losses, the cluster state of the
current epoch, and every process's random generator states. All of it is plain tensors and containers, so
it is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from napari_slpd.errors import CheckpointError
from napari_slpd.utils.files import atomic_path
from src_training.config import CHECKPOINT_NAME, EXPORT_NAME  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

FORMAT = "slpd-train-checkpoint"
FORMAT_VERSION = 1

# Settings that may change between a checkpoint and its resume without changing what is being trained.
RESUMABLE_CHANGES = {"run.num_workers", "run.threads", "run.device", "run.save_every_steps", "run.keep_every_epochs",
                     "run.log_every_steps", "cluster.eval_batch_size", "monitor.labels", "monitor.task", "monitor.k",
                     "monitor.folds", "monitor.seed"}


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def export_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / EXPORT_NAME


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically: a kill during the write leaves the previous checkpoint untouched."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(
            f"{path} is not a readable training checkpoint ({exc}); resume from another one or start over "
            "with --resume none"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a slpd-train checkpoint (an exported or official ViT-4K checkpoint can seed a new run "
            "with --init-checkpoint instead)"
        )
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer napari-slpd; update napari-slpd to resume it")
    return state


def resolve_resume(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """``auto``: the run folder's checkpoint if there is one; ``none``: start over; else a checkpoint path."""
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        path = checkpoint_path(run_dir)
        return path if path.is_file() else None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
    return path


def config_differences(saved: dict, current: dict, allowed: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Dotted names of settings that differ, except those a resume may change (and ``allowed`` ones)."""
    changed = []
    for group in sorted(set(saved) | set(current)):
        a, b = saved.get(group), current.get(group)
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                key = f"{group}.{name}"
                if name not in a and name in b:
                    continue  # a setting newer than the checkpoint: the run continues with its value
                if key not in RESUMABLE_CHANGES and key not in allowed and a.get(name) != b.get(name):
                    changed.append(f"{key}: {a.get(name)!r} -> {b.get(name)!r}")
        elif a is None and isinstance(b, dict):
            continue  # a settings group newer than the checkpoint (e.g. monitor)
        elif a != b and group != "preset":
            changed.append(f"{group}: {a!r} -> {b!r}")
    return changed


def export_teacher(teacher_state: dict[str, torch.Tensor], path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the teacher (``backbone.*`` + ``head.*`` keys) as ``{"teacher": ...}``, the official DINO layout.

    ``napari_slpd.models.checkpoints.load_dino_checkpoint`` (and so ``build_region_encoder("hipt_vit4k",
    checkpoint=path)``) strips ``backbone.``, drops ``head.*`` and loads the ViT-4K from it.
    """
    from napari_slpd.models.checkpoints import save_dino_checkpoint

    return save_dino_checkpoint(teacher_state, path, extra=extra or {})
