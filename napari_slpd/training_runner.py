"""Run SLPD fine-tuning (``src_training``) as a background process and follow it; use its result.

The GUI never trains in its own process: a run is ``python -m src_training`` (or ``torchrun
--nproc_per_node N -m src_training`` for several GPUs) in its own session, writing JSON-lines events
(``src_training/events.py``) that :class:`EventTail` reads incrementally. :class:`TrainingRun` owns the
process:

- ``start`` / ``resume`` launch it (``--resume none`` / ``--resume auto``) and record its pid in
  ``RUN_DIR/run.json``, so a napari restarted later can :meth:`TrainingRun.attach` to a run it left
  running;
- ``request_stop`` sends SIGINT to the training process(es), which finish the current step, write a
  checkpoint and the teacher export, emit ``stopped`` and exit; if they do not within ``stop_timeout``
  seconds, SIGTERM and finally SIGKILL follow. Checkpoints are written atomically by the trainer, so even
  a kill leaves the previous checkpoint intact; leftover temporary files are removed once the process is
  gone;
- ``detach`` leaves the run going (it is in its own session, so closing napari does not signal it).

:func:`use_checkpoint` makes a run's exported teacher ViT-4K the cohort's region encoder: only region
embeddings depend on it, so they are re-encoded from the token grids cached in every FeatureStore (no
slide is read again), then prototypes and the similar-slides index are refreshed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_slpd.errors import CheckpointError, FeatureStoreError, SlpdError
from napari_slpd.io_utils import atomic_path, atomic_write_json
from napari_slpd.progress import is_cancelled

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoint.pth"  # src_training.checkpoint.CHECKPOINT_NAME
EXPORT_FILE = "teacher_vit4k.pth"  # src_training.checkpoint.EXPORT_NAME
LOSS_TERMS = ("loss", "dino_loss", "intra_loss", "inter_loss")
PRESETS = ("tiny", "nsclc", "brca")  # src_training.config.PRESETS, without importing torch here


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


def default_run_dir(cohort_root: str | os.PathLike, preset: str) -> Path:
    """A fresh run folder under COHORT/training/ named by preset and start time."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cohort_root) / "training" / f"slpd-{preset}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


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
            for steps, values in self.curves.values():
                keep = sum(1 for s in steps if s < start_step)
                del steps[keep:], values[keep:]
            self.epoch_losses = [e for e in self.epoch_losses if e.get("epoch", 0) < int(event.get("start_epoch") or 0)]
        elif kind == "step":
            step = int(event.get("global_step", self.global_step))
            for term in LOSS_TERMS:
                value = event.get(term)
                if value is not None:
                    steps, values = self.curves[term]
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


# -------------------------------------------------------------------------------------------------
# Processes


def _process(pid: int, create_time: float | None):
    """The psutil process ``pid`` if it is alive and is the one recorded (not a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if create_time is not None and abs(proc.create_time() - float(create_time)) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _signal(proc, sig) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def remove_partial_files(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files an atomic write left behind when its process was killed mid-write.

    Only call this when no process writes into ``run_dir``: these are ``.<name>.<random>.partial``
    files (napari_slpd.io_utils.atomic_path); the final files they were meant to replace are intact.
    """
    removed = []
    for path in Path(run_dir).glob(".*.partial"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d unfinished temporary file(s) from %s", len(removed), run_dir)
    return removed


class TrainingRun:
    """One run folder and (while it runs) its training process.

    States: ``"idle"`` (never started here), ``"running"``, ``"stopping"``, ``"done"``, ``"stopped"``,
    ``"failed"``. Call :meth:`poll` regularly (the GUI does so from a timer): it reads new events, notices
    the end of the process and escalates a stop that takes too long.
    """

    def __init__(self, run_dir: str | os.PathLike, settings: TrainingSettings | None = None):
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.settings = settings
        self.progress = RunProgress()
        self.tail = EventTail(self.run_dir / EVENTS_FILE)
        self.returncode: int | None = None
        self.stop_timeout = 300.0  # s from SIGINT to SIGTERM, and again from SIGTERM to SIGKILL
        self._popen: subprocess.Popen | None = None
        self._pid: int | None = None
        self._create_time: float | None = None
        self._stop_requested_at: float | None = None
        self._stop_stage = 0  # 0 none, 1 SIGINT sent, 2 SIGTERM sent, 3 SIGKILL sent
        self._ended = False
        self._log_handle = None

    # -- files ---------------------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.run_dir / RUN_FILE

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    @property
    def can_resume(self) -> bool:
        return self.checkpoint_path.is_file() and not self.is_running

    def exported_checkpoint(self) -> Path | None:
        """The teacher ViT-4K exported by the run (official DINO layout), if there is one."""
        candidates = [self.progress.export_path, str(self.run_dir / EXPORT_FILE)]
        for candidate in candidates:
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    def _write_run_file(self, **changes) -> None:
        record = self.read_run_file(self.run_dir) or {}
        record.update(changes)
        atomic_write_json(self.run_file, record)

    @staticmethod
    def read_run_file(run_dir: str | os.PathLike) -> dict | None:
        path = Path(run_dir) / RUN_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise TrainingRunError(f"{path} is not valid JSON ({exc}); delete it to use the run folder") from exc

    # -- starting ------------------------------------------------------------------------------------
    @classmethod
    def start(cls, settings: TrainingSettings, resume: bool = False, env: dict | None = None) -> "TrainingRun":
        """Launch a run (``resume``: continue from the run folder's checkpoint)."""
        run = cls(settings.run_dir, settings)
        run._launch(resume=resume, env=env)
        return run

    def resume(self, env: dict | None = None) -> None:
        """Continue this run from its latest checkpoint (``--resume auto``) in the same folder."""
        if self.is_running:
            raise TrainingRunError(f"the run in {self.run_dir} is still running")
        if not self.checkpoint_path.is_file():
            raise TrainingRunError(f"{self.run_dir} holds no checkpoint to resume from; start a new run instead")
        if self.settings is None:
            record = self.read_run_file(self.run_dir) or {}
            if not record.get("settings"):
                raise TrainingRunError(f"{self.run_file} does not record the run's settings; start a new run")
            self.settings = TrainingSettings(**record["settings"])
        self._launch(resume=True, env=env)

    def _launch(self, resume: bool, env: dict | None) -> None:
        import psutil

        settings = self.settings
        settings.run_dir = str(self.run_dir)
        existing = self.read_run_file(self.run_dir)
        if existing and existing.get("pid") and _process(existing["pid"], existing.get("create_time")):
            raise TrainingRunError(
                f"a training run is already running in {self.run_dir} (pid {existing['pid']}); stop it or attach to it"
            )
        if not resume and (self.checkpoint_path.exists() or self.tail.path.exists()):
            raise TrainingRunError(
                f"{self.run_dir} already holds a run; resume it or start the new run in another folder"
            )
        cohort = Path(settings.cohort)
        if not (cohort / "cohort.json").is_file():
            raise TrainingRunError(f"{cohort} is not a cohort folder (no cohort.json); open or create the cohort first")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_files(self.run_dir)
        command = build_command(settings, resume=resume)
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env["PYTHONUNBUFFERED"] = "1"
        self._close_log()
        self._log_handle = open(self.log_path, "ab")
        self._log_handle.write(f"\n$ {' '.join(command)}\n".encode())
        self._log_handle.flush()
        try:
            # Own session: Ctrl+C in napari's terminal or napari exiting never reaches the run by accident.
            self._popen = subprocess.Popen(
                command, stdout=self._log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=child_env, start_new_session=True, cwd=str(self.run_dir),
            )
        except OSError as exc:
            self._close_log()
            raise TrainingRunError(f"could not start the training process ({exc})") from exc
        self._pid = self._popen.pid
        try:
            self._create_time = psutil.Process(self._pid).create_time()
        except psutil.NoSuchProcess:
            self._create_time = None
        self.returncode = None
        self._ended = False
        self._stop_requested_at, self._stop_stage = None, 0
        self._write_run_file(
            pid=self._pid, create_time=self._create_time, host=socket.gethostname(), command=command,
            settings=asdict(settings), started=time.time(), state="running", resume=resume,
            launcher_pid=os.getpid(),
        )
        log.info("training started (pid %d): %s", self._pid, " ".join(command))

    @classmethod
    def attach(cls, run_dir: str | os.PathLike) -> "TrainingRun":
        """Follow a run folder again (e.g. after napari was restarted while it trained)."""
        run = cls(run_dir)
        record = cls.read_run_file(run.run_dir)
        if record is None and not run.tail.path.exists():
            raise TrainingRunError(f"{run.run_dir} is not a training run folder (no {RUN_FILE}, no {EVENTS_FILE})")
        record = record or {}
        if record.get("settings"):
            with contextlib.suppress(TypeError):
                run.settings = TrainingSettings(**record["settings"])
        if record.get("host") and record["host"] != socket.gethostname():
            log.warning("%s was started on %s; its process cannot be followed from here", run.run_dir, record["host"])
        elif record.get("pid") and _process(record["pid"], record.get("create_time")) is not None:
            run._pid, run._create_time = int(record["pid"]), record.get("create_time")
        run.poll()
        return run

    # -- following -----------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def is_running(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self._pid is not None and _process(self._pid, self._create_time) is not None

    @property
    def state(self) -> str:
        if self.is_running:
            return "stopping" if self._stop_stage else "running"
        outcome = self.progress.outcome
        if outcome == "done":
            return "done"
        if outcome == "stopped":
            return "stopped"
        if outcome == "error" or (self.returncode not in (None, 0)):
            return "failed"
        if self._stop_stage:
            return "stopped"
        if self._pid is None and self._popen is None and not self.progress.log:
            return "idle"
        return "stopped" if self.checkpoint_path.exists() else "failed"

    def poll(self) -> list[dict]:
        """Read new events; notice the process's end; escalate a stop that takes too long."""
        events = self.tail.read_new()
        for event in events:
            self.progress.update(event)
        running = self.is_running
        if running and self._stop_requested_at is not None:
            self._escalate_stop()
        if not running and (self._popen is not None or self._pid is not None) and not self._ended:
            self._on_ended()
            # Events written between the last read and the exit.
            for event in self.tail.read_new():
                self.progress.update(event)
                events.append(event)
        return events

    def _on_ended(self) -> None:
        self._ended = True
        if self._popen is not None:
            self.returncode = self._popen.poll()
        self._close_log()
        remove_partial_files(self.run_dir)
        state = self.state
        if state == "failed" and self.progress.error is None:
            self.progress.error = self.log_tail(12) or f"the training process exited with code {self.returncode}"
            self.progress.log.append(f"ERROR: training exited with code {self.returncode}; see {self.log_path}")
        with contextlib.suppress(OSError, TrainingRunError):
            self._write_run_file(state=state, ended=time.time(), returncode=self.returncode)
        self._pid = None
        self._popen = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_handle is not None:
            with contextlib.suppress(OSError):
                self._log_handle.close()
            self._log_handle = None

    # -- stopping ------------------------------------------------------------------------------------
    def _processes(self):
        """(launcher, training processes). Under torchrun the workers are its children, each in a session
        of its own, so they are signalled directly: a clean stop needs SIGINT in every worker."""
        if self._pid is None:
            return None, []
        proc = _process(self._pid, self._create_time)
        if proc is None:
            return None, []
        workers = []
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            workers = [c for c in proc.children(recursive=False)]
        is_torchrun = self.settings is not None and int(self.settings.gpus) > 1
        return proc, (workers if is_torchrun and workers else [proc])

    def request_stop(self) -> None:
        """Ask the run to stop cleanly (checkpoint + export); returns at once, :meth:`poll` follows up."""
        if not self.is_running:
            return
        if self._stop_stage:
            return  # a second SIGINT would abort the trainer without its checkpoint
        _, targets = self._processes()
        for proc in targets:
            _signal(proc, signal.SIGINT)
        self._stop_requested_at = time.monotonic()
        self._stop_stage = 1
        self.progress.log.append(f"{time.strftime('%H:%M:%S')}  stop requested: finishing the step, then checkpoint")

    def _escalate_stop(self) -> None:
        elapsed = time.monotonic() - (self._stop_requested_at or time.monotonic())
        launcher, targets = self._processes()
        if launcher is None:
            return
        if self._stop_stage == 1 and elapsed > self.stop_timeout:
            log.warning("training did not stop within %.0f s of SIGINT; sending SIGTERM", self.stop_timeout)
            for proc in {launcher, *targets}:
                _signal(proc, signal.SIGTERM)
            self._stop_stage = 2
        elif self._stop_stage == 2 and elapsed > 2 * self.stop_timeout:
            log.warning("training did not stop after SIGTERM; killing it (the last complete checkpoint is kept)")
            import psutil

            with contextlib.suppress(psutil.NoSuchProcess):
                for child in launcher.children(recursive=True):
                    _signal(child, signal.SIGKILL)
            _signal(launcher, signal.SIGKILL)
            self._stop_stage = 3

    def stop(self, timeout: float | None = None, poll_interval: float = 0.2) -> str:
        """Stop and wait for the process to end (escalating after ``timeout`` s); returns the final state."""
        if timeout is not None:
            self.stop_timeout = float(timeout)
        self.request_stop()
        deadline = time.monotonic() + 3 * self.stop_timeout + 10
        while self.is_running and time.monotonic() < deadline:
            self.poll()
            time.sleep(poll_interval)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5)
        self.poll()
        return self.state

    def wait(self, timeout: float | None = None, poll_interval: float = 0.2) -> str:
        """Follow the run until its process ends (or ``timeout`` s pass); returns the state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_running and (deadline is None or time.monotonic() < deadline):
            self.poll()
            time.sleep(poll_interval)
        self.poll()
        return self.state

    def detach(self) -> None:
        """Leave the run going without this process following it; ``attach`` picks it up again."""
        if not self.is_running:
            return
        self._write_run_file(state="running", detached=time.time(), launcher_pid=None)
        self._close_log()  # the child keeps its own handle on the log file
        if self._popen is not None:
            # Keep the pid for is_running, drop the Popen (its destructor neither waits nor kills).
            self._popen = None
        log.info("left the training run in %s running (pid %s)", self.run_dir, self._pid)


def find_runs(cohort_root: str | os.PathLike) -> list[Path]:
    """Run folders under COHORT/training/, newest first."""
    base = Path(cohort_root) / "training"
    if not base.is_dir():
        return []
    runs = [p for p in base.iterdir() if p.is_dir() and ((p / RUN_FILE).exists() or (p / EVENTS_FILE).exists())]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


def running_runs(cohort_root: str | os.PathLike) -> list[Path]:
    """Run folders whose recorded process is alive (to re-attach after a restart)."""
    alive = []
    for run_dir in find_runs(cohort_root):
        try:
            record = TrainingRun.read_run_file(run_dir) or {}
        except TrainingRunError:
            continue
        if record.get("pid") and record.get("host") in (None, socket.gethostname()):
            if _process(record["pid"], record.get("create_time")) is not None:
                alive.append(run_dir)
    return alive


# -------------------------------------------------------------------------------------------------
# Using a checkpoint


@dataclass
class ReencodeResult:
    slide_id: str
    status: str  # "reencoded" | "current" | "error" | "cancelled"
    n_regions: int = 0
    message: str = ""


def reencode_region_embeddings(
    cohort,
    checkpoint: str | os.PathLike,
    slide_ids: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 64,
    progress: ProgressFn | None = None,
    cancel=None,
    region_encoder=None,
) -> list[ReencodeResult]:
    """Recompute the region embeddings of every FeatureStore of ``cohort`` with the ViT-4K ``checkpoint``.

    Region embeddings are the only cached values that depend on the region encoder; the token grids
    (patch encoder output) are read back from each file. Each file is rewritten through a copy that
    replaces it atomically, with its settings (and so its ``settings_key``) updated to the new encoder,
    so prototypes computed from the old embeddings are known to be stale. Progress is counted in regions.
    """
    import h5py

    from napari_slpd.features.engine import encode_regions
    from napari_slpd.features.store import FeatureStore, settings_key

    slide_ids = list(slide_ids) if slide_ids is not None else cohort.slide_ids()
    paths = {sid: cohort.features_path(sid) for sid in slide_ids}
    present = {sid: p for sid, p in paths.items() if p.exists()}
    counts = {}
    token_dim = None
    for sid, path in present.items():
        try:
            with FeatureStore.open(path) as store:
                counts[sid] = store.n_regions
                token_dim = token_dim or store.token_dim
        except FeatureStoreError:
            counts[sid] = 0
    if not counts:
        raise FeatureStoreError(f"no slide of {cohort.root} has features yet; extract features first")
    if region_encoder is None:
        from napari_slpd.models.encoders import build_region_encoder

        region_encoder = build_region_encoder("hipt_vit4k", checkpoint=checkpoint, device=device,
                                              in_dim=int(token_dim))
    total = sum(counts.values())
    done = 0
    if progress:
        progress(0, total)
    results = []
    for sid in slide_ids:
        path = paths[sid]
        if sid not in present:
            results.append(ReencodeResult(sid, "error", 0, "no feature file"))
            continue
        if is_cancelled(cancel):
            results.append(ReencodeResult(sid, "cancelled"))
            continue
        try:
            with FeatureStore.open(path, expect_token_dim=getattr(region_encoder, "in_dim", None)) as store:
                attrs = dict(store.attrs)
                n = store.n_regions
            if attrs.get("region_encoder_sha256") == (region_encoder.checkpoint_sha256 or "") and \
                    attrs.get("region_encoder") == str(region_encoder.model_id):
                results.append(ReencodeResult(sid, "current", n, "already encoded with this checkpoint"))
                done += n
                if progress:
                    progress(done, total)
                continue
            settings = attrs.get("settings") or {}
            if isinstance(settings, str):
                try:
                    settings = json.loads(settings)
                except json.JSONDecodeError:
                    settings = {}
            if not settings:
                raise FeatureStoreError(f"{path} does not record its extraction settings; extract it again")
            settings["region_encoder"] = str(region_encoder.model_id)
            settings["region_encoder_sha256"] = region_encoder.checkpoint_sha256 or ""
            new_key = settings_key(settings)
            with atomic_path(path, suffix=".reencode.partial") as tmp:
                shutil.copyfile(path, tmp)
                with h5py.File(tmp, "r+") as fh:
                    tokens = fh["region_tokens"]
                    embeddings = []
                    for start in range(0, n, batch_size):
                        if is_cancelled(cancel):
                            raise _Cancelled()
                        block = tokens[start:start + batch_size]
                        embeddings.append(encode_regions(region_encoder, block, batch_size))
                        done += len(block)
                        if progress:
                            progress(done, total)
                    emb = np.concatenate(embeddings, axis=0) if embeddings else \
                        np.zeros((0, region_encoder.dim), np.float32)
                    old = fh["region_embeddings"]
                    if old.shape != emb.shape:
                        chunks = old.chunks
                        del fh["region_embeddings"]
                        fh.create_dataset("region_embeddings", data=emb, dtype="float32",
                                          maxshape=(None, emb.shape[1]),
                                          chunks=(max(1, min(256, 65536 // emb.shape[1])), emb.shape[1])
                                          if chunks else None)
                    else:
                        old[...] = emb
                    previous = f"{attrs.get('region_encoder', '?')}"
                    fh.attrs["region_encoder"] = settings["region_encoder"]
                    fh.attrs["region_encoder_sha256"] = settings["region_encoder_sha256"]
                    fh.attrs["region_encoder_checkpoint"] = str(Path(checkpoint).resolve())
                    fh.attrs["reencoded_from"] = previous
                    fh.attrs["settings"] = json.dumps(settings, sort_keys=True)
                    fh.attrs["settings_key"] = new_key
                    run_settings = attrs.get("run_settings") or {}
                    if isinstance(run_settings, str):
                        try:
                            run_settings = json.loads(run_settings)
                        except json.JSONDecodeError:
                            run_settings = {}
                    fh.attrs["run_key"] = settings_key({"settings_key": new_key, **run_settings})
            results.append(ReencodeResult(sid, "reencoded", n))
        except _Cancelled:
            results.append(ReencodeResult(sid, "cancelled", 0, "cancelled; the file keeps its earlier embeddings"))
        except SlpdError as exc:
            results.append(ReencodeResult(sid, "error", 0, str(exc)))
            log.warning("%s: %s", sid, exc)
    return results


class _Cancelled(Exception):
    pass


@dataclass
class UseCheckpointReport:
    checkpoint: str
    reencoded: list[ReencodeResult]
    prototypes: dict[str, str]  # slide_id -> "ok" or why it has none
    index_slides: int
    names: dict[str, str] = field(default_factory=dict)  # slide_id -> what happened to its prototype names
    cancelled: bool = False

    def summary(self) -> str:
        n_re = sum(r.status == "reencoded" for r in self.reencoded)
        n_cur = sum(r.status == "current" for r in self.reencoded)
        errors = [f"{r.slide_id}: {r.message}" for r in self.reencoded if r.status == "error"]
        ok = sum(v == "ok" for v in self.prototypes.values())
        text = (f"{n_re} slides re-encoded ({n_cur} already current) with {Path(self.checkpoint).name}; "
                f"prototypes of {ok} slides refreshed; similar-slides index over {self.index_slides} slides")
        if self.names:
            text += f"; names: {'; '.join(f'{k}: {v}' for k, v in sorted(self.names.items()))}"
        if errors:
            text += f"; problems: {'; '.join(errors)}"
        if self.cancelled:
            text += " (cancelled: slides not done keep their earlier embeddings)"
        return text


def use_checkpoint(
    session,
    checkpoint: str | os.PathLike,
    progress: ProgressFn | None = None,
    cancel=None,
    carry_names: bool = True,
) -> UseCheckpointReport:
    """Make ``checkpoint`` (an exported teacher ViT-4K) the region encoder of the session's cohort.

    Re-encodes region embeddings from the cached token grids, switches the session's feature settings to
    the new encoder (so later extractions use it too), recomputes every slide's prototypes and the
    cohort index. Prototype names given before are carried to the new prototypes by region overlap when
    ``carry_names`` (see :meth:`napari_slpd.annotations.PrototypeAnnotations.carry_over`).

    Progress: re-encoding is the first 80 %, prototypes and index the rest (in thousandths).
    """
    checkpoint = Path(checkpoint).expanduser().resolve()
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    cohort = session.cohort
    fs = session.settings.features
    from napari_slpd.models.encoders import build_region_encoder

    # Fail on a bad checkpoint before touching any file.
    encoder = build_region_encoder("hipt_vit4k", checkpoint=checkpoint, device=fs.device, in_dim=_token_dim(cohort))
    before = None
    if carry_names:
        from napari_slpd.annotations import PrototypeAnnotations

        # Names are stored with the region assignments they were given on, which is all carrying them
        # over to the new prototypes needs.
        before = PrototypeAnnotations.load(cohort, session)
    unit = 1000

    def stage(lo, hi):
        def report(done, total):
            if progress and total > 0:
                progress(int(lo + (hi - lo) * done / total), unit)
        return report

    results = reencode_region_embeddings(cohort, checkpoint, device=fs.device, progress=stage(0, 800),
                                         cancel=cancel, region_encoder=encoder)
    cancelled = any(r.status == "cancelled" for r in results)
    protos: dict[str, str] = {}
    n_index = 0
    names: dict[str, str] = {}
    if not cancelled:
        # Only once every slide is re-encoded does the cohort switch encoders (a cancelled run keeps the
        # slides done so far; running it again skips them).
        from dataclasses import replace

        session.settings.features = replace(fs, region_encoder="hipt_vit4k", region_checkpoint=str(checkpoint))
        protos = session.ensure_prototypes(progress=stage(800, 950), cancel=cancel)
        index = session.index(progress=stage(950, 1000), cancel=cancel)
        n_index = _index_size(index)
        if before is not None:
            names = before.carry_over(session)
    if progress:
        progress(unit, unit)
    return UseCheckpointReport(str(checkpoint), results, protos, n_index, names, cancelled)


def _token_dim(cohort) -> int:
    from napari_slpd.features.store import FeatureStore

    for sid in cohort.slide_ids():
        path = cohort.features_path(sid)
        if path.exists():
            try:
                with FeatureStore.open(path) as store:
                    return int(store.token_dim)
            except FeatureStoreError:
                continue
    raise FeatureStoreError(f"no slide of {cohort.root} has complete features; extract features first")


def _index_size(index) -> int:
    for attr in ("slide_ids", "members", "ids"):
        value = getattr(index, attr, None)
        if value is not None:
            with contextlib.suppress(TypeError):
                return len(value() if callable(value) else value)
    with contextlib.suppress(TypeError):
        return len(index)
    return 0
