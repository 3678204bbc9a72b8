"""The session's view of what the cohort holds: each slide's status (features, prototypes) against the
settings in use, read cheaply while nothing changed (a cohort-level stamp), and the settings the cohort
keeps (saved, compared with the features on disk, guarded against replacing checkpoint features).
A mixin of :class:`napari_slpd.session.Session`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence


from napari_slpd.cohort import SlideRecord
from napari_slpd.errors import FeatureStoreError, SlpdError

from napari_slpd.session.results import SlideStatus, describe_features
from napari_slpd.session.settings import FeatureSettings, SessionSettings

log = logging.getLogger(__name__)

# A folder whose time is this recent is not trusted as a cohort stamp (see Session._cohort_stamp): file
# system times move by clock ticks (a few ms locally, up to seconds on some shares), and two changes within
# one tick leave one time.
RACY_NS = 2_000_000_000


class SessionStatusMixin:
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

        seen = Counter()
        for _, a in self._feature_file_attrs(self.slide_ids()):
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
        fs = self.settings.features
        patch_random = fs.patch_checkpoint is None and fs.patch_encoder == "hipt_vit256"
        region_random = fs.region_checkpoint is None and fs.region_encoder == "hipt_vit4k"
        if not (patch_random or region_random):
            return []
        ids = slide_ids if slide_ids is not None else self.slide_ids()
        return [slide_id for slide_id, a in self._feature_file_attrs(ids)
                if (patch_random and a.get("patch_encoder_sha256")) or (region_random and a.get("region_encoder_sha256"))]

    def _feature_file_attrs(self, slide_ids: Sequence[str]):
        """``(slide_id, attrs)`` of each slide whose feature file exists and can be read."""
        from napari_slpd.features.store import read_store_attrs

        for slide_id in slide_ids:
            path = self.cohort.features_path(slide_id)
            if not path.exists():
                continue
            try:
                yield slide_id, read_store_attrs(path)
            except SlpdError:
                continue

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
        registry = self.cohort.registry_stamp()  # cohort.json and the per-slide records
        if registry is None:
            return None
        parts.append(registry)
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
                    detail = "; ".join(diffs) if diffs else describe_features(attrs)
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
