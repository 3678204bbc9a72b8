"""The demo cohort, Qt-free: a few synthetic H&E slides (different seeds draw different tissue
compositions) plus the real test slides when ``../shared/data/slides`` is there, the small CPU-friendly
settings ``slpd demo`` processes them with, the processing itself (features, prototypes, cohort index), and
names for the prototypes of a synthetic slide taken from the tissue classes it was painted with (its ground
truth, not a model's guess). The GUI side of the demo is :mod:`napari_slpd.widgets.demo`, the command
:mod:`napari_slpd.cli.demo`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from napari_slpd.errors import SlpdError

# Synthetic slides: small enough that the whole demo runs in 2-3 minutes on 2 CPU cores.
SYNTHETIC_SIZE = (3072, 2304)
SYNTHETIC_SEEDS = (11, 12, 13, 14, 15)
REAL_SLIDES = ("cmu_small_region.svs",)  # real slides with a trustworthy pixel size
# Prototype colours by painted tissue class (tab10 hues that read on H&E; grey would read as background).
CLASS_COLORS = {"stroma": "#2ca02c", "tumour": "#d62728", "lymphocytes": "#1f77b4", "necrosis": "#8c564b",
                "fat": "#bcbd22"}


# -- the cohort ----------------------------------------------------------------------------------------


def demo_settings(checkpoint: str | None = None, region_checkpoint: str | None = None, device: str = "auto",
                  k: int = 4):
    """Small settings: 256-px regions of 4 x 4 patches of 64 px at 0.5 um/px (the model sees 64 px), so a
    small slide holds dozens of regions and K-means has something to group."""
    from napari_slpd.session import FeatureSettings, PrototypeSettings, SessionSettings

    features = FeatureSettings(
        patch_checkpoint=checkpoint,
        patch_input_px=64,
        region_checkpoint=region_checkpoint,
        device=device,
        region_px=256,
        patch_px=64,
        target_mpp=0.5,
        min_tissue=0.25,
        batch_size=256,
        num_workers=1,
        overwrite=True,  # the demo owns its cohort: features made by an older version are replaced
    )
    return SessionSettings(features=features, prototypes=PrototypeSettings(k=k), top_k=10)


def build_demo_cohort(root: Path, n_synthetic: int = len(SYNTHETIC_SEEDS), include_real: bool = True,
                      say: Callable[[str], None] = print) -> list[Path]:
    """Write the synthetic slides into ``root/slides`` (once) and return every slide path of the demo."""
    from napari_slpd.samples.synthetic import real_slides_dir, write_synthetic_slide

    slides_dir = root / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    seeds = [SYNTHETIC_SEEDS[i % len(SYNTHETIC_SEEDS)] + 10 * (i // len(SYNTHETIC_SEEDS)) for i in range(n_synthetic)]
    paths = []
    for seed in seeds:
        path = slides_dir / f"synthetic-{seed}.svs"
        if not path.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(path, width=SYNTHETIC_SIZE[0], height=SYNTHETIC_SIZE[1], seed=seed)
            say(f"  wrote {path.name} ({time.perf_counter() - t0:.1f} s)")
        paths.append(path)
    if include_real:
        real = real_slides_dir()
        for name in REAL_SLIDES:
            if (real / name).exists():
                paths.append(real / name)
            else:
                say(f"  (real slide {real / name} not found; the demo uses synthetic slides only)")
    return paths


def process_cohort(session, say: Callable[[str], None] = print) -> dict:
    """Extract missing features, compute missing prototypes, build the cohort index; return a summary."""
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 5 or done == total:
            last[0] = now
            say(f"  features: {100 * done / max(total, 1):5.1f}%")

    results = session.extract(progress=progress)
    for r in results:
        extra = f" ({r.message})" if r.message and r.status != "skipped" else ""
        say(f"  {r.slide_id}: {r.status}, {r.n_regions} regions, {r.seconds:.1f} s{extra}")
    outcome = session.ensure_prototypes()
    for slide_id, message in outcome.items():
        if message != "ok":
            say(f"  {slide_id}: no prototypes: {message}")
    index = session.index()
    say(f"  cohort index: {len(index)} slides, {index.n_prototypes} prototypes "
        f"({time.perf_counter() - t0:.0f} s in all)")
    return {"features": results, "prototypes": outcome}


def pick_query_slide(session) -> str:
    """The slide the demo opens: the one with the most regions (it shows its prototypes best)."""
    best, best_n = None, -1
    for st in session.statuses():
        if st.features_done and st.prototypes_done and (st.n_regions or 0) > best_n:
            best, best_n = st.slide_id, st.n_regions or 0
    if best is None:
        raise SlpdError("no slide of the demo cohort got features and prototypes; see the messages above")
    return best


# -- prototype names from the painted tissue -----------------------------------------------------------


def synthetic_design_of(path: str | os.PathLike):
    """The design a synthetic slide of the demo was painted from, or None for any other slide.

    ``write_synthetic_slide`` is deterministic in its seed, size and pixel size, which the slide's Aperio
    description records; the demo writes its slides with the composition drawn from the seed, so painting
    the design again at low resolution gives the class map behind every pixel.
    """
    import openslide

    from napari_slpd.samples.synthetic import design_slide

    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError):  # not a file OpenSlide reads (a DICOM folder): not one of ours
        return None
    try:
        props = slide.properties
        if "napari-slpd synthetic" not in props.get("tiff.ImageDescription", ""):
            return None
        seed, mpp = int(props["aperio.Seed"]), float(props["aperio.MPP"])
        width, height = slide.dimensions
    except (KeyError, ValueError):  # a synthetic slide of an older version without its seed
        return None
    finally:
        slide.close()
    return design_slide(width, height, seed, mpp)


def tissue_class_shares(design, coords, tile_px: float, assignments, k: int):
    """``[k, classes]`` share of each painted tissue class (sample_data.TISSUE_CLASSES without background)
    in the regions of each prototype, counted on the design's class map."""
    import numpy as np

    from napari_slpd.samples.synthetic import TISSUE_CLASSES

    step = design.class_px
    counts = np.zeros((k, len(TISSUE_CLASSES)), np.float64)
    for (x, y), proto in zip(np.asarray(coords, np.int64), np.asarray(assignments, np.int64)):
        x0, y0 = int(x) // step, int(y) // step
        x1, y1 = -(-int(x + tile_px) // step), -(-int(y + tile_px) // step)
        block = design.classes[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
        if 0 <= proto < k and block.size:
            counts[proto] += np.bincount(block.ravel(), minlength=len(TISSUE_CLASSES))
    tissue = counts[:, 1:]  # background is no tissue class
    return tissue / np.maximum(tissue.sum(axis=1, keepdims=True), 1.0)


def names_from_shares(shares, mixed_share: float = 0.3, some_share: float = 0.15) -> list[str]:
    """A name per prototype from its tissue-class shares: the main class; "A + B" when a second class
    covers at least ``mixed_share`` of its regions, "A, some B" from ``some_share``; a name that still
    repeats gets " (2)", " (3)"."""
    import numpy as np

    from napari_slpd.samples.synthetic import TISSUE_CLASSES

    classes = TISSUE_CLASSES[1:]
    names, seen = [], {}
    for row in np.asarray(shares, np.float64):
        if row.sum() <= 0:
            name = "no tissue"
        else:
            first, second = np.argsort(-row, kind="stable")[:2]
            name = classes[first]
            if row[second] >= mixed_share:
                name += f" + {classes[second]}"
            elif row[second] >= some_share:
                name += f", some {classes[second]}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def _shade(color: str, n: int) -> str:
    """The n-th variant of a class colour: itself, then darker and lighter in turn (two prototypes of one
    class stay told apart on the slide)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    if n == 0:
        return color
    f = 0.6 ** ((n + 1) // 2)
    if n % 2:  # darker
        r, g, b = (int(c * f) for c in (r, g, b))
    else:  # lighter
        r, g, b = (int(255 - (255 - c) * f) for c in (r, g, b))
    return f"#{r:02x}{g:02x}{b:02x}"


def name_prototypes_from_design(session, slide_id: str, annotations) -> dict[int, str]:
    """Name the prototypes of a synthetic slide after the tissue classes it was painted with (and colour
    them by class), unless a name is given already; returns {prototype: name} ({} for other slides).

    These names are the slide's ground truth, not a model's guess; real slides keep "prototype k" until a
    person or ProAlign (with a vision-language model) names them.
    """
    design = synthetic_design_of(session.cohort.slide(slide_id).path)
    if design is None:
        return {}
    protos = session.prototypes(slide_id, compute=False)
    if protos.coords is None or not protos.tile_size_level0:
        return {}
    if annotations.labels(slide_id, protos):
        return {}  # named before (by the demo or by a person): keep those names
    shares = tissue_class_shares(design, protos.coords, float(protos.tile_size_level0), protos.assignments,
                                 protos.k)
    names = names_from_shares(shares)
    used: dict[str, int] = {}
    for k, name in enumerate(names):
        main = name.split(" + ")[0].split(",")[0].split(" (")[0]
        color = CLASS_COLORS.get(main)
        if color is not None:
            color = _shade(color, used.get(main, 0))
            used[main] = used.get(main, 0) + 1
        annotations.set_label(slide_id, k, name=name, color=color, source="user", save=False)
    annotations.save()
    return dict(enumerate(names))
