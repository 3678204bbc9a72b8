"""Storage faults and the writable cache folder of read-only cohorts.

Two things every cache writer needs and none should re-implement:

- :func:`storage_error` turns a failed write (a full disk, a quota, a file size limit, a read-only share,
  files owned by someone else) into a :class:`napari_slpd.errors.StorageError` whose message names the
  folder, the space needed and free, what was kept, and how to go on. ``atomic_path`` uses it, so every
  cache file written through it reports a full disk the same way, keeps the previous file and leaves no
  temporary file behind.
- A cohort on a read-only share (or owned by someone else) is worked with through a writable *cache
  folder*: ``--cache DIR`` on the command line, ``SLPD_CACHE_DIR`` in the environment, or the cache folder
  setting of the Cohort panel; by default ``$XDG_CACHE_HOME/napari-slpd/cohorts``. Files the cohort holds
  are read where they are; anything written (prototypes, the index, names, thumbnails, maps, new features)
  goes to ``<cache>/<cohort name>-<hash of its path>/`` under the same relative path, and is read from there
  afterwards. :func:`write_target` is the redirection ``atomic_path`` applies; :func:`cohort_file` the
  lookup cohort paths use.

```python
from napari_slpd.utils.storage import storage_error, cache_folder_for, write_target, is_writable_dir
```
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
from pathlib import Path

from napari_slpd.errors import StorageError

CACHE_ENV = "SLPD_CACHE_DIR"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL_TEXT = re.compile(r"no space left|disk quota|file too large|errno = (28|27|122)\b", re.I)
_DENIED_TEXT = re.compile(r"read-only file system|permission denied|errno = (30|13)\b", re.I)
# A write that fails without an errno (torch's zip writer: "unexpected pos ...") on a folder with less free
# space than this is a full disk too.
_LOW_FREE_BYTES = 1 << 20

_lock = threading.Lock()
_redirects: dict[Path, Path] = {}  # read-only cohort root -> its writable cache folder


def human_bytes(n: float | None) -> str:
    if n is None:
        return "an unknown amount"
    n = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(folder: str | os.PathLike) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException, folder: str | os.PathLike | None = None, free: int | None = None) -> bool:
    """A write failed because the disk (or quota, or file size limit) is full."""
    for e in _chain(exc):
        if isinstance(e, StorageError):
            return e.kind == "full"
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if isinstance(e, (OSError, RuntimeError)) and _FULL_TEXT.search(str(e)):
            return True
    if isinstance(exc, (OSError, RuntimeError)) and folder is not None:
        free = free_bytes(folder) if free is None else free
        return free is not None and free < _LOW_FREE_BYTES
    return False


def is_denied(exc: BaseException) -> bool:
    """A write failed because the folder is read-only or belongs to someone else."""
    for e in _chain(exc):
        if isinstance(e, StorageError):
            return e.kind == "read-only"
        if isinstance(e, OSError) and e.errno in _DENIED_ERRNOS:
            return True
        if isinstance(e, (OSError, RuntimeError)) and _DENIED_TEXT.search(str(e)):
            return True
    return False


def storage_error(exc: BaseException, target: str | os.PathLike, written: int = 0, needed: int | None = None,
                  free: int | None = None, kept: str | None = None) -> StorageError | None:
    """The StorageError for a write of ``target`` that failed with ``exc``, or None when it is another fault.

    ``written``: bytes written before the failure; ``needed``: the expected size when known; ``free``: the
    free space measured right after the failure (before cleaning up, to recognise a full disk); ``kept``: what the message says was kept
    (default: the previous ``target`` is unchanged and no partial file is left).
    """
    if isinstance(exc, StorageError):
        return exc
    target = Path(target)
    folder = target.parent
    free_now = free_bytes(folder)  # what is free now, once the failed write gave its space back
    kept = kept if kept is not None else (
        f"{target.name} is unchanged" + (" (it did not exist before)" if not target.exists() else "")
        + " and no partial file was left")
    if is_disk_full(exc, folder, free_now if free is None else free):
        need = max(int(needed or 0), int(written or 0))
        need_text = (f"about {human_bytes(need)}" if needed else
                     f"more than {human_bytes(written)}" if written else "more space than is free")
        return StorageError(
            f"not enough space in {folder} to write {target.name}: it needs {need_text}, "
            f"{human_bytes(free_now)} free (disk full or quota reached). {kept[0].upper() + kept[1:]}. "
            f"Free some space there (or choose a cache folder on another disk: --cache DIR, ${CACHE_ENV}, or the "
            f"Cohort panel's cache folder) and run again: finished work is kept and resumed.",
            folder=folder, kind="full", needed=need or None, free=free_now)
    if is_denied(exc):
        return StorageError(
            f"cannot write in {folder}: the folder is read-only or belongs to someone else ({_reason(exc)}). "
            f"{kept[0].upper() + kept[1:]}. Choose a writable cache folder (--cache DIR, ${CACHE_ENV}, or the "
            "Cohort panel's cache folder): the cohort is then read where it is and everything new is written there.",
            folder=folder, kind="read-only")
    return None


def _reason(exc: BaseException) -> str:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    return type(exc).__name__


# -- read-only cohorts: the writable cache folder -------------------------------------------------------------


def is_writable_dir(path: str | os.PathLike) -> bool:
    """Whether files can be created in ``path`` (a read-only mount says no even to root)."""
    path = Path(path)
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


CACHE_SETTING = "cache_folder"  # its key in cohort.json "settings" and in the user config


def user_config_path() -> Path:
    """The user's own settings file (settings that cannot live in a read-only cohort)."""
    base = os.environ.get("XDG_CONFIG_HOME") or (Path.home() / ".config")
    return Path(base) / "napari-slpd" / "config.json"


def user_config() -> dict:
    import json

    try:
        data = json.loads(user_config_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_user_config(**changes) -> Path:
    """Merge ``changes`` into the user config (atomically); returns its path. Raises StorageError."""
    import json
    import tempfile

    data = user_config()
    data.update(changes)
    path = user_config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written here rather than with utils.files.atomic_write_json, which imports this module (no cycle).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        error = storage_error(exc, path) if isinstance(exc, OSError) else None
        if error is not None:
            raise error from exc
        raise
    return path


def _cohort_cache_setting(root: Path) -> str | None:
    """The cache folder a cohort's own settings name (``cohort.json`` "settings" / "cache_folder")."""
    import json

    try:
        data = json.loads((Path(root) / "cohort.json").read_text(encoding="utf-8"))
        value = data.get("settings", {}).get(CACHE_SETTING)
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if isinstance(value, str) and value.strip() else None


def default_cache_root(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``--cache`` / ``$SLPD_CACHE_DIR`` (the Cohort panel's setting sets it too), else
    the one cohort ``root``'s own settings name, else the user config's, else ``$XDG_CACHE_HOME``'s."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    chosen = (_cohort_cache_setting(Path(root)) if root is not None else None) or user_config().get(CACHE_SETTING)
    if isinstance(chosen, str) and chosen.strip():
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "napari-slpd" / "cohorts"


def cache_folder_for(root: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """The folder inside ``cache_root`` that stands in for cohort ``root``: one per cohort path."""
    root = Path(root).resolve()
    cache_root = Path(cache_root).expanduser() if cache_root else default_cache_root(root)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", root.name)[:60] or "cohort"
    digest = hashlib.sha1(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return cache_root.resolve() / f"{name}-{digest}"


def redirect(root: str | os.PathLike, cache_folder: str | os.PathLike) -> None:
    """Send writes under ``root`` to ``cache_folder`` (same relative paths), in this process."""
    with _lock:
        _redirects[Path(root).resolve()] = Path(cache_folder)


def unredirect(root: str | os.PathLike) -> None:
    with _lock:
        _redirects.pop(Path(root).resolve(), None)


def redirected(root: str | os.PathLike) -> Path | None:
    with _lock:
        return _redirects.get(Path(root).resolve())


def _split(path: Path) -> tuple[Path, Path] | None:
    with _lock:
        items = list(_redirects.items())
    for root, cache in items:
        try:
            return cache, path.relative_to(root)
        except ValueError:
            continue
    return None


def write_target(path: str | os.PathLike) -> Path:
    """Where a file meant for ``path`` is written: in the cache folder when ``path`` lies in a read-only cohort."""
    path = Path(path)
    found = _split(path) if path.is_absolute() else None
    return path if found is None else found[0] / found[1]


def cohort_file(path: str | os.PathLike) -> Path:
    """Where a cohort file is read from: its copy in the cache folder when there is one, else the cohort's
    own file when it exists, else the cache folder (where it will be written)."""
    path = Path(path)
    found = _split(path) if path.is_absolute() else None
    if found is None:
        return path
    cached = found[0] / found[1]
    if cached.exists() or not path.exists():
        return cached
    return path


# -- damaged caches ---------------------------------------------------------------------------------------


def set_aside(path: str | os.PathLike) -> Path | None:
    """Rename a damaged file to ``<name>.damaged-<time>`` beside it (kept for a person to look at, never
    deleted); None when that is not possible (a read-only folder), the file then stays where it is."""
    import time

    path = Path(path)
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, aside)
    except OSError:
        return None
    return aside


def backup_path(path: str | os.PathLike) -> Path:
    """Where the previous good version of a small file the user cannot recompute (names, registry) is kept."""
    path = Path(path)
    return path.with_name(path.name + ".bak")
