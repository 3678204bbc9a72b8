"""What one slide of a cohort holds, gathered for a SpatialData export, in plain numpy (no scverse import).

:func:`gather_slide` reads the slide's feature file (patches and regions, their frames and tile specs),
its cached prototypes and their names, its ProAlign result, and, when the slide file opens, the pixel
size along x and y, a thumbnail and the tissue outlines. :mod:`napari_slpd.scverse.export_slide` turns the
result into SpatialData elements.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from napari_slpd.errors import SlpdError
from napari_slpd.scverse.layout import TileSpec, safe_name, tile_spec_for

log = logging.getLogger(__name__)

THUMBNAIL_PX = 2000  # wsidata's default thumbnail size


@dataclass
class TileTable:
    """One collection of square tiles and one feature row per tile."""

    coords: np.ndarray  # [N, 2] int64 level-0 top-left
    size_level0: float
    features: np.ndarray  # [N, D] float32
    model: str  # the table's model name (LazySlide's key prefix)
    spec: TileSpec
    obs: dict[str, np.ndarray] = field(default_factory=dict)  # extra per-tile columns
    categories: dict[str, tuple[np.ndarray, list[str], list[str]]] = field(default_factory=dict)
    # name -> (codes [N] int, -1 = none; category names; colours '#rrggbb')
    aggregates: dict[str, tuple[np.ndarray, dict]] = field(default_factory=dict)  # agg key -> ([G, D], info)
    feature_source: str = ""


@dataclass
class LabelRaster:
    """A label map: ``data`` [H, W] (0 = none, k + 1 = class k); label pixel (0, 0) starts at level-0
    ``origin`` and covers ``scale`` level-0 px."""

    data: np.ndarray
    scale: float
    origin: tuple[float, float]
    names: list[str]
    colors: list[str]


@dataclass
class SlideContent:
    slide_id: str
    patches: TileTable | None
    regions: TileTable
    labels: dict[str, LabelRaster] = field(default_factory=dict)
    tissues: list = field(default_factory=list)  # shapely Polygons, level-0 px
    thumbnail: np.ndarray | None = None  # [h, w, 3] uint8
    dimensions: tuple[int, int] | None = None  # level-0 (width, height)
    mpp_xy: tuple[float, float] | None = None
    attrs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _open_slide(cohort, slide_id: str, notes: list[str]):
    from napari_slpd.slides.slide import open_slide

    try:
        record = cohort.slide(slide_id)
    except SlpdError:
        notes.append("the slide is not registered in the cohort: no tissue outlines, thumbnail or pixel size")
        return None
    try:
        return open_slide(record.path, mpp=record.mpp)
    except Exception as exc:  # noqa: BLE001 - the features still export without the slide
        notes.append(f"the slide {record.path} does not open ({exc}): no tissue outlines or thumbnail")
        return None


def _pixel_size_xy(slide, mpp: float | None) -> tuple[float, float] | None:
    """(x, y) um per level-0 px: the slide's own mpp-x / mpp-y when it states both plausibly (non-square
    pixels stay non-square), else the cohort's single value for both."""
    from napari_slpd.slides.slide import is_plausible_mpp

    if slide is not None and getattr(slide, "pixel_size", None) is not None and slide.pixel_size.source == "metadata":
        x = _float(slide.properties.get("openslide.mpp-x"))
        y = _float(slide.properties.get("openslide.mpp-y"))
        if x is not None and y is not None and is_plausible_mpp(x) and is_plausible_mpp(y):
            return (x, y)
    return None if mpp is None else (float(mpp), float(mpp))


def _level_downsample(slide, level: int, fallback: float) -> float:
    if slide is not None and 0 <= level < slide.level_count:
        return float(slide.level_downsamples[level])
    return float(fallback)


def _patches(store, slide, attrs: dict, step0: float | None) -> TileTable | None:
    """The patch table: the stored patch features, or the region token grids unrolled when the file has
    none (every cell of every region; cells an import left empty are skipped)."""
    coords_attrs = store.coords_attrs
    size0 = _float(coords_attrs.get("patch_size_level0")) or _float(attrs.get("patch_size_level0"))
    if size0 is None:
        size0 = float(store.region_size_level0) / max(int(store.grid_size), 1)
    patch_px = int(attrs.get("patch_px") or coords_attrs.get("patch_px") or coords_attrs.get("patch_size")
                   or round(size0))
    if store.features is not None:
        features = np.asarray(store.features[()], np.float32)
        coords = np.asarray(store.coords, np.int64)
        source = "features"
    else:
        G = int(store.grid_size)
        tokens = store.tokens(dtype=np.float32)  # [M, D, G, G]
        M, D = tokens.shape[:2]
        features = tokens.transpose(0, 2, 3, 1).reshape(M * G * G, D)  # region-major, row-major cells
        offsets = np.arange(G, dtype=np.float64) * size0
        oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
        local = np.stack([ox.ravel(), oy.ravel()], axis=1)
        coords = np.round(store.region_coords[:, None, :] + local[None]).astype(np.int64).reshape(-1, 2)
        present = np.abs(features).sum(axis=1) > 0  # an import's empty cells hold zeros
        features, coords = features[present], coords[present]
        source = "region_tokens"
    if features.shape[0] == 0:
        return None
    if "read_level" in attrs:  # extracted: regions read at read_level, resampled to patch_px
        level = int(attrs["read_level"])
        level_ds = _float(attrs.get("read_downsample")) or _level_downsample(slide, level, 1.0)
    else:  # imported: patches cut at patch_level
        level = int(coords_attrs.get("patch_level") or 0)
        level_ds = _level_downsample(slide, level, size0 / patch_px)
    spec = tile_spec_for(patch_px, size0, step0, _float(attrs.get("target_mpp")), level, level_ds)
    return TileTable(coords, size0, features, safe_name(attrs.get("patch_encoder") or "features"), spec,
                     feature_source=source)


def _regions(store, slide, attrs: dict) -> TileTable:
    size0 = float(store.region_size_level0)
    region_px = int(attrs.get("region_px") or round(size0))
    if "read_level" in attrs:
        level = int(attrs["read_level"])
        level_ds = _float(attrs.get("read_downsample")) or _level_downsample(slide, level, 1.0)
    else:
        level = int(store.coords_attrs.get("patch_level") or 0)
        level_ds = _level_downsample(slide, level, size0 / region_px)
    spec = tile_spec_for(region_px, size0, None, _float(attrs.get("target_mpp")), level, level_ds)
    region_encoder = str(attrs.get("region_encoder") or "regions")
    model = safe_name(region_encoder if region_encoder != "mean" else f"{attrs.get('patch_encoder') or 'features'}_mean")
    obs = {}
    coverage = store.region_coverage
    if coverage is not None:
        obs["coverage"] = np.asarray(coverage, np.float32)
    table = TileTable(np.asarray(store.region_coords, np.int64), size0, np.asarray(store.region_embeddings,
                      np.float32), model, spec, obs=obs, feature_source="region_embeddings")
    # the cohort's region_mean representation (napari_slpd.evaluation.representations), as LazySlide's
    # whole-slide aggregate: wsidata.agg_wsi(..., agg_key="agg_slide") collects it across slides
    mean = table.features.mean(axis=0, dtype=np.float64)[None].astype(np.float32)
    table.aggregates["agg_slide"] = (mean, {"encoder": "mean", "tile_key": "regions"})
    return table


def _add_prototypes(content: SlideContent, cohort, slide_id: str) -> None:
    from napari_slpd.errors import PrototypeError
    from napari_slpd.labeling.names import PrototypeAnnotations
    from napari_slpd.prototypes.cache import load_prototypes

    if not cohort.prototypes_path(slide_id).exists():
        content.notes.append("no prototypes (run `slpd prototypes` to add them)")
        return
    try:
        protos = load_prototypes(cohort, slide_id)
    except PrototypeError as exc:
        content.notes.append(f"prototypes left out: {exc}")
        return
    table = content.regions if protos.source != "features" else content.patches
    if table is None or len(table.coords) != protos.n_regions or (
            protos.coords is not None and not np.array_equal(np.asarray(protos.coords), table.coords)):
        content.notes.append(f"prototypes left out: they were computed from other {protos.source} than the "
                             "feature file holds; run `slpd prototypes` again")
        return
    try:
        styles = PrototypeAnnotations.load(cohort).class_styles(slide_id, protos)
    except SlpdError as exc:
        log.warning("%s: prototype names not used (%s)", slide_id, exc)
        from napari_slpd.labeling.palette import ClassStyle, default_color, default_name

        styles = {k: ClassStyle(default_name(k), default_color(k)) for k in range(protos.k)}
    names = [styles[k].name for k in range(protos.k)]
    colors = [styles[k].color for k in range(protos.k)]
    table.categories["prototype"] = (np.asarray(protos.assignments, np.int64), [str(k) for k in range(protos.k)],
                                     colors)
    table.categories["prototype_name"] = (np.asarray(protos.assignments, np.int64), names, colors)
    table.obs["prototype_similarity"] = np.asarray(protos.similarity, np.float32)
    key = "regions" if table is content.regions else "tiles"
    table.aggregates["agg_prototype"] = (np.asarray(protos.centroids, np.float32), {
        "encoder": "slpd-kmeans", "tile_key": key, "keys": ["prototype"],
        "values": [[k] for k in range(protos.k)], "names": names, "colors": colors,
        "sizes": np.asarray(protos.sizes, np.float64), "k_requested": int(protos.k_requested),
        "seed": int(protos.seed), "source": str(protos.source),
    })
    lm = protos.label_map()
    content.labels["prototypes"] = LabelRaster(lm.data, float(lm.scale), tuple(lm.origin), names, colors)


def _add_proalign(content: SlideContent, cohort, slide_id: str) -> None:
    from napari_slpd.prototypes.label_map import label_map
    from napari_slpd.proalign.cache import ProAlignCacheError, load_proalign

    path = cohort.proalign_path(slide_id)
    if not path.exists():
        return
    try:
        result = load_proalign(path, with_attention=False)
    except ProAlignCacheError as exc:
        content.notes.append(f"ProAlign result left out: {exc}")
        return
    names, colors = list(result.names), list(result.colors)
    size = result.patch_size_level0
    if size:
        lm = label_map(result.patch_labels.astype(np.int64), result.patch_coords, size, n_labels=result.k)
        content.labels["proalign_patches"] = LabelRaster(lm.data, float(lm.scale), tuple(lm.origin), names, colors)
        p = content.patches
        if p is not None and np.array_equal(p.coords, result.patch_coords):
            p.categories["proalign_label"] = (result.patch_labels.astype(np.int64), names, colors)
            p.obs["proalign_confidence"] = np.asarray(result.patch_confidence, np.float32)
    rsize = result.region_size_level0
    if result.region_labels is not None and result.region_coords is not None and rsize:
        lm = label_map(result.region_labels.astype(np.int64), result.region_coords, rsize, n_labels=result.k)
        content.labels["proalign_regions"] = LabelRaster(lm.data, float(lm.scale), tuple(lm.origin), names, colors)
        if np.array_equal(content.regions.coords, result.region_coords):
            content.regions.categories["proalign_label"] = (result.region_labels.astype(np.int64), names, colors)


def _tissue_polygons(slide) -> list:
    """Tissue outlines of the slide (napari-slpd's tissue detection) as shapely Polygons in level-0 px."""
    import shapely

    from napari_slpd.export.geometry import mask_to_polygons
    from napari_slpd.slides.tissue import detect_tissue

    mask = detect_tissue(slide)
    sx, sy = mask.scale_xy
    polygons = []
    for rings in mask_to_polygons(mask.mask):
        scaled = [np.asarray(r, np.float64) * np.array([sx, sy]) for r in rings]
        polygons.append(shapely.Polygon(scaled[0], scaled[1:]))
    return polygons


def gather_slide(cohort, slide_id: str, tissues: bool = True, thumbnail: bool = True) -> SlideContent:
    """Everything the cohort holds about ``slide_id``, in level-0 px (see the module docstring)."""
    from napari_slpd import __version__
    from napari_slpd.features.store import FeatureStore

    notes: list[str] = []
    with FeatureStore.open(cohort.features_path(slide_id)) as store:
        attrs = dict(store.attrs)
        slide = _open_slide(cohort, slide_id, notes)
        try:
            step0 = _float(attrs.get("lattice_step_level0"))
            patches = _patches(store, slide, attrs, step0)
            regions = _regions(store, slide, attrs)
            settings_key = store.settings_key
        except BaseException:
            if slide is not None:
                slide.close()
            raise
    content = SlideContent(slide_id, patches, regions, notes=notes)
    try:
        mpp = _float(attrs.get("mpp")) or (slide.mpp if slide is not None else None)
        content.mpp_xy = _pixel_size_xy(slide, mpp)
        if slide is not None:
            content.dimensions = tuple(int(v) for v in slide.dimensions)
            if thumbnail:
                content.thumbnail = np.asarray(slide.thumbnail(THUMBNAIL_PX), np.uint8)
            if tissues:
                content.tissues = _tissue_polygons(slide)
    finally:
        if slide is not None:
            slide.close()
    _add_prototypes(content, cohort, slide_id)
    _add_proalign(content, cohort, slide_id)
    content.attrs = {
        "slide_id": slide_id,
        "slide_path": str(attrs.get("slide_path") or ""),
        "patch_encoder": str(attrs.get("patch_encoder") or ""),
        "region_encoder": str(attrs.get("region_encoder") or ""),
        "features_settings_key": settings_key,
        "patch_features_from": patches.feature_source if patches is not None else "",
        "mpp_x": None if content.mpp_xy is None else content.mpp_xy[0],
        "mpp_y": None if content.mpp_xy is None else content.mpp_xy[1],
        "code_version": __version__,
        "notes": list(notes),
    }
    return content


__all__ = ["TileTable", "LabelRaster", "SlideContent", "gather_slide", "THUMBNAIL_PX"]
