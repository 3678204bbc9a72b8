"""The prototype palette: the one place that says which colour prototype k of a slide gets when nobody
named it, and how colours are written (#rrggbb) and converted for napari (RGBA floats). The layer, the
legend, the labeling table, exports and ProAlign's text prototypes all take their defaults from here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from napari_slpd.errors import SlpdError

_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")

# Colours of prototypes 0..9 (matplotlib tab10 without grey, which reads as background on H&E), the same
# order the Prototypes panel uses for unnamed prototypes; cycled and darkened beyond 10.
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
          "#aec7e8")

# Defaults for ProAlign text prototypes that come without a colour (distinct, colour-blind-aware Tableau 20
# order; a description file's own colours win).
TEXT_PROTOTYPE_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
    "#dbdb8d", "#9edae5",
)


@dataclass(frozen=True)
class ClassStyle:
    """How one prototype (or named class) appears outside napari: its class name and colour (#rrggbb), as
    GeoJSON export (QuPath classification) and the label-map TIFF palette write it."""

    name: str
    color: str


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


def default_prototype_rgba(k: int) -> tuple[float, float, float, float]:
    """:func:`default_color` as napari's RGBA floats."""
    return color_to_rgba(default_color(k))


def slide_colors(k: int, stored: dict[int, str] | None = None) -> dict[int, str]:
    """The colour of each of a slide's ``k`` prototypes: its stored colour where one was given, else the
    default palette, so that no two prototypes of a slide share a colour (a default, or a later stored
    colour, already taken moves on to the next free palette colour)."""
    stored = stored or {}
    out: dict[int, str] = {}
    used: set[str] = set()
    for i in sorted(j for j in stored if 0 <= j < int(k)):  # a person's choice first
        color = normalize_color(stored[i])
        if color not in used:
            out[i] = color
            used.add(color)
    spare = _free_colors(used)
    for i in range(int(k)):
        if i in out:
            continue
        color = default_color(i)
        if color in used:
            color = next(c for c in spare if c not in used)
        out[i] = color
        used.add(color)
    return dict(sorted(out.items()))


def neighbour_colors(query_colors: dict[int, str], pairs, k: int) -> dict[int, str]:
    """Colours of a neighbour slide's ``k`` prototypes next to its query: a prototype matched to query
    prototype q (``pairs`` of (q, own)) takes q's colour; the others take palette colours that no query
    prototype uses (so a colour always means one matched pair)."""
    matched = {int(l): int(q) for q, l in pairs}
    out: dict[int, str] = {}
    used = {normalize_color(c) for c in query_colors.values()}
    spare = _free_colors(used)
    for i in range(int(k)):
        if i in matched and matched[i] in query_colors:
            out[i] = normalize_color(query_colors[matched[i]])
        else:
            out[i] = next(c for c in spare if c not in used)
            used.add(out[i])
    return out


def _free_colors(used: set[str]):
    """Palette colours in order, forever (callers skip those in ``used``)."""
    i = 0
    while True:
        yield default_color(i)
        i += 1
