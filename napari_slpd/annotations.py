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

``source`` is "user" (typed or accepted by a person), "proalign" (a zero-shot name accepted from
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
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from napari_slpd.errors import PrototypeError, SlpdError
from napari_slpd.io_utils import atomic_write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SOURCES = ("user", "proalign", "propagated")
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")

# Colours of prototypes 0..9 (matplotlib tab10 without grey, which reads as background on H&E), the same
# order the Prototypes panel uses for unnamed prototypes; cycled and darkened beyond 10.
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
          "#aec7e8")


class StaleAnnotationsError(PrototypeError):
    """Names were given to prototypes that have since been recomputed."""


def default_color(k: int) -> str:
    k = int(k)
    base = _TAB10[k % len(_TAB10)]
    if k < len(_TAB10):
        return base
    f = 0.75 ** (k // len(_TAB10))
    r, g, b = (int(base[i:i + 2], 16) for i in (1, 3, 5))
    return "#{:02x}{:02x}{:02x}".format(int(r * f), int(g * f), int(b * f))


def default_name(k: int) -> str:
    return f"prototype {int(k)}"


def normalize_color(color: str | Sequence[float]) -> str:
    """'#rrggbb' from a hex string ('#rgb' too) or an RGB(A) sequence (0-1 floats or 0-255 ints)."""
    if isinstance(color, str):
        text = color.strip()
        if re.fullmatch(r"#[0-9a-fA-F]{3}", text):
            text = "#" + "".join(c * 2 for c in text[1:])
        if not _HEX.match(text):
            raise SlpdError(f"colour {color!r} is not a #rrggbb hex colour")
        return text.lower()
    values = [float(v) for v in list(color)[:3]]
    if len(values) != 3:
        raise SlpdError(f"colour {color!r} needs three components")
    scale = 255.0 if max(values) <= 1.0 else 1.0  # 0-1 floats (napari, Qt F) or 0-255 ints
    rgb = [int(round(min(255.0, max(0.0, v * scale)))) for v in values]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def color_to_rgba(color: str) -> tuple[float, float, float, float]:
    c = normalize_color(color)
    return (int(c[1:3], 16) / 255.0, int(c[3:5], 16) / 255.0, int(c[5:7], 16) / 255.0, 1.0)


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


class PrototypeAnnotations:
    """Names and colours of the cohort's prototypes. ``load`` reads them; changes are saved at once.

    ``provider`` says where the current prototypes are read from (a Session, a Cohort, or a function
    slide_id -> SlidePrototypes); it decides which names are current and which stale.
    """

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
        c = _cohort_of(cohort)
        path = Path(c.annotations_path)
        data = None
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise SlpdError(
                    f"prototype names file {path} cannot be read ({exc}); fix or delete it (names are lost then)"
                ) from exc
            if not isinstance(data, dict) or not isinstance(data.get("slides"), dict):
                raise SlpdError(f"{path} is not a napari-slpd prototype names file")
            if int(data.get("version", 1)) > FORMAT_VERSION:
                raise SlpdError(f"{path} was written by a newer napari-slpd; update napari-slpd to read it")
        return cls(cohort, data, provider if provider is not None else cohort)

    def save(self) -> None:
        with self._lock:
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
        return {int(k): PrototypeLabel.from_json(v) for k, v in self._slide(slide_id)["labels"].items()}

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
        names = {i: labels[i].name if i in labels else default_name(i) for i in range(k)}
        colors = {i: labels[i].color if i in labels else default_color(i) for i in range(k)}
        return names, colors

    def class_styles(self, slide_id: str, protos=None) -> dict:
        """{k: ClassStyle(name, colour)} for napari_slpd.export."""
        from napari_slpd.export import ClassStyle

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
            if current is None:
                return self.set_label(slide_id, k, color=color, source="user")
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
            moved = PrototypeLabel(label.name, label.color, label.source, label.confidence, label.origin)
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


# -------------------------------------------------------------------------------------------------
# Propagation


def plan_propagation(
    provider,
    slide_id: str,
    proto_idx: int,
    name: str,
    targets: Sequence[str],
    color: str | None = None,
    annotations: PrototypeAnnotations | None = None,
    overwrite_user: bool = False,
    min_similarity: float | None = None,
) -> list[Change]:
    """Preview: give ``name`` to the partner of prototype ``proto_idx`` of ``slide_id`` in each target slide.

    The partner is found by the optimal one-to-one matching of the two slides' prototype sets (the
    matching behind the similar-slides ranking). A target whose partner already carries a name typed by
    a person is skipped unless ``overwrite_user``; partners less similar than ``min_similarity`` (cosine)
    are skipped. ``provider``: a Session, a Cohort or a slide_id -> SlidePrototypes function.
    """
    from napari_slpd.prototypes import match_prototypes

    source = prototype_source(provider)
    annotations = annotations or PrototypeAnnotations.load(_cohort_of(provider), provider)
    name = _clean_name(name)
    src = source(slide_id)
    if src is None:
        raise PrototypeError(f"{slide_id} has no prototypes; compute them first")
    if not 0 <= int(proto_idx) < src.k:
        raise PrototypeError(f"{slide_id} has {src.k} prototypes; there is no prototype {proto_idx}")
    if color is None:
        try:
            current = annotations.label(slide_id, proto_idx, src)
        except StaleAnnotationsError:
            current = None
        color = current.color if current else default_color(proto_idx)
    color = normalize_color(color)
    changes = []
    for target in dict.fromkeys(targets):  # unique, order kept
        if target == slide_id:
            continue
        try:
            other = source(target)
        except SlpdError as exc:
            changes.append(Change(target, -1, "skip", None, reason=f"no prototypes ({exc})"))
            continue
        if other is None:
            changes.append(Change(target, -1, "skip", None, reason="no prototypes"))
            continue
        identity = prototype_identity(other.centroids)
        try:
            pairs = match_prototypes(src.centroids, other.centroids)
        except PrototypeError as exc:
            changes.append(Change(target, -1, "skip", None, reason=str(exc), identity=identity))
            continue
        partner = next((p for p in pairs if p.k == int(proto_idx)), None)
        if partner is None:
            changes.append(Change(target, -1, "skip", None, reason=(
                f"prototype {proto_idx} has no partner among its {other.k} prototypes"), identity=identity))
            continue
        l, sim = int(partner.l), float(partner.similarity)
        new = PrototypeLabel(name, color, "propagated", confidence=sim, origin=f"{slide_id}:{int(proto_idx)}")
        try:
            old = annotations.label(target, l, other)
        except StaleAnnotationsError:
            changes.append(Change(target, l, "skip", new, None, sim, reason=(
                "its names are stale (prototypes recomputed); carry them over or discard them first"),
                identity=identity))
            continue
        if old is not None and old.name == name and old.color == color:
            changes.append(Change(target, l, "unchanged", new, old, sim, identity=identity))
        elif old is not None and old.source == "user" and not overwrite_user:
            changes.append(Change(target, l, "skip", new, old, sim, reason=(
                f"prototype {l} is already named '{old.name}' by a person"), identity=identity))
        elif min_similarity is not None and sim < min_similarity:
            changes.append(Change(target, l, "skip", new, old, sim, reason=(
                f"the matched prototype {l} is too different (cosine {sim:.2f} < {min_similarity:.2f})"),
                identity=identity))
        else:
            changes.append(Change(target, l, "set", new, old, sim, identity=identity))
    return changes


# -------------------------------------------------------------------------------------------------
# ProAlign zero-shot names


@dataclass
class NameSuggestion:
    """ProAlign's name for one prototype: the zero-shot label most of its patches carry."""

    proto_idx: int
    name: str
    color: str
    confidence: float  # share * mean_confidence
    share: float  # fraction of the prototype's patches (or regions) with this label
    mean_confidence: float  # their mean zero-shot confidence
    runner_up: str = ""


def proalign_suggestions(result, protos) -> list[NameSuggestion]:
    """Zero-shot names of a slide's prototypes from its ProAlign result (napari_slpd.proalign).

    Patch labels are counted per prototype through each patch's region (``patch_region``); without them
    the region-level labels are used. Both results must come from the same feature file (same regions).
    """
    assignments = np.asarray(protos.assignments, dtype=np.int64)
    n_regions = len(assignments)
    coords = getattr(protos, "coords", None)
    if result.region_coords is not None and coords is not None:
        if len(result.region_coords) != n_regions or not np.array_equal(
                np.asarray(result.region_coords, np.int64), np.asarray(coords, np.int64)):
            raise SlpdError(
                f"the ProAlign result of {result.slide_id} was computed on other regions than its prototypes; "
                "run ProAlign again on the current features"
            )
    n_names = len(result.names)
    if result.patch_region is not None:
        region = np.asarray(result.patch_region, dtype=np.int64)
        keep = (region >= 0) & (region < n_regions)
        proto = assignments[region[keep]]
        labels = np.asarray(result.patch_labels, dtype=np.int64)[keep]
        conf = np.asarray(result.patch_confidence, dtype=np.float64)[keep]
    elif result.region_labels is not None:
        labels = np.asarray(result.region_labels, dtype=np.int64)
        keep = labels >= 0
        if len(labels) != n_regions:
            raise SlpdError(f"the ProAlign result of {result.slide_id} has {len(labels)} regions, not {n_regions}")
        proto, labels = assignments[keep], labels[keep]
        conf = np.asarray(result.region_confidence, dtype=np.float64)[keep]
    else:
        raise SlpdError(f"the ProAlign result of {result.slide_id} maps no patch to a region")
    k = protos.k
    votes = np.zeros((k, n_names))
    conf_sum = np.zeros((k, n_names))
    np.add.at(votes, (proto, labels), 1)
    np.add.at(conf_sum, (proto, labels), conf)
    suggestions = []
    for i in range(k):
        total = votes[i].sum()
        if total == 0:
            continue
        order = np.argsort(-votes[i], kind="stable")
        best = int(order[0])
        share = float(votes[i, best] / total)
        mean_conf = float(conf_sum[i, best] / votes[i, best])
        runner = result.names[int(order[1])] if n_names > 1 and votes[i, order[1]] > 0 else ""
        color = result.colors[best] if best < len(result.colors) and result.colors[best] else default_color(i)
        suggestions.append(NameSuggestion(i, result.names[best], normalize_color(color), share * mean_conf, share,
                                          mean_conf, runner))
    return suggestions


def load_suggestions(provider, slide_id: str) -> list[NameSuggestion]:
    """ProAlign suggestions for a slide from the cohort cache (ProAlignCacheError when it has none)."""
    from napari_slpd.proalign.cache import load_proalign

    cohort = _cohort_of(provider)
    path = cohort.proalign_path(slide_id)
    if not Path(path).exists():
        from napari_slpd.proalign.cache import ProAlignCacheError

        raise ProAlignCacheError(f"{slide_id} has no ProAlign result yet; run ProAlign on the cohort first")
    result = load_proalign(path, with_attention=False)
    protos = prototype_source(provider)(slide_id)
    if protos is None:
        raise PrototypeError(f"{slide_id} has no prototypes; compute them first")
    return proalign_suggestions(result, protos)


def accept_suggestions(annotations: PrototypeAnnotations, slide_id: str, suggestions: Iterable[NameSuggestion],
                       keep_user_names: bool = True) -> list[PrototypeLabel]:
    """Give the suggested names (source "proalign"); names a person typed stay unless told otherwise."""
    accepted = []
    annotations.reload_if_changed()
    current = annotations.labels(slide_id)
    for s in suggestions:
        old = current.get(s.proto_idx)
        if keep_user_names and old is not None and old.source == "user":
            continue
        accepted.append(annotations.set_label(slide_id, s.proto_idx, name=s.name, color=s.color, source="proalign",
                                              confidence=s.confidence, origin="proalign zero-shot", save=False))
    if accepted:
        annotations.save()
    return accepted


# -------------------------------------------------------------------------------------------------
# What the labeling panel lists


@dataclass
class PrototypeRow:
    """One prototype of a slide as the labeling panel lists it."""

    proto_idx: int
    name: str
    color: str
    named: bool  # a name was given (else the default name)
    source: str  # "user" | "proalign" | "propagated" | "" (default)
    confidence: float | None
    regions: int
    share: float  # fraction of the slide's regions
    suggestion: NameSuggestion | None = None

    @property
    def suggestion_text(self) -> str:
        if self.suggestion is None:
            return ""
        return f"{self.suggestion.name} ({self.suggestion.confidence:.2f})"


def prototype_rows(annotations: PrototypeAnnotations, slide_id: str, protos,
                   suggestions: Iterable[NameSuggestion] = ()) -> list[PrototypeRow]:
    """Rows of the labeling table: names (stale names are not shown), sizes and ProAlign suggestions."""
    try:
        labels = annotations.labels(slide_id, protos)
    except StaleAnnotationsError:
        labels = {}
    counts = np.bincount(np.asarray(protos.assignments, dtype=np.int64), minlength=protos.k)
    total = max(1, int(counts.sum()))
    by_k = {s.proto_idx: s for s in suggestions}
    rows = []
    for k in range(protos.k):
        label = labels.get(k)
        rows.append(PrototypeRow(
            proto_idx=k,
            name=label.name if label else default_name(k),
            color=label.color if label else default_color(k),
            named=label is not None,
            source=label.source if label else "",
            confidence=label.confidence if label else None,
            regions=int(counts[k]),
            share=float(counts[k]) / total,
            suggestion=by_k.get(k),
        ))
    return rows
