"""Qt-free orchestration of a cohort: what the napari panels and ``slpd demo`` both do.

A :class:`Session` is an open cohort folder plus the settings in use. It registers slides, extracts the
features that are missing, computes the prototypes that are missing, keeps the cohort index fresh and
answers similarity queries, each step reusing whatever the cache already holds. Every long step takes
``progress(done, total)`` and ``cancel`` (threading.Event or callable) so a GUI worker or a CLI can show
progress and stop it; a cancelled step leaves only finished (or resumable, never final-named partial)
files behind.

The panels stay thin: they call these methods in a worker thread and draw the results.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from napari_slpd.cohort import CACHE_FOLDERS, Cohort, SlideRecord, find_slides
from napari_slpd.viewer.embedding_map import UmapParams
from napari_slpd.errors import FeatureStoreError, PrototypeError, SlpdError
from napari_slpd.utils.device import DEVICE_CHOICES, check_device_name, kmeans_device
from napari_slpd.utils.files import atomic_path
from napari_slpd.utils.progress import is_cancelled

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
MPP_FALLBACKS = ("none", "objective", "level0")
DEVICES = DEVICE_CHOICES  # the one definition: napari_slpd.utils.device
THUMBNAIL_PX = 256


# -- settings ------------------------------------------------------------------------------------------


@dataclass
class FeatureSettings:
    """What the Features panel edits: encoders, device and the region grid."""

    patch_encoder: str = "hipt_vit256"  # "hipt_vit256" | "timm:<name>" | "open_clip:<name>"
    patch_checkpoint: str | None = None  # None: random init (hipt_vit256 only)
    patch_input_px: int | None = None  # the encoder's input side; None = its model card's
    region_encoder: str = "hipt_vit4k"  # "hipt_vit4k" | "mean"
    region_checkpoint: str | None = None
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    region_px: int = 4096
    patch_px: int = 256
    target_mpp: float = 0.5
    min_tissue: float = 0.25
    mpp_fallback: str = "none"  # for slides that state no plausible pixel size
    batch_size: int = 256
    num_workers: int = 2
    token_dtype: str = "float16"
    overwrite: bool = False  # replace feature files made with other settings (current ones stay cached)

    def __post_init__(self):
        check_device_name(self.device)
        if self.mpp_fallback not in MPP_FALLBACKS:
            raise SlpdError(f"mpp_fallback must be one of {MPP_FALLBACKS}, not {self.mpp_fallback!r}")
        self.grid_config()  # validates region/patch sizes with the grid's own messages

    def grid_config(self):
        from napari_slpd.slides.grid import GridConfig

        return GridConfig(
            region_px=int(self.region_px),
            patch_px=int(self.patch_px),
            target_mpp=float(self.target_mpp),
            min_tissue=float(self.min_tissue),
        )

    def encoder_key(self) -> tuple:
        return (self.patch_encoder, self.patch_checkpoint, self.patch_input_px, self.region_encoder,
                self.region_checkpoint, self.device)

    @property
    def random_init(self) -> bool:
        """Whether a HIPT encoder runs without weights (its features then carry no learned morphology)."""
        patch_random = self.patch_checkpoint is None and self.patch_encoder == "hipt_vit256"
        region_random = self.region_checkpoint is None and self.region_encoder == "hipt_vit4k"
        return patch_random or region_random


@dataclass
class PrototypeSettings:
    k: int = 4  # SPEC: K = 4 (NSCLC), 2 (BRCA); up to 32
    seed: int = 0
    niter: int = 10
    nredo: int = 5
    min_regions: int | None = None  # slides with fewer regions get no prototypes (None: K regions)

    def __post_init__(self):
        if not 1 <= int(self.k) <= 32:
            raise SlpdError(f"the number of prototypes K must be between 1 and 32, not {self.k}")


@dataclass
class SessionSettings:
    features: FeatureSettings = field(default_factory=FeatureSettings)
    prototypes: PrototypeSettings = field(default_factory=PrototypeSettings)
    top_k: int = 10  # neighbours listed for a query
    umap: UmapParams = field(default_factory=UmapParams)
    # The writable cache folder for when this cohort is read-only ("" : --cache / $SLPD_CACHE_DIR, the user
    # config, ~/.cache); see napari_slpd.utils.storage.default_cache_root.
    cache_folder: str = ""

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        # The session that owns these settings saves them into its cohort on every change (also when a
        # core function such as use_checkpoint switches the encoder by assigning ``features``).
        hook = self.__dict__.get("_on_change")
        if hook is not None and not name.startswith("_"):
            hook()

    def __getstate__(self):  # copies and pickles never carry the owning session's save hook
        return {k: v for k, v in self.__dict__.items() if k != "_on_change"}

    def to_dict(self) -> dict:
        """The settings as saved in the cohort (``cohort.json`` "settings"). ``overwrite`` is an action
        option of one run, never saved (a reopened cohort must not replace features unasked)."""
        from dataclasses import asdict

        features = asdict(self.features)
        features.pop("overwrite", None)
        return {"features": features, "prototypes": asdict(self.prototypes), "top_k": int(self.top_k),
                "umap": asdict(self.umap), "cache_folder": str(self.cache_folder or "")}

    @classmethod
    def from_dict(cls, data: dict) -> tuple["SessionSettings", list[str]]:
        """(settings, problems): values that are unknown or invalid are left at their defaults and named
        in ``problems`` (a cohort written by another version still opens)."""
        from dataclasses import fields

        problems: list[str] = []

        def build(kind, section_name):
            section = data.get(section_name)
            if not isinstance(section, dict):
                return kind()
            names = {f.name for f in fields(kind)}
            values = {k: v for k, v in section.items() if k in names and k != "overwrite"}
            unknown = sorted(set(section) - names)
            if unknown:
                problems.append(f"{section_name}: unknown setting(s) {', '.join(unknown)} ignored")
            try:
                return kind(**values)
            except (SlpdError, TypeError, ValueError) as exc:
                problems.append(f"{section_name}: {exc}; defaults used")
                return kind()

        settings = cls(features=build(FeatureSettings, "features"), prototypes=build(PrototypeSettings, "prototypes"),
                       umap=build(UmapParams, "umap"))
        try:
            settings.top_k = max(1, int(data.get("top_k", settings.top_k)))
        except (TypeError, ValueError):
            problems.append(f"top_k {data.get('top_k')!r} is not a number; {settings.top_k} used")
        cache_folder = data.get("cache_folder", "")
        if isinstance(cache_folder, str):
            settings.cache_folder = cache_folder
        else:
            problems.append(f"cache_folder {cache_folder!r} is not a folder name; ignored")
        return settings, problems


# -- results -------------------------------------------------------------------------------------------


@dataclass
class SlideStatus:
    slide_id: str
    path: Path
    exists: bool
    features: str  # "done" | "missing" | "partial" | "other-settings" | "damaged"
    prototypes: str  # "done" | "missing" | "stale"
    n_regions: int | None = None
    detail: str = ""
    mpp: float | None = None  # pixel size recorded in the cohort (user value), None: the file's own
    mpp_source: str | None = None

    @property
    def features_done(self) -> bool:
        return self.features == "done"

    @property
    def prototypes_done(self) -> bool:
        return self.prototypes == "done"


@dataclass
class RegionData:
    """The small, in-memory part of a slide's feature file."""

    slide_id: str
    embeddings: np.ndarray  # [M, E] float32
    coords: np.ndarray  # [M, 2] int64 level-0 top-left
    size: float  # level-0 px per region side
    settings_key: str
    attrs: dict

    def __len__(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class SlideMatch:
    slide_id: str
    distance: float  # prototype set distance K - S
    similarity: float  # S: sum of matched cosine similarities
    pairs: list[tuple[int, int]]  # (query prototype, this slide's prototype)
    pair_similarities: list[float] = field(default_factory=list)


@dataclass
class RegionMatch:
    slide_id: str
    region: int
    distance: float  # cosine distance 1 - cos
    prototype: int | None = None  # the matched region's prototype on its own slide


# -- the session ---------------------------------------------------------------------------------------


# A folder whose time is this recent is not trusted as a cohort stamp (see Session._cohort_stamp): file
# system times move by clock ticks (a few ms locally, up to seconds on some shares), and two changes within
# one tick leave one time.
RACY_NS = 2_000_000_000


class Session:
    """An open cohort and the settings used on it. Thread-safe for one writer at a time (the GUI runs
    one task per panel; heavy state is guarded by a lock)."""

    def __init__(self, root: str | os.PathLike, settings: SessionSettings | None = None, create: bool = True):
        self.cohort = Cohort(root, create=create)
        self._lock = threading.RLock()
        self.notices: list[str] = []  # what opening found and settled (see _recover), for the user
        self._regions: dict[str, tuple[float, RegionData]] = {}
        self._prototypes: dict[str, tuple[tuple, Any]] = {}
        self._index = None  # CohortIndex
        self._rindex = None  # RegionIndex
        self._annotations = None  # PrototypeAnnotations, read again when the file changes
        self._pixel_sizes: dict[str, tuple[Any, Any]] = {}
        self._status_cache: dict[str, tuple[tuple, SlideStatus]] = {}  # slide_id -> (files' stamp, status)
        self._statuses_memo: tuple[tuple, list[SlideStatus]] | None = None  # (cohort stamp, statuses)
        self._index_stamp: tuple | None = None  # the cohort stamp the index was last synced at
        self.settings_problems: list[str] = []  # saved settings that could not be used as they were
        self.settings_save_error: str | None = None  # why the settings could not be saved (read-only cohort)
        self._settings: SessionSettings | None = None
        self.settings = settings or SessionSettings()

    # -- settings owned by the cohort ------------------------------------------------------------------
    @property
    def settings(self) -> SessionSettings:
        return self._settings

    @settings.setter
    def settings(self, value: SessionSettings) -> None:
        """Replacing the settings saves them in the cohort (so does changing one of their fields)."""
        changed = self._settings is not None and self._settings is not value
        self._attach(value)
        if changed:
            self.save_settings()

    def _attach(self, value: SessionSettings) -> None:
        old = self._settings
        if old is not None and old is not value and old.__dict__.get("_on_change") == self.save_settings:
            object.__setattr__(old, "_on_change", None)
        self._settings = value
        object.__setattr__(value, "_on_change", self.save_settings)

    def saved_settings(self) -> SessionSettings | None:
        """The settings saved in the cohort folder (None: it has none yet). Values that cannot be used are
        left at their defaults and listed in ``settings_problems``."""
        try:
            data = self.cohort.load_settings()
        except SlpdError as exc:
            self.settings_problems = [str(exc)]
            return None
        if data is None:
            return None
        settings, self.settings_problems = SessionSettings.from_dict(data)
        for problem in self.settings_problems:
            log.warning("cohort settings of %s: %s", self.root, problem)
        return settings

    def save_settings(self) -> bool:
        """Write the current settings into the cohort (atomically); False (and ``settings_save_error``)
        when the folder cannot be written, e.g. a read-only cohort."""
        try:
            section = self.cohort.load_settings() or {}
            section.update(self.settings.to_dict())
            self.cohort.save_settings(section)
        except (OSError, SlpdError) as exc:
            self.settings_save_error = f"the settings could not be saved in {self.root}: {exc}"
            log.warning("%s", self.settings_save_error)
            return False
        self.settings_save_error = None
        return True

    def features_made_with(self) -> FeatureSettings | None:
        """The feature settings the cohort's cached features were last computed with (saved in the cohort
        by each extraction; inferred from the feature files of a cohort made elsewhere, without
        checkpoint paths). None: no features yet."""
        from dataclasses import fields

        try:
            section = self.cohort.load_settings() or {}
        except SlpdError:
            section = {}
        made = section.get("features_made_with")
        if isinstance(made, dict):
            names = {f.name for f in fields(FeatureSettings)}
            try:
                return FeatureSettings(**{k: v for k, v in made.items() if k in names and k != "overwrite"})
            except (SlpdError, TypeError, ValueError):
                pass
        return self._settings_from_feature_files()

    def _settings_from_feature_files(self) -> FeatureSettings | None:
        from collections import Counter

        from napari_slpd.features.store import read_store_attrs

        seen = Counter()
        for slide_id in self.slide_ids():
            path = self.cohort.features_path(slide_id)
            if not path.exists():
                continue
            try:
                a = read_store_attrs(path)
            except SlpdError:
                continue
            if not a.get("complete", False):
                continue
            seen[(str(a.get("patch_encoder", "")).split(" (")[0], str(a.get("region_encoder", "")).split(" (")[0],
                  int(a.get("region_px", 0)), int(a.get("patch_px", 0)), float(a.get("target_mpp", 0.5)),
                  float(a.get("min_tissue", 0.25)))] += 1
        if not seen:
            return None
        (patch, region, region_px, patch_px, target_mpp, min_tissue), _ = seen.most_common(1)[0]
        from dataclasses import replace

        try:
            return replace(self.settings.features, patch_encoder=patch or self.settings.features.patch_encoder,
                           region_encoder=region or self.settings.features.region_encoder, region_px=region_px,
                           patch_px=patch_px, target_mpp=target_mpp, min_tissue=min_tissue, overwrite=False)
        except SlpdError:
            return None

    def _record_features_made_with(self) -> None:
        from dataclasses import asdict

        try:
            section = self.cohort.load_settings() or self.settings.to_dict()
            made = asdict(self.settings.features)
            made.pop("overwrite", None)
            section["features_made_with"] = made
            self.cohort.save_settings(section)
        except (OSError, SlpdError) as exc:
            log.warning("the feature settings could not be recorded in %s: %s", self.root, exc)

    def checkpoint_features_at_risk(self, slide_ids: Sequence[str] | None = None) -> list[str]:
        """Slides whose cached features were made with a checkpoint (patch or region encoder) that the
        current settings would replace with a randomly initialised encoder's features."""
        from napari_slpd.features.store import read_store_attrs

        fs = self.settings.features
        patch_random = fs.patch_checkpoint is None and fs.patch_encoder == "hipt_vit256"
        region_random = fs.region_checkpoint is None and fs.region_encoder == "hipt_vit4k"
        if not (patch_random or region_random):
            return []
        at_risk = []
        for slide_id in (slide_ids if slide_ids is not None else self.slide_ids()):
            path = self.cohort.features_path(slide_id)
            if not path.exists():
                continue
            try:
                a = read_store_attrs(path)
            except SlpdError:
                continue
            if (patch_random and a.get("patch_encoder_sha256")) or (region_random and a.get("region_encoder_sha256")):
                at_risk.append(slide_id)
        return at_risk

    @property
    def root(self) -> Path:
        return self.cohort.root

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        slides: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        settings: SessionSettings | None = None,
    ) -> "Session":
        """Open (or create) the cohort folder ``root`` and register slides: those in the folder ``slides``
        (or the given slide paths); with ``slides=None`` the slides lying in ``root`` itself. Without
        ``settings``, the settings saved in the cohort are used (defaults for a new cohort)."""
        session = cls(root, settings)
        session.notices = session._recover()
        if settings is None:
            saved = session.saved_settings()
            if saved is not None:
                session._attach(saved)  # as saved: nothing to write back
        if slides is None:
            session.add_slides(find_slides(session.root, skip=CACHE_FOLDERS))
        elif isinstance(slides, (str, os.PathLike)) and Path(slides).is_dir() and not _is_dicom_dir(Path(slides)):
            session.add_slides(find_slides(slides))
        elif isinstance(slides, (str, os.PathLike)):
            session.add_slides([slides])
        else:
            session.add_slides(slides)
        return session

    def _recover(self) -> list[str]:
        """What opening found and settled (a read-only cohort and its cache folder, a damaged cohort file, a
        region-encoder switch interrupted by a kill): one line each, for the GUI and the CLI to show."""
        from napari_slpd.features.versions import recover_interrupted_switch

        notes = [n for n in (self.cohort.read_only_note(), self.cohort.notice) if n]
        try:
            self.cohort.slide_ids()  # reads (and, when damaged, recovers) cohort.json now, not mid-task
            if self.cohort.notice and self.cohort.notice not in notes:
                notes.append(self.cohort.notice)
            note = recover_interrupted_switch(self.cohort)
        except SlpdError as exc:
            note = str(exc)
        if note:
            notes.append(note)
        return notes

    def notes(self) -> list[str]:
        """Everything the user should read about this cohort's files, one plain line each: what opening
        settled (``notices``: read-only cohort and its cache folder, a recovered cohort file, a finished or
        undone encoder switch), a damaged prototype names file, an index that could not be saved, settings
        that could not be saved."""
        notes = list(self.notices)
        try:
            names = self.annotations()  # read once (small), then only when the file changed
        except SlpdError as exc:
            names = None
            notes.append(str(exc))
        if names is not None and getattr(names, "notice", None):
            notes.append(names.notice)
        index = self._index
        if index is not None and getattr(index, "save_error", None):
            notes.append(f"the cohort index could not be saved ({index.save_error}); queries use it from memory")
        if self.settings_save_error:
            notes.append(self.settings_save_error)
        return list(dict.fromkeys(notes))

    def add_slides(self, paths: Iterable[str | os.PathLike]) -> tuple[list[SlideRecord], list[str]]:
        """Register slides; returns (records added, messages for paths that are not slides)."""
        from napari_slpd.slides.slide import locate_slide_file

        added, problems = [], []
        for path in paths:
            try:
                locate_slide_file(path)
                added.append(self.cohort.add_slide(path))
            except SlpdError as exc:
                problems.append(str(exc))
                log.warning("not added to the cohort: %s", exc)
        return added, problems

    def slide_ids(self) -> list[str]:
        return self.cohort.slide_ids()

    def record(self, slide_id: str) -> SlideRecord:
        return self.cohort.slide(slide_id)

    def open_slide(self, slide_id: str):
        """The slide opened with its recorded pixel size (or the fallback of the feature settings)."""
        from napari_slpd.slides.slide import open_slide

        record = self.record(slide_id)
        return open_slide(record.path, mpp=record.mpp, mpp_fallback=self.settings.features.mpp_fallback)

    def set_slide_mpp(self, slide_id: str, mpp: float) -> None:
        """Record a user-given pixel size for a slide whose file has none (or a wrong one)."""
        from napari_slpd.slides.slide import resolve_pixel_size

        resolve_pixel_size({}, mpp=mpp)  # validates the value with the slide module's message
        record = self.record(slide_id)
        self.cohort.add_slide(record.path, mpp=mpp, mpp_source="user")

    # -- status ----------------------------------------------------------------------------------------
    def status(self, slide_id: str) -> SlideStatus:
        return self._status(self.record(slide_id))

    def statuses(self) -> list[SlideStatus]:
        return [self._status(record) for record in self.cohort.slides()]  # one registry read for all

    def _status_stamp(self, record: SlideRecord) -> tuple:
        """What a slide's status depends on, read with a few stat calls (no file opened): the feature,
        partial and prototypes files (inode, time, size), the slide file's presence, the record and the
        settings compared."""
        from napari_slpd.features.store import partial_path_for

        def stamp(path):
            try:
                st = os.stat(path)
            except OSError:
                return None
            return st.st_ino, st.st_mtime_ns, st.st_size

        features = self.cohort.features_path(record.slide_id)
        fs, ps = self.settings.features, self.settings.prototypes
        have = stamp(features)
        return (have, None if have is not None else stamp(partial_path_for(features)),
                stamp(self.cohort.prototypes_path(record.slide_id)), str(record.path), os.path.exists(record.path),
                record.mpp, record.mpp_source, fs.region_px, fs.patch_px, fs.target_mpp, fs.patch_encoder,
                fs.region_encoder, fs.patch_checkpoint, fs.region_checkpoint, ps.k, ps.seed, ps.niter, ps.nredo,
                ps.min_regions)

    def status_settings(self) -> tuple:
        """The settings a slide's status depends on (the Cohort panel reads statuses again when they change)."""
        fs, ps = self.settings.features, self.settings.prototypes
        return (fs.region_px, fs.patch_px, fs.target_mpp, fs.patch_encoder, fs.region_encoder, fs.patch_checkpoint,
                fs.region_checkpoint, ps.k, ps.seed, ps.niter, ps.nredo, ps.min_regions)

    def _cohort_stamp(self) -> tuple | None:
        """What the features and prototypes of *every* slide depend on, read with a handful of stat calls
        (not two per slide): the cohort file, the features/ and prototypes/ folders (and their copies in the
        cache folder of a read-only cohort), and the settings. A folder's time changes whenever a file in it
        is created, replaced (atomic writes rename) or removed; the writers that update a feature file in
        place (region-embedding versions) touch its folder too. None when a folder changed less than
        RACY_NS ago: a change within the same clock tick would leave its time as it is, so the stamp is
        not trusted yet (the per-slide checks run instead). The slide files' presence is not part of it."""
        import time

        root = self.cohort.root
        folders = [root / "features", root / "prototypes"]
        if self.cohort.cache_root is not None:
            folders += [self.cohort.cache_root / "features", self.cohort.cache_root / "prototypes"]
        now = time.time_ns()
        parts: list = []
        for folder in folders:
            try:
                st = os.stat(folder)
            except OSError:
                parts.append(None)
                continue
            if abs(now - st.st_mtime_ns) < RACY_NS:
                return None
            parts.append((st.st_ino, st.st_mtime_ns))
        try:
            st = os.stat(self.cohort.registry_path)  # replaced atomically: a new inode at each write
            parts.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            parts.append(None)
        return tuple(parts), self.status_settings()

    def _current_statuses(self) -> list[SlideStatus]:
        """statuses() for the queries: the list of the last call while the cohort stamp is unchanged (O(1)
        stat calls instead of a few per slide); its ``exists`` flags may be older than the slide files."""
        stamp = self._cohort_stamp()  # taken before reading: a change meanwhile gives another stamp next time
        memo = self._statuses_memo
        if stamp is not None and memo is not None and memo[0] == stamp:
            return memo[1]
        statuses = self.statuses()
        self._statuses_memo = (stamp, statuses) if stamp is not None else None
        return statuses

    def known_status(self, record: SlideRecord) -> SlideStatus | None:
        """The slide's status when it is known and its files did not change since (stat calls only), else
        None: a 10,000-slide list shows at once and the unknown statuses are read off the GUI thread."""
        cached = self._status_cache.get(record.slide_id)
        if cached is not None and cached[0] == self._status_stamp(record):
            return cached[1]
        return None

    def _status(self, record: SlideRecord) -> SlideStatus:
        stamp = self._status_stamp(record)
        cached = self._status_cache.get(record.slide_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        status = self._read_status(record)
        self._status_cache[record.slide_id] = (stamp, status)
        return status

    def _read_status(self, record: SlideRecord) -> SlideStatus:
        from napari_slpd.features.store import partial_path_for, read_store_attrs

        slide_id = record.slide_id
        path = self.cohort.features_path(slide_id)
        features, n_regions, detail = "missing", None, ""
        if path.exists():
            try:
                attrs = read_store_attrs(path)
            except FeatureStoreError as exc:
                features, detail = "damaged", str(exc)
            else:
                if not bool(attrs.get("complete", False)):
                    features = "partial"
                else:
                    n_regions = int(attrs.get("n_regions", 0))
                    diffs = self._settings_differences(attrs)
                    features = "other-settings" if diffs else "done"
                    detail = "; ".join(diffs) if diffs else _describe_features(attrs)
        elif partial_path_for(path).exists():
            features, detail = "partial", "an unfinished extraction can be resumed"
        protos = "missing"
        if self.cohort.prototypes_path(slide_id).exists():
            current = features == "done" and self._prototypes_current(slide_id, str(attrs.get("settings_key", "")))
            protos = "done" if current else "stale"
        return SlideStatus(slide_id, record.path, record.path.exists(), features, protos, n_regions, detail,
                           record.mpp, record.mpp_source)

    def _settings_differences(self, attrs: dict) -> list[str]:
        """Cheap check of a feature file against the current settings (names and sizes; checkpoints are
        compared by the engine itself, through the settings key, when extracting)."""
        fs = self.settings.features
        diffs = []
        for key, want in (("region_px", fs.region_px), ("patch_px", fs.patch_px)):
            if key in attrs and int(attrs[key]) != int(want):
                diffs.append(f"{key} {attrs[key]} (settings: {want})")
        if "target_mpp" in attrs and abs(float(attrs["target_mpp"]) - float(fs.target_mpp)) > 1e-6:
            diffs.append(f"target_mpp {attrs['target_mpp']} (settings: {fs.target_mpp})")
        for key, want in (("patch_encoder", fs.patch_encoder), ("region_encoder", fs.region_encoder)):
            have = str(attrs.get(key, ""))
            if have and not have.startswith(want):
                diffs.append(f"{key} {have} (settings: {want})")
        # Weights: a checkpoint against random init is visible without hashing the checkpoint file.
        for key, checkpoint, encoder, random_name in (
            ("patch_encoder", fs.patch_checkpoint, fs.patch_encoder, "hipt_vit256"),
            ("region_encoder", fs.region_checkpoint, fs.region_encoder, "hipt_vit4k"),
        ):
            have = str(attrs.get(key, ""))
            if not have or not have.startswith(encoder) or encoder != random_name:
                continue
            made_random = not str(attrs.get(f"{key}_sha256", "") or "")
            if made_random and checkpoint:
                diffs.append(f"{key.replace('_', ' ')} randomly initialised (settings: checkpoint {Path(checkpoint).name})")
            elif not made_random and not checkpoint:
                diffs.append(f"{key.replace('_', ' ')} from a checkpoint (settings: random init)")
        return diffs

    # -- features --------------------------------------------------------------------------------------
    def encoders(self):
        """(patch encoder, region encoder) for the current settings, built once per process and reused
        (opening another cohort with the same models does not load them again)."""
        fs = self.settings.features
        key = fs.encoder_key() + (_checkpoint_stamp(fs.patch_checkpoint), _checkpoint_stamp(fs.region_checkpoint))
        with _ENCODERS_LOCK:
            if _ENCODERS.get("key") != key:
                from napari_slpd.models.encoders import (
                    build_patch_encoder,
                    build_region_encoder,
                )

                _ENCODERS.clear()  # one set of models in memory at a time
                patch = build_patch_encoder(
                    fs.patch_encoder, checkpoint=fs.patch_checkpoint, device=fs.device, input_size=fs.patch_input_px
                )
                region = build_region_encoder(
                    fs.region_encoder, checkpoint=fs.region_checkpoint, device=fs.device, in_dim=patch.dim
                )
                _ENCODERS.update(key=key, patch=patch, region=region)
            return _ENCODERS["patch"], _ENCODERS["region"]

    def extraction_config(self, slide_id: str):
        from napari_slpd.features.engine import ExtractionConfig

        fs = self.settings.features
        record = self.record(slide_id)
        return ExtractionConfig(
            grid=fs.grid_config(),
            batch_size=int(fs.batch_size),
            num_workers=int(fs.num_workers),
            device=fs.device,
            token_dtype=fs.token_dtype,
            mpp=record.mpp,
            mpp_fallback=fs.mpp_fallback,
            overwrite=bool(fs.overwrite),
        )

    def extract(
        self,
        slide_ids: Sequence[str] | None = None,
        progress: ProgressFn | None = None,
        cancel=None,
        on_slide: Callable[[Any], None] | None = None,
        replace_checkpoint_features: bool = False,
        overwrite: bool | None = None,
    ) -> list:
        """Extract (or resume, or skip when cached) the features of ``slide_ids`` (all slides by default).

        Returns one ExtractionResult per slide handled. Overall progress is reported in thousandths of a
        slide. A slide that fails with an SlpdError does not stop the others: its result has status
        "error" and the message. ``on_slide(result)`` is called after each slide (from this thread).
        ``overwrite`` (default: the settings' own) replaces features made with other settings; features
        made with a checkpoint are never replaced by features of a randomly initialised encoder unless
        ``replace_checkpoint_features`` says so explicitly.
        """
        from napari_slpd.features.engine import ExtractionResult

        slide_ids = list(slide_ids) if slide_ids is not None else self.slide_ids()
        n = len(slide_ids)
        unit = 1000
        results = []
        if progress:
            progress(0, n * unit)
        patch, region = self.encoders() if slide_ids else (None, None)
        for i, slide_id in enumerate(slide_ids):
            if is_cancelled(cancel):
                break
            record = self.record(slide_id)
            out = self.cohort.features_path(slide_id)

            def slide_progress(done, total, i=i):
                if progress and total > 0:
                    progress(i * unit + min(unit, done * unit // total), n * unit)

            try:
                result = self._extract_one(record, out, patch, region, slide_progress, cancel,
                                           replace_checkpoint_features, overwrite)
            except SlpdError as exc:
                result = ExtractionResult(slide_id, record.path, out, "error", message=str(exc))
                log.warning("%s: %s", slide_id, exc)
                disk_full = getattr(exc, "kind", None) == "full"  # the next slides cannot be written either
            else:
                disk_full = False
            results.append(result)
            self._regions.pop(slide_id, None)
            if on_slide:
                on_slide(result)
            if progress:
                progress((i + 1) * unit, n * unit)
            if result.status == "cancelled" or disk_full:
                break
        if any(r.status == "extracted" for r in results):
            self._record_features_made_with()
        return results

    def _extract_one(self, record: SlideRecord, out: Path, patch, region, progress, cancel,
                     replace_checkpoint_features: bool = False, overwrite: bool | None = None):
        """One slide. ``overwrite`` here replaces only a file made with other settings: a file that is
        current stays cached (the engine's own overwrite would recompute it too)."""
        from napari_slpd.features.engine import extract_slide, extraction_settings
        from napari_slpd.features.store import existing_store_is_current
        from napari_slpd.slides.slide import open_slide

        config = self.extraction_config(record.slide_id)
        if overwrite is not None:
            config.overwrite = bool(overwrite)
        slide = open_slide(record.path, mpp=config.mpp, mpp_fallback=config.mpp_fallback)
        try:
            if config.overwrite and out.exists():
                try:
                    current = existing_store_is_current(out, extraction_settings(slide, config, patch, region))
                except FeatureStoreError:  # other settings, incomplete or damaged: replace it
                    current = False
                if not current and not replace_checkpoint_features and self.checkpoint_features_at_risk([record.slide_id]):
                    raise FeatureStoreError(
                        f"the features of {record.slide_id} were made with a checkpoint; the current settings "
                        "use a randomly initialised encoder, and replacing them needs an explicit confirmation "
                        "(the features were kept)"
                    )
                config.overwrite = not current
            return extract_slide(slide, out, patch, region, config, progress, cancel)
        finally:
            slide.close()

    def region_data(self, slide_id: str) -> RegionData:
        """Embeddings and coordinates of a slide's regions (cached in memory while the file is unchanged)."""
        from napari_slpd.features.store import FeatureStore

        path = self.cohort.features_path(slide_id)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        with self._lock:
            cached = self._regions.get(slide_id)
            if cached is not None and cached[0] == mtime:
                return cached[1]
        with FeatureStore.open(path) as store:
            data = RegionData(
                slide_id=slide_id,
                embeddings=np.array(store.region_embeddings, dtype=np.float32),
                coords=np.array(store.region_coords, dtype=np.int64),
                size=float(store.region_size_level0),
                settings_key=store.settings_key,
                attrs=dict(store.attrs),
            )
        with self._lock:
            self._regions[slide_id] = (mtime, data)
        return data

    def slides_with_features(self) -> list[str]:
        return [s.slide_id for s in self._current_statuses() if s.features_done]

    # -- prototypes ------------------------------------------------------------------------------------
    def _prototype_stale_reason(self, slide_id: str, features_key: str | None) -> str | None:
        """Why the cached prototypes of a slide do not fit the current settings (None: they do)."""
        from napari_slpd.prototypes.cache import read_attrs, stale_reason

        path = self.cohort.prototypes_path(slide_id)
        if not path.exists():
            return "no prototypes yet"
        try:
            attrs = read_attrs(path)
        except SlpdError as exc:
            return str(exc)
        ps = self.settings.prototypes
        return stale_reason(
            attrs, features_key, k=int(ps.k), source="region_embeddings", seed=int(ps.seed), niter=int(ps.niter),
            nredo=int(ps.nredo), min_regions=-1 if ps.min_regions is None else int(ps.min_regions),
        )

    def prototypes_current(self, slide_id: str) -> bool:
        """Whether the cache holds the slide's prototypes for the current settings and features."""
        return self._prototypes_current(slide_id)

    def _prototypes_current(self, slide_id: str, features_key: str | None = None) -> bool:
        if features_key is None:
            from napari_slpd.features.store import read_store_attrs

            try:
                features_key = str(read_store_attrs(self.cohort.features_path(slide_id)).get("settings_key", ""))
            except SlpdError:
                return False
        return self._prototype_stale_reason(slide_id, features_key) is None

    def prototypes(self, slide_id: str, compute: bool = True):
        """The slide's SlidePrototypes for the current settings: from memory, from the cohort cache, or
        (``compute``) computed and cached. Raises PrototypeError when they cannot be had (no features,
        too few regions, or not computed and ``compute`` is False)."""
        from napari_slpd.prototypes.cache import (
            compute_slide_prototypes,
            prototypes_stamp,
            read_prototypes,
        )

        data = self.region_data(slide_id)  # raises FeatureStoreError when there are no features
        ps = self.settings.prototypes
        key = (data.settings_key, int(ps.k), int(ps.seed), int(ps.niter), int(ps.nredo), ps.min_regions)
        with self._lock:
            cached = self._prototypes.get(slide_id)
            if cached is not None and cached[0] == (key, prototypes_stamp(self.cohort, slide_id)):
                return cached[1]
        if self._prototype_stale_reason(slide_id, data.settings_key) is None:
            protos = read_prototypes(self.cohort.prototypes_path(slide_id))
        elif not compute:
            raise PrototypeError(
                f"the prototypes of {slide_id} are not computed for the current settings (K={ps.k}); "
                "compute them in the Prototypes panel"
            )
        else:
            protos = compute_slide_prototypes(
                self.cohort, slide_id, k=int(ps.k), seed=int(ps.seed), niter=int(ps.niter), nredo=int(ps.nredo),
                min_regions=ps.min_regions, device=kmeans_device(self.settings.features.device), save=True,
            )
        if len(protos.assignments) != len(data):
            raise PrototypeError(
                f"the prototypes of {slide_id} cover {len(protos.assignments)} regions but its features have "
                f"{len(data)}; recompute them"
            )
        with self._lock:
            self._prototypes[slide_id] = ((key, prototypes_stamp(self.cohort, slide_id)), protos)
        return protos

    def ensure_prototypes(self, slide_ids: Sequence[str] | None = None, progress: ProgressFn | None = None,
                          cancel=None) -> dict[str, str]:
        """Prototypes of ``slide_ids`` (every slide with current features by default), computed where the
        cache has none for the current settings. Returns slide_id -> "ok" or why it has none."""
        from napari_slpd.prototypes.cache import compute_cohort_prototypes

        slide_ids = list(slide_ids) if slide_ids is not None else self.slides_with_features()
        if not slide_ids:
            return {}
        ps = self.settings.prototypes
        report = compute_cohort_prototypes(
            self.cohort, k=int(ps.k), seed=int(ps.seed), niter=int(ps.niter), nredo=int(ps.nredo),
            min_regions=ps.min_regions, device=kmeans_device(self.settings.features.device),
            slide_ids=slide_ids, progress=progress, cancel=cancel,
        )
        return {r.slide_id: ("ok" if r.status in ("computed", "current") else (r.message or r.status))
                for r in report.results}

    # -- the cohort index and queries ------------------------------------------------------------------
    def index(self, progress: ProgressFn | None = None, cancel=None):
        """The cohort index, up to date with the prototypes of every slide with current features (their
        missing prototypes are computed first) and saved in ``COHORT/index``."""
        from napari_slpd.similarity import CohortIndex

        # Nothing changed in the cohort since the last sync (a few stat calls): the index is current.
        stamp = self._cohort_stamp()
        with self._lock:
            if stamp is not None and self._index is not None and self._index_stamp == stamp:
                return self._index
        # Only the slides whose prototypes are missing or stale (statuses: stat calls while unchanged),
        # not a check of every prototypes file of a 10,000-slide cohort at each query.
        todo = [s.slide_id for s in self._current_statuses() if s.features_done and s.prototypes != "done"]
        if todo:
            self.ensure_prototypes(todo, progress=progress, cancel=cancel)
            stamp = self._cohort_stamp()  # the prototypes just written
        with self._lock:
            self._index_stamp = None
            if self._index is None:
                self._index = CohortIndex.open(self.cohort, cancel=cancel)
            else:
                changes = self._index.sync(self.cohort, cancel=cancel)
                if any(changes.values()) and not is_cancelled(cancel):
                    self._index.save(self.cohort.index_dir)
            if not is_cancelled(cancel):
                self._index_stamp = stamp
            return self._index

    def similar_slides(self, slide_id: str, top_k: int | None = None) -> list[SlideMatch]:
        """Cohort slides ranked by prototype set distance (K - S) to ``slide_id`` (itself excluded)."""
        top_k = int(top_k or self.settings.top_k)
        self.prototypes(slide_id)
        index = self.index()
        current = set(self.slides_with_features())
        # Slides whose prototypes are left from other feature settings are not comparable: leave them out.
        exclude = [s for s in index.slide_ids if s not in current]
        hits = index.query(slide_id, n=top_k, exclude=exclude)  # the default search is exact (bounded)
        return [
            SlideMatch(
                h.slide_id, float(h.distance), float(h.similarity),
                [(int(p.k), int(p.l)) for p in h.pairs], [float(p.similarity) for p in h.pairs],
            )
            for h in hits
        ]

    def similar_to_prototype(self, slide_id: str, k: int, top_k: int | None = None) -> list[SlideMatch]:
        """Cohort slides ranked by their best match to prototype ``k`` of ``slide_id``: distance = 1 - the
        largest cosine between that prototype and one of the slide's prototypes (itself excluded). This
        is what a click on a region asks in slide mode: where else is this tissue pattern?"""
        top_k = int(top_k or self.settings.top_k)
        query = self.prototypes(slide_id)
        if not 0 <= int(k) < int(query.k):
            raise SlpdError(f"{slide_id} has {query.k} prototypes; there is no prototype {k}")
        q = np.asarray(query.centroids, dtype=np.float32)[int(k)]
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        matches = []
        for other in self.slides_with_features():
            if other == slide_id:
                continue
            try:
                protos = self.prototypes(other, compute=False)
            except SlpdError:
                continue  # no prototypes for the current settings: not comparable
            c = np.asarray(protos.centroids, dtype=np.float32)
            c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
            if c.shape[1] != q.shape[0] or not len(c):
                continue
            cos = c @ q
            best = int(np.argmax(cos))
            matches.append(SlideMatch(other, float(1.0 - cos[best]), float(cos[best]), [(int(k), best)],
                                      [float(cos[best])]))
        matches.sort(key=lambda m: (m.distance, m.slide_id))
        return matches[:top_k]

    def similar_regions(self, slide_id: str, region: int, top_k: int | None = None,
                        include_same_slide: bool = False) -> list[RegionMatch]:
        """The regions across the cohort nearest (cosine) to region ``region`` of ``slide_id``."""
        top_k = int(top_k or self.settings.top_k)
        data = self.region_data(slide_id)
        if not 0 <= int(region) < len(data):
            raise SlpdError(f"{slide_id} has {len(data)} regions; there is no region {region}")
        index = self._region_index()
        hits = index.query(slide_id, int(region), n=top_k, exclude_same_slide=not include_same_slide)
        matches = []
        for hit in hits:
            proto = None
            try:
                proto = int(self.prototypes(hit.slide_id, compute=False).assignments[hit.region_index])
            except SlpdError:
                pass
            matches.append(RegionMatch(hit.slide_id, int(hit.region_index), float(1.0 - hit.similarity), proto))
        return matches

    def _region_index(self):
        from napari_slpd.similarity import RegionIndex

        with self._lock:
            if self._rindex is None:
                self._rindex = RegionIndex.open(self.cohort)
            elif self._rindex.sync(self.cohort):
                self._rindex.save(self.cohort.index_dir)
            return self._rindex

    # -- thumbnails ------------------------------------------------------------------------------------
    def thumbnail(self, slide_id: str, max_px: int = THUMBNAIL_PX) -> np.ndarray:
        """RGB uint8 thumbnail (longer side ``max_px``), cached as COHORT/thumbnails/<id>.png."""
        from PIL import Image

        path = self.cohort.thumbnail_path(slide_id)
        if path.exists():
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
                if max(image.shape[:2]) == max_px or max(image.shape[:2]) < max_px:
                    return image
            except OSError:
                log.warning("thumbnail %s is unreadable; making it again", path)
        slide = self.open_slide(slide_id)
        try:
            image = slide.thumbnail(max_px)
        finally:
            slide.close()
        with atomic_path(path, suffix=".partial.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return image

    # -- names and colours of prototypes (one authority: the cohort's annotations + the palette) -------
    def annotations(self):
        """The cohort's prototype names and colours (PrototypeAnnotations), read again when the file
        changed (the labeling panel, the CLI or propagation wrote it)."""
        from napari_slpd.labeling import PrototypeAnnotations

        with self._lock:
            if self._annotations is None:
                self._annotations = PrototypeAnnotations.load(self.cohort, self)
            else:
                try:
                    self._annotations.reload_if_changed()
                except SlpdError as exc:
                    log.warning("prototype names: %s", exc)
            return self._annotations

    def prototype_styles(self, slide_id: str, protos=None) -> tuple[dict[int, str], dict[int, str]]:
        """(names, '#rrggbb' colours) of every prototype of ``slide_id``: the stored ones, the palette's
        elsewhere, colours unique within the slide. What the layer, legend, hover, similar-slides detail
        and export all show."""
        from napari_slpd.labeling.palette import default_name, slide_colors

        if protos is None:
            protos = self.prototypes(slide_id, compute=False)
        try:
            return self.annotations().styles(slide_id, protos)
        except SlpdError as exc:  # a damaged names file: defaults, and say why in the log
            log.warning("prototype names of %s: %s", slide_id, exc)
            k = int(protos.k)
            return {i: default_name(i) for i in range(k)}, slide_colors(k)

    def neighbour_styles(self, query_slide: str, slide_id: str, pairs, protos=None, query_protos=None):
        """(names, colours) of a neighbour's prototypes shown next to its query: its own names, the colour
        of the query prototype each one is matched to (``pairs`` of (query k, own l))."""
        from napari_slpd.labeling.palette import neighbour_colors

        if protos is None:
            protos = self.prototypes(slide_id, compute=False)
        names, _ = self.prototype_styles(slide_id, protos)
        _, query_colors = self.prototype_styles(query_slide, query_protos)
        return names, neighbour_colors(query_colors, pairs, int(protos.k))

    def prototype_pairs(self, query_slide: str, slide_id: str) -> list[tuple[int, int, float]]:
        """(query k, neighbour l, cosine) of the optimal matching of two slides' prototypes."""
        from napari_slpd.similarity import match_prototypes

        a = self.prototypes(query_slide, compute=False)
        b = self.prototypes(slide_id, compute=False)
        return [(int(p.k), int(p.l), float(p.similarity)) for p in match_prototypes(a.centroids, b.centroids)]

    # -- pixel sizes and region sizes -------------------------------------------------------------------
    def file_pixel_size(self, slide_id: str):
        """(PixelSize the file states, (width, height)) of a slide, cached while the file is unchanged."""
        from napari_slpd.slides.slide import open_slide

        record = self.record(slide_id)
        try:
            stamp = record.path.stat().st_mtime_ns
        except OSError:
            stamp = None
        cached = self._pixel_sizes.get(slide_id)
        if cached is not None and cached[0] == (str(record.path), stamp):
            return cached[1]
        slide = open_slide(record.path)
        try:
            info = (slide.pixel_size, tuple(int(v) for v in slide.dimensions))
        finally:
            slide.close()
        self._pixel_sizes[slide_id] = ((str(record.path), stamp), info)
        return info

    def pixel_size_text(self, slide_id: str, file_pixel_size=None, record: SlideRecord | None = None
                        ) -> tuple[str, str, bool]:
        """(short text, explanation, usable) of a slide's pixel size as a person reads it: "0.499",
        "0.5 (set)", "unknown" or "implausible (264.58)", with the fix named in GUI words (``record``:
        the slide's record when the caller has it, e.g. for every row of a list)."""
        record = record if record is not None else self.record(slide_id)
        fix = ("select the slide and press 'Set pixel size' below (or choose 'Unknown pixel size: objective "
               "/ level0' in the Features panel)")
        if record.mpp is not None:
            text = f"{record.mpp:.4g} (set)"
            tip = f"pixel size set in this cohort: {record.mpp:g} µm/px ({record.mpp_source or 'user'})"
            if file_pixel_size is not None and file_pixel_size.raw is not None:
                tip += f"; the file states {file_pixel_size.raw:g} µm/px"
            return text, tip, True
        if file_pixel_size is None:
            return "…", "reading the slide's pixel size", True
        ps = file_pixel_size
        if ps.mpp is not None:
            return f"{ps.mpp:.4g}", f"{ps.mpp:g} µm/px as the slide file states it ({ps.source})", True
        if ps.source == "implausible" and ps.raw is not None:
            return (f"implausible ({ps.raw:.2f})",
                    f"the file states {ps.raw:g} µm/px, which no scanner produces (a 96-dpi default?); {fix}", False)
        return "unknown", f"the file states no pixel size; {fix}", False

    def largest_region_px(self, slide_ids: Sequence[str] | None = None, min_regions: int | None = None) -> int | None:
        """The largest region size (patch size x a power of two, at the settings' resolution) that fits
        ``min_regions`` (K by default) regions on each of ``slide_ids``; None when not even one patch fits
        or a pixel size is unknown."""
        from napari_slpd.slides.slide import resolve_pixel_size

        fs = self.settings.features
        need = int(min_regions or self.settings.prototypes.k)
        best = None
        for slide_id in (slide_ids if slide_ids is not None else self.slide_ids()):
            record = self.record(slide_id)
            try:
                ps, (w, h) = self.file_pixel_size(slide_id)
            except SlpdError:
                continue
            mpp = record.mpp if record.mpp is not None else ps.mpp
            if mpp is None and fs.mpp_fallback != "none":
                try:
                    mpp = resolve_pixel_size({}, mpp=None, mpp_fallback=fs.mpp_fallback).mpp
                except SlpdError:
                    mpp = None
            if mpp is None:
                return None
            w_t, h_t = w * mpp / fs.target_mpp, h * mpp / fs.target_mpp
            size = None
            r = int(fs.patch_px)
            while (w_t // r) * (h_t // r) >= need:
                size = r
                r *= 2
            if size is None:
                return None
            best = size if best is None else min(best, size)
        return best

    def slide_size_text(self, slide_id: str) -> str:
        """'2220 x 2967 px at 0.499 µm/px (1.1 x 1.5 mm)' for messages about region sizes."""
        record = self.record(slide_id)
        ps, (w, h) = self.file_pixel_size(slide_id)
        mpp = record.mpp if record.mpp is not None else ps.mpp
        if mpp is None:
            return f"{w} x {h} px (pixel size unknown)"
        return f"{w} x {h} px at {mpp:.3g} µm/px ({w * mpp / 1000:.1f} x {h * mpp / 1000:.1f} mm)"

    # -- embedding maps ---------------------------------------------------------------------------------
    def embedding_map(self, slide_ids: Sequence[str] | None = None, name: str | None = None,
                      progress: ProgressFn | None = None, cancel=None):
        """(EmbeddingMap, from_cache) of the regions of ``slide_ids`` (all slides with features)."""
        from napari_slpd.viewer.embedding_map import load_or_compute_map

        slide_ids = list(slide_ids) if slide_ids is not None else self.slides_with_features()
        if name is None:
            name = slide_ids[0] if len(slide_ids) == 1 else "cohort"
        datas = [self.region_data(s) for s in slide_ids]
        return load_or_compute_map(
            self.root, name, [(d.slide_id, d.settings_key, d.embeddings) for d in datas],
            self.settings.umap, cancel=cancel, progress=progress,
        )


# -- helpers -------------------------------------------------------------------------------------------


# The models of the last settings used in this process: building them (and hashing a checkpoint) takes
# seconds, and they hold no per-cohort state.
_ENCODERS: dict = {}
_ENCODERS_LOCK = threading.Lock()


def _checkpoint_stamp(path: str | None):
    """Changes when the checkpoint file is replaced, so a rewritten checkpoint is loaded again."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return path  # missing: the encoder builder raises the clear error
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _describe_features(attrs: dict) -> str:
    return (
        f"{attrs.get('n_regions', '?')} regions of {attrs.get('region_px', '?')} px at "
        f"{attrs.get('target_mpp', '?')} um/px; {attrs.get('patch_encoder', '?')} + {attrs.get('region_encoder', '?')}"
    )
