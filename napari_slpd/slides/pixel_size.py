"""A slide's pixel size (um/px) and where it came from: the user's value, plausible metadata, or a chosen
fallback (the objective power, or level 0 assumed at 20x); implausible stated values are named as such."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from napari_slpd.errors import PixelSizeError

log = logging.getLogger("napari_slpd.slides.slide")  # the messages users and tests know

# um/px outside this range is not a microscope scan: e.g. 264.58 um/px is a 96-dpi default written by
# generic TIFF writers, 25400 um/px is a 1-dpi default.
PLAUSIBLE_MPP = (0.1, 2.0)
# The "level0" fallback: assume level 0 was scanned at 20x, the most common objective.
LEVEL0_ASSUMED_MPP = 0.5
MPP_FALLBACKS = ("none", "objective", "level0")


@dataclass(frozen=True)
class PixelSize:
    """The pixel size used for a slide and where it came from.

    ``source`` is ``"metadata"``, ``"user"``, ``"objective-power"``, ``"level0-assumed"`` (``mpp`` set) or
    ``"missing"``, ``"implausible"`` (``mpp`` None). ``raw`` is the value the file states, even when bogus.
    """

    mpp: float | None
    source: str
    raw: float | None = None

    @property
    def known(self) -> bool:
        return self.mpp is not None

    def describe(self) -> str:
        if self.mpp is None:
            if self.source == "implausible":
                return f"unknown (file states an implausible {self.raw:g} um/px)"
            return "unknown (not in the file)"
        text = f"{self.mpp:.4g} um/px ({self.source})"
        if self.source != "metadata" and self.raw is not None:
            text += f"; file states {self.raw:g}"
        return text


def is_plausible_mpp(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def resolve_pixel_size(
    properties: dict[str, str], mpp: float | None = None, mpp_fallback: str = "none"
) -> PixelSize:
    """Choose the um/px of a slide: the user's value, else plausible metadata, else the chosen fallback."""
    if mpp_fallback not in MPP_FALLBACKS:
        raise PixelSizeError(f"mpp_fallback must be one of {MPP_FALLBACKS}, not {mpp_fallback!r}")
    mpp_x = _parse_float(properties.get("openslide.mpp-x"))
    mpp_y = _parse_float(properties.get("openslide.mpp-y"))
    stated = [v for v in (mpp_x, mpp_y) if v is not None]
    raw = float(np.mean(stated)) if stated else None
    if mpp is not None:
        mpp = float(mpp)
        if not is_plausible_mpp(mpp):
            raise PixelSizeError(
                f"a pixel size of {mpp:g} um/px is outside the plausible range "
                f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px (20x is about 0.5, 40x about 0.25)"
            )
        return PixelSize(mpp, "user", raw)
    if raw is not None and is_plausible_mpp(raw):
        return PixelSize(raw, "metadata", raw)
    unknown = PixelSize(None, "implausible" if raw is not None else "missing", raw)
    if mpp_fallback == "objective":
        power = objective_power_of(properties)
        if power is not None:
            return PixelSize(10.0 / power, "objective-power", raw)
        log.warning("mpp_fallback='objective' but the slide states no objective power; pixel size unknown")
        return unknown
    if mpp_fallback == "level0":
        return PixelSize(LEVEL0_ASSUMED_MPP, "level0-assumed", raw)
    return unknown


def objective_power_of(properties: dict[str, str]) -> float | None:
    power = _parse_float(properties.get("openslide.objective-power"))
    return power if power is not None and 1.0 <= power <= 150.0 else None
