"""Procedural H&E slides for napari's File > Open Sample, the demo and sample cohorts (no data needed).

``write_synthetic_slide`` paints a procedural H&E slide and writes it as an Aperio-style tiled JPEG TIFF
pyramid that openslide opens (pixel size, objective power, thumbnail, label and macro included). Each seed
draws its own tissue composition (tumour nests, stroma, fat, necrosis, lymphocyte clusters and background)
and layout, so a handful of seeds make a small cohort whose slides differ visibly and in feature space.

Colours follow Beer-Lambert stain mixing (optical density of haematoxylin and eosin per pixel), which is
what makes flat concentration maps look like H&E. Every pixel is a function of its level-0 coordinates
only (hashed noise, global fields), so tiles join without seams and a slide is painted strip by strip.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.utils.files import atomic_path

TISSUE_CLASSES = ("background", "stroma", "tumour", "lymphocytes", "necrosis", "fat")
# Optical density per unit stain (R, G, B), measured from the colours of real H&E nuclei and stroma.
_HEMATOXYLIN_OD = np.array([0.60, 0.72, 0.30], np.float32)
_EOSIN_OD = np.array([0.15, 0.85, 0.45], np.float32)
CLASS_MAP_UM = 4.0  # resolution of the tissue-class map (um per class-map px)


@dataclass(frozen=True)
class _ClassStyle:
    """How a tissue class is painted: stain concentrations and its nuclei (sizes in um)."""

    eosin: float  # background eosin concentration
    haem: float  # background haematoxylin (basophilic cytoplasm, mucin)
    nucleus_cell_um: float  # one candidate nucleus per cell of this side
    nucleus_p: float  # probability that a candidate is a nucleus
    nucleus_r_um: tuple[float, float]  # radius range
    nucleus_haem: float
    elongation: float = 1.0  # ratio of long to short axis (fibroblasts)
    vesicular: float = 0.0  # paler nucleus centre (open chromatin of tumour cells)


_STYLES = {
    "stroma": _ClassStyle(0.34, 0.04, 9.0, 0.22, (1.2, 1.6), 0.85, elongation=3.5),
    "tumour": _ClassStyle(0.20, 0.16, 11.0, 0.88, (3.4, 4.6), 0.95, vesicular=0.35),
    "lymphocytes": _ClassStyle(0.12, 0.08, 6.5, 0.92, (2.2, 2.8), 1.35),
    "necrosis": _ClassStyle(0.30, 0.10, 5.0, 0.30, (0.6, 1.3), 1.0),
    "fat": _ClassStyle(0.0, 0.0, 9.0, 0.0, (1.0, 1.0), 0.0),
}


# -- hashed noise: a deterministic function of integer coordinates --------------------------------------


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) float32 per (ix, iy, salt), stateless (so any block of any slide can be painted)."""
    with np.errstate(over="ignore"):
        h = ix.astype(np.uint32) * np.uint32(0x8DA6B343)
        h ^= iy.astype(np.uint32) * np.uint32(0xD8163841)
        h ^= np.uint32((salt * 0xCB1AB31F) & 0xFFFFFFFF)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0x5BD1E995)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x27D4EB2F)
        h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


# -- the slide design: composition and large-scale fields -----------------------------------------------


@dataclass
class SyntheticDesign:
    """Everything painted at low resolution for one seed: class map, stain fields, composition."""

    width: int
    height: int
    mpp: float
    seed: int
    class_px: int  # level-0 px per class-map px
    classes: np.ndarray  # [h, w] uint8 index into TISSUE_CLASSES
    eosin_gain: np.ndarray  # [h, w] float32 slow stain variation
    fibre_angle: np.ndarray  # [h, w] float32 radians, direction of stroma fibres
    stain_shift: np.ndarray  # [3] per-seed colour cast (lab-to-lab stain variation)
    composition: dict  # class name -> fraction of the tissue area

    @property
    def tissue_fraction(self) -> float:
        return float((self.classes > 0).mean())


def _smooth_noise(rng, shape, sigma_px) -> np.ndarray:
    """Gaussian-smoothed white noise, standardised. Wide kernels are applied on a coarser grid and
    interpolated up (same look, a fraction of the cost)."""
    from scipy import ndimage

    factor = max(1.0, sigma_px / 8.0)
    coarse = (max(4, math.ceil(shape[0] / factor) + 2), max(4, math.ceil(shape[1] / factor) + 2))
    field = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma_px / factor, mode="wrap")
    if factor > 1.0:  # 8 coarse px per sigma: smooth enough that linear interpolation leaves no facets
        field = ndimage.zoom(field, factor, order=1, mode="nearest", grid_mode=False)
    field = field[: shape[0], : shape[1]].astype(np.float32)
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def design_slide(width: int, height: int, seed: int, mpp: float = 0.5, composition: dict | None = None):
    """The low-resolution layout of a synthetic slide for ``seed`` (see SyntheticDesign)."""
    rng = np.random.default_rng(seed)
    class_px = max(1, int(round(CLASS_MAP_UM / mpp)))
    h, w = max(8, math.ceil(height / class_px)), max(8, math.ceil(width / class_px))
    um_per = class_px * mpp  # um per class-map px

    # Tissue outline: one to three smooth blobs with ragged edges.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = np.full((h, w), -np.inf, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.2, 0.38) * h, rng.uniform(0.2, 0.38) * w
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
        blobs = np.maximum(blobs, 1.0 - np.sqrt(u * u + v * v))
    edge = _smooth_noise(rng, (h, w), max(1.0, 150.0 / um_per))
    tissue = blobs + 0.18 * edge > 0.0

    # Composition: a Dirichlet draw, so seeds differ in which tissue dominates.
    names = TISSUE_CLASSES[1:]
    if composition is None:
        weights = rng.dirichlet(np.full(len(names), 0.6)) + 0.02
        weights[0] += 0.15  # every slide has some stroma between the other compartments
        weights /= weights.sum()
    else:
        unknown = set(composition) - set(names)
        if unknown:
            raise SlpdError(f"unknown tissue classes {sorted(unknown)}; choose from {list(names)}")
        weights = np.array([float(composition.get(n, 0.0)) for n in names]) + 1e-6
        weights /= weights.sum()

    # Compartments: one smooth field per class at its own scale (lymphocyte clusters small, fat lobules
    # and necrosis large); the class with the highest field wins, with offsets tuned so areas match the
    # drawn composition.
    scales_um = {"stroma": 250, "tumour": 180, "lymphocytes": 90, "necrosis": 300, "fat": 320}
    fields = np.stack([_smooth_noise(rng, (h, w), max(1.0, scales_um[n] / um_per)) for n in names])
    inside = fields[:, tissue]
    bias = np.log(weights).astype(np.float32)
    best_bias, best_error = bias.copy(), np.inf
    if inside.shape[1]:
        # Damped, clipped steps: an undamped update oscillates (a class that is missing grabs everything).
        for _ in range(80):
            winner = np.argmax(inside + bias[:, None], axis=0)
            actual = np.bincount(winner, minlength=len(names)) / winner.size
            error = float(np.abs(actual - weights).sum())
            if error < best_error:
                best_bias, best_error = bias.copy(), error
            if error < 0.02:
                break
            step = np.clip(np.log(weights) - np.log(actual + 1e-4), -1.0, 1.0)
            bias = bias + 0.25 * step.astype(np.float32)
    classes = np.zeros((h, w), np.uint8)
    classes[tissue] = np.argmax(inside + best_bias[:, None], axis=0).astype(np.uint8) + 1
    counts = np.bincount(classes[tissue], minlength=len(TISSUE_CLASSES))[1:]
    total = max(1, int(tissue.sum()))
    return SyntheticDesign(
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        class_px=class_px,
        classes=classes,
        eosin_gain=(1.0 + 0.15 * _smooth_noise(rng, (h, w), max(1.0, 400.0 / um_per))).astype(np.float32),
        fibre_angle=(np.pi * (0.5 + 0.5 * np.tanh(_smooth_noise(rng, (h, w), max(1.0, 120 / um_per))))).astype(
            np.float32
        ),
        stain_shift=(1.0 + rng.normal(0, 0.06, 3)).astype(np.float32),
        composition={n: float(c) / total for n, c in zip(names, counts)},
    )


# -- painting ------------------------------------------------------------------------------------------

_GRAIN_SHAPE = (509, 521)  # coprime periods: a repeating grain texture whose repetition is not visible


def _grain(design: SyntheticDesign) -> np.ndarray:
    """Per-seed uniform [0, 1) texture indexed by level-0 coordinates modulo its (prime) shape."""
    cached = getattr(design, "_grain_cache", None)
    if cached is None:
        cached = np.random.default_rng(design.seed + 1_000_003).random(_GRAIN_SHAPE, dtype=np.float32)
        design._grain_cache = cached
    return cached


def _nucleus_layer(x, y, style: _ClassStyle, mpp: float, salt: int, angle: float, shift: float):
    """Haematoxylin of one layer of nuclei at pixel coordinates (x, y) (1-D float32 arrays).

    One candidate nucleus per cell of a lattice rotated by ``angle``; a candidate stays inside its own
    cell, so only the pixel's own cell needs testing. Per-cell random values are drawn once per cell and
    gathered per pixel. Two layers with different rotations make the pattern look random, not a lattice.
    """
    cell = style.nucleus_cell_um / mpp
    c, s = math.cos(angle), math.sin(angle)
    u = (x * c + y * s) / cell + shift
    v = (-x * s + y * c) / cell + shift * 0.61
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    u0, v0 = int(iu.min()), int(iv.min())
    shape = (int(iv.max()) - v0 + 1, int(iu.max()) - u0 + 1)
    cv, cu = np.mgrid[v0 : v0 + shape[0], u0 : u0 + shape[1]]
    present = _hash01(cu, cv, salt) < style.nucleus_p
    r_lo, r_hi = style.nucleus_r_um
    radius = (r_lo + (r_hi - r_lo) * _hash01(cu, cv, salt + 1)) / style.nucleus_cell_um  # in cells
    margin = np.minimum(radius * style.elongation, 0.5)
    pu = margin + (1 - 2 * margin) * _hash01(cu, cv, salt + 2)
    pv = margin + (1 - 2 * margin) * _hash01(cu, cv, salt + 3)
    theta = np.pi * _hash01(cu, cv, salt + 4)
    strength = style.nucleus_haem * (0.8 + 0.4 * _hash01(cu, cv, salt + 5))
    strength = np.where(present, strength, 0.0).astype(np.float32)

    k = (iv - v0) * shape[1] + (iu - u0)
    du = (u - iu) - pu.ravel()[k]
    dv = (v - iv) - pv.ravel()[k]
    if style.elongation != 1.0:
        t = theta.ravel()[k]
        ct, st = np.cos(t), np.sin(t)
        du, dv = (du * ct + dv * st) / style.elongation, -du * st + dv * ct
    r = radius.ravel()[k]
    d2 = (du * du + dv * dv) / (r * r)
    value = np.clip((1.0 - d2) * 4.0, 0.0, 1.0)  # soft edge
    if style.vesicular:  # open chromatin: paler centre, dark rim
        value *= 1.0 - style.vesicular * np.clip(1.0 - d2 * 1.6, 0.0, 1.0)
    return (value * strength.ravel()[k]).astype(np.float32)


def _nuclei(x, y, style: _ClassStyle, mpp: float, salt: int) -> np.ndarray:
    first = _nucleus_layer(x, y, style, mpp, salt, angle=0.35, shift=0.0)
    second = _nucleus_layer(x, y, style, mpp, salt + 20, angle=1.27, shift=0.37)
    return np.maximum(first, second)


def _fat_membranes(x, y, mpp: float, salt: int) -> np.ndarray:
    """1 on adipocyte membranes, 0 inside the cells: a Voronoi diagram of jittered points (F2 - F1)."""
    cell = 70.0 / mpp
    cx, cy = np.floor(x / cell).astype(np.int64), np.floor(y / cell).astype(np.int64)
    f1 = np.full(x.shape, np.inf, np.float32)
    f2 = np.full(x.shape, np.inf, np.float32)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            nx, ny = cx + ox, cy + oy
            px = (nx + 0.15 + 0.7 * _hash01(nx, ny, salt)) * cell
            py = (ny + 0.15 + 0.7 * _hash01(nx, ny, salt + 1)) * cell
            d = np.sqrt((x - px) ** 2 + (y - py) ** 2).astype(np.float32)
            f2 = np.where(d < f1, f1, np.minimum(f2, d))
            f1 = np.minimum(f1, d)
    thickness = 1.6 / mpp
    return np.clip(1.0 - (f2 - f1) / thickness, 0.0, 1.0)


def paint_block(design: SyntheticDesign, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the level-0 box at (x0, y0): every pixel depends only on its coordinates."""
    seed_salt = (design.seed * 7919 + 17) & 0x7FFFFFFF
    mpp = design.mpp
    grain_tex = _grain(design)
    gy = (np.arange(y0, y0 + h) % _GRAIN_SHAPE[0])[:, None]
    gx = (np.arange(x0, x0 + w) % _GRAIN_SHAPE[1])[None, :]
    fine = grain_tex[gy, gx]  # (h, w) per-pixel grain
    fine2 = grain_tex[(gy * 7 + 3) % _GRAIN_SHAPE[0], (gx * 5 + 11) % _GRAIN_SHAPE[1]]

    # Class per pixel: nearest class-map px, looked up at a dithered position so borders are not
    # staircase-like.
    cp = design.class_px
    ch, cw = design.classes.shape
    ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    ci = np.clip(((ys + (fine - 0.5) * 2 * cp) / cp).astype(np.int64), 0, ch - 1)
    cj = np.clip(((xs + (fine2 - 0.5) * 2 * cp) / cp).astype(np.int64), 0, cw - 1)
    cls = design.classes[ci, cj]

    haem = np.zeros(h * w, np.float32)
    eosin = np.zeros(h * w, np.float32)
    cls_flat = cls.ravel()
    present = np.bincount(cls_flat, minlength=len(TISSUE_CLASSES))
    for index, name in enumerate(TISSUE_CLASSES[1:], start=1):
        if not present[index]:
            continue
        sel = np.flatnonzero(cls_flat == index)
        yy, xx = np.divmod(sel, w)
        x = (xx + x0).astype(np.float32)
        y = (yy + y0).astype(np.float32)
        grain = fine.ravel()[sel]
        style = _STYLES[name]
        salt = seed_salt + 100 * index
        if name == "fat":
            membrane = _fat_membranes(x, y, mpp, salt)
            eosin[sel] = 0.30 * membrane
            haem[sel] = 0.04 * membrane
            continue
        gain = design.eosin_gain[ci.ravel()[sel], cj.ravel()[sel]]
        e = style.eosin * gain * (0.85 + 0.3 * grain)
        if name == "stroma":  # wavy collagen fibres along a slowly turning direction
            angle = design.fibre_angle[ci.ravel()[sel], cj.ravel()[sel]]
            along = -x * np.sin(angle) + y * np.cos(angle)
            across = x * np.cos(angle) + y * np.sin(angle)
            phase = across * (2 * np.pi * mpp / 7.0) + 2.5 * np.sin(along * mpp / 30.0)
            e = e * (0.78 + 0.35 * (0.5 + 0.5 * np.sin(phase)) * (0.6 + 0.8 * fine2.ravel()[sel]))
        nuc = _nuclei(x, y, style, mpp, salt)
        if name == "necrosis":  # eosinophilic debris, pale ghosts of cells, karyorrhectic fragments
            ghosts = _nucleus_layer(x, y, _STYLES["tumour"], mpp, salt + 60, angle=0.8, shift=0.2)
            e = e * (0.9 + 0.25 * fine2.ravel()[sel]) + 0.08 * ghosts
            nuc = np.maximum(nuc, 0.12 * ghosts)
        eosin[sel] = e * (1.0 - 0.6 * np.minimum(nuc, 1.0))
        haem[sel] = style.haem * (0.8 + 0.4 * grain) + nuc

    od = haem[:, None] * _HEMATOXYLIN_OD + eosin[:, None] * _EOSIN_OD
    od *= design.stain_shift
    rgb = 255.0 * np.power(np.float32(10.0), -od)
    # Glass: faintly grey-white with sensor noise.
    rgb *= (0.955 + 0.02 * fine.ravel())[:, None]
    return np.clip(rgb, 0, 255).astype(np.uint8).reshape(h, w, 3)


# -- writing a pyramidal TIFF ---------------------------------------------------------------------------


def _box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = image.shape[0] // factor, image.shape[1] // factor
    if h == 0 or w == 0:
        return np.zeros((max(h, 1), max(w, 1), 3), np.uint8)
    view = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).astype(np.float32)
    return (view.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


def _tiles_of(image: np.ndarray, tile: int):
    h, w = image.shape[:2]
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            block = image[ty : ty + tile, tx : tx + tile]
            if block.shape[:2] != (tile, tile):
                padded = np.full((tile, tile, 3), 255, np.uint8)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            yield block


def _label_image(text: str, seed: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (400, 400), (246, 246, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 389, 389], outline=(30, 30, 30), width=3)
    draw.text((30, 40), "napari-slpd", fill=(0, 0, 0))
    draw.text((30, 80), "SYNTHETIC H&E", fill=(0, 0, 0))
    draw.text((30, 120), text[:40], fill=(0, 0, 0))
    draw.text((30, 160), f"seed {seed}", fill=(0, 0, 0))
    # A mock 2D barcode so the label looks like one.
    cells = np.random.default_rng(seed).random((16, 16)) > 0.5
    for (r, c), on in np.ndenumerate(cells):
        if on:
            draw.rectangle([200 + c * 10, 200 + r * 10, 209 + c * 10, 209 + r * 10], fill=(0, 0, 0))
    return np.asarray(image)


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int = 8192,
    height: int = 6144,
    seed: int = 0,
    mpp: float = 0.5,
    tile: int = 256,
    level_factor: int = 4,
    min_level_px: int = 512,
    quality: int = 90,
    composition: dict | None = None,
    progress=None,
    cancel=None,
) -> SyntheticDesign:
    """Write a synthetic H&E slide to ``path`` (Aperio-style tiled JPEG TIFF, ``.svs`` or ``.tif``).

    Levels shrink by ``level_factor`` until the longer side is below ``min_level_px``. The slide states
    ``mpp`` um/px and the matching objective power (10 / mpp), and carries thumbnail, label and macro
    images. Memory: one strip of tiles at level 0 plus level 1 in full (1 / level_factor^2 of level 0).
    Returns the design (class map and composition) so callers can check what was painted.
    """
    import tifffile

    if width < 64 or height < 64:
        raise SlpdError(f"a synthetic slide must be at least 64 x 64 px, not {width} x {height}")
    if tile % 16:
        raise SlpdError(f"tile size must be a multiple of 16 (TIFF rule), not {tile}")
    design = design_slide(width, height, seed, mpp, composition)
    level_dims = [(width, height)]
    while max(level_dims[-1]) // level_factor >= min_level_px and len(level_dims) < 8:
        w, h = level_dims[-1]
        level_dims.append((w // level_factor, h // level_factor))
    level1 = (
        np.full((level_dims[1][1], level_dims[1][0], 3), 255, np.uint8) if len(level_dims) > 1 else None
    )
    n_rows = math.ceil(height / tile)
    objective = 10.0 / mpp
    description = (
        f"Aperio Image Library v12.0.16 (napari-slpd synthetic)\r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {objective:g}|MPP = {mpp:.6f}"
        f"|Filename = synthetic-seed{seed}|Seed = {seed}"
    )
    if composition is not None:  # recorded so that the painted design (the slide's ground truth) can be redrawn
        description += "|Composition = " + ";".join(f"{k}:{float(v):.6f}" for k, v in sorted(composition.items()))

    def level0_tiles():
        for row in range(n_rows):
            if cancel is not None and (cancel() if callable(cancel) else cancel.is_set()):
                raise SlpdError("writing the synthetic slide was cancelled")
            y0 = row * tile
            strip_h = min(tile, height - y0)
            strip = paint_block(design, 0, y0, width, strip_h)
            if level1 is not None:
                # Accumulate level 1 from whole level_factor-row groups of this strip.
                small = _box_downsample(strip, level_factor)
                r0 = y0 // level_factor
                rows = min(small.shape[0], level1.shape[0] - r0)
                cols = min(small.shape[1], level1.shape[1])
                if rows > 0:
                    level1[r0 : r0 + rows, :cols] = small[:rows, :cols]
            padded = np.full((tile, math.ceil(width / tile) * tile, 3), 255, np.uint8)
            padded[:strip_h, :width] = strip
            for tx in range(0, padded.shape[1], tile):
                yield padded[:, tx : tx + tile]
            if progress is not None:
                progress(row + 1, n_rows)

    jpeg = dict(compression="jpeg", compressionargs={"level": quality}, photometric="rgb", metadata=None)
    bigtiff = width * height * 3 > 3_000_000_000
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            tif.write(
                level0_tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                description=description, resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                **jpeg,
            )
            # Aperio keeps the thumbnail (stripped) as the second directory.
            thumb_src = level1 if level1 is not None else paint_block(design, 0, 0, width, height)
            scale = max(1, math.ceil(max(thumb_src.shape[:2]) / 768))
            thumb = _box_downsample(thumb_src, scale)
            tif.write(thumb, description=f"{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - |",
                      rowsperstrip=16, **jpeg)
            previous = level1
            for index in range(1, len(level_dims)):
                w, h = level_dims[index]
                image = previous if index == 1 else _box_downsample(previous, level_factor)[:h, :w]
                tif.write(
                    _tiles_of(image, tile), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                    description=f"{width}x{height} -> {w}x{h} ({tile}x{tile}) JPEG/RGB Q={quality}|",
                    subfiletype=0, **jpeg,
                )
                previous = image
            label = _label_image(Path(path).stem, seed)
            tif.write(label, description=f"label {label.shape[1]}x{label.shape[0]}", subfiletype=1,
                      compression="lzw", photometric="rgb", rowsperstrip=64, metadata=None)
            macro_body = _box_downsample(thumb, max(1, math.ceil(thumb.shape[0] / 380)))
            macro = np.full((400, 400 + macro_body.shape[1] + 40, 3), 236, np.uint8)
            macro[:, :400] = label[:400, :400]
            macro[10 : 10 + macro_body.shape[0], 420 : 420 + macro_body.shape[1]] = macro_body[:380]
            tif.write(macro, description=f"macro {macro.shape[1]}x{macro.shape[0]}", subfiletype=9,
                      **jpeg)
    return design


# -- cached sample slides ------------------------------------------------------------------------------------

# Size of the slide behind napari's "Synthetic H&E slide" sample (about 3 x 2.3 mm at 0.5 um/px; painted
# once, in about ten seconds, then cached).
SYNTHETIC_SAMPLE_SIZE = (6144, 4608)
_SYNTHETIC_CACHE_NAME = "napari-slpd-synthetic-seed{seed}-{width}x{height}-v1.svs"


def synthetic_slide_path(
    seed: int = 0,
    folder: str | os.PathLike | None = None,
    width: int | None = None,
    height: int | None = None,
    **kwargs,
) -> Path:
    """Path of a cached synthetic slide for ``seed`` (written on first use; in the temp folder by default)."""
    width = width or SYNTHETIC_SAMPLE_SIZE[0]
    height = height or SYNTHETIC_SAMPLE_SIZE[1]
    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir()) / "napari-slpd"
    path = folder / _SYNTHETIC_CACHE_NAME.format(seed=seed, width=width, height=height)
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(path, width=width, height=height, seed=seed, **kwargs)
    return path


def real_slides_dir() -> Path:
    """../shared/data/slides beside the repository (or $SLPD_SLIDES_DIR)."""
    env = os.environ.get("SLPD_SLIDES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "slides"
