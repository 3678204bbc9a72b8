"""Exclusive locks that tell the truth on local disks and on shared file systems (NFS, Lustre, GPFS).

A lock is a file (``.<name>.lock``) holding who took it: host, pid, the process's start time and when it
was taken, so a refusal names the holder and ``slpd status`` can list holders.

Two ways to hold it:

* ``flock`` on that file, where flock works across every machine that sees the folder (a local disk, NFS
  mounted with network locks, Lustre mounted ``-o flock``): the kernel drops the lock when its process
  dies, so a killed run never leaves a lock behind.
* an *exclusive lock file* (created with ``O_EXCL``, atomic on POSIX file systems and NFSv3+), where flock
  fails (ENOLCK, EOPNOTSUPP, ENOSYS: Lustre without ``flock``, some FUSE and SMB mounts) or only works within
  one machine (NFS ``nolock`` / ``local_lock=flock|all``, Lustre ``localflock``; read from the mount table).
  Such a lock survives a killed process: it is *stale*, and cleared with a warning, when its holder was on
  this machine and is gone (pid not running, or running with another start time: a reused pid), or when it
  is older than ``stale_after_s`` (``$SLPD_STALE_LOCK_S``; default none: a lock of a process on another
  machine is only cleared by age).

``SLPD_LOCKS=files`` (or ``flock``) forces one way, e.g. for a file system whose flock is known to lie.
A lock file is opened read-write (never a folder opened read-only: NFS refuses an exclusive lock on a
read-only descriptor with EBADF).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from napari_slpd.errors import SlpdError

log = logging.getLogger(__name__)

STALE_ENV = "SLPD_STALE_LOCK_S"
MODE_ENV = "SLPD_LOCKS"
# flock errors that mean "this file system has no working flock", not "someone holds it"
NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
HELD_ERRNOS = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
# a lock file without a readable holder: its creator writes the holder right after creating it, so one
# still empty after this long was left by a crash between the two (or by an old version's flock lock)
UNREADABLE_STALE_S = 30.0


class LockHeld(SlpdError):
    """Another live process holds the lock (``holder`` says who, when known)."""

    def __init__(self, message: str, holder: "Holder | None" = None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    process_start: float | None  # seconds since the epoch, when known (tells a reused pid from the holder)
    taken: float  # when the lock was taken (seconds since the epoch, the holder's clock)
    token: str = ""
    mode: str = "flock"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken))
        return f"pid {self.pid} on {self.host} since {when}"

    def to_json(self) -> dict:
        return {"host": self.host, "pid": self.pid, "process_start": self.process_start, "taken": self.taken,
                "token": self.token, "mode": self.mode}

    @classmethod
    def from_json(cls, data: dict) -> "Holder":
        return cls(str(data.get("host", "?")), int(data.get("pid", -1)), data.get("process_start"),
                   float(data.get("taken", 0.0)), str(data.get("token", "")), str(data.get("mode", "flock")))


def this_host() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` of this machine started (seconds since the epoch); None when unknown or gone."""
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:
        return None


def holder_alive(holder: Holder) -> bool | None:
    """True / False for a holder on this machine; None for one elsewhere (cannot be checked from here)."""
    if holder.host != this_host():
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if holder.process_start is not None:
        started = process_start_time(holder.pid)
        if started is not None and abs(started - holder.process_start) > 1.0:
            return False  # the pid was reused by another process
    return True


def read_holder(lock_path: str | os.PathLike) -> Holder | None:
    try:
        return Holder.from_json(json.loads(Path(lock_path).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def stale_after_default() -> float | None:
    value = os.environ.get(STALE_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError as exc:
        raise SlpdError(f"${STALE_ENV} must be a number of seconds, not {value!r}") from exc
    return seconds if seconds > 0 else None


# -- does flock work here? ----------------------------------------------------------------------------

_MOUNT_CACHE: dict[str, tuple[str, str]] = {}


def _mount_of(path: Path, mountinfo: str | None = None) -> tuple[str, str] | None:
    """(file system type, mount options) of the mount holding ``path``, from /proc/self/mountinfo."""
    try:
        lines = (mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()).splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str, str] | None = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 6 or len(rest) < 3:
            continue
        mount_point = fields[4].replace("\\040", " ")
        if target == mount_point or target.startswith(mount_point.rstrip("/") + "/"):
            if best is None or len(mount_point) > best[0]:
                best = (len(mount_point), rest[0], f"{fields[5]},{rest[2]}")
    return (best[1], best[2]) if best else None


def flock_is_local_only(folder: str | os.PathLike, mountinfo: str | None = None) -> str | None:
    """Why flock on ``folder``'s file system does not exclude other machines (None when it does, or on a
    local file system)."""
    mount = _mount_of(Path(folder), mountinfo)
    if mount is None:
        return None
    fstype, options = mount
    opts = set(options.split(","))
    if fstype.startswith("nfs") and ({"nolock", "local_lock=flock", "local_lock=all"} & opts):
        return f"{fstype} mounted with {', '.join(sorted({'nolock', 'local_lock=flock', 'local_lock=all'} & opts))}"
    if fstype == "lustre" and "localflock" in opts:
        return "lustre mounted with localflock"
    return None


def lock_mode(folder: str | os.PathLike) -> str:
    """"flock" or "files" for locks in ``folder`` ($SLPD_LOCKS, else the mount's own options)."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in ("flock", "files"):
        return forced
    if forced and forced != "auto":
        raise SlpdError(f"${MODE_ENV} must be flock, files or auto, not {forced!r}")
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return "files"  # not POSIX
    key = str(folder)
    if key not in _MOUNT_CACHE:
        why = flock_is_local_only(folder)
        _MOUNT_CACHE[key] = ("files", why) if why else ("flock", "")
        if why:
            log.info("locks in %s are lock files (flock does not span machines there: %s)", folder, why)
    return _MOUNT_CACHE[key][0]


# -- the lock ------------------------------------------------------------------------------------------


class FileLock:
    """An exclusive lock on ``path`` (a ``.lock`` file), taken at once or refused with :class:`LockHeld`.

    ``what`` names the guarded thing in messages; ``wait_s``: keep trying that long (None: fail at once);
    ``stale_after_s``: a lock file older than this is stale whoever holds it (default $SLPD_STALE_LOCK_S).
    ``notes`` collects the messages of cleared stale locks (they are also logged as warnings)."""

    def __init__(self, path: str | os.PathLike, what: str = "", wait_s: float | None = None,
                 stale_after_s: float | None = None, poll_s: float = 0.1):
        self.path = Path(path)
        self.what = what or self.path.name
        self.stale_after_s = stale_after_s if stale_after_s is not None else stale_after_default()
        self.notes: list[str] = []
        self.mode = lock_mode(self.path.parent)
        self._fd: int | None = None
        self._token = uuid.uuid4().hex
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                self._acquire()
                return
            except LockHeld:
                if deadline is None or time.monotonic() >= deadline:
                    raise
                time.sleep(poll_s)

    # flock ----------------------------------------------------------------------------------------
    def _acquire(self) -> None:
        if self.mode == "flock":
            try:
                self._acquire_flock()
                return
            except _NoFlock as exc:
                log.warning("flock does not work in %s (%s); using exclusive lock files there", self.path.parent, exc)
                _MOUNT_CACHE[str(self.path.parent)] = ("files", str(exc))
                self.mode = "files"
        self._acquire_file()

    def _holder(self) -> Holder:
        return Holder(this_host(), os.getpid(), process_start_time(os.getpid()), time.time(), self._token, self.mode)

    def _acquire_flock(self) -> None:
        import fcntl

        for _ in range(10):  # the file may be removed and created again by a releasing holder meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in HELD_ERRNOS:
                    holder = read_holder(self.path)
                    raise LockHeld(self._held_message(holder), holder) from exc
                if exc.errno in NO_FLOCK_ERRNOS:
                    with contextlib.suppress(OSError):
                        if self.path.stat().st_size == 0:  # the empty file this attempt made: not a lock
                            self.path.unlink()
                    raise _NoFlock(f"flock: {os.strerror(exc.errno)}") from exc
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder unlinked on release: take the new one
                os.close(fd)
                continue
            self._fd = fd
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self._holder().to_json()).encode(), 0)
            return
        raise LockHeld(f"{self.what}: its lock {self.path} keeps changing hands; try again")

    # lock files -------------------------------------------------------------------------------------
    def _acquire_file(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is None:
                    # being written by its creator this instant, or a damaged file: judged by its age
                    with contextlib.suppress(OSError):
                        age = time.time() - self.path.stat().st_mtime
                        limit = UNREADABLE_STALE_S if self.stale_after_s is None else min(self.stale_after_s,
                                                                                          UNREADABLE_STALE_S)
                        if age > limit:
                            self._clear(None, f"an unreadable lock file {age:.0f} s old")
                            continue
                    raise LockHeld(self._held_message(None)) from None
                why = self._stale_reason(holder)
                if why is None:
                    raise LockHeld(self._held_message(holder), holder) from None
                self._clear(holder, why)
                continue
            try:
                os.write(fd, json.dumps(self._holder().to_json()).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        raise LockHeld(f"{self.what}: could not take its lock {self.path} (it keeps being taken and cleared)")

    def _stale_reason(self, holder: Holder) -> str | None:
        alive = holder_alive(holder)
        if alive is False:
            return f"its holder ({holder.describe()}) is no longer running"
        age = time.time() - holder.taken
        if self.stale_after_s is not None and age > self.stale_after_s:
            return f"it is {age:.0f} s old (older than {self.stale_after_s:.0f} s, ${STALE_ENV})"
        return None

    def _clear(self, holder: Holder | None, why: str) -> None:
        """Remove a stale lock file; a lock taken anew by someone else meanwhile is put back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # cleared by someone else
        moved = read_holder(aside)
        if holder is not None and moved is not None and moved.token != holder.token:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # a fresh lock, not the stale one: back (unless retaken already)
            with contextlib.suppress(OSError):
                aside.unlink()
            return
        with contextlib.suppress(OSError):
            aside.unlink()
        note = f"cleared a stale lock on {self.what} ({self.path}): {why}"
        self.notes.append(note)
        log.warning(note)

    # -----------------------------------------------------------------------------------------------
    def _held_message(self, holder: Holder | None) -> str:
        who = f"{holder.describe()} holds it" if holder is not None else "it is locked"
        return (f"another process is writing {self.what} ({who}: {self.path}); wait for it to finish or stop it "
                f"(a lock left by a crashed process on another machine is cleared by age: ${STALE_ENV})")

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)  # closing drops the flock
            return
        if self.mode == "files":
            holder = read_holder(self.path)
            if holder is not None and holder.token == self._token:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self.mode = "released"

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _NoFlock(OSError):
    pass


def lock_status(path: str | os.PathLike) -> tuple[Holder | None, str]:
    """Who holds the lock ``path`` and a word on it: "held", "stale" (holder gone), "unknown" (another
    machine's process, cannot be checked from here) or "free" (no lock file)."""
    path = Path(path)
    if not path.exists():
        return None, "free"
    holder = read_holder(path)
    if holder is None:
        return None, "unknown"
    if holder.mode == "flock" and holder.host == this_host():
        try:
            import fcntl

            fd = os.open(path, os.O_RDWR)
        except (ImportError, OSError):
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return holder, "held"
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return holder, "stale"
            finally:
                os.close(fd)
    alive = holder_alive(holder)
    return holder, {True: "held", False: "stale", None: "unknown"}[alive]
