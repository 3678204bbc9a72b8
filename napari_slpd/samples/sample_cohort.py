"""A labelled sample cohort to try slide-level evaluation without data (``slpd sample-cohort``).

``write_sample_cohort(out, n_slides, n_classes, seed)`` paints procedural H&E slides
(napari_slpd.samples.synthetic) whose tissue composition depends on their class: each class favours one
or two tissue types (tumour-rich, immune-rich, necrotic, ...), each class has two subtypes that shift the
mix, each case (patient) has two or three slides, and every slide draws its own composition around its
subtype's. ``OUT/labels.csv`` holds ``slide_id, case_id, class, subtype, time, event``: the survival time
is exponential with a hazard that grows with tumour and necrosis and shrinks with lymphocytes, censored
at random. Slides are written directly into OUT, so ``slpd extract OUT --out COHORT`` takes the folder as
it is; then ``slpd evaluate COHORT --labels OUT/labels.csv``. The tissue each slide was painted with is its
ground truth: ``OUT/annotations/SLIDE.geojson`` (QuPath GeoJSON, one classified MultiPolygon per tissue
class, holes kept) for ``slpd evaluate COHORT --annotations OUT/annotations``.

```python
from napari_slpd.samples.sample_cohort import SampleCohortSpec, write_sample_cohort
cohort = write_sample_cohort("sample", SampleCohortSpec(n_slides=24, n_classes=3, seed=0))
cohort.slides   # [SampleSlide(slide_id, path, case_id, class_name, subtype, composition, time, event)]
cohort.labels   # Path of labels.csv
cohort.annotations  # folder of SLIDE.geojson ground-truth tissue annotations
```
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.samples.synthetic import TISSUE_CLASSES, design_slide, write_synthetic_slide

TISSUES = TISSUE_CLASSES[1:]  # stroma, tumour, lymphocytes, necrosis, fat
# What each class is rich in (class c uses entry c; beyond five classes, pairs of tissues).
_CLASS_THEMES = [("tumour",), ("lymphocytes",), ("necrosis",), ("fat",), ("stroma",),
                 ("tumour", "necrosis"), ("tumour", "lymphocytes"), ("stroma", "fat"), ("lymphocytes", "fat")]
_THEME_NAMES = {"tumour": "tumour-rich", "lymphocytes": "immune-rich", "necrosis": "necrotic", "fat": "fatty",
                "stroma": "stromal"}
# Log-hazard per unit fraction of each tissue (survival depends on composition).
HAZARD_WEIGHTS = {"stroma": 0.0, "tumour": 2.0, "lymphocytes": -1.5, "necrosis": 1.5, "fat": -0.5}
LABELS_NAME = "labels.csv"
ANNOTATIONS_DIR = "annotations"


@dataclass
class SampleCohortSpec:
    n_slides: int = 24
    n_classes: int = 3
    seed: int = 0
    width: int = 2048
    height: int = 1536
    mpp: float = 0.5
    slides_per_case: tuple[int, int] = (2, 3)
    concentration: float = 30.0  # Dirichlet concentration around the subtype's composition (higher: tighter)

    def check(self) -> None:
        if self.n_classes < 2 or self.n_classes > len(_CLASS_THEMES):
            raise SlpdError(f"--classes must be between 2 and {len(_CLASS_THEMES)}, not {self.n_classes}")
        if self.n_slides < 2 * self.n_classes:
            raise SlpdError(
                f"{self.n_slides} slides are too few for {self.n_classes} classes: use at least "
                f"{2 * self.n_classes} (two per class), better 10 per class for 10-fold cross-validation"
            )
        if min(self.width, self.height) < 512:
            raise SlpdError(f"sample slides must be at least 512 px on each side, not {self.width} x {self.height}")


@dataclass
class SampleSlide:
    slide_id: str
    path: Path
    case_id: str
    class_name: str
    subtype: str
    composition: dict
    time: float
    event: int


@dataclass
class SampleCohort:
    folder: Path
    labels: Path
    slides: list[SampleSlide] = field(default_factory=list)
    annotations: Path | None = None


def class_names(n_classes: int) -> list[str]:
    names = []
    for theme in _CLASS_THEMES[:n_classes]:
        names.append("+".join(_THEME_NAMES[t] for t in theme) if len(theme) > 1 else _THEME_NAMES[theme[0]])
    return names


def _subtype_means(n_classes: int, rng) -> list[list[np.ndarray]]:
    """[class][subtype] mean composition over TISSUES."""
    out = []
    for theme in _CLASS_THEMES[:n_classes]:
        base = np.full(len(TISSUES), 0.12)
        base[TISSUES.index("stroma")] += 0.1  # stroma between compartments, as on real slides
        for t in theme:
            base[TISSUES.index(t)] += 0.9 / len(theme)
        subtypes = []
        for _ in range(2):
            shift = rng.dirichlet(np.ones(len(TISSUES))) * 0.25  # a subtype tilts the mix
            mean = base + shift
            subtypes.append(mean / mean.sum())
        out.append(subtypes)
    return out


def plan_sample_cohort(spec: SampleCohortSpec) -> list[dict]:
    """Who is who, before painting: slide id, case, class, subtype, composition, survival (deterministic)."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    means = _subtype_means(spec.n_classes, rng)
    names = class_names(spec.n_classes)
    plans, case = [], 0
    # Cases take classes in turn so classes stay balanced; the slides of a case share class and subtype.
    while len(plans) < spec.n_slides:
        c = case % spec.n_classes
        sub = int(rng.integers(0, 2))
        n = int(rng.integers(spec.slides_per_case[0], spec.slides_per_case[1] + 1))
        for _ in range(min(n, spec.n_slides - len(plans))):
            composition = rng.dirichlet(means[c][sub] * spec.concentration)
            log_hazard = sum(HAZARD_WEIGHTS[t] * composition[i] for i, t in enumerate(TISSUES))
            t_event = rng.exponential(36.0 / math.exp(log_hazard))
            t_censor = rng.exponential(60.0)
            index = len(plans)
            plans.append({
                "slide_id": f"sample-{index:03d}", "case_id": f"case-{case:03d}", "class": names[c],
                "subtype": f"{names[c]}/{'ab'[sub]}", "composition": dict(zip(TISSUES, map(float, composition))),
                "time": round(float(min(t_event, t_censor)), 2), "event": int(t_event <= t_censor),
                "seed": int(spec.seed * 100_003 + index * 7 + 1),
            })
        case += 1
    return plans


def write_sample_cohort(out: str | os.PathLike, spec: SampleCohortSpec | None = None, progress=None,
                        cancel=None, say=None) -> SampleCohort:
    """Paint the slides into ``out`` (existing slides with the same name are kept) and write labels.csv."""
    from napari_slpd.utils.files import atomic_path
    from napari_slpd.utils.progress import raise_if_cancelled

    spec = spec or SampleCohortSpec()
    plans = plan_sample_cohort(spec)
    folder = Path(out).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise SlpdError(f"{folder} is a file; sample-cohort needs a folder")
    folder.mkdir(parents=True, exist_ok=True)
    result = SampleCohort(folder, folder / LABELS_NAME)
    for i, plan in enumerate(plans):
        raise_if_cancelled(cancel, "writing the sample cohort")
        path = folder / f"{plan['slide_id']}.svs"
        if not path.exists():
            t0 = time.perf_counter()
            design = write_synthetic_slide(path, width=spec.width, height=spec.height, seed=plan["seed"],
                                           mpp=spec.mpp, composition=plan["composition"])
            if say is not None:
                say(f"  wrote {path.name} ({plan['class']}, {time.perf_counter() - t0:.1f} s)")
        else:  # the design is deterministic: redraw it for the annotation without repainting the slide
            design = design_slide(spec.width, spec.height, plan["seed"], spec.mpp, plan["composition"])
        write_ground_truth(folder / ANNOTATIONS_DIR / f"{plan['slide_id']}.geojson", design)
        result.slides.append(SampleSlide(plan["slide_id"], path, plan["case_id"], plan["class"], plan["subtype"],
                                         plan["composition"], plan["time"], plan["event"]))
        if progress is not None:
            progress(i + 1, len(plans))
    result.annotations = folder / ANNOTATIONS_DIR
    with atomic_path(result.labels) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["slide_id", "case_id", "class", "subtype", "time", "event"])
            for s in result.slides:
                writer.writerow([s.slide_id, s.case_id, s.class_name, s.subtype, s.time, s.event])
    return result


def write_ground_truth(path: Path, design) -> Path:
    """The tissue classes painted on a slide (its design's class map) as QuPath GeoJSON, atomically."""
    import json

    from napari_slpd.evaluation.segmentation.annotations import raster_to_shapes, shapes_to_geojson
    from napari_slpd.utils.files import atomic_path

    classes = design.classes.astype(np.int16) - 1  # background (0) is not annotated
    shapes = raster_to_shapes(classes, list(TISSUES), scale=float(design.class_px))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(shapes_to_geojson(shapes)), encoding="utf-8")
    return path
