"""The cohort registry under many writers (processes, as on a shared file system) and the locks."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from napari_slpd.cohort import Cohort
from napari_slpd.errors import SlpdError
from napari_slpd.utils import locks
from napari_slpd.utils.locks import FileLock, Holder, LockHeld, flock_is_local_only, lock_status


def _register(root: str, writer: int, n: int, start) -> None:
    start.wait()  # every writer begins at once
    cohort = Cohort(root)
    for i in range(n):
        cohort.add_slide(f"/slides/w{writer}/s{writer:02d}_{i:03d}.svs", mpp=0.25 if i % 2 else None)


def _run_writers(root, writers: int, n: int) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_register, args=(str(root), w, n, start)) for w in range(writers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


@pytest.mark.parametrize("writers, n", [(8, 25), (2, 100)])
def test_concurrent_writers_lose_nothing(tmp_path, writers, n):
    root = tmp_path / "cohort"
    Cohort(root).save_settings({"kept": True})
    _run_writers(root, writers, n)
    cohort = Cohort(root)
    ids = cohort.slide_ids()
    assert len(ids) == writers * n
    assert ids == sorted(f"s{w:02d}_{i:03d}" for w in range(writers) for i in range(n))
    assert cohort.slide("s01_001").mpp == 0.25 and cohort.slide("s01_002").mpp is None
    assert cohort.load_settings() == {"kept": True}
    assert not [p for p in (root / "registry").iterdir() if p.name.startswith(".")]  # no temporary left


def _read_while_writing(root: str, out) -> None:
    seen, errors = 0, []
    cohort = Cohort(root, create=False)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            now = len(cohort.slide_ids())
        except Exception as exc:  # a half-written registry would show here
            errors.append(repr(exc))
            break
        if now < seen:
            errors.append(f"went back from {seen} to {now}")
        seen = now
        if seen >= 2 * 60:
            break
    out.put((seen, errors))


def test_reader_never_sees_a_half_written_registry(tmp_path, caplog):
    root = tmp_path / "cohort"
    Cohort(root)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    reader = ctx.Process(target=_read_while_writing, args=(str(root), out))
    reader.start()
    _run_writers(root, 2, 60)
    seen, errors = out.get(timeout=90)
    reader.join(30)
    assert errors == [] and seen == 120
    assert "cannot be read" not in caplog.text


def test_same_id_two_files_at_once_one_wins(tmp_path):
    root = tmp_path / "cohort"
    Cohort(root)
    code = ("import sys; from napari_slpd.cohort import Cohort\n"
            "try:\n    Cohort(sys.argv[1]).add_slide(sys.argv[2])\nexcept Exception as e:\n"
            "    print(e); sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), f"/slides/{d}/same.svs"], env=env,
                              stdout=subprocess.PIPE, text=True) for d in ("a", "b", "a")]
    codes = sorted(p.wait(60) for p in procs)
    # the two for /slides/a agree with each other; /slides/b is refused unless it came first, then both a are
    assert codes in ([0, 0, 3], [0, 3, 3])
    assert Cohort(root).slide_ids() == ["same"]


def test_legacy_registry_removal_and_relative_paths(tmp_path):
    root = tmp_path / "cohort"
    root.mkdir()
    (root / "cohort.json").write_text(json.dumps({"slides": {"old": {"path": "old.svs", "mpp": 0.5,
                                                                     "mpp_source": "user"}}}))
    cohort = Cohort(root)
    assert cohort.slide("old").path == root / "old.svs" and cohort.slide("old").mpp == 0.5
    cohort.add_slide(root / "new.svs")
    record = json.loads((root / "registry" / "new.json").read_text())
    assert record == {"slide_id": "new", "path": "new.svs"}
    cohort.remove_slide("old")  # listed in cohort.json, stays removed
    assert Cohort(root).slide_ids() == ["new"]
    cohort.add_slide(root / "old.svs")
    assert Cohort(root).slide_ids() == ["new", "old"]
    assert Cohort(root).slide("old").mpp is None  # the removal forgot it


# -- locks ---------------------------------------------------------------------------------------------

def _hold(path: str, ready, release) -> None:
    lock = FileLock(path, what="slide x")
    ready.set()
    release.wait(30)
    lock.release()


@pytest.mark.parametrize("mode", ["flock", "files"])
def test_lock_held_by_another_process_names_it(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("SLPD_LOCKS", mode)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    path = tmp_path / ".x.lock"
    proc = ctx.Process(target=_hold, args=(str(path), ready, release))
    proc.start()
    assert ready.wait(30)
    with pytest.raises(LockHeld, match=f"pid {proc.pid} on {socket.gethostname()}") as info:
        FileLock(path, what="slide x")
    assert info.value.holder.pid == proc.pid
    holder, state = lock_status(path)
    assert state == "held" and holder.pid == proc.pid
    release.set()
    proc.join(30)
    with FileLock(path, what="slide x"):
        pass
    assert not path.exists()


def test_dead_holders_lock_file_is_cleared_with_a_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLPD_LOCKS", "files")
    path = tmp_path / ".x.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps(Holder(socket.gethostname(), dead.pid, None, time.time(), "t", "files").to_json()))
    assert lock_status(path)[1] == "stale"
    lock = FileLock(path, what="slide x")
    assert "no longer running" in lock.notes[0] and "cleared a stale lock" in caplog.text
    lock.release()
    # another machine's lock: kept (cannot be checked from here) until older than the configured age
    path.write_text(json.dumps(Holder("elsewhere", 1, None, time.time() - 100, "t2", "files").to_json()))
    with pytest.raises(LockHeld, match="pid 1 on elsewhere"):
        FileLock(path)
    assert lock_status(path)[1] == "unknown"
    monkeypatch.setenv("SLPD_STALE_LOCK_S", "50")
    with FileLock(path) as lock:
        assert "100 s old" in lock.notes[0]


def test_without_working_flock_falls_back_to_lock_files(tmp_path, monkeypatch):
    import fcntl

    real = fcntl.flock

    def nfs_flock(fd, op):  # NFS: an exclusive lock on a read-only descriptor is EBADF; Lustre: ENOSYS
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if str(tmp_path / "lustre") in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSYS, "Function not implemented")
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", nfs_flock)
    monkeypatch.delenv("SLPD_LOCKS", raising=False)
    (tmp_path / "lustre").mkdir()
    lock = FileLock(tmp_path / "lustre" / ".a.lock")
    assert lock.mode == "files" and json.loads((tmp_path / "lustre" / ".a.lock").read_text())["pid"] == os.getpid()
    with pytest.raises(LockHeld, match="another process is writing"):
        FileLock(tmp_path / "lustre" / ".a.lock")  # a second taker is refused, not let in
    lock.release()
    with FileLock(tmp_path / ".b.lock") as ok:  # opened read-write: flock works there
        assert ok.mode == "flock"

    # the index save locks a file it opened read-write, never its folder opened read-only
    import numpy as np

    from napari_slpd.similarity.index import CohortIndex

    index = CohortIndex(dim=4)
    index.add("s1", np.eye(3, 4, dtype=np.float32))
    index.save(tmp_path / "index")
    assert CohortIndex.load(tmp_path / "index").slide_ids == ["s1"]


def test_mount_table_says_when_flock_is_local_only(tmp_path):
    info = ("36 35 0:31 / /shared rw,relatime shared:1 - nfs4 srv:/x rw,vers=4.2,local_lock=flock\n"
            "37 35 0:32 / /scratch rw - lustre 10.0.0.1@o2ib:/fs rw,localflock\n"
            "38 35 0:33 / /good rw - lustre 10.0.0.1@o2ib:/fs rw,flock\n"
            "39 35 0:34 / / rw - ext4 /dev/sda1 rw\n")
    assert "local_lock=flock" in flock_is_local_only("/shared/cohort", info)
    assert "localflock" in flock_is_local_only("/scratch/a/b", info)
    assert flock_is_local_only("/good/cohort", info) is None
    assert flock_is_local_only("/home/x", info) is None
    with pytest.raises(SlpdError, match="SLPD_LOCKS must be"):
        os.environ["SLPD_LOCKS"] = "maybe"
        try:
            locks.lock_mode(tmp_path)
        finally:
            del os.environ["SLPD_LOCKS"]
