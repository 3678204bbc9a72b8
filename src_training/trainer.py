"""The SLPD training loop, in the order of DINO's ``main_dino.py``: data, networks, losses, optimizer,
schedules, resume, then epochs of (re-clustering after the warm-up, training steps, checkpoint).

One step (SPEC section 2):

- the teacher sees the 2 global views, the student all 10;
- L_dino = DINO loss with centering; after the warm-up (epoch > warm_epoch) also
- L_intra: each region's own prototype c(n, k) through the teacher's last layer as the target, and
- L_inter: the matched prototype c(m, l*) of the nearest slide m as the target;
- L = L_dino + w_intra L_intra + w_inter L_inter; AdamW with the lr/wd schedules, per-parameter gradient
  clipping at 3.0 (DINO's clip_gradients), last layer frozen during epoch 0, then the EMA teacher update.

Over 600 lines, but one idea: the training loop, kept in one file so that it reads top to bottom as
DINO's does; losses, heads, data, clustering, schedules and checkpoints are their own modules.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from napari_slpd.errors import SlpdError
from napari_slpd.utils.device import autocast_dtype
from napari_slpd.utils.files import atomic_write_json
from src_training import checkpoint as ckpt
from src_training import distributed
from src_training.clustering import ClusterResult, recluster
from src_training.config import TrainConfig
from src_training.data import (
    EpochBatchSampler,
    MultiCropViews,
    ShardSampler,
    TokenGridDataset,
    TokenGridIndex,
    collate_eval,
    collate_views,
)
from src_training.events import EventWriter
from src_training.head import DINOHead, MultiCropWrapper
from src_training.losses import DINOLoss, PrototypeDistillLoss
from src_training.schedules import Schedules, teacher_temperature_schedule

log = logging.getLogger(__name__)


class TrainingDiverged(SlpdError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    status: str  # "done" or "stopped"
    epoch: int  # next epoch to run
    global_step: int  # next step to run
    checkpoint: Path | None
    export: Path | None
    history: list[dict] = field(default_factory=list)  # step records (the "step" events), this process's view


def _cancel_requested(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def build_networks(cfg: TrainConfig, token_dim: int, device: torch.device) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher (same weights); the teacher never drops paths and gets no gradients."""
    from napari_slpd.models.vit import vit4k_xs

    kwargs = {"input_embed_dim": token_dim}
    if cfg.model.phi_dropout is not None:
        kwargs["phi_drop"] = cfg.model.phi_dropout
    if cfg.model.arch != "vit4k_xs":
        raise SlpdError(f"unknown architecture {cfg.model.arch!r}; SLPD trains vit4k_xs")
    student_backbone = vit4k_xs(drop_path_rate=cfg.model.drop_path_rate, **kwargs)
    teacher_backbone = vit4k_xs(drop_path_rate=0.0, **kwargs)
    if cfg.model.init_checkpoint:
        from napari_slpd.models.checkpoints import load_dino_checkpoint

        load_dino_checkpoint(student_backbone, cfg.model.init_checkpoint, key="teacher")
    h = cfg.head
    head_args = dict(out_dim=h.out_dim, hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers)
    student = MultiCropWrapper(student_backbone, DINOHead(student_backbone.embed_dim, norm_last_layer=h.norm_last_layer, **head_args))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(teacher_backbone.embed_dim, **head_args))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student.to(device), teacher.to(device)


def param_groups(model: nn.Module) -> list[dict]:
    """DINO's get_params_groups: no weight decay on biases and norm parameters."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, clip: float) -> None:
    """DINO's clip_gradients: scale each parameter's gradient to norm <= clip, without a host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2)
    scales = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


def cancel_last_layer_gradients(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class Trainer:
    """An SLPD fine-tuning run of the ViT-4K on a cohort's cached token grids.

    ``index`` says which token grids to train on (``TokenGridIndex.from_cohort``); ``run_dir`` receives
    checkpoints, the exported teacher and config.json; ``events`` is an ``EventWriter``, a path, "-" (stdout)
    or None. Call :meth:`fit`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        index: TokenGridIndex,
        run_dir: str | os.PathLike,
        events: EventWriter | str | os.PathLike | None = None,
        resume: str | None = "auto",
        ctx: distributed.DistContext | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.index = index
        self.run_dir = Path(run_dir)
        self.ctx = ctx or distributed.init_distributed(cfg.run.device)
        self.device = self.ctx.device
        if isinstance(events, EventWriter):
            self.events = events if self.ctx.is_main else EventWriter(None)
        else:
            self.events = EventWriter(events, enabled=self.ctx.is_main)
        self.resume = resume
        self.history: list[dict] = []
        self._stop_reason: str | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # Same initial weights on every process and for every world size; training randomness per process.
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)

        # ============ data ============
        self.global_crop, self.local_crop = cfg.views.crop_sizes(self.index.grid)
        views = MultiCropViews(self.global_crop, self.local_crop, cfg.views.n_global, cfg.views.n_local, cfg.views.hflip_prob)
        self.train_set = TokenGridDataset(self.index, views=views)
        self.eval_set = TokenGridDataset(self.index, eval_crop=self.global_crop)
        self.sampler = EpochBatchSampler(len(self.index), cfg.optim.batch_size_per_gpu, ctx.rank, ctx.world_size, cfg.run.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.global_batch = self.sampler.global_batch
        loader_args = dict(
            num_workers=cfg.run.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.run.num_workers > 0,
            # A private generator: the loader must not draw from the global RNG (exact resume).
            generator=torch.Generator(),
        )
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=collate_views, **loader_args
        )
        eval_batch = cfg.cluster.eval_batch_size or 5 * cfg.optim.batch_size_per_gpu
        # Used once per epoch: its workers (and their open files) end after each clustering pass.
        self.eval_loader = torch.utils.data.DataLoader(
            self.eval_set,
            batch_sampler=ShardSampler(len(self.index), eval_batch, ctx.rank, ctx.world_size),
            collate_fn=collate_eval,
            **{**loader_args, "persistent_workers": False},
        )

        # ============ KNN monitor (optional: a labels file) ============
        self.monitor = None
        self.monitor_set = None
        self.monitor_history: list[dict] = []
        if cfg.monitor.labels:
            from src_training.monitor import prepare_monitor

            self.monitor_setup = prepare_monitor(cfg.monitor.labels, cfg.monitor.task, list(self.index.slide_ids),
                                                 k=cfg.monitor.k, folds=cfg.monitor.folds, seed=cfg.monitor.seed)
            # Whole token grids, as the region encoder sees them once the checkpoint is used.
            self.monitor_set = TokenGridDataset(self.index, eval_crop=self.index.grid)
            self.monitor_loader = torch.utils.data.DataLoader(
                self.monitor_set,
                batch_sampler=ShardSampler(len(self.index), eval_batch, ctx.rank, ctx.world_size),
                collate_fn=collate_eval,
                **{**loader_args, "persistent_workers": False},
            )

        # ============ networks ============
        self.student, self.teacher = build_networks(cfg, self.index.token_dim, self.device)
        if cfg.monitor.labels:
            from src_training.monitor import KnnMonitor

            self.monitor = KnnMonitor(self.monitor_setup, self.monitor_loader, self.index, self.device,
                                      int(self.teacher.backbone.embed_dim), run_dir=self.run_dir)
        if ctx.distributed:
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.teacher.load_state_dict(self.student.state_dict())  # after DDP's broadcast from rank 0
        else:
            self.student_ddp = self.student
        torch.manual_seed(cfg.run.seed + 1 + ctx.rank)

        # ============ losses ============
        n_views = cfg.views.n_views
        temps = teacher_temperature_schedule(
            cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs, cfg.optim.epochs
        )
        common = dict(teacher_temps=temps, student_temp=cfg.loss.student_temp, center_momentum=cfg.loss.center_momentum)
        out_dim = cfg.head.out_dim
        self.dino_loss = DINOLoss(out_dim, n_views, cfg.views.n_global, **common).to(self.device)
        self.intra_loss = PrototypeDistillLoss(out_dim, n_views, official_view_skip=cfg.loss.official_view_skip, **common).to(self.device)
        self.inter_loss = (
            self.intra_loss
            if cfg.loss.shared_prototype_center
            else PrototypeDistillLoss(out_dim, n_views, official_view_skip=cfg.loss.official_view_skip, **common).to(self.device)
        )

        # ============ optimizer and schedules ============
        self.optimizer = torch.optim.AdamW(param_groups(self.student))
        self.amp_dtype, needs_scaler = autocast_dtype(cfg.run.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        self.schedules = Schedules(cfg.optim, self.global_batch, self.steps_per_epoch)

        self.epoch, self.step_in_epoch = 0, 0
        self.clusters: ClusterResult | None = None
        self.epoch_sums = np.zeros(4)  # loss, dino, intra, inter summed over this epoch's steps
        self.epoch_steps = 0
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._last_cluster_s = 0.0

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        """The training state; every process must call this (it gathers the random generator states)."""
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
        all_rng = distributed.all_gather_objects(rng)
        return {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "fp16_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "dino_loss": self.dino_loss.state_dict(),
            "intra_loss": self.intra_loss.state_dict(),
            "inter_loss": self.inter_loss.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.epoch * self.steps_per_epoch + self.step_in_epoch,
            "epoch_sums": torch.as_tensor(self.epoch_sums),
            "epoch_steps": self.epoch_steps,
            "clusters": self.clusters.state_dict() if self.clusters is not None else None,
            "rng": all_rng,
            "world_size": self.ctx.world_size,
            "config": self.cfg.to_dict(),
            "n_regions": len(self.index),
            "slide_ids": list(self.index.slide_ids),
        }

    def save(self, reason: str) -> Path:
        state = self._state()
        path = ckpt.checkpoint_path(self.run_dir)
        if self.ctx.is_main:
            ckpt.save_checkpoint(state, path)
            keep = self.cfg.run.keep_every_epochs
            if reason == "epoch" and keep and self.epoch % keep == 0:
                ckpt.save_checkpoint(state, self.run_dir / f"checkpoint_epoch{self.epoch:04d}.pth")
            self.events.emit("checkpoint", path=str(path), epoch=self.epoch, global_step=state["global_step"], reason=reason)
        distributed.barrier()
        self.last_checkpoint = path
        return path

    def _restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        saved_global_batch = state["config"]["optim"]["batch_size_per_gpu"] * state["world_size"]
        # Another number of processes with the same global batch (the per-process batch scaled) trains the
        # same steps: the sampler deals each global batch out by rank.
        scaled = {"optim.batch_size_per_gpu"} if saved_global_batch == self.global_batch else set()
        changed = ckpt.config_differences(state["config"], self.cfg.to_dict(), scaled)
        if changed:
            raise SlpdError(
                f"{path} was written with other training settings ({'; '.join(changed[:6])}); resume with the same "
                "settings, or start a new run (another --out, or --resume none to overwrite this one)"
            )
        if state["n_regions"] != len(self.index) or list(state["slide_ids"]) != list(self.index.slide_ids):
            raise SlpdError(
                f"the cohort changed since {path} was written ({state['n_regions']} regions in "
                f"{len(state['slide_ids'])} slides then, {len(self.index)} in {self.index.n_slides} now); start a new "
                "run (another --out, or --resume none)"
            )
        if saved_global_batch != self.global_batch:
            per = saved_global_batch // self.ctx.world_size
            hint = (f"resume with --batch-size {per} on {self.ctx.world_size} process(es)"
                    if per * self.ctx.world_size == saved_global_batch else
                    f"use a number of processes that divides {saved_global_batch}")
            raise SlpdError(
                f"{path} was trained with a global batch of {saved_global_batch} ({state['config']['optim']['batch_size_per_gpu']} "
                f"per process x {state['world_size']}), this run has {self.global_batch} "
                f"({self.cfg.optim.batch_size_per_gpu} per process x {self.ctx.world_size}); keep the global batch: {hint}"
            )
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("fp16_scaler"):
            self.scaler.load_state_dict(state["fp16_scaler"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.intra_loss.load_state_dict(state["intra_loss"])
        if self.inter_loss is not self.intra_loss:
            self.inter_loss.load_state_dict(state["inter_loss"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.epoch_sums = state["epoch_sums"].numpy().astype(np.float64).copy()
        self.epoch_steps = int(state["epoch_steps"])
        clusters = state.get("clusters")
        # A cluster state is only reused inside the epoch it was made for; at an epoch start it is redone.
        if clusters is not None and int(clusters["epoch"]) == self.epoch and self.step_in_epoch > 0:
            self.clusters = ClusterResult.from_state_dict(clusters).to(self.device)
        rng = state.get("rng") or []
        if state["world_size"] == self.ctx.world_size and len(rng) == self.ctx.world_size:
            mine = rng[self.ctx.rank]
            torch.set_rng_state(mine["torch"])
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"])
        else:
            log.warning("resuming with %d processes instead of %d: stochastic depth draws will differ from an "
                        "uninterrupted run", self.ctx.world_size, state["world_size"])
        self.resumed_from = path
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step_in_epoch)

    def export(self) -> Path:
        path = ckpt.export_path(self.run_dir)
        if self.ctx.is_main:
            ckpt.export_teacher(
                self.teacher.state_dict(),
                path,
                extra={
                    "epoch": self.epoch,
                    "global_step": self.epoch * self.steps_per_epoch + self.step_in_epoch,
                    "arch": self.cfg.model.arch,
                    "config": self.cfg.to_dict(),
                    "trained_with": "napari-slpd src_training (SLPD)",
                },
            )
            self.events.emit("export", path=str(path), global_step=self.epoch * self.steps_per_epoch + self.step_in_epoch)
        distributed.barrier()
        return path

    # ------------------------------------------------------------------------------------------------- loop
    def fit(self, progress: Callable[[int, int], None] | None = None, cancel=None) -> TrainResult:
        """Train to the last epoch or until ``cancel`` (Event or callable) asks to stop; returns a TrainResult.

        Raises :class:`TrainingDiverged` on a non-finite loss (the last checkpoint is kept).
        """
        self._cancel = cancel
        started = time.time()
        threads_before = torch.get_num_threads()
        if self.cfg.run.threads:
            torch.set_num_threads(self.cfg.run.threads)
        try:
            return self._fit(progress, started)
        finally:
            torch.set_num_threads(threads_before)

    def _fit(self, progress, started: float) -> TrainResult:
        self._setup()
        try:
            resume_path = ckpt.resolve_resume(self.resume, self.run_dir)
            if resume_path is not None:
                self._restore(resume_path)
            cfg = self.cfg
            if self.ctx.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.run_dir / "config.json", cfg.to_dict())
            self._emit_start()
            if self.monitor is not None and self.epoch == 0 and self.step_in_epoch == 0:
                self._measure(-1)  # the starting point
            self._step_timer = _Throughput()
            while self.epoch < cfg.optim.epochs:
                epoch = self.epoch
                epoch_started = time.perf_counter()
                if epoch > cfg.cluster.warm_epoch and self.clusters is None:
                    if not self._recluster(epoch):
                        return self._stopped(started)
                finished = self._train_one_epoch(epoch, progress)
                if not finished:
                    return self._stopped(started)
                means = self.epoch_sums / max(self.epoch_steps, 1)
                if self.ctx.is_main:
                    self.events.emit(
                        "epoch", epoch=epoch, loss=means[0], dino_loss=means[1], intra_loss=means[2], inter_loss=means[3],
                        seconds=round(time.perf_counter() - epoch_started, 3),
                    )
                    log.info("epoch %d/%d: loss %.4f (dino %.4f, intra %.4f, inter %.4f)", epoch + 1, cfg.optim.epochs, *means)
                if self.monitor is not None:
                    self._measure(epoch)
                self.epoch, self.step_in_epoch = epoch + 1, 0
                self.epoch_sums, self.epoch_steps = np.zeros(4), 0
                self.clusters = None
                self.save("epoch")
            export = self.export()
            if self.ctx.is_main:
                self.events.emit("done", epochs=self.epoch, global_step=self.epoch * self.steps_per_epoch,
                                 seconds=round(time.time() - started, 3), export=str(export))
            return TrainResult("done", self.epoch, self.epoch * self.steps_per_epoch, self.last_checkpoint, export, self.history)
        finally:
            self.train_set.close()
            self.eval_set.close()
            if self.monitor_set is not None:
                self.monitor_set.close()

    def _measure(self, epoch: int) -> dict:
        """KNN monitor after ``epoch`` (-1: before training); every process takes part (its share of regions)."""
        record = self.monitor.measure(self.teacher.backbone, epoch)
        self.monitor_history.append(record)
        if self.ctx.is_main:
            self.events.emit("monitor", **record)
            log.info("epoch %d: KNN AUC %.3f (balanced accuracy %.3f) on %d slides, task %s", epoch,
                     record["knn_auc"], record["balanced_accuracy"], record["n_slides"], record["task"])
        return record

    def _emit_start(self) -> None:
        cfg = self.cfg
        below = [
            {"slide_id": sid, "n_regions": int(n)}
            for sid, n in zip(self.index.slide_ids, self.index.counts)
            if n < cfg.cluster.min_num_region
        ]
        if not self.ctx.is_main:
            return
        self.events.emit(
            "start", run_dir=str(self.run_dir), device=str(self.device), world_size=self.ctx.world_size,
            amp={None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype], preset=cfg.preset,
            n_slides=self.index.n_slides, n_regions=len(self.index), grid=self.index.grid,
            crops=[self.global_crop, self.local_crop], steps_per_epoch=self.steps_per_epoch, epochs=cfg.optim.epochs,
            total_steps=self.total_steps, global_batch=self.global_batch, start_epoch=self.epoch,
            start_step=self.epoch * self.steps_per_epoch + self.step_in_epoch,
            resumed_from=str(self.resumed_from) if self.resumed_from else None, config=cfg.to_dict(),
        )
        self.events.emit(
            "data", slides={sid: int(n) for sid, n in zip(self.index.slide_ids, self.index.counts)},
            missing=self.index.missing, below_min_regions=below, min_num_region=cfg.cluster.min_num_region,
        )
        if below:
            log.info("%d slide(s) have fewer than %d regions and are left out of the prototype losses: %s",
                     len(below), cfg.cluster.min_num_region, ", ".join(b["slide_id"] for b in below[:10]))

    def _local_stop(self) -> bool:
        if self._stop_reason is None and _cancel_requested(self._cancel):
            self._stop_reason = "cancel requested"
        return self._stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop after the current step (safe to call from a signal handler)."""
        self._stop_reason = reason

    def _stopped(self, started: float) -> TrainResult:
        path = self.save("stop")
        export = self.export()
        if self.ctx.is_main:
            self.events.emit("stopped", reason=self._stop_reason or "stop requested", checkpoint=str(path))
        step = self.epoch * self.steps_per_epoch + self.step_in_epoch
        return TrainResult("stopped", self.epoch, step, path, export, self.history)

    def _recluster(self, epoch: int) -> bool:
        # Only a single process may abandon the clustering pass midway; with several, all stop after it.
        should_stop = self._local_stop if not self.ctx.distributed else None
        kmeans_device = "cpu" if self.device.type == "cpu" else "auto"
        out = recluster(
            epoch, self.teacher, self.eval_loader, self.index, self.cfg.cluster, self.cfg.head.bottleneck_dim,
            self.device, None if self.cfg.cluster.fp32 else self.amp_dtype, should_stop=should_stop,
            kmeans_device=kmeans_device,
        )
        if out is None:
            return False
        self.clusters, stats = out
        self._last_cluster_s = stats["seconds"]
        if self.ctx.is_main:
            self.events.emit("clusters", **stats)
            log.info("epoch %d: %d slide(s) clustered into %d prototypes, %d left out (%.1f s)", epoch,
                     stats["n_slides_clustered"], stats["k"], len(stats["excluded"]), stats["seconds"])
        return True

    def _prototype_losses(self, student_logits, slides, items, epoch):
        """(L_intra, L_inter) of this process's batch; both are called on every process (collectives)."""
        clusters, cfg = self.clusters, self.cfg
        n_views = cfg.views.n_views
        batch = slides.shape[0]
        per_view = student_logits.view(n_views, batch, -1)
        proto = clusters.assignments[items]
        intra_rows = proto >= 0
        with torch.no_grad():
            intra_targets = self.teacher.forward_last_layer(clusters.centroids[slides[intra_rows], proto[intra_rows]])
        intra = self.intra_loss(
            per_view[:, intra_rows].reshape(-1, per_view.shape[-1]), intra_targets, epoch, n_targets=1
        )
        self._intra_entropy = self.intra_loss.target_entropy  # read now: a shared loss object is called again
        r = cfg.cluster.neighbours
        neighbours = clusters.neighbours[slides]  # [B, r]
        inter_rows = intra_rows & (neighbours >= 0).all(dim=1)
        s_rows, k_rows = slides[inter_rows], proto[inter_rows]
        targets = []
        for j in range(r):
            m = neighbours[inter_rows, j]
            l_star = clusters.neighbour_prototypes[s_rows, k_rows, j]
            targets.append(clusters.centroids[m, l_star])
        with torch.no_grad():
            inter_targets = self.teacher.forward_last_layer(torch.cat(targets))  # neighbour-major [r * B'', D]
        inter = self.inter_loss(
            per_view[:, inter_rows].reshape(-1, per_view.shape[-1]), inter_targets, epoch, n_targets=r
        )
        self._inter_entropy = self.inter_loss.target_entropy
        return intra, inter

    def _train_one_epoch(self, epoch: int, progress) -> bool:
        cfg, device = self.cfg, self.device
        sched = self.schedules
        prototype_losses = epoch > cfg.cluster.warm_epoch
        self.sampler.set_epoch(epoch, self.step_in_epoch)
        self.student_ddp.train()
        self.teacher.eval()  # no dropout/drop-path in the teacher (the official teacher has none active)
        n_global = cfg.views.n_global
        self._step_timer.restart()
        for views, slides, items in self.train_loader:
            step = self.step_in_epoch
            it = epoch * self.steps_per_epoch + step  # global training iteration
            for i, group in enumerate(self.optimizer.param_groups):
                group["lr"] = float(sched.lr[it])  # Python floats: the checkpoint loads with weights_only=True
                if i == 0:  # only the first group is regularized
                    group["weight_decay"] = float(sched.weight_decay[it])
            views = [v.to(device, non_blocking=True) for v in views]
            slides, items = slides.to(device), items.to(device)

            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                with torch.no_grad():
                    teacher_logits, _ = self.teacher(views[:n_global])  # only the global views
                student_logits, _ = self.student_ddp(views)
                loss_dino = self.dino_loss(student_logits, teacher_logits, epoch)
                if prototype_losses:
                    loss_intra, loss_inter = self._prototype_losses(student_logits, slides, items, epoch)
                    entropies = [self.dino_loss.target_entropy, self._intra_entropy, self._inter_entropy]
                else:
                    loss_intra = loss_inter = torch.zeros((), device=device)
                    entropies = [self.dino_loss.target_entropy, loss_intra, loss_inter]
                loss = loss_dino + cfg.loss.intra_weight * loss_intra + cfg.loss.inter_weight * loss_inter

            # One all-reduce for the logged values and the stop flag; all processes decide together.
            report = torch.stack([loss.detach().float(), loss_dino.detach().float(), loss_intra.detach().float(),
                                  loss_inter.detach().float(), *(h.detach().float().reshape(()) for h in entropies),
                                  torch.tensor(float(self._local_stop()), device=device)])
            distributed.all_reduce_sum(report)
            values = (report[:4] / self.ctx.world_size).tolist()
            self._entropies = (report[4:7] / self.ctx.world_size).tolist()
            stop = report[7].item() > 0
            if not all(math.isfinite(v) for v in values):
                self._diverged(epoch, step, values)

            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                if cfg.optim.clip_grad:
                    clip_gradients_per_parameter(self.student, cfg.optim.clip_grad)
                if epoch < cfg.optim.freeze_last_layer:
                    cancel_last_layer_gradients(self.student)
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                if cfg.optim.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    clip_gradients_per_parameter(self.student, cfg.optim.clip_grad)
                if epoch < cfg.optim.freeze_last_layer:
                    cancel_last_layer_gradients(self.student)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            ema_update(self.teacher, self.student, float(sched.momentum[it]))

            self.step_in_epoch = step + 1
            self.epoch_sums += np.asarray(values)
            self.epoch_steps += 1
            self._log_step(epoch, step, it, values, prototype_losses)
            if progress is not None and self.ctx.is_main:
                progress(it + 1, self.total_steps)
            every = cfg.run.save_every_steps
            if stop:
                if self._stop_reason is None:
                    self._stop_reason = "stop requested by another process"
                return False
            if every and (it + 1) % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self.save("step")
        return True

    def _log_step(self, epoch, step, it, values, prototype_losses) -> None:
        rate = self._step_timer.tick()
        record = {
            "epoch": epoch, "step": step, "global_step": it, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "loss": values[0], "dino_loss": values[1], "intra_loss": values[2],
            "inter_loss": values[3], "prototype_losses": prototype_losses,
            "dino_target_entropy": self._entropies[0], "intra_target_entropy": self._entropies[1],
            "inter_target_entropy": self._entropies[2],
            "lr": float(self.schedules.lr[it]), "weight_decay": float(self.schedules.weight_decay[it]),
            "momentum": float(self.schedules.momentum[it]), "teacher_temp": self.dino_loss.teacher_temp(epoch),
            "steps_per_s": rate, "regions_per_s": rate * self.global_batch if rate else None,
            "eta_s": self._eta(it, rate),
        }
        self.history.append(record)
        every = max(self.cfg.run.log_every_steps, 1)
        if self.ctx.is_main and (step % every == 0 or step == 0 or step == self.steps_per_epoch - 1):
            self.events.emit("step", **record)

    def _eta(self, it: int, rate: float | None) -> float | None:
        """Seconds left: remaining steps at the current rate plus the re-clustering passes still to come."""
        if not rate:
            return None
        cfg = self.cfg
        epoch = it // self.steps_per_epoch
        clusterings_left = sum(1 for e in range(epoch + 1, cfg.optim.epochs) if e > cfg.cluster.warm_epoch)
        return (self.total_steps - it - 1) / rate + clusterings_left * self._last_cluster_s

    def _diverged(self, epoch: int, step: int, values: list[float]) -> None:
        existing = ckpt.checkpoint_path(self.run_dir)
        last = self.last_checkpoint or (existing if existing.exists() else None)
        message = (
            f"the loss is not finite at epoch {epoch}, step {step} (loss {values[0]}, dino {values[1]}, "
            f"intra {values[2]}, inter {values[3]}); training stopped without applying this step. "
            + (f"The last good checkpoint {last} is kept; " if last else "No checkpoint had been written yet; ")
            + "try a lower --lr, full precision (--amp off) or more warm-up epochs, then resume."
        )
        if self.ctx.is_main:
            self.events.emit("error", kind="non_finite_loss", message=message, checkpoint=str(last) if last else None)
        raise TrainingDiverged(message)


class _Throughput:
    """Steps per second, smoothed (exponential moving average of step times; the first step is ignored)."""

    def __init__(self, smoothing: float = 0.1):
        self.smoothing = smoothing
        self.last = time.perf_counter()
        self.mean_dt: float | None = None
        self.n = 0

    def restart(self) -> None:
        """Start timing afresh without forgetting the mean (after clustering, worker start-up...)."""
        self.last = time.perf_counter()
        self.n = 0

    def tick(self) -> float | None:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.n += 1
        if self.n == 1:  # includes start-up (workers, clustering, first-call overheads)
            return 1.0 / self.mean_dt if self.mean_dt else None
        self.mean_dt = dt if self.mean_dt is None else (1 - self.smoothing) * self.mean_dt + self.smoothing * dt
        return 1.0 / self.mean_dt if self.mean_dt > 0 else None
