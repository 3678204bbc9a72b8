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
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from napari_slpd.cohort import CACHE_FOLDERS, Cohort, DuplicateSlideIdError, SkippedFile, SlideRecord, find_slides
from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.session.results import RegionData, RegionMatch, SlideMatch, SlideStatus
from napari_slpd.session.runs import SessionRunsMixin
from napari_slpd.session.settings import ProgressFn, SessionSettings
from napari_slpd.session.status import SessionStatusMixin
from napari_slpd.session.views import SessionViewsMixin
from napari_slpd.slides.ids import is_dicom_folder as _is_dicom_dir
from napari_slpd.utils.device import kmeans_device
from napari_slpd.utils.progress import is_cancelled

log = logging.getLogger(__name__)

REGIONS_KEPT = 32  # slides whose region embeddings stay in memory (each [M, E] float32)
PROTOTYPES_KEPT = 512  # slides whose prototypes stay in memory (K centroids and M assignments each)


class _Recent(OrderedDict):
    """A dict that keeps its ``limit`` most recently used entries (used under the session's lock)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = int(limit)

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class Session(SessionStatusMixin, SessionViewsMixin, SessionRunsMixin):
    """An open cohort and the settings used on it. Thread-safe for one writer at a time (the GUI runs
    one task per panel; heavy state is guarded by a lock)."""

    def __init__(self, root: str | os.PathLike, settings: SessionSettings | None = None, create: bool = True):
        self.cohort = Cohort(root, create=create)
        self._lock = threading.RLock()
        self.notices: list[str] = []  # what opening found and settled (see _recover), for the user
        self.last_skipped: list[SkippedFile] = []  # files the last add_slides (or open) did not register
        # Read back from the cohort's files as slides are shown and queried: the most recently used are kept
        # (a long session over a large cohort must not keep every slide it touched).
        self._regions: _Recent = _Recent(REGIONS_KEPT)  # slide_id -> (mtime, RegionData)
        self._prototypes: _Recent = _Recent(PROTOTYPES_KEPT)  # slide_id -> ((key, stamp), SlidePrototypes)
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
        region-encoder switch or a feature file update interrupted by a kill): one line each, for the GUI and
        the CLI to show."""
        from napari_slpd.features.store_versions import recover_interrupted_updates
        from napari_slpd.session.versions import recover_interrupted_switch

        notes = [n for n in (self.cohort.read_only_note(), self.cohort.notice) if n]
        try:
            self.cohort.slide_ids()  # reads (and, when damaged, recovers) cohort.json now, not mid-task
            if self.cohort.notice and self.cohort.notice not in notes:
                notes.append(self.cohort.notice)
            # a feature file whose update (new region embeddings) was killed half-way: the old or the new state
            for folder in dict.fromkeys([self.cohort.root / "features", self.cohort.features_path("_").parent]):
                notes.extend(recover_interrupted_updates(folder))
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

    def add_slides(self, paths: Iterable[str | os.PathLike]) -> tuple[list[SlideRecord], list[SkippedFile]]:
        """Register slides; returns (records added, the files not added: SkippedFile with state "unreadable"
        or "duplicate id" and the reason), those also kept in the cohort (``Cohort.skipped_files``)."""
        from napari_slpd.slides.slide import locate_slide_file

        added, skipped = [], []
        for path in paths:
            try:
                locate_slide_file(path)
                added.append(self.cohort.add_slide(path))
            except SlpdError as exc:
                state = "duplicate id" if isinstance(exc, DuplicateSlideIdError) else "unreadable"
                log.warning("not added to the cohort: %s", exc)
                skipped.append(self.cohort.record_skipped(path, state, str(exc)))
        self.last_skipped = skipped
        return added, skipped

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
        from napari_slpd.features.processor import ExtractionProcessor
        from napari_slpd.features.slide_tasks import SlideTask

        slide_ids = list(slide_ids) if slide_ids is not None else self.slide_ids()
        n = len(slide_ids)
        unit = 1000
        if progress:
            progress(0, n * unit)
        if not slide_ids:
            return []
        patch, region = self.encoders()
        records = [self.record(slide_id) for slide_id in slide_ids]
        tasks = [SlideTask(record.path, mpp=record.mpp, id=record.slide_id) for record in records]
        config = self.extraction_config(slide_ids[0])
        config.mpp = None  # each slide's own (its task's)
        if overwrite is not None:
            config.overwrite = bool(overwrite)

        def guard(slide_id: str) -> str | None:
            if replace_checkpoint_features or not self.checkpoint_features_at_risk([slide_id]):
                return None
            return (f"the features of {slide_id} were made with a checkpoint; the current settings use a randomly "
                    "initialised encoder, and replacing them needs an explicit confirmation (the features were kept)")

        def progress_for(i, task):
            def slide_progress(done, total):
                if progress and total > 0:
                    progress(i * unit + min(unit, done * unit // total), n * unit)

            return slide_progress

        def finished(i, task, result):
            if result.status == "error":
                log.warning("%s: %s", task.slide_id, result.message)
            self._regions.pop(task.slide_id, None)
            if on_slide:
                on_slide(result)
            if progress:
                progress((i + 1) * unit, n * unit)

        # The slides are registered already: the processor only extracts them (and prefetches the next).
        processor = ExtractionProcessor(self.cohort, patch, region, config, register=False, keep_current=True,
                                        guard=guard)
        results = processor.run(tasks, progress_for=progress_for, on_result=finished, cancel=cancel).results
        if any(r.status == "extracted" for r in results):
            self._record_features_made_with()
        return results

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
    def index(self, progress: ProgressFn | None = None, cancel=None, compute: bool = True,
              index_progress: ProgressFn | None = None):
        """The cohort index, up to date with the prototypes of every slide with current features (their
        missing prototypes are computed first, unless not ``compute``) and saved in ``COHORT/index``;
        ``index_progress`` follows the reading of the prototypes files into it."""
        from napari_slpd.similarity import CohortIndex

        # Nothing changed in the cohort since the last sync (a few stat calls): the index is current.
        stamp = self._cohort_stamp()
        with self._lock:
            if stamp is not None and self._index is not None and self._index_stamp == stamp:
                return self._index
        # Only the slides whose prototypes are missing or stale (statuses: stat calls while unchanged),
        # not a check of every prototypes file of a 10,000-slide cohort at each query.
        todo = [s.slide_id for s in self._current_statuses() if s.features_done and s.prototypes != "done"]
        if todo and compute:
            self.ensure_prototypes(todo, progress=progress, cancel=cancel)
            stamp = self._cohort_stamp()  # the prototypes just written
        with self._lock:
            self._index_stamp = None
            if self._index is None:
                self._index = CohortIndex.open(self.cohort, progress=index_progress, cancel=cancel)
            else:
                changes = self._index.sync(self.cohort, progress=index_progress, cancel=cancel)
                if any(changes.values()) and not is_cancelled(cancel):
                    self._index.save(self.cohort.index_dir)
            if not is_cancelled(cancel):
                self._index_stamp = stamp
            return self._index

    def comparable_slides(self) -> set[str]:
        """The slides a query may rank: current features and prototypes current for the settings in use
        (prototypes left from other settings are not comparable)."""
        return {s.slide_id for s in self._current_statuses() if s.features_done and s.prototypes == "done"}

    def similar_slides(self, slide_id: str, top_k: int | None = None, method: str | None = None,
                       compute: bool = True) -> list[SlideMatch]:
        """Cohort slides ranked by prototype set distance (K - S) to ``slide_id`` (itself excluded).
        ``method``: the index's (None: its configured, exact bounded search); ``compute``: compute missing
        prototypes first (the panels) or rank only the slides that have them (``slpd similar``)."""
        from napari_slpd.similarity import search_slides

        top_k = int(top_k or self.settings.top_k)
        self.prototypes(slide_id, compute=compute)
        index = self.index(compute=compute)
        return search_slides(index, slide_id, self.comparable_slides(), top_k, method)

    def similar_to_prototype(self, slide_id: str, k: int, top_k: int | None = None,
                             compute: bool = True) -> list[SlideMatch]:
        """Cohort slides ranked by their best match to prototype ``k`` of ``slide_id``: distance = 1 - the
        largest cosine between that prototype and one of the slide's prototypes (itself excluded). This
        is what a click on a region asks in slide mode: where else is this tissue pattern?"""
        from napari_slpd.similarity import rank_by_prototype

        top_k = int(top_k or self.settings.top_k)
        query = self.prototypes(slide_id, compute=compute)
        if not 0 <= int(k) < int(query.k):
            raise SlpdError(f"{slide_id} has {query.k} prototypes; there is no prototype {k}")

        def candidates():
            for other in self.slides_with_features():
                if other == slide_id:
                    continue
                try:
                    protos = self.prototypes(other, compute=False)
                except SlpdError:
                    continue  # no prototypes for the current settings: not comparable
                yield other, protos.centroids

        return rank_by_prototype(query.centroids, int(k), candidates(), top_k)

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
