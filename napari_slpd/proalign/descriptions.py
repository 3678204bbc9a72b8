"""Prototype descriptions: the named tissue types of an organ, each with several text descriptions.

A description file is YAML (or JSON, a subset) with this schema::

    organ: lung                      # the name users pass to --descriptions
    version: 1                       # bump when the content changes (recorded in every result)
    notes: free text                 # optional
    generated_by: {model: ..., date: ...}   # optional, written by `slpd describe`
    prototypes:
      - name: adenocarcinoma, acinar pattern     # unique within the file (case-insensitive)
        color: "#d62728"                          # hex #RRGGBB, used by label maps and GeoJSON export
        descriptions:                             # one or more non-empty strings (several recommended)
          - an H&E image of ...
        notes: free text                          # optional

Files ship in ``napari_slpd/proalign/descriptions/``. Users add or override files: a name passed to
:func:`load_descriptions` is looked up first in the folders given by the caller, then in
``$SLPD_DESCRIPTIONS_DIR`` (``os.pathsep``-separated), then in the user folder
(``$XDG_CONFIG_HOME/napari-slpd/descriptions``, where ``slpd describe`` writes by default), and last in the
packaged folder; a path to a file is loaded as is. Parsing uses ``yaml.safe_load`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from napari_slpd.errors import SlpdError
from napari_slpd.labeling.palette import TEXT_PROTOTYPE_PALETTE

PACKAGED_DIR = Path(__file__).resolve().parent / "descriptions"
DESCRIPTION_SUFFIXES = (".yaml", ".yml", ".json")
ENV_DIRS = "SLPD_DESCRIPTIONS_DIR"

_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_TOP_KEYS = {"organ", "version", "prototypes", "notes", "generated_by"}
_PROTO_KEYS = {"name", "color", "descriptions", "notes"}

DEFAULT_PALETTE = TEXT_PROTOTYPE_PALETTE  # one palette module: napari_slpd.labeling.palette


class DescriptionError(SlpdError):
    """A prototype description file is missing, unreadable, or does not follow the schema."""


@dataclass(frozen=True)
class PrototypeType:
    name: str
    color: str                      # "#rrggbb", lower case
    descriptions: tuple[str, ...]
    notes: str | None = None

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "color": self.color, "descriptions": list(self.descriptions)}
        if self.notes:
            out["notes"] = self.notes
        return out


@dataclass(frozen=True)
class PrototypeDescriptions:
    organ: str
    version: str
    prototypes: tuple[PrototypeType, ...]
    notes: str | None = None
    generated_by: dict | None = None
    source: Path | None = field(default=None, compare=False)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.prototypes]

    @property
    def colors(self) -> list[str]:
        return [p.color for p in self.prototypes]

    def __len__(self) -> int:
        return len(self.prototypes)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"organ": self.organ, "version": self.version}
        if self.notes:
            out["notes"] = self.notes
        if self.generated_by:
            out["generated_by"] = dict(self.generated_by)
        out["prototypes"] = [p.to_dict() for p in self.prototypes]
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)

    @property
    def content_sha256(self) -> str:
        """Hash of the content that matters for embeddings (names and descriptions, in order)."""
        payload = json.dumps([[p.name, list(p.descriptions)] for p in self.prototypes], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# -- validation ---------------------------------------------------------------------------------------
def _where(source: str | os.PathLike | None) -> str:
    return f" in {source}" if source else ""


def validate_descriptions(data: Any, source: str | os.PathLike | None = None) -> PrototypeDescriptions:
    """Check ``data`` (parsed YAML/JSON) against the schema; return it as :class:`PrototypeDescriptions`.

    Every problem found is listed in one :class:`DescriptionError`, so a user fixes a file in one pass.
    """
    where = _where(source)
    if not isinstance(data, dict):
        raise DescriptionError(
            f"prototype descriptions{where} must be a mapping with keys organ, version, prototypes; "
            f"got {type(data).__name__}"
        )
    problems: list[str] = []
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown} (allowed: {sorted(_TOP_KEYS)})")
    organ = data.get("organ")
    if not isinstance(organ, str) or not organ.strip():
        problems.append("'organ' must be a non-empty string")
    version = data.get("version")
    if version is None or isinstance(version, (bool, list, dict)) or not str(version).strip():
        problems.append("'version' must be a number or a string")
    notes = data.get("notes")
    if notes is not None and not isinstance(notes, str):
        problems.append("'notes' must be a string")
    generated_by = data.get("generated_by")
    if generated_by is not None and not isinstance(generated_by, dict):
        problems.append("'generated_by' must be a mapping")
    raw_protos = data.get("prototypes")
    protos: list[PrototypeType] = []
    if not isinstance(raw_protos, list) or len(raw_protos) < 2:
        problems.append("'prototypes' must be a list of at least 2 prototype types")
        raw_protos = raw_protos if isinstance(raw_protos, list) else []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw_protos):
        label = f"prototypes[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{label} must be a mapping with name, color, descriptions")
            continue
        name = entry.get("name")
        if isinstance(name, str) and name.strip():
            label = f"prototypes[{i}] ({name.strip()!r})"
        bad_keys = sorted(set(map(str, entry)) - _PROTO_KEYS)
        if bad_keys:
            problems.append(f"{label}: unknown key(s) {bad_keys} (allowed: {sorted(_PROTO_KEYS)})")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{label}: 'name' must be a non-empty string")
            name = None
        else:
            name = " ".join(name.split())
            key = name.casefold()
            if key in seen:
                problems.append(f"{label}: name {name!r} is used twice (also prototypes[{seen[key]}])")
            seen[key] = i
        color = entry.get("color")
        if not isinstance(color, str) or not _HEX_COLOR.match(color.strip()):
            problems.append(f"{label}: 'color' must be a hex colour like \"#1f77b4\", got {color!r}")
            color = None
        descriptions = entry.get("descriptions")
        texts: list[str] = []
        if isinstance(descriptions, str):
            descriptions = [descriptions]
        if not isinstance(descriptions, list) or not descriptions:
            problems.append(f"{label}: 'descriptions' must be a non-empty list of strings")
        else:
            for j, text in enumerate(descriptions):
                if not isinstance(text, str) or not text.strip():
                    problems.append(f"{label}: descriptions[{j}] must be a non-empty string, got {text!r}")
                else:
                    texts.append(" ".join(text.split()))
        proto_notes = entry.get("notes")
        if proto_notes is not None and not isinstance(proto_notes, str):
            problems.append(f"{label}: 'notes' must be a string")
            proto_notes = None
        if name is not None and color is not None and texts:
            protos.append(PrototypeType(name, color.strip().lower(), tuple(texts), proto_notes))
    if problems:
        listed = "\n  - ".join(problems)
        raise DescriptionError(f"invalid prototype descriptions{where}:\n  - {listed}")
    return PrototypeDescriptions(
        organ=organ.strip(),
        version=str(version).strip(),
        prototypes=tuple(protos),
        notes=notes,
        generated_by=dict(generated_by) if generated_by else None,
        source=Path(source) if source else None,
    )


def parse_descriptions(text: str, source: str | os.PathLike | None = None) -> PrototypeDescriptions:
    """Parse YAML or JSON text (``yaml.safe_load``: no Python objects are ever constructed) and validate."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DescriptionError(f"prototype descriptions{_where(source)} are not valid YAML/JSON: {exc}") from None
    return validate_descriptions(data, source)


# -- locating files ---------------------------------------------------------------------------------------
def user_descriptions_dir() -> Path:
    """Where user description files live by default (and where ``slpd describe`` writes)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "napari-slpd" / "descriptions"


def search_dirs(extra: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Folders searched for description files, highest priority first (the packaged folder last)."""
    dirs: list[Path] = [Path(p).expanduser() for p in (extra or [])]
    env = os.environ.get(ENV_DIRS, "")
    dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    dirs += [user_descriptions_dir(), PACKAGED_DIR]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def available_descriptions(extra_dirs: Iterable[str | os.PathLike] | None = None) -> dict[str, Path]:
    """Description names (file stems) -> the file that :func:`load_descriptions` would use."""
    found: dict[str, Path] = {}
    for folder in search_dirs(extra_dirs):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in DESCRIPTION_SUFFIXES and path.is_file() and not path.name.startswith("."):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def resolve_descriptions(source: str | os.PathLike, extra_dirs: Iterable[str | os.PathLike] | None = None) -> Path:
    """A file path, or a name (e.g. ``lung``) looked up in :func:`search_dirs`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise DescriptionError(f"prototype descriptions {path} is a folder; give a .yaml file or a name")
    name = str(source)
    looks_like_path = os.sep in name or (os.altsep and os.altsep in name) or path.suffix.lower() in DESCRIPTION_SUFFIXES
    if looks_like_path:
        raise DescriptionError(f"prototype description file {path} does not exist")
    available = available_descriptions(extra_dirs)
    if name in available:
        return available[name]
    lowered = {k.casefold(): v for k, v in available.items()}
    if name.casefold() in lowered:
        return lowered[name.casefold()]
    raise DescriptionError(
        f"no prototype descriptions named {name!r}; available: {', '.join(available) or 'none'}. "
        f"Give a path to a .yaml file, put <name>.yaml into {user_descriptions_dir()} or ${ENV_DIRS}, "
        f"or generate one with `slpd describe --organ {name} --endpoint URL --model NAME`"
    )


def load_descriptions(source: str | os.PathLike, extra_dirs: Iterable[str | os.PathLike] | None = None
                      ) -> PrototypeDescriptions:
    """Load and validate a description file given by path or by name (see module docstring)."""
    path = resolve_descriptions(source, extra_dirs)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DescriptionError(f"cannot read prototype descriptions {path}: {exc}") from None
    return parse_descriptions(text, path)


def fill_missing_colors(data: dict) -> dict:
    """Give prototypes without a valid colour one from :data:`DEFAULT_PALETTE` not used by the others.

    Used for machine-written files (colours are cosmetic; a model that forgets them should not fail).
    """
    protos = data.get("prototypes")
    if not isinstance(protos, list):
        return data
    used = {str(p.get("color", "")).lower() for p in protos if isinstance(p, dict)}
    free = [c for c in DEFAULT_PALETTE if c not in used]
    for i, entry in enumerate(protos):
        if isinstance(entry, dict):
            color = entry.get("color")
            if not isinstance(color, str) or not _HEX_COLOR.match(color.strip()):
                entry["color"] = free.pop(0) if free else DEFAULT_PALETTE[i % len(DEFAULT_PALETTE)]
    return data
