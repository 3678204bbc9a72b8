"""Names and colours of prototypes, kept in the cohort (``Cohort.annotations_path``) across sessions.

A name belongs to one prototype of one slide's *current* prototypes. Prototypes are recomputed when K,
the features or the region encoder change, and prototype 2 of the new set has nothing to do with
prototype 2 of the old one, so every slide's names are stored with the identity of the prototype set
they were given to (a hash of its centroids) and with its region assignments. When the identity no
longer matches, the names are *stale*: they are reported and never shown on the new prototypes; they
can be discarded, or carried over to the new prototypes by region overlap (the regions a named
prototype covered, matched one-to-one to the new prototypes by intersection over union), which is what
happens after "use this checkpoint" in the fine-tune panel.

File layout (JSON, written atomically)::

    {"version": 1,
     "slides": {"<slide_id>": {
         "prototypes": {"identity": "<sha256[:20]>", "k": 4, "n_regions": 120,
                        "regions": "<sha256[:20] of region coords>", "assignments": [0, 2, ...]},
         "labels": {"<k>": {"name": "tumour", "color": "#d62728", "source": "user",
                            "confidence": null, "origin": null, "updated": 1718000000.0}}}}}

``source`` is "default" (only a colour was chosen: the name stays the default "prototype <k>", whatever index
the prototype has later), "user" (typed or accepted by a person), "proalign" (a zero-shot name accepted from
ProAlign; confidence = its share of the prototype's patches times their mean confidence) or
"propagated" (copied from a matched prototype of another slide; confidence = the cosine of the two
prototypes; origin = "<slide_id>:<k>").

Propagation (:func:`plan_propagation` then :meth:`PrototypeAnnotations.apply`) uses the prototype set
matching that defines slide similarity: the source prototype's partner in the optimal one-to-one
matching of the two slides' prototype sets gets the name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.labeling.palette import color_to_rgba, default_color, default_name, normalize_color, slide_colors  # noqa: F401
from napari_slpd.utils.files import atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SOURCES = ("user", "proalign", "propagated", "default")

class StaleAnnotationsError(PrototypeError):
    """Names were given to prototypes that have since been recomputed."""


def _clean_name(name: str) -> str:
    text = " ".join(str(name).split())
    if not text:
        raise SlpdError("a prototype name cannot be empty; clear the name instead")
    if len(text) > 120:
        raise SlpdError(f"prototype names are limited to 120 characters ({len(text)} given)")
    return text


def prototype_identity(centroids: np.ndarray) -> str:
    """A short hash of a prototype set: equal for a recomputation that gives the same centroids."""
    c = np.ascontiguousarray(np.round(np.asarray(centroids, dtype=np.float64), 4), dtype=np.float32)
    c[c == 0] = 0.0  # -0.0 and 0.0 must hash alike
    digest = hashlib.sha256(f"{c.shape}".encode() + c.tobytes()).hexdigest()
    return digest[:20]


def regions_identity(coords: np.ndarray | None) -> str:
    if coords is None:
        return ""
    c = np.ascontiguousarray(np.asarray(coords, dtype=np.int64))
    return hashlib.sha256(f"{c.shape}".encode() + c.tobytes()).hexdigest()[:20]


# -------------------------------------------------------------------------------------------------
# Where prototypes come from


PrototypeSource = Callable[[str], Any]  # slide_id -> SlidePrototypes (centroids, assignments, coords)


def prototype_source(provider) -> PrototypeSource:
    """A slide_id -> SlidePrototypes function from a Session (its current prototypes, never computed
    here), a Cohort (the prototypes cached in it) or such a function itself."""
    if callable(provider) and not hasattr(provider, "prototypes") and not hasattr(provider, "prototypes_path"):
        return provider
    if hasattr(provider, "prototypes") and hasattr(provider, "cohort"):  # a Session
        return lambda slide_id: provider.prototypes(slide_id, compute=False)
    if hasattr(provider, "prototypes_path"):  # a Cohort
        from napari_slpd.prototypes import load_prototypes

        def load(slide_id: str):
            return load_prototypes(provider, slide_id)

        return load
    raise TypeError(f"cannot read prototypes from {type(provider).__name__}; give a Session, a Cohort or a function")


def _cohort_of(provider):
    return provider.cohort if hasattr(provider, "cohort") else provider


# -------------------------------------------------------------------------------------------------
# Records


@dataclass
class PrototypeLabel:
    name: str
    color: str
    source: str = "user"
    confidence: float | None = None
    origin: str | None = None
    updated: float = field(default_factory=time.time)

    def __post_init__(self):
        self.name = _clean_name(self.name)
        self.color = normalize_color(self.color)
        if self.source not in SOURCES:
            raise SlpdError(f"label source must be one of {SOURCES}, not {self.source!r}")
        if self.confidence is not None:
            self.confidence = float(self.confidence)

    @property
    def named(self) -> bool:
        """Whether a name was given (a colour-only label keeps the default name)."""
        return self.source != "default"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "PrototypeLabel":
        known = {k: data[k] for k in ("name", "color", "source", "confidence", "origin", "updated") if k in data}
        return cls(**known)


@dataclass
class SlideState:
    """How a slide's stored names relate to its current prototypes."""

    slide_id: str
    status: str  # "none" (no names), "current", "stale", "no-prototypes"
    n_labels: int = 0
    message: str = ""


@dataclass
class Change:
    """One planned change of a prototype's name (a row of the preview shown before applying)."""

    slide_id: str
    proto_idx: int
    action: str  # "set" (will change), "unchanged" (already so), "skip" (will not change: see reason)
    new: PrototypeLabel | None
    old: PrototypeLabel | None = None
    similarity: float | None = None  # cosine of the source prototype and this one
    reason: str = ""
    identity: str = ""  # the identity of the slide's prototype set the change was planned on

    def describe(self) -> str:
        old = f"'{self.old.name}'" if self.old else default_name(self.proto_idx)
        sim = f" (cosine {self.similarity:.2f})" if self.similarity is not None else ""
        if self.action == "set":
            return f"{self.slide_id}: {old} -> '{self.new.name}'{sim}"
        if self.action == "unchanged":
            return f"{self.slide_id}: {old} already named so{sim}"
        return f"{self.slide_id}: not changed: {self.reason}"


# -------------------------------------------------------------------------------------------------
# The store


def _read_names_text(text: str) -> tuple[dict | None, str | None]:
    """(data, None) for a good names file's text, (None, what is wrong) otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("slides"), dict):
        return None, "not a napari-slpd prototype names file"
    if int(data.get("version", 1)) > FORMAT_VERSION:
        raise SlpdError("the prototype names file was written by a newer napari-slpd; update napari-slpd to read it")
    return data, None


def _read_names_file(path: Path) -> tuple[dict | None, str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not text: {exc}"
    except OSError as exc:
        raise SlpdError(f"prototype names file {path} cannot be read ({exc.strerror or exc})") from exc
    try:
        return _read_names_text(text)
    except SlpdError as exc:
        raise SlpdError(f"{path}: {exc}") from exc


class PrototypeAnnotations:
    """Names and colours of the cohort's prototypes. ``load`` reads them; changes are saved at once.

    ``provider`` says where the current prototypes are read from (a Session, a Cohort, or a function
    slide_id -> SlidePrototypes); it decides which names are current and which stale.
    """

    notice: str | None = None  # set by load() when the file was damaged and what was done about it

    def __init__(self, cohort, data: dict | None = None, provider=None):
        self.cohort = _cohort_of(cohort)
        self._source = prototype_source(provider if provider is not None else cohort)
        self._data = data if data is not None else {"version": FORMAT_VERSION, "slides": {}}
        self._lock = threading.RLock()
        self._stamp = self._file_stamp()

    # -- persistence -----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.cohort.annotations_path)

    @classmethod
    def load(cls, cohort, provider=None) -> "PrototypeAnnotations":
        """The cohort's names. A damaged file is set aside (``annotations.json.damaged-<time>``, never
        deleted) and the names come back from the backup kept before every rewrite (``annotations.json.bak``);
        ``notice`` then says so (None when all was well)."""
        from napari_slpd.utils.storage import backup_path, set_aside

        c = _cohort_of(cohort)
        path = Path(c.annotations_path)
        data = None
        notice = None
        if path.exists():
            data, problem = _read_names_file(path)
            if problem is not None:
                backup = backup_path(path)
                restored, _ = _read_names_file(backup) if backup.exists() else (None, "none")
                aside = set_aside(path)
                kept = f"kept as {aside.name}" if aside is not None else "left as it is"
                if restored is not None:
                    data = restored
                    notice = (f"prototype names file {path} is damaged ({problem}; {kept}): the names were restored "
                              f"from its backup {backup.name}; names given after that backup are missing")
                else:
                    notice = (f"prototype names file {path} is damaged ({problem}; {kept}) and has no usable backup: "
                              "starting without names (the damaged file holds what could be recovered by hand)")
                log.warning(notice)
        names = cls(cohort, data, provider if provider is not None else cohort)
        names.notice = notice
        return names

    def save(self) -> None:
        """Write the names atomically, after copying the previous good file to ``annotations.json.bak``."""
        from napari_slpd.utils.files import keep_backup

        with self._lock:
            keep_backup(self.path, lambda text: _read_names_text(text)[1] is None)
            atomic_write_json(self.path, self._data)
            self._stamp = self._file_stamp()

    def _file_stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """Read the file again when someone else wrote it (another panel, the CLI, use_checkpoint)."""
        if self._file_stamp() == self._stamp:
            return False
        fresh = PrototypeAnnotations.load(self.cohort, self._source)
        with self._lock:
            self._data, self._stamp = fresh._data, fresh._stamp
        return True

    # -- reading ---------------------------------------------------------------------------------------
    def _slide(self, slide_id: str) -> dict | None:
        return self._data["slides"].get(slide_id)

    def _current(self, slide_id: str):
        """(prototypes, identity) of the slide's current prototypes, or (None, "") when it has none."""
        try:
            protos = self._source(slide_id)
        except SlpdError:
            return None, ""
        if protos is None:
            return None, ""
        return protos, prototype_identity(protos.centroids)

    def slide_ids(self) -> list[str]:
        return sorted(sid for sid, rec in self._data["slides"].items() if rec.get("labels"))

    def state(self, slide_id: str, protos=None) -> SlideState:
        record = self._slide(slide_id)
        labels = (record or {}).get("labels") or {}
        if not labels:
            return SlideState(slide_id, "none")
        if protos is None:
            protos, identity = self._current(slide_id)
        else:
            identity = prototype_identity(protos.centroids)
        if protos is None:
            return SlideState(slide_id, "no-prototypes", len(labels),
                              f"{slide_id} has {len(labels)} named prototypes but no prototypes now")
        stored = record.get("prototypes") or {}
        if stored.get("identity") == identity:
            return SlideState(slide_id, "current", len(labels))
        return SlideState(
            slide_id, "stale", len(labels),
            f"the {len(labels)} prototype name(s) of {slide_id} were given to prototypes that have since been "
            f"recomputed (K was {stored.get('k', '?')}, now {protos.k}); carry them over by region overlap or "
            "discard them",
        )

    def stale_slides(self) -> list[SlideState]:
        return [s for s in (self.state(sid) for sid in self.slide_ids()) if s.status in ("stale", "no-prototypes")]

    def labels(self, slide_id: str, protos=None) -> dict[int, PrototypeLabel]:
        """prototype index -> label for the slide's current prototypes. Stale names raise
        StaleAnnotationsError (never applied to prototypes they were not given to)."""
        st = self.state(slide_id, protos)
        if st.status == "none":
            return {}
        if st.status != "current":
            raise StaleAnnotationsError(st.message)
        labels = {int(k): PrototypeLabel.from_json(v) for k, v in self._slide(slide_id)["labels"].items()}
        for k, label in labels.items():
            # Files written before colour-only labels existed stored a recolour as the user "naming" the
            # prototype its default name: that name says nothing and must not travel to another index.
            if label.source == "user" and label.name == default_name(k):
                label.source = "default"
        return labels

    def label(self, slide_id: str, k: int, protos=None) -> PrototypeLabel | None:
        return self.labels(slide_id, protos).get(int(k))

    def styles(self, slide_id: str, protos=None) -> tuple[dict[int, str], dict[int, str]]:
        """(names, colours) of every prototype of the slide, defaults where unnamed; stale names are
        left out (defaults shown) rather than raising, for display."""
        if protos is None:
            protos, _ = self._current(slide_id)
        k = protos.k if protos is not None else 0
        try:
            labels = self.labels(slide_id, protos) if protos is not None else {}
        except StaleAnnotationsError:
            labels = {}
        names = {i: labels[i].name if i in labels and labels[i].named else default_name(i) for i in range(k)}
        # Stored colours where given, palette colours elsewhere, never two alike on one slide.
        colors = slide_colors(k, {i: labels[i].color for i in labels if i < k})
        return names, colors

    def class_styles(self, slide_id: str, protos=None) -> dict:
        """{k: ClassStyle(name, colour)} for napari_slpd.export (GeoJSON, label TIFF)."""
        from napari_slpd.labeling.palette import ClassStyle

        names, colors = self.styles(slide_id, protos)
        return {k: ClassStyle(names[k], colors[k]) for k in names}

    # -- writing ---------------------------------------------------------------------------------------
    def _require(self, slide_id: str, k: int | None = None):
        protos, identity = self._current(slide_id)
        if protos is None:
            raise PrototypeError(f"{slide_id} has no prototypes yet; compute them before naming them")
        st = self.state(slide_id, protos)
        if st.status == "stale":
            raise StaleAnnotationsError(st.message)
        if k is not None and not 0 <= int(k) < protos.k:
            raise PrototypeError(f"{slide_id} has {protos.k} prototypes (0..{protos.k - 1}); there is no prototype {k}")
        return protos, identity

    def _record_for(self, slide_id: str, protos, identity: str) -> dict:
        record = self._data["slides"].setdefault(slide_id, {"labels": {}})
        record["prototypes"] = {
            "identity": identity,
            "k": int(protos.k),
            "n_regions": int(protos.n_regions),
            "regions": regions_identity(getattr(protos, "coords", None)),
            "assignments": [int(a) for a in np.asarray(protos.assignments).tolist()],
        }
        record.setdefault("labels", {})
        return record

    def set_label(
        self,
        slide_id: str,
        k: int,
        name: str | None = None,
        color: str | Sequence[float] | None = None,
        source: str = "user",
        confidence: float | None = None,
        origin: str | None = None,
        save: bool = True,
    ) -> PrototypeLabel:
        """Name and/or colour prototype ``k`` of the slide (keeps what is not given)."""
        with self._lock:
            if save:
                self.reload_if_changed()
            protos, identity = self._require(slide_id, k)
            record = self._record_for(slide_id, protos, identity)
            old = record["labels"].get(str(int(k)))
            old_label = PrototypeLabel.from_json(old) if old else None
            label = PrototypeLabel(
                name=name if name is not None else (old_label.name if old_label else default_name(k)),
                color=color if color is not None else (old_label.color if old_label else default_color(k)),
                source=source,
                confidence=confidence,
                origin=origin,
            )
            record["labels"][str(int(k))] = label.to_json()
            if save:
                self.save()
            return label

    def rename(self, slide_id: str, k: int, name: str) -> PrototypeLabel:
        return self.set_label(slide_id, k, name=name, source="user")

    def recolor(self, slide_id: str, k: int, color) -> PrototypeLabel:
        with self._lock:
            current = self.label(slide_id, k)
            if current is None:  # a colour, no name: the default name stays (and follows the index)
                return self.set_label(slide_id, k, name=default_name(k), color=color, source="default")
            # A colour change keeps where the name came from.
            return self.set_label(slide_id, k, color=color, source=current.source,
                                  confidence=current.confidence, origin=current.origin)

    def clear(self, slide_id: str, k: int | None = None, save: bool = True) -> None:
        """Forget the name of prototype ``k`` (all names of the slide when ``k`` is None)."""
        with self._lock:
            self.reload_if_changed()
            record = self._slide(slide_id)
            if record is None:
                return
            if k is None:
                self._data["slides"].pop(slide_id, None)
            else:
                record.get("labels", {}).pop(str(int(k)), None)
            if save:
                self.save()

    def discard_stale(self, slide_id: str | None = None) -> list[str]:
        """Drop stale names (of one slide, or all); returns the slides cleared."""
        cleared = []
        with self._lock:
            self.reload_if_changed()
            targets = [slide_id] if slide_id else self.slide_ids()
            for sid in targets:
                if self.state(sid).status in ("stale", "no-prototypes"):
                    self._data["slides"].pop(sid, None)
                    cleared.append(sid)
            if cleared:
                self.save()
        return cleared

    def apply(self, changes: Iterable[Change]) -> list[Change]:
        """Write the planned changes whose action is "set" (in one save); returns those applied.

        A change planned on a prototype set that has been recomputed since is refused."""
        applied = []
        with self._lock:
            self.reload_if_changed()
            for change in changes:
                if change.action != "set" or change.new is None:
                    continue
                protos, identity = self._require(change.slide_id, change.proto_idx)
                if change.identity and change.identity != identity:
                    raise StaleAnnotationsError(
                        f"the prototypes of {change.slide_id} changed after this preview was made; preview again"
                    )
                record = self._record_for(change.slide_id, protos, identity)
                record["labels"][str(int(change.proto_idx))] = change.new.to_json()
                applied.append(change)
            if applied:
                self.save()
        return applied

    # -- carrying names over recomputed prototypes -------------------------------------------------------
    def plan_carry_over(self, slide_id: str, min_iou: float = 0.5) -> list[Change]:
        """Where the stale names of a slide go on its new prototypes, by region overlap.

        The old assignments (stored with the names) and the new ones are compared region by region; old
        and new prototypes are matched one-to-one by maximal intersection over union; a name moves to
        its partner when their IoU is at least ``min_iou``, else it is dropped ("skip").
        """
        from scipy.optimize import linear_sum_assignment

        record = self._slide(slide_id)
        protos, identity = self._current(slide_id)
        if not record or not record.get("labels") or protos is None:
            return []
        stored = record.get("prototypes") or {}
        if stored.get("identity") == identity:
            return []
        labels = {int(k): PrototypeLabel.from_json(v) for k, v in record["labels"].items()}
        old = np.asarray(stored.get("assignments") or [], dtype=np.int64)
        new = np.asarray(protos.assignments, dtype=np.int64)
        same_regions = len(old) == len(new) and (
            not stored.get("regions") or stored.get("regions") == regions_identity(getattr(protos, "coords", None)))
        if not same_regions:
            return [Change(slide_id, k, "skip", None, lab, reason="the regions of the slide changed (new features); "
                           "names cannot be carried over", identity=identity) for k, lab in sorted(labels.items())]
        k_old, k_new = int(stored.get("k") or (old.max() + 1 if old.size else 0)), protos.k
        inter = np.zeros((k_old, k_new))
        np.add.at(inter, (old, new), 1)
        union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        partner = dict(zip(rows.tolist(), cols.tolist()))
        changes = []
        for k, label in sorted(labels.items()):
            target = partner.get(k)
            if target is None or iou[k, target] < min_iou:
                best = iou[k].max() if k < k_old and k_new else 0.0
                changes.append(Change(slide_id, k, "skip", None, label, reason=(
                    f"'{label.name}' overlaps no new prototype enough (best IoU {best:.2f} < {min_iou})"),
                    identity=identity))
                continue
            is_default = label.source == "default" or label.name == default_name(k)
            moved = PrototypeLabel(default_name(target) if is_default else label.name, label.color,
                                   "default" if is_default else label.source, label.confidence, label.origin)
            changes.append(Change(slide_id, int(target), "set", moved, None, similarity=float(iou[k, target]),
                                  reason=f"carried from old prototype {k} (IoU {iou[k, target]:.2f})",
                                  identity=identity))
        return changes

    def carry_over(self, provider=None, min_iou: float = 0.5) -> dict[str, str]:
        """Carry every stale slide's names to its new prototypes (see :meth:`plan_carry_over`).

        Returns slide_id -> a short report. ``provider`` (e.g. the Session after a refresh) replaces where
        current prototypes are read from."""
        if provider is not None:
            self._source = prototype_source(provider)
        report = {}
        with self._lock:
            self.reload_if_changed()
            for sid in self.slide_ids():
                if self.state(sid).status != "stale":
                    continue
                plan = self.plan_carry_over(sid, min_iou)
                moved = [c for c in plan if c.action == "set"]
                dropped = [c for c in plan if c.action == "skip"]
                protos, identity = self._current(sid)
                record = self._data["slides"][sid]
                record["labels"] = {}
                self._record_for(sid, protos, identity)
                for c in moved:
                    record["labels"][str(c.proto_idx)] = c.new.to_json()
                report[sid] = f"{len(moved)} name(s) carried over" + (f", {len(dropped)} dropped" if dropped else "")
            if report:
                self.save()
        return report
