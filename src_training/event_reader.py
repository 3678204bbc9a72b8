"""Reading the event stream of a run (schema in :mod:`src_training.events`): an incremental tail of the
JSON-lines file, one readable line per event for the log, and the curves, ETA and state a GUI shows.
Plain Python (no torch), so a viewer can follow a run without importing the trainer."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path



LOSS_TERMS = ("loss", "dino_loss", "intra_loss", "inter_loss")


# -------------------------------------------------------------------------------------------------
# Events


class EventTail:
    """Reads the events file incrementally: only new bytes each time, a half-written last line is kept for
    the next read, lines that are not JSON objects are skipped (and counted)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0
        self._buffer = b""
        self._inode: int | None = None
        self.skipped = 0

    def read_new(self) -> list[dict]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        if self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self.offset):
            # The file was replaced or truncated: read it again from the start.
            self.offset, self._buffer = 0, b""
        self._inode = stat.st_ino
        if stat.st_size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()  # b"" after a complete last line, else the partial line
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.skipped += 1
                continue
            if isinstance(event, dict) and "event" in event:
                events.append(event)
            else:
                self.skipped += 1
        return events


ENTROPY_TERMS = ("dino_target_entropy", "intra_target_entropy")


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(value, spec=".4f") -> str:
    return "?" if value is None else format(value, spec)


def format_event(event: dict) -> str | None:
    """A one-line human description of an event for the log view (None: too chatty to show)."""
    kind = event.get("event")
    if kind == "start":
        resumed = f", resumed from {event['resumed_from']}" if event.get("resumed_from") else ""
        return (f"started on {event.get('device')} x{event.get('world_size', 1)}: {event.get('n_slides')} slides, "
                f"{event.get('n_regions')} regions, {event.get('epochs')} epochs of {event.get('steps_per_epoch')} "
                f"steps{resumed}")
    if kind == "data":
        missing = event.get("missing") or []
        below = event.get("below_min_regions") or []
        text = f"data: {len(event.get('slides') or {})} slides used"
        if missing:
            text += f"; {len(missing)} without token grids ({', '.join(m['slide_id'] for m in missing[:5])})"
        if below:
            text += f"; {len(below)} below {event.get('min_num_region')} regions (DINO loss only)"
        return text
    if kind == "clusters":
        return (f"epoch {event.get('epoch')}: clustered {event.get('n_slides_clustered')} slides into K={event.get('k')}"
                f" (mean region-prototype cosine {_fmt(event.get('mean_similarity'), '.3f')}, "
                f"mean prototype distance to nearest slide {_fmt(event.get('mean_prototype_distance'), '.3f')})")
    if kind == "step":
        return None  # drawn in the loss plot; the epoch event sums them up for the log
    if kind == "epoch":
        return (f"epoch {event.get('epoch')} done in {_fmt(event.get('seconds'), '.1f')} s: loss "
                f"{_fmt(event.get('loss'))} (dino {_fmt(event.get('dino_loss'))}, intra "
                f"{_fmt(event.get('intra_loss'))}, inter {_fmt(event.get('inter_loss'))})")
    if kind == "monitor":
        when = "before training" if event.get("epoch") == -1 else f"epoch {event.get('epoch')}"
        return (f"{when}: KNN AUC {_fmt(event.get('knn_auc'), '.3f')} (+/- {_fmt(event.get('knn_auc_std'), '.3f')}), "
                f"balanced accuracy {_fmt(event.get('balanced_accuracy'), '.3f')} on {event.get('n_slides')} slides, "
                f"{event.get('n_folds')} frozen folds, task {event.get('task')}")
    if kind == "checkpoint":
        return f"checkpoint ({event.get('reason')}) at epoch {event.get('epoch')}, step {event.get('global_step')}"
    if kind == "export":
        return f"teacher exported: {event.get('path')}"
    if kind == "stopped":
        return f"stopped ({event.get('reason')}); checkpoint {event.get('checkpoint')}"
    if kind == "error":
        return f"ERROR ({event.get('kind')}): {event.get('message')}"
    if kind == "done":
        return (f"finished: {event.get('epochs')} epochs, {event.get('global_step')} steps in "
                f"{_fmt_seconds(event.get('seconds'))}; teacher {event.get('export')}")
    return None


@dataclass
class RunProgress:
    """What the events of a run say so far: the loss curves, where it is, what it wrote."""

    epochs: int | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    global_step: int = 0  # steps done
    device: str | None = None
    # loss term -> ([global step], [value]); a resume drops points after its checkpoint
    curves: dict[str, tuple[list[int], list[float]]] = field(
        default_factory=lambda: {t: ([], []) for t in LOSS_TERMS})
    epoch_losses: list[dict] = field(default_factory=list)
    # target entropy of the DINO / intra-slide loss -> ([global step], [nats]): a loss term is its targets'
    # entropy plus KL(targets || student); the gap between the two curves is what the student learns
    entropy_curves: dict[str, tuple[list[int], list[float]]] = field(
        default_factory=lambda: {t: ([], []) for t in ENTROPY_TERMS})
    # KNN monitor: one record per measurement (epoch -1: before training), as the monitor events hold them
    monitor: list[dict] = field(default_factory=list)
    # First global step with the prototype losses on (the end of the DINO-only warm-up), when known
    warmup_end_step: int | None = None
    warm_epoch: int | None = None
    eta_s: float | None = None
    eta_time: float | None = None  # event time the ETA refers to
    last_checkpoint: str | None = None
    export_path: str | None = None
    outcome: str | None = None  # None while going; "done" | "stopped" | "error"
    error: str | None = None
    log: list[str] = field(default_factory=list)

    def update(self, event: dict) -> str | None:
        kind = event.get("event")
        if kind == "start":
            self.epochs = event.get("epochs")
            self.steps_per_epoch = event.get("steps_per_epoch")
            self.total_steps = event.get("total_steps")
            self.device = event.get("device")
            start_step = int(event.get("start_step") or 0)
            self.global_step = start_step
            self.outcome, self.error = None, None
            for steps, values in [*self.curves.values(), *self.entropy_curves.values()]:
                keep = sum(1 for s in steps if s < start_step)
                del steps[keep:], values[keep:]
            start_epoch = int(event.get("start_epoch") or 0)
            self.epoch_losses = [e for e in self.epoch_losses if e.get("epoch", 0) < start_epoch]
            self.monitor = [m for m in self.monitor if int(m.get("epoch", -1)) < start_epoch]
            warm = ((event.get("config") or {}).get("cluster") or {}).get("warm_epoch")
            if warm is not None and self.steps_per_epoch:
                self.warm_epoch = int(warm)
                first = (int(warm) + 1) * int(self.steps_per_epoch)
                self.warmup_end_step = first if self.total_steps is None or first < int(self.total_steps) else None
        elif kind == "step":
            step = int(event.get("global_step", self.global_step))
            for term in LOSS_TERMS:
                value = event.get(term)
                if value is not None:
                    steps, values = self.curves[term]
                    steps.append(step)
                    values.append(float(value))
            for term in ENTROPY_TERMS:
                value = event.get(term)
                if value is not None and (term == "dino_target_entropy" or event.get("prototype_losses")):
                    steps, values = self.entropy_curves[term]
                    steps.append(step)
                    values.append(float(value))
            self.global_step = step + 1
            self.epoch = event.get("epoch", self.epoch)
            self.total_steps = event.get("total_steps", self.total_steps)
            self.steps_per_epoch = event.get("steps_per_epoch", self.steps_per_epoch)
            if event.get("eta_s") is not None:
                self.eta_s, self.eta_time = float(event["eta_s"]), float(event.get("time", time.time()))
        elif kind == "epoch":
            self.epoch_losses.append({k: event.get(k) for k in ("epoch",) + LOSS_TERMS})
        elif kind == "monitor":
            self.monitor = [m for m in self.monitor if m.get("epoch") != event.get("epoch")]
            self.monitor.append({k: v for k, v in event.items() if k not in ("event", "v")})
        elif kind == "checkpoint":
            self.last_checkpoint = event.get("path")
        elif kind == "export":
            self.export_path = event.get("path")
        elif kind == "stopped":
            self.outcome = "stopped"
            self.last_checkpoint = event.get("checkpoint") or self.last_checkpoint
        elif kind == "error":
            self.outcome = "error"
            self.error = event.get("message")
        elif kind == "done":
            self.outcome = "done"
            self.export_path = event.get("export") or self.export_path
            self.eta_s, self.eta_time = 0.0, float(event.get("time", time.time()))
        line = format_event(event)
        if line:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("time", time.time()))))
            line = f"{stamp}  {line}"
            self.log.append(line)
        return line

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left, counted down from the last step's estimate."""
        if self.eta_s is None:
            return None
        if self.outcome is not None:
            return 0.0
        now = time.time() if now is None else now
        return max(0.0, self.eta_s - max(0.0, now - (self.eta_time or now)))

    @property
    def fraction(self) -> float:
        if not self.total_steps:
            return 0.0
        return min(1.0, self.global_step / self.total_steps)

    def summary(self, now: float | None = None) -> str:
        if self.total_steps is None:
            return "starting…"
        epoch = "?" if self.epoch is None else self.epoch + 1
        text = f"epoch {epoch}/{self.epochs}, step {self.global_step}/{self.total_steps}"
        last = self.curves["loss"][1]
        if last:
            text += f", loss {last[-1]:.4f}"
        if self.outcome is None:
            text += f", ETA {_fmt_seconds(self.eta(now))}"
        return text
