"""Score the cohort's label maps against annotated tissue regions (``slpd evaluate COHORT --annotations DIR``).

For every slide with an annotation file (QuPath GeoJSON or label mask, see annotations.py) the truth is
rasterised at a quarter of a patch side; the units scored are the slide's regions (region resolution) and
the patches of each region (patch resolution: the region split into its G x G token grid). A unit's true
class is the majority class of its annotated pixels when at least half of it is annotated (else it is
not scored); its predicted class is the majority of the method's labels painted on the same raster.

Methods (each scored where its inputs exist; a slide without them is listed in ``notes``):

- ``prototypes``: the slide's unsupervised prototypes mapped to classes without looking at the slide:
  slides are split into folds grouped by case (at most 5); on the training slides every prototype gets the
  majority true class of its regions, and a prototype of a test slide takes the class of the nearest
  (cosine) labelled training prototype.
- ``proalign``: ProAlign's zero-shot labels (patch labels; region labels at region resolution), their text
  classes matched to annotation classes by name (case and separators ignored) or by a mapping file
  (CSV ``name,class``).
- ``named_prototypes``: the names given to prototypes (typed or propagated in the napari panel), matched
  to annotation classes the same way.

```python
from napari_slpd.evaluation.segmentation import SegmentationConfig, evaluate_segmentation
result = evaluate_segmentation(cohort, "annotations/", SegmentationConfig(n_bootstrap=1000, seed=0))
result.pooled["prototypes"]["region"]   # {"figures": {dice, iou, mean_dice, ...}, "ci": {...}}
result.slides[slide_id]["prototypes"]["patch"]  # figures of one slide
```
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from napari_slpd.evaluation.errors import LabelsError
from napari_slpd.evaluation.segmentation import annotations as A
from napari_slpd.evaluation.segmentation.scores import confusion, figures, pooled_with_ci
from napari_slpd.utils.progress import raise_if_cancelled

log = logging.getLogger(__name__)

METHODS = ("prototypes", "proalign", "named_prototypes")
RESOLUTIONS = ("region", "patch")
MAX_FOLDS = 5
MIN_ANNOTATED = 0.5  # a unit is scored when at least this fraction of it is annotated


@dataclass
class SegmentationConfig:
    methods: list[str] | None = None  # None: every method whose inputs exist
    n_bootstrap: int = 1000
    seed: int = 0
    mapping: str | None = None  # CSV name,class: method label name -> annotation class
    cases: dict[str, str] | None = None  # slide -> case (from the labels file); default: each slide its own

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlideTruth:
    slide_id: str
    downsample: float
    raster: np.ndarray  # [h, w] int16 true class, -1 = not annotated
    region_coords: np.ndarray  # [M, 2] level-0
    region_size: float
    grid: int  # patches per region side
    units: dict = field(default_factory=dict)  # resolution -> (coords [U, 2], size)
    truth: dict = field(default_factory=dict)  # resolution -> [U] true class (-1: not scored)
    region_of_unit: dict = field(default_factory=dict)  # resolution -> [U] region index


@dataclass
class SegmentationResult:
    annotations: str
    classes: list[str]
    methods: list[str]
    slides: dict  # slide -> method -> resolution -> figures
    pooled: dict  # method -> resolution -> {"figures", "ci"}
    confusions: dict  # slide -> method -> resolution -> [C, C + 1]
    predictions: dict  # slide -> method -> raster [h, w] int16 (for overlays and the error layer)
    truths: dict  # slide -> SlideTruth
    notes: list[str]
    config: SegmentationConfig

    def lines(self) -> list[str]:
        out = [f"segmentation: {len(self.truths)} annotated slide(s), classes {', '.join(self.classes)}"]
        for method in self.methods:
            for res in RESOLUTIONS:
                pooled = self.pooled.get(method, {}).get(res)
                if not pooled:
                    continue
                f, ci = pooled["figures"], pooled["ci"]
                per_class = ", ".join(f"{c} {d:.3f}" for c, d in zip(self.classes, f["dice"]) if np.isfinite(d))
                out.append(
                    f"  {method} @ {res}: mean Dice {f['mean_dice']:.3f} [{ci['mean_dice'][0]:.3f}, "
                    f"{ci['mean_dice'][1]:.3f}], mean IoU {f['mean_iou']:.3f} [{ci['mean_iou'][0]:.3f}, "
                    f"{ci['mean_iou'][1]:.3f}], pixel accuracy {f['pixel_accuracy']:.3f} "
                    f"[{ci['pixel_accuracy'][0]:.3f}, {ci['pixel_accuracy'][1]:.3f}]; Dice per class: {per_class}"
                )
        return out + [f"  {n}" for n in self.notes]

    def write_files(self, folder, plots: bool = True) -> str:
        """segmentation.json, segmentation_slides.csv and plots into ``folder``; the HTML section."""
        from napari_slpd.evaluation.segmentation.report import write_segmentation_files

        return write_segmentation_files(self, folder, plots=plots)

    def to_dict(self) -> dict:
        return {"annotations": self.annotations, "classes": self.classes, "methods": self.methods,
                "slides": self.slides, "pooled": self.pooled, "notes": self.notes, "config": self.config.to_dict(),
                "units": {s: {r: int((t.truth[r] >= 0).sum()) for r in t.truth} for s, t in self.truths.items()}}


# -- truth --------------------------------------------------------------------------------------------------


def block_majority(raster: np.ndarray, coords: np.ndarray, size: float, downsample: float,
                   min_fraction: float = MIN_ANNOTATED) -> np.ndarray:
    """[U] the majority value >= 0 of ``raster`` inside each level-0 square (x, y, size), -1 where fewer
    than ``min_fraction`` of its raster pixels hold a value >= 0."""
    h, w = raster.shape
    out = np.full(len(coords), -1, np.int64)
    for u, (x, y) in enumerate(np.asarray(coords, np.float64)):
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1, y1 = int(round((x + size) / downsample)), int(round((y + size) / downsample))
        block = raster[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
        cells = max(1, (x1 - x0) * (y1 - y0))
        values = block[block >= 0]
        if values.size == 0 or values.size < min_fraction * cells:
            continue
        out[u] = int(np.bincount(values).argmax())
    return out


def paint(coords: np.ndarray, size: float, labels: np.ndarray, shape: tuple[int, int], downsample: float
          ) -> np.ndarray:
    """Raster [h, w] int16 of ``labels`` painted on the level-0 squares (x, y, size), -1 elsewhere."""
    out = np.full(shape, -1, np.int16)
    h, w = shape
    for (x, y), label in zip(np.asarray(coords, np.float64), np.asarray(labels)):
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1, y1 = int(round((x + size) / downsample)), int(round((y + size) / downsample))
        out[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = int(label)
    return out


def _patch_units(region_coords: np.ndarray, region_size: float, grid: int) -> tuple[np.ndarray, np.ndarray]:
    step = region_size / grid
    offsets = np.array([(i * step, j * step) for j in range(grid) for i in range(grid)])
    coords = (region_coords[:, None, :].astype(np.float64) + offsets[None]).reshape(-1, 2)
    return coords, np.repeat(np.arange(len(region_coords)), grid * grid)


def slide_truth(cohort, slide_id: str, path: Path, classes: list[str], table: dict | None) -> SlideTruth:
    """Rasterise the annotation of ``slide_id`` and find the true class of its regions and patches
    (``classes`` grows with names first seen here)."""
    from napari_slpd.features.store import FeatureStore

    with FeatureStore.open(cohort.features_path(slide_id)) as store:
        region_coords = np.asarray(store.region_coords, np.int64)
        region_size = float(store.region_size_level0)
        grid = int(store.grid_size)
    extent = (region_coords.max(axis=0) + region_size) if len(region_coords) else np.array([1, 1])
    downsample = max(1.0, region_size / grid / 4.0)
    if path.suffix in A.GEOJSON_SUFFIXES:
        raster, names = A.rasterize(A.read_geojson(path), (int(extent[0]), int(extent[1])), downsample, classes)
    else:
        if table is None:
            raise LabelsError(f"label mask {path} needs a class table (classes.csv with value,name) next to it")
        raster, names = A.read_mask(path, table, (int(extent[0]), int(extent[1])), downsample, classes)
    classes[:] = names
    truth = SlideTruth(slide_id, downsample, raster, region_coords, region_size, grid)
    patch_coords, region_of_patch = _patch_units(region_coords, region_size, grid)
    truth.units = {"region": (region_coords, region_size), "patch": (patch_coords, region_size / grid)}
    truth.region_of_unit = {"region": np.arange(len(region_coords)), "patch": region_of_patch}
    for res, (coords, size) in truth.units.items():
        truth.truth[res] = block_majority(raster, coords, size, downsample)
    return truth


# -- class matching ----------------------------------------------------------------------------------------


def read_mapping(path: str | os.PathLike | None) -> dict[str, str]:
    if not path:
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"name", "class"} <= set(rows[0]):
        raise LabelsError(f"mapping file {path} needs the columns name,class (method label -> annotation class)")
    return {A.normalize_name(r["name"]): r["class"] for r in rows}


def match_names(names: list[str], classes: list[str], mapping: dict[str, str]) -> np.ndarray:
    """[len(names)] annotation class index of each method label name (-1: no matching class)."""
    index = {A.normalize_name(c): i for i, c in enumerate(classes)}
    out = []
    for name in names:
        key = A.normalize_name(name)
        target = mapping.get(key, name)
        out.append(index.get(A.normalize_name(target), -1))
    return np.asarray(out, np.int64)


# -- methods -----------------------------------------------------------------------------------------------


def _prototypes_of(cohort, slide_id: str):
    from napari_slpd.errors import PrototypeError
    from napari_slpd.prototypes.cache import load_prototypes

    try:  # the coordinates are in the file itself, so older prototypes still paint the right regions
        protos = load_prototypes(cohort, slide_id, check_stale=False)
    except PrototypeError as exc:
        log.debug("no prototypes for %s: %s", slide_id, exc)
        return None
    if protos is None or protos.coords is None or protos.tile_size_level0 is None:
        return None
    return protos


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_classes(protos, truth: SlideTruth, n_classes: int) -> np.ndarray:
    """[K] majority true class of each prototype's regions on an annotated slide (-1: none annotated)."""
    raster_truth = block_majority(truth.raster, protos.coords, protos.tile_size_level0, truth.downsample)
    out = np.full(protos.k, -1, np.int64)
    for k in range(protos.k):
        values = raster_truth[(protos.assignments == k) & (raster_truth >= 0)]
        if values.size:
            out[k] = int(np.bincount(values, minlength=n_classes).argmax())
    return out


def map_prototypes(test_centroids: np.ndarray, train_centroids: np.ndarray, train_classes: np.ndarray) -> np.ndarray:
    """[K_test] class of the nearest (cosine) training prototype that has a class."""
    keep = train_classes >= 0
    if not keep.any():
        return np.full(len(test_centroids), -1, np.int64)
    sim = _normalized(test_centroids) @ _normalized(train_centroids[keep]).T
    return train_classes[keep][sim.argmax(axis=1)]


def case_folds(slide_ids: list[str], cases: list[str], seed: int) -> list[tuple[list[int], list[int]]]:
    """(train, test) index lists: at most MAX_FOLDS folds grouped by case, shuffled with ``seed``."""
    unique = sorted(set(cases))
    if len(unique) < 2:
        return []
    order = np.random.default_rng(seed).permutation(len(unique))
    n_folds = min(MAX_FOLDS, len(unique))
    fold_of_case = {unique[c]: i % n_folds for i, c in enumerate(order)}
    folds = []
    for f in range(n_folds):
        test = [i for i, c in enumerate(cases) if fold_of_case[c] == f]
        train = [i for i, c in enumerate(cases) if fold_of_case[c] != f]
        folds.append((train, test))
    return folds


# -- the run ------------------------------------------------------------------------------------------------


def evaluate_segmentation(cohort, annotations: str | os.PathLike, config: SegmentationConfig | None = None,
                          progress=None, cancel=None) -> SegmentationResult:
    config = config or SegmentationConfig()
    folder = Path(annotations).expanduser()
    if not folder.is_dir():
        raise LabelsError(f"annotations folder {folder} does not exist")
    methods = list(config.methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LabelsError(f"unknown segmentation method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    table = A.class_table_of(folder)
    mapping = read_mapping(config.mapping)
    notes: list[str] = []
    files = {}
    for slide_id in cohort.slide_ids():
        path = A.find_annotation(folder, slide_id)
        if path is not None and cohort.features_path(slide_id).exists():
            files[slide_id] = path
    if not files:
        raise LabelsError(
            f"no annotation in {folder} matches a slide of the cohort with features (expected SLIDE_ID.geojson or "
            "SLIDE_ID.png/.tif/.npy with classes.csv)"
        )
    classes: list[str] = []
    truths: dict[str, SlideTruth] = {}
    for i, (slide_id, path) in enumerate(files.items()):
        raise_if_cancelled(cancel, "the segmentation evaluation")
        truths[slide_id] = slide_truth(cohort, slide_id, path, classes, table)
        if progress is not None:
            progress(i + 1, 2 * len(files))
    n_classes = len(classes)
    ids = list(truths)
    preds: dict[str, dict[str, np.ndarray]] = {s: {} for s in ids}

    if "prototypes" in methods:
        protos = {s: _prototypes_of(cohort, s) for s in ids}
        have = [s for s in ids if protos[s] is not None]
        if len(have) < len(ids):
            notes.append(f"prototypes: {len(ids) - len(have)} annotated slide(s) without prototypes (run `slpd "
                         "prototypes`)")
        cases = [(config.cases or {}).get(s, s) for s in have]
        folds = case_folds(have, cases, config.seed)
        if not folds:
            notes.append("prototypes: mapping prototypes to classes needs annotated slides of at least 2 cases")
        own = {s: prototype_classes(protos[s], truths[s], n_classes) for s in have}
        for train, test in folds:
            if not train:
                continue
            centroids = np.concatenate([protos[have[i]].centroids for i in train])
            labels = np.concatenate([own[have[i]] for i in train])
            for i in test:
                p = protos[have[i]]
                proto_class = map_prototypes(p.centroids, centroids, labels)
                t = truths[have[i]]
                preds[have[i]]["prototypes"] = paint(p.coords, p.tile_size_level0, proto_class[p.assignments],
                                                      t.raster.shape, t.downsample)

    if "proalign" in methods:
        from napari_slpd.proalign.cache import load_proalign

        missing = 0
        for s in ids:
            path = cohort.proalign_path(s)
            if not path.exists():
                missing += 1
                continue
            result = load_proalign(path, with_attention=False)
            target = match_names(list(result.names), classes, mapping)
            t = truths[s]
            labels = np.where(result.patch_labels >= 0, target[np.maximum(result.patch_labels, 0)], -1)
            preds[s]["proalign"] = paint(result.patch_coords, result.patch_size_level0, labels, t.raster.shape,
                                         t.downsample)
            used = set(np.unique(result.patch_labels[result.patch_labels >= 0]).tolist())
            unmatched = sorted({n for i, (n, c) in enumerate(zip(result.names, target)) if c < 0 and i in used})
            if unmatched:
                notes.append(f"proalign: {s}: label(s) {', '.join(unmatched)} match no annotation class "
                             "(give a --seg-mapping CSV name,class)")
        if missing:
            notes.append(f"proalign: {missing} annotated slide(s) without ProAlign labels (run `slpd proalign`)")

    if "named_prototypes" in methods:
        from napari_slpd.labeling.names import PrototypeAnnotations

        try:
            named = PrototypeAnnotations.load(cohort)
        except Exception as exc:  # noqa: BLE001 - no or unreadable names file: the method has nothing to score
            named = None
            notes.append(f"named_prototypes: no prototype names ({exc})")
        unnamed = 0
        for s in ids if named is not None else []:
            p = _prototypes_of(cohort, s)
            labels = named.labels(s, p) if p is not None else {}
            if not labels:
                unnamed += 1
                continue
            names = [labels[k].name if k in labels else "" for k in range(p.k)]
            target = np.where([bool(n) for n in names], match_names(names, classes, mapping), -1)
            t = truths[s]
            preds[s]["named_prototypes"] = paint(p.coords, p.tile_size_level0, target[p.assignments], t.raster.shape,
                                                 t.downsample)
        if unnamed:
            notes.append(f"named_prototypes: {unnamed} annotated slide(s) without named prototypes")

    slides, cms = {}, {}
    for s in ids:
        t = truths[s]
        slides[s], cms[s] = {}, {}
        for method, raster in preds[s].items():
            slides[s][method], cms[s][method] = {}, {}
            for res, (coords, size) in t.units.items():
                pred = block_majority(raster, coords, size, t.downsample)
                cm = confusion(t.truth[res], pred, n_classes)
                cms[s][method][res] = cm
                slides[s][method][res] = figures(cm)
    pooled = {}
    used_methods = [m for m in methods if any(m in preds[s] for s in ids)]
    for method in used_methods:
        pooled[method] = {}
        scored = [s for s in ids if method in cms[s]]
        cases = [(config.cases or {}).get(s, s) for s in scored]
        for res in RESOLUTIONS:
            pooled[method][res] = pooled_with_ci([cms[s][method][res] for s in scored], cases, config.n_bootstrap,
                                                 config.seed)
            pooled[method][res]["n_slides"] = len(scored)
    if progress is not None:
        progress(2 * len(files), 2 * len(files))
    return SegmentationResult(str(folder), classes, used_methods, slides, pooled, cms, preds, truths, notes, config)
