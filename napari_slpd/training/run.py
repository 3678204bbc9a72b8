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

Its settings and command line are in :mod:`napari_slpd.training.settings`, reading its events in
:mod:`src_training.event_reader`; using its result is :func:`napari_slpd.features.reencode.use_checkpoint`.
"""


from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path


from napari_slpd.utils.files import atomic_write_json

from napari_slpd.training.settings import (CHECKPOINT_FILE, EVENTS_FILE, EXPORT_FILE, LOG_FILE, RUN_FILE,
                                          TrainingRunError, TrainingSettings, build_command)
from src_training.event_reader import EventTail, RunProgress

log = logging.getLogger(__name__)


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
    files (napari_slpd.utils.files.atomic_path); the final files they were meant to replace are intact.
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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # Damaged (a full disk, a crash of the file system): set aside, and the run is followed from its
            # events file and checkpoint, which are what resuming needs.
            from napari_slpd.utils.storage import set_aside

            aside = set_aside(path)
            log.warning("training run file %s is damaged (%s; %s); the run is followed from its events file and "
                        "checkpoint instead", path, exc, f"kept as {aside.name}" if aside else "left as it is")
            return None

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
    from napari_slpd.training.settings import training_folder

    bases = dict.fromkeys([Path(cohort_root) / "training", training_folder(cohort_root)])  # + a read-only cohort's cache
    runs = [p for base in bases if base.is_dir() for p in base.iterdir()
            if p.is_dir() and ((p / RUN_FILE).exists() or (p / EVENTS_FILE).exists())]
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
