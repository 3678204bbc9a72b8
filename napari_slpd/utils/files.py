"""Small file helpers shared by every cache writer: nothing half-written ever carries a final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = ".partial", size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it is renamed onto ``final`` (atomic on POSIX).

    On an exception the temporary file is removed and ``final`` is untouched. A full disk (or quota, or
    file size limit) and a read-only folder raise :class:`napari_slpd.errors.StorageError` naming the folder
    and the space needed (``size_hint``: the expected size, when the caller knows it). A ``final`` inside a
    read-only cohort that has a cache folder is written there instead (napari_slpd.utils.storage).
    """
    from napari_slpd.utils.storage import storage_error, write_target

    final = write_target(Path(final))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    except OSError as exc:
        error = storage_error(exc, final, needed=size_hint)
        if error is not None:
            raise error from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, final)
    except BaseException as exc:
        written = 0
        with contextlib.suppress(OSError):
            written = tmp_path.stat().st_size
        free = None
        if isinstance(exc, (OSError, RuntimeError)):
            from napari_slpd.utils.storage import free_bytes

            free = free_bytes(final.parent)  # before the temporary file gives its space back
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        error = storage_error(exc, final, written, size_hint, free) if isinstance(exc, (OSError, RuntimeError)) else None
        if error is not None:
            raise error from exc
        raise


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, created: bool = True):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` as a whole, so a reader never
    sees half a folder and a failure leaves the old one intact. ``created=False`` yields a path that does not
    exist yet (inside a private temporary folder), for writers that refuse an existing folder (zarr stores)."""
    final = Path(final).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    written = tmp if created else tmp / final.name
    try:
        yield written
        os.chmod(written, 0o777 & ~_current_umask())
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(written, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(final: str | os.PathLike, obj) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_new(final: str | os.PathLike, text: str) -> bool:
    """Create ``final`` holding ``text`` only if no file of that name exists (False when one does): the whole
    file appears at once, with its permissions, and of concurrent writers exactly one wins (a registration, a
    claim, a cohort's first registry)."""
    import uuid

    final = Path(final)
    staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.new")
    with atomic_path(staging) as tmp:
        tmp.write_text(text, encoding="utf-8")
    staging = _redirected(staging)
    try:
        return _link_or_rename_new(staging, _redirected(final))
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()


def _redirected(path: Path) -> Path:
    from napari_slpd.utils.storage import write_target

    return write_target(path)


def _link_or_rename_new(tmp: Path, final: Path) -> bool:
    """Give ``tmp``'s content the name ``final`` only when ``final`` does not exist (FileExistsError
    otherwise). A hard link is atomic create-if-absent on POSIX file systems and NFS; where links are not
    supported, an exclusive create plus a rename over it keeps the same guarantee for the name."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS):
            raise
    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # claims the name, or FileExistsError
    os.close(fd)
    os.replace(tmp, final)
    return True


def keep_backup(path: str | os.PathLike, is_valid) -> None:
    """Before ``path`` is rewritten: copy it to its backup (``utils.storage.backup_path``) when ``is_valid(text)``
    says it is a good file (so a damaged file never replaces the last good backup). Failures to back up are not
    fatal."""
    from napari_slpd.utils.storage import backup_path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    try:
        if not is_valid(text):
            return
        backup = backup_path(path)
        if backup.exists() and backup.read_text(encoding="utf-8") == text:
            return
        atomic_write_text(backup, text)
    except Exception:  # noqa: BLE001 - a backup must never stop the write it protects
        return


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
