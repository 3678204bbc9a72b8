"""What a fine-tune run is: the settings the Fine-tune panel sets, the command line that runs
``src_training`` (or torchrun for several GPUs), and where a run folder goes. File names and presets come
from ``src_training`` itself (its config module does not import torch)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from napari_slpd.errors import SlpdError

from src_training.config import CHECKPOINT_NAME as CHECKPOINT_FILE  # noqa: F401 (used by run.py)
from src_training.config import EXPORT_NAME as EXPORT_FILE  # noqa: F401
from src_training.config import PRESETS
from src_training.events import EVENTS_NAME as EVENTS_FILE

RUN_FILE = "run.json"
LOG_FILE = "train.log"


class TrainingRunError(SlpdError):
    """A training run cannot be started, attached to, stopped or used."""


# -------------------------------------------------------------------------------------------------
# Settings and command line


@dataclass
class TrainingSettings:
    """What the Fine-tune panel sets; None means "the preset's value"."""

    cohort: str
    run_dir: str
    preset: str = "tiny"
    epochs: int | None = None
    num_clusters: int | None = None  # K
    batch_size: int | None = None  # regions per process and step
    warm_epoch: int | None = None  # prototype losses from epoch warm_epoch + 1 on (epochs counted from 0)
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpus: int = 1  # > 1: torchrun with one process per GPU
    extra_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise TrainingRunError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("epochs", "num_clusters", "batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise TrainingRunError(f"{name.replace('_', ' ')} must be at least 1, not {value}")
        if self.threads is not None and int(self.threads) < 0:
            raise TrainingRunError(f"CPU threads cannot be negative ({self.threads})")
        if self.warm_epoch is not None and int(self.warm_epoch) < 0:
            raise TrainingRunError(f"warm-up epochs cannot be negative ({self.warm_epoch})")
        if int(self.gpus) < 1:
            raise TrainingRunError(f"the number of GPUs must be at least 1, not {self.gpus}")
        if int(self.gpus) > 1 and str(self.device).startswith("cpu"):
            raise TrainingRunError("several GPUs were asked for with device 'cpu'; choose device auto or cuda")
        if int(self.gpus) > 1 and str(self.device).startswith("cuda:"):
            raise TrainingRunError("with several GPUs each process picks its own GPU; use device auto or cuda")

    @property
    def events_path(self) -> Path:
        return Path(self.run_dir) / EVENTS_FILE


def build_command(settings: TrainingSettings, resume: bool = False, python: str | None = None) -> list[str]:
    """The command line of a run: ``python -m src_training ...`` or, for several GPUs, torchrun's.

    torchrun is invoked as ``python -m torch.distributed.run`` (the same program) so that the environment
    of this Python is used whatever PATH says.
    """
    settings.validate()
    python = python or sys.executable
    if int(settings.gpus) > 1:
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(settings.gpus)),
               "-m", "src_training"]
    else:
        cmd = [python, "-m", "src_training"]
    cmd += [
        "--cohort", str(settings.cohort),
        "--out", str(settings.run_dir),
        "--events", str(settings.events_path),
        "--preset", settings.preset,
        "--device", "cuda" if int(settings.gpus) > 1 and settings.device == "auto" else str(settings.device),
        # A new run must not silently continue an older one left in the same folder (the trainer's default).
        "--resume", "auto" if resume else "none",
    ]
    for flag, value in (("--epochs", settings.epochs), ("--num-clusters", settings.num_clusters),
                        ("--batch-size", settings.batch_size), ("--warm-epoch", settings.warm_epoch),
                        ("--threads", settings.threads)):
        if value is not None:
            cmd += [flag, str(int(value))]
    cmd += [str(a) for a in settings.extra_args]
    return cmd


def training_folder(cohort_root: str | os.PathLike) -> Path:
    """COHORT/training, or its place in the cache folder when the cohort is read-only
    (napari_slpd.utils.storage: new runs are written there)."""
    from napari_slpd.utils.storage import write_target

    folder = Path(cohort_root) / "training"
    moved = write_target(folder.resolve())
    return folder if moved == folder.resolve() else moved


def default_run_dir(cohort_root: str | os.PathLike, preset: str) -> Path:
    """A fresh run folder under COHORT/training/ named by preset and start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = training_folder(cohort_root) / f"slpd-{preset}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
