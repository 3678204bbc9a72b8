"""Faults produced for real: small filesystems (tmpfs mounts), read-only remounts, files that vanish or
change under a running extraction, damaged caches, processes killed mid-write.

Mounting needs root (or CAP_SYS_ADMIN); where it is refused, the tests that need a mount skip with the reason
and the file-size-limit (RLIMIT_FSIZE) variant of the full-disk test still runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest



def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


def _mount_error(folder: Path) -> str | None:
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run mount: {exc}"
    if out.returncode != 0:
        return f"mounting a tmpfs was refused ({out.stderr.strip() or out.returncode}); needs root or CAP_SYS_ADMIN"
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=20)
    return None


_CAN_MOUNT: dict[str, str | None] = {}


def can_mount(tmp_root: Path) -> str | None:
    """None when tmpfs mounts work here, else the reason they do not."""
    if "reason" not in _CAN_MOUNT:
        probe = tmp_root / f"probe-{uuid.uuid4().hex[:6]}"
        probe.mkdir(parents=True)
        _CAN_MOUNT["reason"] = _mount_error(probe)
    return _CAN_MOUNT["reason"]


class SmallDisk:
    """A tmpfs of ``size`` bytes mounted at ``path`` (unmounted at teardown)."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)], check=True,
                       timeout=20)

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=20)

    def free(self) -> int:
        return os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize

    def fill(self, leave: int = 4096) -> Path:
        """Take all free space but ``leave`` bytes with a filler file (a full disk); returns the filler."""
        filler = self.path / f".filler-{uuid.uuid4().hex[:6]}"
        with open(filler, "wb") as fh:
            block = b"\0" * (1 << 16)
            while self.free() > leave + len(block):
                fh.write(block)
                fh.flush()
            rest = self.free() - leave
            if rest > 0:
                with contextlib.suppress(OSError):
                    fh.write(b"\0" * rest)
                    fh.flush()
        return filler

    def remount(self, *options: str) -> None:
        subprocess.run(["mount", "-o", ",".join(("remount",) + options), str(self.path)], check=True, timeout=20)

    def read_only(self) -> None:
        self.remount("ro")

    def read_write(self) -> None:
        self.remount("rw")


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> SmallDisk, mounted; skipped with the reason where mounts are refused."""
    reason = can_mount(tmp_path)
    if reason:
        pytest.skip(reason)
    disks = []

    def make(size: int = 8 << 20, name: str = "disk") -> SmallDisk:
        disk = SmallDisk(tmp_path / name, size)
        disk.mount()
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.umount()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
