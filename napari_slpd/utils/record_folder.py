"""A folder of small JSON records, one file per key, each written whole by a rename and read merged.

Many processes on many machines (torchrun ranks, SLURM array tasks, a GUI beside a CLI) add records at
once without a lock and without a read-modify-write of a shared file: a writer only ever replaces its own
record's file, and ``rename`` is atomic on local disks, NFS and Lustre alike, so a reader sees each record
either as it was or as it is, never half-written, and no writer's record is lost to another's.

A first record for a key can be written *exclusively* (hard link of the finished temporary file, which
fails when the name exists): two writers registering the same key at the same moment learn that one of
them came second.

Reading lists the folder (and the folders read before it: a read-only cohort's own records beneath its
cache folder's) and parses only the files that changed since the last read, by inode: every atomic
replace gives a record a new inode. A folder whose modification time did not change is not listed again,
unless it changed less than ``RACY_S`` ago (a change within the same clock tick leaves the time as it is).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".json"
RACY_S = 2.0


class RecordFolder:
    """Records ``name -> dict`` kept as ``<folder>/<name>.json``; later folders override earlier ones."""

    def __init__(self, read_folders: list[Path], write_folder: Path):
        self.read_folders = [Path(f) for f in read_folders]
        self.write_folder = Path(write_folder)
        self._lock = threading.Lock()
        self._scans: dict[Path, tuple] = {}  # folder -> (dir stamp, {name: (inode, record)})
        self.generation = 0  # grows whenever the merged content may have changed

    def path(self, name: str) -> Path:
        return self.write_folder / f"{name}{SUFFIX}"

    def write(self, name: str, record: dict, exclusive: bool = False) -> bool:
        """Write ``record`` as ``name`` atomically. ``exclusive``: only when no record of that name exists
        (False is returned when one does). Raises StorageError (full disk, read-only folder)."""
        from napari_slpd.utils.files import atomic_path, atomic_write_new

        final = self.path(name)
        text = json.dumps(record, indent=1, sort_keys=True) + "\n"
        if not exclusive:
            with atomic_path(final) as tmp:
                tmp.write_text(text, encoding="utf-8")
            self._changed()
            return True
        created = atomic_write_new(final, text)
        self._changed()
        return created

    def remove_file(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(name).unlink()
        self._changed()

    def _changed(self) -> None:
        """Our own write: list the folder again at the next read (records parsed before are kept by inode)."""
        with self._lock:
            previous = self._scans.get(self.write_folder)
            if previous is not None:
                self._scans[self.write_folder] = (None, previous[1])
            self.generation += 1

    def read_all(self) -> dict[str, dict]:
        """Every record, merged over the read folders (the last folder holding a name wins)."""
        merged: dict[str, dict] = {}
        with self._lock:
            for folder in self.read_folders:
                for name, (_, record) in self._scan(folder).items():
                    merged[name] = record
        return merged

    def refresh(self) -> int:
        """Look for changes now (a cheap stat per folder when there are none); the new ``generation``."""
        with self._lock:
            for folder in self.read_folders:
                self._scan(folder)
            return self.generation

    def _scan(self, folder: Path) -> dict[str, tuple[int, dict]]:
        try:
            st = os.stat(folder)
        except OSError:
            if self._scans.pop(folder, None) is not None:
                self.generation += 1
            return {}
        stamp = (st.st_ino, st.st_mtime_ns)
        previous = self._scans.get(folder)
        if previous is not None and previous[0] == stamp and time.time() - st.st_mtime > RACY_S:
            return previous[1]
        known = previous[1] if previous is not None else {}
        found: dict[str, tuple[int, dict]] = {}
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
                continue
            name = entry.name[: -len(SUFFIX)]
            inode = entry.inode()
            old = known.get(name)
            if old is not None and old[0] == inode:
                found[name] = old
                continue
            record = _read_record(Path(entry.path))
            if record is not None:
                found[name] = (inode, record)
        if previous is None or found.keys() != known.keys() or any(found[n] is not known[n] for n in found):
            self.generation += 1
        self._scans[folder] = (stamp, found)
        return found


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:  # replaced or removed since the listing: the next read sees the new one
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("registry record %s cannot be read (%s); it is ignored", path, exc)
        return None
    if not isinstance(record, dict):
        log.warning("registry record %s is not a JSON object; it is ignored", path)
        return None
    return record
