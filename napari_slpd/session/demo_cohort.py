"""The demo cohort, Qt-free: a labelled sample cohort of synthetic H&E slides (two tissue-composition
classes with subtypes, several slides per case, a survival time; :mod:`napari_slpd.samples.sample_cohort`)
plus the real test slides when ``../shared/data/slides`` is there, the small CPU-friendly settings
``slpd demo`` processes them with, the processing itself (features, prototypes, cohort index, then the
slide-level evaluation of every representation on the labels), and names for the prototypes of a synthetic
slide taken from the tissue classes it was painted with (its ground truth, not a model's guess). The GUI side of the demo is :mod:`napari_slpd.widgets.demo`, the command
:mod:`napari_slpd.cli.demo`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from napari_slpd.errors import SlpdError

# Synthetic slides: small enough that the whole demo runs in a few minutes on 2 CPU cores, enough of them
# (two classes, about four cases each) for a cross-validated evaluation.
SYNTHETIC_SIZE = (2048, 1536)
DEMO_SLIDES = 20
DEMO_CLASSES = 2
LABELS_FILE = "labels.csv"  # in COHORT/slides, written by the sample-cohort generator
REAL_SLIDES = ("cmu_small_region.svs",)  # real slides with a trustworthy pixel size
# Prototype colours by painted tissue class (tab10 hues that read on H&E; grey would read as background).
CLASS_COLORS = {"stroma": "#2ca02c", "tumour": "#d62728", "lymphocytes": "#1f77b4", "necrosis": "#8c564b",
                "fat": "#bcbd22"}


# -- the cohort ----------------------------------------------------------------------------------------


def demo_settings(checkpoint: str | None = None, region_checkpoint: str | None = None, device: str = "auto",
                  k: int = 4):
    """Small settings: 256-px regions of 4 x 4 patches of 64 px at 0.5 um/px (the model sees 64 px), so a
    small slide holds dozens of regions and K-means has something to group."""
    from napari_slpd.session.settings import FeatureSettings, PrototypeSettings, SessionSettings

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


def build_demo_cohort(root: Path, n_synthetic: int = DEMO_SLIDES, include_real: bool = True,
                      say: Callable[[str], None] = print) -> list[Path]:
    """Write the labelled sample slides into ``root/slides`` (once; ``root/slides/labels.csv`` holds their
    class, case and survival) and return every slide path of the demo (the real slides are unlabelled)."""
    from napari_slpd.samples.sample_cohort import SampleCohortSpec, write_sample_cohort
    from napari_slpd.samples.synthetic import real_slides_dir

    spec = SampleCohortSpec(n_slides=n_synthetic, n_classes=DEMO_CLASSES, seed=0, width=SYNTHETIC_SIZE[0],
                            height=SYNTHETIC_SIZE[1])
    sample = write_sample_cohort(root / "slides", spec, say=say)
    paths = [s.path for s in sample.slides]
    if include_real:
        real = real_slides_dir()
        for name in REAL_SLIDES:
            if (real / name).exists():
                paths.append(real / name)
            else:
                say(f"  (real slide {real / name} not found; the demo uses synthetic slides only)")
    return paths


def demo_labels(root: Path) -> Path | None:
    """The labels file of the demo cohort in ``root`` (None before :func:`build_demo_cohort`)."""
    path = Path(root) / "slides" / LABELS_FILE
    return path if path.exists() else None


def demo_evaluation_config(labels: Path):
    """Evaluation settings that fit the demo's few cases: as many folds as the rarest class has cases
    (at most 5), KNN, linear probe, Cox survival and retrieval (ABMIL is left to the panel: it trains)."""
    import csv

    from napari_slpd.evaluation import EvaluationConfig

    with open(labels, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    cases: dict[str, set] = {}
    for row in rows:
        cases.setdefault(row["class"], set()).add(row["case_id"])
    n_folds = max(2, min(5, min(len(c) for c in cases.values())))
    return EvaluationConfig(tasks=["class"], protocols=["knn", "linear", "retrieval"], n_folds=n_folds,
                            n_bootstrap=200, seed=0)


def evaluate_demo(session, root: Path, say: Callable[[str], None] = print):
    """Evaluate the demo cohort's representations on its labels; the report goes to ``root/evaluation``.
    Returns the EvaluationResult (None without labels)."""
    from napari_slpd.evaluation import write_report

    labels = demo_labels(root)
    if labels is None:
        return None
    config = demo_evaluation_config(labels)
    result = session.evaluate(labels, config).result
    write_report(result, Path(root) / "evaluation", cohort=session.cohort)
    for r in result.results:
        summary = r.summary.get(r.primary) or {}
        if summary.get("mean") is not None:
            say(f"  {r.task} / {r.representation} / {r.protocol}: {r.primary} {summary['mean']:.3f} "
                f"+/- {summary.get('std') or 0:.3f} ({config.n_folds} folds)")
    say(f"  evaluation report: {Path(root) / 'evaluation' / 'report.html'}")
    return result


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
        composition = None
        if props.get("aperio.Composition"):  # a sample-cohort slide: painted with a given composition
            composition = {k: float(v) for k, v in (item.split(":") for item in props["aperio.Composition"].split(";"))}
    except (KeyError, ValueError):  # a synthetic slide of an older version without its seed
        return None
    finally:
        slide.close()
    return design_slide(width, height, seed, mpp, composition)


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
