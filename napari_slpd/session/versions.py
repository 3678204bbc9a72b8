"""Region encoders of a cohort: the versions of region embeddings its feature files hold, and switching
between them (instantly: the embeddings are kept per region encoder, see :mod:`napari_slpd.features.store`).

```python
from napari_slpd.session.versions import (cohort_region_encoders, selected_region_encoder,
    use_region_encoder, region_embedding_sources)
encoders = cohort_region_encoders(cohort)   # [CohortRegionEncoder(key, region_encoder, sha256, checkpoint,
                                            #   label, origin, dim, n_slides, n_selected, selected, complete)]
selected_region_encoder(cohort) -> key | None        # None: the slides disagree (a cancelled switch)
report = use_region_encoder(session, key, progress=None, cancel=None)   # select it in every file,
                                            # restore its prototypes, refresh the index, carry names over
region_embedding_sources(cohort) -> [(version, loader(slide_id) -> [M, E])]   # for napari_slpd.evaluation
install_evaluation_sources()      # evaluation sees every version as region_mean@KEY (the panels call it)
cmp = evaluate_versions(cohort, "labels.csv", before_key, after_key, task=None, protocols=("knn", "linear"))
cmp.rows, cmp.table()             # the before/after table "Use checkpoint" shows (paired bootstrap p-values)
```
CLI: ``slpd region-encoders COHORT [--use VERSION] [--json]``.

Prototypes follow the selected version: their cache is keyed by the feature file's ``settings_key``,
which is the selected version's. So that switching back gives the very prototypes (and so the very cohort
index) of before, the prototype files of the version being left are kept in
``COHORT/prototypes/versions/<key>/<slide_id>.h5`` and restored when it is selected again (only if they
still match the features; otherwise the prototypes are computed anew).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_slpd.errors import FeatureStoreError, SlpdError
from napari_slpd.utils.files import atomic_path
from napari_slpd.utils.progress import ProgressFn, is_cancelled, progress_span
from napari_slpd.utils.storage import write_target

log = logging.getLogger(__name__)

STASH_DIR = "versions"  # under COHORT/prototypes/


@dataclass
class CohortRegionEncoder:
    """A region encoder the cohort has region embeddings of."""

    key: str
    region_encoder: str
    sha256: str
    checkpoint: str
    label: str
    origin: str  # "extraction" | "reencoded"
    dim: int
    created: str
    n_slides: int  # slides holding embeddings of this encoder
    n_selected: int  # slides where it is the selected version
    n_with_features: int  # slides with a complete feature file
    slides_missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.n_slides == self.n_with_features

    @property
    def selected(self) -> bool:
        return self.n_with_features > 0 and self.n_selected == self.n_with_features

    @property
    def kind(self) -> str:
        """The FeatureSettings.region_encoder that builds it ("hipt_vit4k", "mean", or the first word of the
        model id of encoders this package does not build, e.g. imported embeddings)."""
        for kind in ("hipt_vit4k", "mean"):
            if self.region_encoder.startswith(kind):
                return kind
        return self.region_encoder.split(" ")[0] or "hipt_vit4k"

    def describe(self) -> str:
        where = "" if self.complete else f" ({self.n_slides} of {self.n_with_features} slides)"
        mark = " [selected]" if self.selected else ""
        return f"{self.key}: {self.label}{where}{mark}"

    def to_dict(self) -> dict:
        return {"key": self.key, "region_encoder": self.region_encoder, "sha256": self.sha256,
                "checkpoint": self.checkpoint, "label": self.label, "origin": self.origin, "dim": self.dim,
                "created": self.created, "n_slides": self.n_slides, "n_selected": self.n_selected,
                "n_with_features": self.n_with_features, "complete": self.complete, "selected": self.selected}


def _feature_files(cohort, slide_ids: Sequence[str] | None = None) -> dict[str, Path]:
    ids = list(slide_ids) if slide_ids is not None else cohort.slide_ids()
    return {sid: cohort.features_path(sid) for sid in ids if cohort.features_path(sid).exists()}


def _file_versions(path: Path):
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(path) as store:
        return store.region_embedding_versions()


def cohort_region_encoders(cohort, slide_ids: Sequence[str] | None = None) -> list[CohortRegionEncoder]:
    """Every region encoder the cohort's feature files hold embeddings of, oldest first (damaged or
    unfinished files are skipped)."""
    found: dict[str, CohortRegionEncoder] = {}
    holders: dict[str, set[str]] = {}
    readable = []
    for sid, path in _feature_files(cohort, slide_ids).items():
        try:
            versions = _file_versions(path)
        except FeatureStoreError:
            continue
        readable.append(sid)
        for v in versions:
            entry = found.get(v.key)
            if entry is None:
                entry = found[v.key] = CohortRegionEncoder(
                    v.key, v.region_encoder, v.sha256, v.checkpoint, v.label, v.origin, v.dim, v.created, 0, 0, 0)
            entry.n_slides += 1
            entry.n_selected += int(v.selected)
            if not entry.checkpoint and v.checkpoint:
                entry.checkpoint = v.checkpoint
            holders.setdefault(v.key, set()).add(sid)
    for key, entry in found.items():
        entry.n_with_features = len(readable)
        entry.slides_missing = [s for s in readable if s not in holders[key]]
    return sorted(found.values(), key=lambda e: (e.origin != "extraction", e.created, e.key))


def selected_region_encoder(cohort) -> str | None:
    """The key selected in every feature file, or None (no features, or the files disagree)."""
    selected = [e.key for e in cohort_region_encoders(cohort) if e.selected]
    return selected[0] if len(selected) == 1 else None


def find_region_encoder(cohort, version: str) -> CohortRegionEncoder:
    """The cohort's region encoder named by key, sha256 prefix, model id or checkpoint path."""
    encoders = cohort_region_encoders(cohort)
    text = str(version)
    exact = [e for e in encoders if e.key == text]
    if exact:
        return exact[0]
    resolved = str(Path(text).expanduser().resolve()) if os.sep in text or text.endswith(".pth") else None
    matches = [e for e in encoders if (e.sha256 and e.sha256.startswith(text.lower())) or e.region_encoder == text
               or (resolved and e.checkpoint == resolved)]
    if len(matches) == 1:
        return matches[0]
    known = "; ".join(e.describe() for e in encoders) or "none"
    raise FeatureStoreError(f"cohort {cohort.root} has no region embeddings of {version!r} (it has: {known})")


# -- prototypes kept per version -------------------------------------------------------------------------


def stash_path(cohort, key: str, slide_id: str) -> Path:
    """Where the kept prototypes of ``slide_id`` under version ``key`` are (in the cache folder of a
    read-only cohort: see napari_slpd.utils.storage.cohort_file)."""
    from napari_slpd.slides.ids import safe_slide_id
    from napari_slpd.utils.storage import cohort_file

    return cohort_file(cohort.root / "prototypes" / STASH_DIR / key / f"{safe_slide_id(slide_id)}.h5")


def _prototype_key(path: Path) -> str | None:
    from napari_slpd.prototypes.cache import read_attrs

    try:
        return str(read_attrs(path).get("features_settings_key", "")) or None
    except SlpdError:
        return None


def stash_prototypes(cohort, slide_ids: Sequence[str] | None = None) -> int:
    """Keep a copy of each slide's prototypes that match its selected region embeddings, under the key of
    that version. Returns the number of files kept."""
    from napari_slpd.features.store import read_store_attrs
    from napari_slpd.features.store import VERSION_ATTR, version_key

    kept = 0
    for sid, path in _feature_files(cohort, slide_ids).items():
        proto = cohort.prototypes_path(sid)
        if not proto.exists():
            continue
        try:
            attrs = read_store_attrs(path)
        except FeatureStoreError:
            continue
        key = attrs.get(VERSION_ATTR) or version_key(attrs.get("region_encoder", ""),
                                                     attrs.get("region_encoder_sha256", ""))
        if _prototype_key(proto) != str(attrs.get("settings_key", "")):
            continue  # stale prototypes are not worth keeping
        target = write_target(stash_path(cohort, str(key), sid))
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(proto, tmp)
        kept += 1
    return kept


def restore_prototypes(cohort, slide_ids: Sequence[str] | None = None) -> list[str]:
    """Put back the kept prototypes of each slide's selected version where they match its features (and
    the current file does not). Returns the slides restored."""
    from napari_slpd.features.store import VERSION_ATTR, read_store_attrs, version_key

    restored = []
    for sid, path in _feature_files(cohort, slide_ids).items():
        try:
            attrs = read_store_attrs(path)
        except FeatureStoreError:
            continue
        features_key = str(attrs.get("settings_key", ""))
        key = attrs.get(VERSION_ATTR) or version_key(attrs.get("region_encoder", ""),
                                                     attrs.get("region_encoder_sha256", ""))
        kept = stash_path(cohort, str(key), sid)
        proto = cohort.prototypes_path(sid)
        if not kept.exists() or _prototype_key(kept) != features_key:
            continue
        if proto.exists() and _prototype_key(proto) == features_key and _same_file(proto, kept):
            continue
        before = proto.stat().st_mtime_ns if proto.exists() else 0
        proto = write_target(proto)  # a read-only cohort: its cache folder
        proto.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(proto) as tmp:
            shutil.copyfile(kept, tmp)
        _bump_mtime(proto, before)
        restored.append(sid)
    return restored


def _same_file(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _bump_mtime(path: Path, before_ns: int) -> None:
    """The prototypes' stamp (mtime, size) must change on every rewrite: the cohort index compares it."""
    import time

    now = max(time.time_ns(), before_ns + 1_000_000)
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


# -- switching ---------------------------------------------------------------------------------------------


@dataclass
class SwitchReport:
    key: str
    label: str
    switched: list[str]  # slides whose selection changed
    already: list[str]  # slides that had it selected
    missing: dict[str, str]  # slide -> why it could not be switched
    prototypes_restored: list[str]
    prototypes: dict[str, str]  # slide -> "ok" or why it has none
    index_slides: int
    names: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False

    def summary(self) -> str:
        text = (f"region encoder {self.key} ({self.label}) selected in {len(self.switched) + len(self.already)} "
                f"slides; prototypes of {len(self.prototypes_restored)} slides restored, "
                f"{sum(v == 'ok' for v in self.prototypes.values())} ready; similar-slides index over "
                f"{self.index_slides} slides")
        if self.missing:
            text += "; not switched: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.missing.items()))
        if self.names:
            text += "; names: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.names.items()))
        if self.cancelled:
            text += " (cancelled)"
        return text


def select_in_files(cohort, key: str, slide_ids: Sequence[str] | None = None,
                    cancel=None) -> tuple[list[str], list[str], dict[str, str]]:
    """(switched, already selected, missing: slide -> why) after selecting ``key`` in each feature file."""
    from napari_slpd.features.store import FeatureStore, select_region_embedding_version

    switched, already, missing = [], [], {}
    for sid, path in _feature_files(cohort, slide_ids).items():
        if is_cancelled(cancel):
            missing[sid] = "cancelled"
            continue
        try:
            with FeatureStore.open(path) as store:
                keys = {v.key: v.selected for v in store.region_embedding_versions()}
            if key not in keys:
                missing[sid] = f"has no region embeddings of {key}"
                continue
            if keys[key] and _root_pointer_ok(path, key):
                already.append(sid)
                continue
            select_region_embedding_version(path, key)
            switched.append(sid)
        except FeatureStoreError as exc:
            missing[sid] = str(exc)
    return switched, already, missing


def _root_pointer_ok(path: Path, key: str) -> bool:
    """Whether the root attributes agree with the link (False after an interrupted switch: redo it)."""
    from napari_slpd.features.store import VERSION_ATTR, read_store_attrs

    return read_store_attrs(path).get(VERSION_ATTR, key) == key


def activate(session, key: str, progress: ProgressFn | None = None, cancel=None, carry_names: bool = True,
             names_before=None, lo: int = 0) -> tuple[list[str], list[str], dict[str, str], list[str], dict, int, dict]:
    """Select ``key`` everywhere, restore its prototypes, switch the session's feature settings to its
    encoder, compute the prototypes still missing and refresh the index. Progress in thousandths from
    ``lo``. Returns (switched, already, missing, restored, prototypes, index size, names)."""
    from dataclasses import replace

    cohort = session.cohort
    unit = 1000

    if names_before is None and carry_names:
        from napari_slpd.labeling import PrototypeAnnotations

        names_before = PrototypeAnnotations.load(cohort, session)
    _begin_switch(cohort, key)  # a process killed from here on is noticed and undone at the next open
    stash_prototypes(cohort)
    switched, already, missing = select_in_files(cohort, key, cancel=cancel)
    if is_cancelled(cancel):  # cancelled half-way: every file goes back to what it had, never a mix
        recover_interrupted_switch(cohort)
        return [], already, missing, [], {}, 0, {}
    restored = restore_prototypes(cohort)
    encoder = next((e for e in cohort_region_encoders(cohort) if e.key == key), None)
    protos, n_index, names = {}, 0, {}
    if encoder is not None and not is_cancelled(cancel):
        fs = session.settings.features
        checkpoint = encoder.checkpoint or None
        if encoder.origin == "extraction" and encoder.sha256 == "" and encoder.kind == "hipt_vit4k":
            checkpoint = None  # the seeded random initialisation
        session.settings.features = replace(fs, region_encoder=encoder.kind, region_checkpoint=checkpoint)
        mid = lo + (unit - lo) * 3 // 4
        protos = session.ensure_prototypes(progress=progress_span(progress, lo, mid, unit), cancel=cancel)
        index = session.index(progress=progress_span(progress, mid, unit, unit), cancel=cancel)
        n_index = _index_size(index)
        if names_before is not None:
            names = names_before.carry_over(session)
    _end_switch(cohort)
    return switched, already, missing, restored, protos, n_index, names


# -- an interrupted switch (process killed, machine down) -----------------------------------------------------

SWITCH_FILE = "region_encoder_switch.json"  # COHORT/: present only while a switch of region encoder runs


def _switch_path(cohort) -> Path:
    from napari_slpd.utils.storage import cohort_file

    return cohort_file(cohort.root / SWITCH_FILE)


def _begin_switch(cohort, key: str) -> None:
    from napari_slpd.utils.files import atomic_write_json

    previous = selected_region_encoder(cohort)
    journal = _switch_path(cohort)
    if journal.exists():  # an older interrupted switch: its "from" is the state to go back to
        try:
            import json

            previous = json.loads(journal.read_text(encoding="utf-8")).get("from") or previous
        except (OSError, ValueError):
            pass
    atomic_write_json(journal, {"from": previous, "to": key, "pid": os.getpid()})


def _end_switch(cohort) -> None:
    _switch_path(cohort).unlink(missing_ok=True)


def recover_interrupted_switch(cohort) -> str | None:
    """Finish off a switch of region encoder that was interrupted (a killed "Use checkpoint" or version
    switch): when every feature file already selects the new version the cohort keeps it; otherwise every
    file goes back to the version it had before. Returns what was done (None when nothing was pending), so
    that the cohort is always on one encoder, the old or the new, and says which."""
    import json

    journal = _switch_path(cohort)
    if not journal.exists():
        return None
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        old, new = record.get("from"), record["to"]
    except (OSError, ValueError, KeyError, TypeError):
        old, new = None, None
    encoders = {e.key: e for e in cohort_region_encoders(cohort)}
    target = new if new in encoders and encoders[new].selected else old
    if target is None or target not in encoders:
        target = new if new in encoders else None
    if target is None:
        _end_switch(cohort)
        return f"an interrupted switch of region encoder was found ({journal.name}) but no version to settle on"
    switched, _, missing = select_in_files(cohort, target)
    restore_prototypes(cohort)
    _end_switch(cohort)
    label = encoders[target].label or target
    if target == new:
        note = (f"an interrupted switch of region encoder had already selected {label} in every feature file: "
                f"the cohort uses it (prototypes and the index are brought up to date when next used)")
    else:
        note = (f"an interrupted switch of region encoder to {encoders[new].label if new in encoders else new} was "
                f"undone: every slide uses {label} again ({len(switched)} file(s) switched back); use the checkpoint "
                "again to switch (its region embeddings are kept: no recomputation)")
    if missing:
        note += f"; {len(missing)} slide(s) could not be set: " + "; ".join(f"{k}: {v}" for k, v in list(missing.items())[:3])
    log.warning("%s", note)
    return note


def use_region_encoder(session, version: str, progress: ProgressFn | None = None, cancel=None,
                       carry_names: bool = True) -> SwitchReport:
    """Make the region embeddings of ``version`` (a key of :func:`cohort_region_encoders`, a checkpoint
    sha256 prefix, model id or checkpoint path) the cohort's: no embedding is recomputed, the prototypes
    kept for it are restored, the cohort index follows. Slides lacking that version are reported (use the
    checkpoint again to encode them)."""
    encoder = find_region_encoder(session.cohort, version)
    switched, already, missing, restored, protos, n_index, names = activate(
        session, encoder.key, progress=progress, cancel=cancel, carry_names=carry_names)
    if progress:
        progress(1000, 1000)
    return SwitchReport(encoder.key, encoder.label, switched, already, missing, restored, protos, n_index, names,
                        cancelled=is_cancelled(cancel))


def _index_size(index) -> int:
    ids = getattr(index, "slide_ids", None)
    try:
        return len(ids() if callable(ids) else ids) if ids is not None else len(index)
    except TypeError:
        return 0


# -- for evaluation ----------------------------------------------------------------------------------------


def region_embedding_sources(cohort) -> list[tuple[str, Callable[[str], np.ndarray]]]:
    """``[(version, loader)]``: "current" (each file's selected version) and, when the cohort holds more
    than one, every version by key; ``loader(slide_id) -> [M, E] float32`` raises FeatureStoreError for a
    slide without that version. The hook :func:`napari_slpd.evaluation.representations.
    set_region_embedding_sources` takes this function as it is."""
    from napari_slpd.features.store import load_region_embeddings

    def loader(version):
        def load(slide_id: str) -> np.ndarray:
            return load_region_embeddings(cohort.features_path(slide_id), version)
        return load

    sources = [("current", loader(None))]
    encoders = cohort_region_encoders(cohort)
    if len(encoders) > 1:
        sources += [(e.key, loader(e.key)) for e in encoders]
    return sources


# -- before / after ----------------------------------------------------------------------------------------


@dataclass
class VersionComparison:
    """The evaluation of two region-embedding versions side by side (what "Use checkpoint" shows)."""

    before: str  # version keys
    after: str
    task: str
    rows: list[dict]  # {protocol, metric, before, before_std, after, after_std, difference, ci_low, ci_high, p_value}
    n_slides: int
    n_folds: int
    result: object = None  # napari_slpd.evaluation.engine.EvaluationResult

    def table(self) -> str:
        lines = [f"task {self.task}: {self.n_slides} slides, {self.n_folds} folds; before = {self.before}, "
                 f"after = {self.after}",
                 f"{'protocol':<10} {'metric':<18} {'before':>15} {'after':>15} {'diff':>8} {'p':>6}"]
        for r in self.rows:
            lines.append(
                f"{r['protocol']:<10} {r['metric']:<18} {r['before']:>7.3f} +/- {r['before_std']:<5.3f} "
                f"{r['after']:>7.3f} +/- {r['after_std']:<5.3f} {r['difference']:>+8.3f} "
                f"{'' if r['p_value'] is None else format(r['p_value'], '.3f'):>6}")
        return "\n".join(lines)


def _representation_of(version: str, selected: str | None) -> str:
    return f"region_mean@{version}"


def install_evaluation_sources() -> None:
    """Let :mod:`napari_slpd.evaluation` see every region-embedding version (``region_mean@KEY``)."""
    from napari_slpd.evaluation.representations import set_region_embedding_sources

    set_region_embedding_sources(region_embedding_sources)


def evaluate_versions(cohort, labels, before: str, after: str, task: str | None = None,
                      protocols: Sequence[str] = ("knn", "linear"), n_folds: int = 10, seed: int = 0,
                      progress: ProgressFn | None = None, cancel=None) -> VersionComparison:
    """Evaluate the mean region embeddings of versions ``before`` and ``after`` on the same slides and folds
    with the evaluation engine (``protocols``: KNN and linear probe by default), with the engine's paired
    bootstrap of each difference. Folds: ``n_folds``, fewer when a class has fewer cases."""
    from napari_slpd.evaluation.engine import EvaluationConfig, evaluate
    from napari_slpd.evaluation.errors import LabelsError

    install_evaluation_sources()
    before_key = find_region_encoder(cohort, before).key
    after_key = find_region_encoder(cohort, after).key
    names = [_representation_of(before_key, None), _representation_of(after_key, None)]
    import re

    folds = int(n_folds)
    for _attempt in range(2):
        config = EvaluationConfig(tasks=[task] if task else None, representations=names, protocols=list(protocols),
                                  n_folds=folds, seed=seed)
        try:
            result = evaluate(cohort, labels, config, progress=progress, cancel=cancel)
            break
        except LabelsError as exc:  # too few cases of a class for this many folds: the most that work
            suggested = re.search(r"--folds (\d+)", str(exc))
            if suggested is None or int(suggested[1]) >= folds or _attempt:
                raise
            folds = int(suggested[1])
    task_name = task or next(iter(result.tasks))
    rows = []
    for protocol in protocols:
        try:
            a = result.result(task_name, names[0], protocol)
            b = result.result(task_name, names[1], protocol)
        except KeyError:
            continue
        comparison = next((c for c in result.comparisons if c.task == task_name and c.protocol == protocol), None)
        for metric in a.summary:
            fa, fb = a.summary[metric], b.summary[metric]
            row = {"protocol": protocol, "metric": metric, "before": fa.get("mean"), "before_std": fa.get("std"),
                   "after": fb.get("mean"), "after_std": fb.get("std"),
                   "difference": (fb.get("mean") or 0.0) - (fa.get("mean") or 0.0),
                   "ci_low": None, "ci_high": None, "p_value": None}
            if comparison is not None and comparison.metric == metric:
                sign = 1.0 if comparison.a == names[1] else -1.0  # engine: difference = a - b
                row.update(ci_low=sign * (comparison.ci_low if sign > 0 else comparison.ci_high),
                           ci_high=sign * (comparison.ci_high if sign > 0 else comparison.ci_low),
                           p_value=comparison.p_value)
            rows.append(row)
    info = result.tasks[task_name]
    return VersionComparison(before_key, after_key, task_name, rows, len(info.data.slide_ids), len(info.data.folds),
                             result)
