"""A cohort: a folder holding the cache of a set of slides (features, prototypes, index, names).

Layout (every file written atomically)::

    COHORT/
      cohort.json                 {"slides": {...}, "settings": {...}}: the settings the cohort is worked with (see
                                  session.py) and the slides registered by versions before 0.9 (still read)
      registry/<slide_id>.json    one record per slide {"slide_id", "path", "mpp", "mpp_source"} (or {"removed":
                                  true}), each written whole by a rename: any number of processes on any number
                                  of machines register slides at once without losing one (napari_slpd.registry)
      registry/skipped/<hash>.json  one record per file offered but not registered {"path", "state", "reason"}
                                  (unreadable, duplicate id), so the GUI lists it instead of dropping it
      features/<slide_id>.h5      FeatureStore (napari_slpd.features.store)
      prototypes/<slide_id>.h5    per-slide prototypes (napari_slpd.prototypes)
      index/                      cohort similarity index (napari_slpd.similarity.index)
      proalign/<slide_id>.h5      ProAlign slide embeddings and named label maps
      annotations.json            prototype names and colours chosen by the user
      training/                   SLPD fine-tune runs (checkpoints, events)
      thumbnails/<slide_id>.png   small RGB thumbnails for the GUI

Slide paths are stored relative to the cohort folder when the slide lies inside it, absolute otherwise,
so that a cohort folder that holds its slides can be moved as a whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from napari_slpd.errors import SlpdError
from napari_slpd.slides.ids import SLIDE_SUFFIXES, find_slides, safe_slide_id, slide_id_for  # noqa: F401 (re-exported)
from napari_slpd.utils.files import atomic_write_json

log = logging.getLogger(__name__)

REGISTRY_NAME = "cohort.json"
SETTINGS_KEY = "settings"
# The cache folders a cohort folder holds (not looked into for slides when the cohort's own folder is scanned).
CACHE_FOLDERS = ("features", "prototypes", "proalign", "thumbnails", "index", "training", "registry")


def _parse_registry(text: str) -> dict:
    """The registry in ``text``; ValueError saying what is wrong when it is not a cohort file."""
    try:
        registry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc
    if not isinstance(registry, dict) or not isinstance(registry.setdefault("slides", {}), dict):
        raise ValueError("not a napari-slpd cohort file")
    return registry


class DuplicateSlideIdError(SlpdError):
    """Another file of the cohort already has this slide id (the file name without its suffix)."""


@dataclass(frozen=True)
class SkippedFile:
    """A file offered to the cohort that is not in it, and why: ``state`` "unreadable" (not a slide this
    reader can open: truncated, damaged, another format) or "duplicate id" (another file has its id)."""

    path: Path
    state: str
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass
class SlideRecord:
    slide_id: str
    path: Path
    mpp: float | None = None  # user override or recorded fallback, um/px
    mpp_source: str | None = None


class Cohort:
    """Paths and slide registry of a cohort cache folder. Creating one creates the folder."""

    notice: str | None = None  # set when cohort.json was damaged and recovered (what happened)

    def __init__(self, root: str | os.PathLike, create: bool = True, cache: str | os.PathLike | None = None):
        """``cache``: the writable cache folder used when ``root`` is read-only (default: ``--cache`` /
        ``$SLPD_CACHE_DIR`` / ``~/.cache/napari-slpd/cohorts``; see napari_slpd.utils.storage)."""
        from napari_slpd.utils.storage import cache_folder_for, is_writable_dir, redirect, unredirect

        self.root = Path(root).expanduser().resolve()
        if not self.root.exists():
            if not create:
                raise SlpdError(f"cohort folder {self.root} does not exist")
            # exist_ok: several processes (torchrun ranks) may create the same cohort at once.
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SlpdError(f"cannot create the cohort folder {self.root}: {exc.strerror or exc}; "
                                "choose a folder you can write to") from exc
        if not self.root.is_dir():
            raise SlpdError(f"cohort path {self.root} is a file, not a folder")
        # A read-only cohort (read-only share, someone else's files): read here, write to a cache folder.
        self.cache_root: Path | None = None
        if not is_writable_dir(self.root):
            self.cache_root = cache_folder_for(self.root, cache)
            redirect(self.root, self.cache_root)
        else:
            unredirect(self.root)
        self._records_folder = _records_folder(self.root, self.cache_root)
        self._skipped_folder = _records_folder(self.root, self.cache_root, "registry/skipped")

    @property
    def read_only(self) -> bool:
        return self.cache_root is not None

    def read_only_note(self) -> str:
        """One line for the user when the cohort is read-only ("" otherwise)."""
        if self.cache_root is None:
            return ""
        return (f"cohort folder {self.root} is read-only: it is read where it is, and everything written "
                f"(prototypes, index, names, thumbnails, new features) goes to the cache folder {self.cache_root} "
                "(choose another with --cache DIR, $SLPD_CACHE_DIR or the Cohort panel)")

    def _file(self, path: Path) -> Path:
        if self.cache_root is None:
            return path
        from napari_slpd.utils.storage import cohort_file

        return cohort_file(path)

    # -- registry ------------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self._file(self.root / REGISTRY_NAME)

    def _load_registry(self) -> dict:
        if not self.registry_path.exists():
            return {"slides": {}}
        try:
            registry = _parse_registry(self.registry_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            recovered = getattr(self, "_recovered", None)  # a damaged file that could not be replaced
            if recovered is not None:
                return json.loads(json.dumps(recovered))
            return self._recover_registry(str(exc))
        return registry

    def _write_registry(self, registry: dict) -> None:
        """Atomically, after keeping the previous good file as cohort.json.bak (see _recover_registry)."""
        from napari_slpd.utils.files import keep_backup

        def valid(text: str) -> bool:
            try:
                _parse_registry(text)
            except ValueError:
                return False
            return True

        keep_backup(self.registry_path, valid)
        atomic_write_json(self.registry_path, registry)

    def _recover_registry(self, problem: str) -> dict:
        """A damaged cohort.json: set it aside, take the slides from its backup and from the feature files
        (each records its slide's path), write the result back, and say so in ``notice``."""
        from napari_slpd.utils.storage import backup_path, set_aside

        path = self.registry_path
        registry = {"slides": {}}
        sources = []
        backup = backup_path(path)
        if backup.exists():
            try:
                registry = _parse_registry(backup.read_text(encoding="utf-8"))
                sources.append(f"its backup {backup.name}")
            except (OSError, UnicodeDecodeError, ValueError):
                pass
        found = no_path = 0
        for h5 in sorted((self.root / "features").glob("*.h5")):
            if h5.stem in registry["slides"]:
                continue
            try:
                from napari_slpd.features.store import read_store_attrs

                attrs = read_store_attrs(h5)
            except SlpdError:
                continue
            registry["slides"][h5.stem] = {"path": str(attrs.get("slide_path") or "")}
            found += 1
            no_path += not attrs.get("slide_path")
        if found:
            sources.append(f"{found} feature file(s)" + (f" ({no_path} without a recorded slide path: features "
                                                          "only until their slide is added again)" if no_path else ""))
        aside = set_aside(path)
        kept = f"kept as {aside.name}" if aside is not None else "left as it is"
        self.notice = (f"cohort file {path} is damaged ({problem}; {kept}): its {len(registry['slides'])} slide(s) "
                       f"were recovered from {' and '.join(sources) or 'nothing (no backup, no feature files)'}; "
                       "pixel sizes set by hand and the cohort settings may need to be set again")
        log.warning(self.notice)
        written = False
        if aside is not None:
            try:
                atomic_write_json(path, registry)
                written = True
            except SlpdError:
                pass
        if not written:
            self._recovered = json.loads(json.dumps(registry))
        return registry

    def _records(self) -> dict[str, SlideRecord]:
        """slide_id -> record, merged from cohort.json (slides registered before per-slide records) and
        registry/ (one record per slide, which wins), parsed once and reused while neither changed (same
        inode, time and size of cohort.json; same records): a 10,000-slide cohort asks for one record per
        row; each must not parse everything."""
        stamp = self.registry_stamp()
        cached = self.__dict__.get("_records_cache")
        if stamp is not None and cached is not None and cached[0] == stamp:
            return cached[1]
        entries = dict(self._load_registry()["slides"])
        for name, record in self._records_folder.read_all().items():
            slide_id = str(record.get("slide_id") or name)
            if record.get("removed"):
                entries.pop(slide_id, None)
            elif record.get("path"):
                entries[slide_id] = record
        records = {}
        for slide_id, entry in sorted(entries.items()):
            path = Path(entry["path"])
            if not path.is_absolute():
                path = self.root / path
            records[slide_id] = SlideRecord(slide_id, path, entry.get("mpp"), entry.get("mpp_source"))
        self._records_cache = (stamp, records) if stamp is not None and self.notice is None else None
        return records

    def registry_stamp(self) -> tuple | None:
        """Changes whenever the registered slides may have changed (a few stat calls); None when unknown."""
        try:
            st = os.stat(self.registry_path)
            file_stamp = (str(self.registry_path), st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            file_stamp = (str(self.registry_path), None)
        except OSError:
            return None
        return file_stamp, id(self._records_folder), self._records_folder.refresh()

    def slides(self) -> list[SlideRecord]:
        return [SlideRecord(r.slide_id, r.path, r.mpp, r.mpp_source) for r in self._records().values()]

    def slide_ids(self) -> list[str]:
        return list(self._records())

    def slide(self, slide_id: str) -> SlideRecord:
        r = self._records().get(slide_id)
        if r is not None:
            return SlideRecord(r.slide_id, r.path, r.mpp, r.mpp_source)
        raise SlpdError(f"slide {slide_id!r} is not in cohort {self.root} (known: {', '.join(self.slide_ids()) or 'none'})")

    def add_slide(self, path: str | os.PathLike, mpp: float | None = None, mpp_source: str | None = None) -> SlideRecord:
        """Register a slide (idempotent for the same path). Two different files with one id are refused.

        Writes the slide's own record only (``registry/<slide_id>.json``, atomically): any number of
        processes may register slides into one cohort at once, on one machine or on a shared file system."""
        path = Path(path).expanduser().resolve()
        slide_id = slide_id_for(path)
        name = safe_slide_id(slide_id)
        try:
            stored = str(path.relative_to(self.root))
        except ValueError:
            stored = str(path)
        for attempt in range(2):
            existing = self._records().get(slide_id)
            if existing is not None and existing.path.resolve() != path:
                raise DuplicateSlideIdError(
                    f"slide id {slide_id!r} is already used in this cohort by {existing.path}; rename {path.name}"
                )
            entry = {"slide_id": slide_id, "path": stored}
            if existing is not None and existing.mpp is not None:
                entry.update(mpp=existing.mpp, mpp_source=existing.mpp_source)
            if mpp is not None:
                entry["mpp"] = float(mpp)
                entry["mpp_source"] = mpp_source or "user"
            if existing is not None or attempt:
                self._records_folder.write(name, entry)
                break
            if self._records_folder.write(name, entry, exclusive=True):
                break
            # another process registered this id a moment ago: check it is the same file, then update
        self._ensure_registry_file()
        if stored in self._skipped_records():
            self._skipped_folder.remove_file(_skipped_name(stored))  # a file fixed (or renamed) since refused
        return self.slide(slide_id)

    # -- files that are not slides of the cohort -------------------------------------------------
    def _stored_path(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def _skipped_records(self) -> dict[str, dict]:
        return {str(r.get("path")): r for r in self._skipped_folder.read_all().values() if r.get("path")}

    def record_skipped(self, path: str | os.PathLike, state: str, reason: str) -> SkippedFile:
        """Remember that ``path`` was offered but not registered (``state``, ``reason``), so the GUI and
        ``slpd status`` list it with the slides instead of dropping it silently (its own record, like a slide's)."""
        path = Path(path).expanduser().resolve()
        stored = self._stored_path(path)
        entry = {"path": stored, "state": str(state), "reason": str(reason)}
        if self._skipped_records().get(stored) != entry:
            try:
                self._skipped_folder.write(_skipped_name(stored), entry)
            except SlpdError as exc:  # the caller still reports it; it is only not kept for next time
                log.warning("could not remember %s in %s: %s", path, self._skipped_folder.write_folder, exc)
        return SkippedFile(path, str(state), str(reason))

    def skipped_files(self) -> list[SkippedFile]:
        """The files offered but not registered that still exist (those since registered are left out)."""
        registered = {str(r.path) for r in self._records().values()}
        out = []
        for stored, entry in sorted(self._skipped_records().items()):
            path = Path(stored)
            path = path if path.is_absolute() else self.root / path
            if str(path) in registered or not path.exists():
                continue
            out.append(SkippedFile(path, str(entry.get("state", "unreadable")), str(entry.get("reason", ""))))
        return out

    def _ensure_registry_file(self) -> None:
        """cohort.json marks a folder as a cohort (the commands look for it): created once, never
        replaced here (an existing one is left as it is, whoever wrote it)."""
        if self.registry_path.exists():
            return
        from napari_slpd.utils.files import atomic_write_new

        atomic_write_new(self.registry_path, json.dumps({"slides": {}}, indent=2, sort_keys=True) + "\n")

    # -- settings ------------------------------------------------------------------------------
    def load_settings(self) -> dict | None:
        """The settings section of the registry (a plain dict, see napari_slpd.session), None if absent."""
        section = self._load_registry().get(SETTINGS_KEY)
        return dict(section) if isinstance(section, dict) else None

    def save_settings(self, settings: dict) -> None:
        """Replace the settings section (atomically, with the rest of the registry unchanged)."""
        registry = self._load_registry()
        registry.setdefault("slides", {})
        registry[SETTINGS_KEY] = settings
        self._write_registry(registry)

    def remove_slide(self, slide_id: str) -> None:
        """Unregister a slide: its record says "removed" (a slide cohort.json still lists stays removed)."""
        if slide_id in self._records():
            self._records_folder.write(safe_slide_id(slide_id), {"slide_id": slide_id, "removed": True})

    # -- cache paths ---------------------------------------------------------------------------
    def features_path(self, slide_id: str) -> Path:
        return self._file(self.root / "features" / f"{safe_slide_id(slide_id)}.h5")

    def prototypes_path(self, slide_id: str) -> Path:
        return self._file(self.root / "prototypes" / f"{safe_slide_id(slide_id)}.h5")

    def proalign_path(self, slide_id: str) -> Path:
        return self._file(self.root / "proalign" / f"{safe_slide_id(slide_id)}.h5")

    def thumbnail_path(self, slide_id: str) -> Path:
        return self._file(self.root / "thumbnails" / f"{safe_slide_id(slide_id)}.png")

    @property
    def index_dir(self) -> Path:
        return self._file(self.root / "index")

    @property
    def annotations_path(self) -> Path:
        return self._file(self.root / "annotations.json")

    @property
    def training_dir(self) -> Path:
        return self._file(self.root / "training")


def _records_folder(root: Path, cache_root: Path | None, sub: str = "registry"):
    """The per-slide records of a cohort: its own, and (read-only cohort) its cache folder's over them."""
    from napari_slpd.utils.record_folder import RecordFolder

    own = root / sub
    if cache_root is None:
        return RecordFolder([own], own)
    cached = cache_root / sub
    return RecordFolder([own, cached], cached)


def _skipped_name(stored: str) -> str:
    """A file name for the record of a skipped path (paths hold separators and may be long)."""
    import hashlib

    return hashlib.sha256(stored.encode("utf-8")).hexdigest()[:24]
