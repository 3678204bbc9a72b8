"""Training configuration: dataclasses whose defaults are the official SLPD settings (SPEC section 2).

The official trainer (Carboxy/SLPD ``main_SLPD.py``) is driven by argparse flags; here the same values live
in small dataclasses, one per concern, so that a preset is a few overrides and a checkpoint can store the
whole configuration as a plain dict (loadable with ``torch.load(weights_only=True)``).

Presets:

- ``nsclc``: the official TCGA-NSCLC run (K = 4 prototypes, slides with fewer than 32 regions left out).
- ``brca``: the official TCGA-BRCA run (K = 2, min 16 regions).
- ``tiny``: a small, fast run for CPUs, tests and trying the tool on a handful of slides: small DINO head,
  batch 16, 4 epochs, prototype losses from epoch 2 on, crop sizes scaled to the token grid of the cache.
  A quick check that the pipeline runs, not a recipe: use nsclc/brca on 16 x 16 token grids.

``official_preset_fits(grid)`` says whether a cohort's token grids (side ``grid``) take the official crops
(14 global, 6 local) as they are; the fine-tune panel then offers the official recipe by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from napari_slpd.errors import SlpdError

# The official crop sizes are meant for a 16 x 16 token grid (4096-px regions, 256-px patches).
REFERENCE_GRID = 16


class ConfigError(SlpdError):
    """A training setting is out of range or does not fit the data."""


@dataclass
class ModelConfig:
    arch: str = "vit4k_xs"
    # Stochastic depth of the student (the teacher never drops paths).
    drop_path_rate: float = 0.1
    # Dropout after phi. The official SLPD trainer builds vit4k_xs with drop_rate=0, so phi's dropout is
    # inactive during training even though HIPT's architecture declares 0.25; None keeps the model's value.
    phi_dropout: float | None = 0.0
    # Optional ViT-4K checkpoint (official DINO layout) to start from; the official run starts from random
    # initialization (SPEC: "the HIPT ViT-4K weights are not loaded").
    init_checkpoint: str | None = None


@dataclass
class HeadConfig:
    """DINO head: MLP in_dim -> hidden -> hidden -> bottleneck (GELU), L2-normalize, weight-normed last layer."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True


@dataclass
class ViewConfig:
    """Multi-crop views on the token grid: RandomCrop + horizontal flip, as in DataAugmentationDINO4K."""

    global_crop: int = 14
    local_crop: int = 6
    n_global: int = 2
    n_local: int = 8
    hflip_prob: float = 0.5
    # Scale the crop sizes by G / 16 for caches whose grids are not 16 x 16 (small test regions).
    scale_to_grid: bool = False

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local

    def crop_sizes(self, grid: int) -> tuple[int, int]:
        """(global, local) crop sizes for a token grid of side ``grid``; raises if they do not fit."""
        global_crop, local_crop = self.global_crop, self.local_crop
        if self.scale_to_grid and grid != REFERENCE_GRID:
            global_crop = max(1, round(self.global_crop * grid / REFERENCE_GRID))
            local_crop = max(1, round(self.local_crop * grid / REFERENCE_GRID))
        if global_crop > grid or local_crop > grid:
            raise ConfigError(
                f"crops of {global_crop} (global) and {local_crop} (local) tokens do not fit the cached token "
                f"grids of {grid} x {grid}; use --preset tiny (scales crops to the grid) or set "
                f"--global-crop/--local-crop to at most {grid}"
            )
        return global_crop, local_crop


@dataclass
class LossConfig:
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    # Official quirk: the prototype losses reuse DINO's "skip the student view with the teacher's view index"
    # rule although a prototype is no view, so the student's first global view is dropped (9 of 10 used).
    # False compares every prototype target with all student views.
    official_view_skip: bool = True
    # The official trainer (main_SLPD.py) builds one prototype-loss object for intra and inter, so the two
    # share one center (updated twice per step): our default too (SPEC section 2). False gives each
    # prototype loss its own center.
    shared_prototype_center: bool = True


@dataclass
class ClusterConfig:
    num_clusters: int = 4
    min_num_region: int = 32
    # Prototype losses are active when epoch > warm_epoch (epochs counted from 0).
    warm_epoch: int = 20
    neighbours: int = 1
    niter: int = 10
    nredo: int = 5
    seed: int = 0
    # Batch of the center-crop embedding pass; 0 = 5 x the training batch, as the official trainer.
    eval_batch_size: int = 0
    # Run the clustering pass (teacher embeddings of every region, then K-means) in full precision even
    # when training uses mixed precision: bf16 bottleneck embeddings (8 bits of mantissa) blur the cosine
    # similarities K-means and the slide matching work on. False: the training's autocast.
    fp32: bool = True


@dataclass
class OptimConfig:
    epochs: int = 100
    batch_size_per_gpu: int = 128
    # Peak learning rate for a global batch of 256 (linear scaling rule), reached after warmup_epochs.
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    # DINO clips each parameter's gradient norm separately (utils.clip_gradients); 0 disables clipping.
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    momentum_teacher: float = 0.996


@dataclass
class RunConfig:
    seed: int = 0
    num_workers: int = 4
    # torch CPU threads of each training process (0: torch's default). On a shared or small machine 1-2
    # threads per process are usually faster than oversubscribing the cores.
    threads: int = 0
    # "auto": bf16 autocast on CUDA, full precision on CPU; "bf16", "fp16" (with a grad scaler) or "off".
    amp: str = "auto"
    device: str = "auto"
    # A checkpoint is written at the end of every epoch and, if > 0, every this many steps.
    save_every_steps: int = 0
    # Keep a numbered copy of the checkpoint every this many epochs (0: only the latest is kept).
    keep_every_epochs: int = 0
    # Step events are written every this many steps (the first and last step of an epoch always are).
    log_every_steps: int = 1


@dataclass
class MonitorConfig:
    """KNN monitor (src_training/monitor.py): a labels file turns it on."""

    labels: str | None = None  # CSV/TSV with slide_id, a task column, optional case_id
    task: str | None = None  # the classification column (None: the first one)
    k: int = 5
    folds: int = 10
    seed: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    preset: str = "nsclc"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        groups = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in data.items():
            if name not in groups:
                raise ConfigError(f"unknown training setting group {name!r}")
            if isinstance(value, dict):
                sub_cls = type(getattr(cls(), name))
                known = {f.name for f in dataclasses.fields(sub_cls)}
                unknown = set(value) - known
                if unknown:
                    raise ConfigError(f"unknown setting(s) in {name}: {', '.join(sorted(unknown))}")
                kwargs[name] = sub_cls(**value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def override(self, dotted: dict[str, Any]) -> "TrainConfig":
        """A copy with ``{"optim.lr": 1e-3, ...}`` applied; unknown names raise ConfigError."""
        data = self.to_dict()
        for key, value in dotted.items():
            group, _, name = key.partition(".")
            if group not in data or not isinstance(data[group], dict) or name not in data[group]:
                raise ConfigError(f"unknown training setting {key!r}")
            data[group][name] = value
        return TrainConfig.from_dict(data)

    def validate(self) -> None:
        o, c, v, l, r = self.optim, self.cluster, self.views, self.loss, self.run
        checks = [
            (o.epochs >= 1, "epochs must be >= 1"),
            (o.batch_size_per_gpu >= 1, "batch size must be >= 1"),
            (o.lr > 0 and o.min_lr >= 0, "learning rates must be positive"),
            (0 <= o.momentum_teacher <= 1, "teacher momentum must lie in [0, 1]"),
            (c.num_clusters >= 1, "num_clusters must be >= 1"),
            (c.min_num_region >= c.num_clusters, "min_num_region must be >= num_clusters (K-means needs K points)"),
            (c.neighbours >= 1, "neighbours must be >= 1"),
            (v.n_global >= 1 and v.n_local >= 0, "need at least one global view"),
            (v.global_crop >= 1 and v.local_crop >= 1, "crop sizes must be >= 1"),
            (l.teacher_temp > 0 and l.student_temp > 0, "temperatures must be positive"),
            (0 <= l.center_momentum <= 1, "center momentum must lie in [0, 1]"),
            (r.amp in ("auto", "bf16", "fp16", "off"), "amp must be one of auto, bf16, fp16, off"),
            (r.threads >= 0 and r.num_workers >= 0, "threads and num_workers must be >= 0"),
            (r.save_every_steps >= 0 and r.log_every_steps >= 0, "step intervals must be >= 0"),
            (self.head.out_dim >= 2 and self.head.bottleneck_dim >= 1, "head dims must be positive"),
            (self.monitor.k >= 1 and self.monitor.folds >= 2, "monitor k must be >= 1 and folds >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid training settings: {message}")


def preset(name: str) -> TrainConfig:
    """The configuration of a named preset (nsclc, brca, tiny)."""
    if name == "nsclc":
        return TrainConfig(preset="nsclc")
    if name == "brca":
        return TrainConfig(cluster=ClusterConfig(num_clusters=2, min_num_region=16), preset="brca")
    if name == "tiny":
        return TrainConfig(
            head=HeadConfig(out_dim=1024, hidden_dim=256, bottleneck_dim=64),
            views=ViewConfig(scale_to_grid=True),
            cluster=ClusterConfig(num_clusters=2, min_num_region=4, warm_epoch=1),
            # A run of a dozen steps: with the official reference lr (5e-4 per 256, i.e. 3e-5 at batch 16) and
            # teacher momentum 0.996 neither network would move; the teacher must follow the student within a
            # few dozen steps, so the tiny run uses lr 1e-2 per 256 (6e-4 at batch 16), momentum 0.99 and a
            # one-epoch warm-up.
            optim=OptimConfig(epochs=4, batch_size_per_gpu=16, lr=1e-2, warmup_epochs=1, momentum_teacher=0.99),
            run=RunConfig(num_workers=0),
            preset="tiny",
        )
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


PRESETS = ("nsclc", "brca", "tiny")
PRESET_LABELS = {
    "nsclc": "nsclc: official SLPD recipe (K=4, 100 epochs)",
    "brca": "brca: official SLPD recipe (K=2, 100 epochs)",
    "tiny": "tiny: quick check / small token grids (not the official recipe)",
}


def official_preset_fits(grid: int | None) -> bool:
    """Whether token grids of side ``grid`` take the official crops (14 x 14 global, 6 x 6 local) unscaled."""
    if not grid:
        return False
    views = ViewConfig()
    return int(grid) >= max(views.global_crop, views.local_crop)


def default_preset(grid: int | None) -> str:
    """The preset a user should start from: the official recipe when the grids allow it, else tiny."""
    return "nsclc" if official_preset_fits(grid) else "tiny"

# File names inside a run folder (here, not in checkpoint.py, so that a viewer can use them without torch).
CHECKPOINT_NAME = "checkpoint.pth"
EXPORT_NAME = "teacher_vit4k.pth"
