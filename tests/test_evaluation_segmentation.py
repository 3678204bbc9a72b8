"""Segmentation evaluation (issue 25): QuPath GeoJSON read with holes and multipolygons, figures equal
scikit-learn's f1 / jaccard / accuracy on the same units, a perfect labelling scores 1 and a shuffled one
chance, prototypes mapped to classes on training folds recover classes that follow the prototypes, the
sample cohort's ground truth round-trips through GeoJSON, and ``slpd evaluate --annotations`` reports it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_slpd.evaluation.errors import LabelsError
from napari_slpd.evaluation.segmentation import annotations as A
from napari_slpd.evaluation.segmentation.engine import (
    SegmentationConfig,
    block_majority,
    evaluate_segmentation,
    match_names,
    paint,
)
from napari_slpd.evaluation.segmentation.report import error_map
from napari_slpd.evaluation.segmentation.scores import confusion, figures, pooled_with_ci


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_geojson_holes_and_multipolygons_are_honoured(tmp_path):
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [_square(0, 0, 80, 80), _square(20, 20, 60, 60)],     # a square with a square hole
             [_square(100, 0, 140, 40)]]}},                       # and a second, separate square
        {"type": "Feature", "properties": {"classification": "Stroma"},   # class given as text
         "geometry": {"type": "Polygon", "coordinates": [_square(30, 30, 50, 50)]}},  # inside the hole
        {"type": "Feature", "properties": {"objectType": "detection"},    # no class: ignored
         "geometry": {"type": "Polygon", "coordinates": [_square(0, 100, 40, 140)]}},
    ]}
    path = tmp_path / "S1.geojson"
    path.write_text(json.dumps(collection))
    shapes = A.read_geojson(path)
    assert [s.name for s in shapes] == ["Tumor", "Stroma"] and len(shapes[0].polygons) == 2
    raster, names = A.rasterize(shapes, (160, 160), downsample=10)
    assert names == ["Tumor", "Stroma"]
    expected = np.full((16, 16), -1)
    expected[0:8, 0:8] = 0
    expected[2:6, 2:6] = -1   # the hole
    expected[3:5, 3:5] = 1    # stroma inside the hole
    expected[0:4, 10:14] = 0  # the second polygon of the MultiPolygon
    np.testing.assert_array_equal(raster, expected)
    # classes named in a given order, matched case- and separator-insensitively
    raster2, names2 = A.rasterize(shapes, (160, 160), 10, class_names=["stroma", "tumor"])
    assert names2 == ["stroma", "tumor"] and (raster2 == np.where(expected == 0, 1, np.where(expected == 1, 0, -1))).all()


def test_raster_to_geojson_round_trip_keeps_holes(tmp_path):
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=(3, 40, 50)), 3)
    classes = field.argmax(0).astype(np.int16)
    classes[gaussian_filter(rng.normal(size=(40, 50)), 4) > 0.05] = -1  # unannotated patches make holes
    classes[18:22, 20:30] = -1
    shapes = A.raster_to_shapes(classes, ["a", "b", "c"], scale=8.0)
    assert any(len(polygon) > 1 for s in shapes for polygon in s.polygons)  # some polygons have holes
    path = tmp_path / "r.geojson"
    path.write_text(json.dumps(A.shapes_to_geojson(shapes)))
    back, names = A.rasterize(A.read_geojson(path), (400, 320), downsample=8.0, class_names=["a", "b", "c"])
    np.testing.assert_array_equal(back, classes)


def test_bad_annotation_files(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(LabelsError, match="not readable GeoJSON"):
        A.read_geojson(bad)
    bad.write_text(json.dumps({"type": "Feature", "properties": {"classification": {"name": "x"}},
                               "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}))
    with pytest.raises(LabelsError, match="at least 3"):
        A.read_geojson(bad)
    table = tmp_path / "classes.csv"
    table.write_text("id,label\n1,a\n")
    with pytest.raises(LabelsError, match="value,name"):
        A.read_class_table(table)


def test_figures_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, jaccard_score

    rng = np.random.default_rng(1)
    for n_classes in (2, 4):
        truth = rng.integers(-1, n_classes, 500)
        pred = np.where(rng.random(500) < 0.6, truth, rng.integers(-1, n_classes, 500))
        got = figures(confusion(truth, pred, n_classes))
        keep = truth >= 0
        t, p = truth[keep], np.where(pred[keep] < 0, n_classes, pred[keep])  # no prediction: its own label
        labels = list(range(n_classes))
        np.testing.assert_allclose(got["dice"], f1_score(t, p, labels=labels, average=None), atol=1e-12)
        np.testing.assert_allclose(got["iou"], jaccard_score(t, p, labels=labels, average=None), atol=1e-12)
        assert got["mean_dice"] == pytest.approx(f1_score(t, p, labels=labels, average="macro"), abs=1e-12)
        assert got["mean_iou"] == pytest.approx(jaccard_score(t, p, labels=labels, average="macro"), abs=1e-12)
        assert got["pixel_accuracy"] == pytest.approx(accuracy_score(t, p), abs=1e-12)
        assert got["n_units"] == keep.sum()


def test_perfect_labelling_scores_one_and_shuffled_is_chance():
    rng = np.random.default_rng(2)
    coords = np.stack(np.meshgrid(np.arange(12) * 64, np.arange(10) * 64), -1).reshape(-1, 2)
    labels = rng.integers(0, 4, len(coords))
    shape = (10 * 64 // 4, 12 * 64 // 4)
    truth_raster = paint(coords, 64, labels, shape, 4)
    for size in (64, 16):  # region and patch units
        units = np.stack(np.meshgrid(np.arange(0, 768, size), np.arange(0, 640, size)), -1).reshape(-1, 2)
        truth = block_majority(truth_raster, units, size, 4)
        perfect = block_majority(paint(coords, 64, labels, shape, 4), units, size, 4)
        f = figures(confusion(truth, perfect, 4))
        assert f["mean_dice"] == 1.0 and f["mean_iou"] == 1.0 and f["pixel_accuracy"] == 1.0
    chance = []
    for seed in range(20):
        shuffled = np.random.default_rng(seed).permutation(labels)
        pred = block_majority(paint(coords, 64, shuffled, shape, 4), coords, 64, 4)
        chance.append(figures(confusion(labels, pred, 4))["pixel_accuracy"])
    expected = (np.bincount(labels, minlength=4) / labels.size) @ (np.bincount(labels, minlength=4) / labels.size)
    assert abs(np.mean(chance) - expected) < 0.05


def test_pooled_ci_resamples_cases_and_error_map():
    cms = [confusion(np.array([0, 1, 1]), np.array([0, 1, 0]), 2), confusion(np.array([0, 0]), np.array([0, 0]), 2)]
    out = pooled_with_ci(cms, ["P1", "P1"], n_bootstrap=50, seed=0)  # one case: every resample is the same
    assert out["figures"]["pixel_accuracy"] == pytest.approx(4 / 5)
    assert out["ci"]["pixel_accuracy"] == pytest.approx((0.8, 0.8))
    e = error_map(np.array([0, 1, 1, -1, 0]), np.array([0, 0, -1, 1, 1]))
    assert e.tolist() == [1, 2, 3, 0, 2]
    e1 = error_map(np.array([0, 1, 1, -1, 0]), np.array([0, 0, -1, 1, 1]), cls=1)
    assert e1.tolist() == [0, 3, 3, 0, 2]  # FN, FN, -, FP
    assert match_names(["Tumour", "LYMPHOCYTES", "other"], ["tumour", "lymphocytes"], {}).tolist() == [0, 1, -1]
    assert match_names(["cancer"], ["tumour"], {"cancer": "tumour"}).tolist() == [0]


@pytest.fixture(scope="module")
def annotated_cohort(tmp_path_factory):
    """A synthetic embedding cohort whose annotated class of each region follows its prototype's tissue
    (the prototypes of all slides grouped into 3 classes by k-means), written as QuPath GeoJSON."""
    from sklearn.cluster import KMeans

    from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort
    from napari_slpd.prototypes.cache import load_prototypes

    root = tmp_path_factory.mktemp("seg")
    cohort, labels = write_embedding_cohort(root / "cohort", SyntheticCohortSpec(
        n_slides=12, n_classes=2, n_tissue_types=3, regions=(24, 32), k=3, noise=0.2, seed=3))
    protos = {s: load_prototypes(cohort, s, check_stale=False) for s in cohort.slide_ids()}
    allc = np.concatenate([p.centroids for p in protos.values()])
    allc = allc / np.linalg.norm(allc, axis=1, keepdims=True)
    km = KMeans(3, n_init=10, random_state=0).fit(allc)
    names = ["tumour", "stroma", "necrosis"]
    follow, shuffled = root / "follow", root / "shuffled"
    follow.mkdir()
    shuffled.mkdir()
    rng = np.random.default_rng(0)
    for s, p in protos.items():
        c = p.centroids / np.linalg.norm(p.centroids, axis=1, keepdims=True)
        region_class = km.predict(c)[p.assignments]
        for folder, cls in ((follow, region_class), (shuffled, rng.integers(0, 3, region_class.size))):
            raster = paint(p.coords, p.tile_size_level0, cls, (int(p.coords[:, 1].max() + 256) // 8,
                                                               int(p.coords[:, 0].max() + 256) // 8), 8.0)
            shapes = A.raster_to_shapes(raster, names, scale=8.0)
            (folder / f"{s}.geojson").write_text(json.dumps(A.shapes_to_geojson(shapes)))
    cohort.segmentation_groups = {s: km.predict(p.centroids / np.linalg.norm(p.centroids, axis=1, keepdims=True))
                                  for s, p in protos.items()}  # the class index of each prototype
    return cohort, labels, follow, shuffled


def test_prototypes_mapped_on_training_folds(annotated_cohort):
    cohort, _, follow, shuffled = annotated_cohort
    good = evaluate_segmentation(cohort, follow, SegmentationConfig(methods=["prototypes"], n_bootstrap=50))
    assert sorted(good.classes) == ["necrosis", "stroma", "tumour"]
    pooled = good.pooled["prototypes"]
    assert pooled["region"]["figures"]["mean_dice"] == pytest.approx(1.0), pooled["region"]["figures"]  # follows
    assert pooled["region"]["ci"]["mean_dice"][0] <= pooled["region"]["figures"]["mean_dice"] <= \
        pooled["region"]["ci"]["mean_dice"][1]
    assert pooled["patch"]["figures"]["n_units"] == 4 * pooled["region"]["figures"]["n_units"]  # 2 x 2 patches
    bad = evaluate_segmentation(cohort, shuffled, SegmentationConfig(methods=["prototypes"], n_bootstrap=50))
    assert abs(bad.pooled["prototypes"]["region"]["figures"]["pixel_accuracy"] - 1 / 3) < 0.12
    # the pooled figure equals scikit-learn on all scored units of all slides
    from sklearn.metrics import f1_score

    t, p = [], []
    for s, truth in good.truths.items():
        t.append(truth.truth["region"])
        p.append(block_majority(good.predictions[s]["prototypes"], *truth.units["region"], truth.downsample))
    t, p = np.concatenate(t), np.concatenate(p)
    keep = t >= 0
    dice = f1_score(t[keep], np.where(p[keep] < 0, 3, p[keep]), labels=[0, 1, 2], average=None)
    np.testing.assert_allclose(pooled["region"]["figures"]["dice"], dice, atol=1e-12)


def test_cli_annotations(annotated_cohort, tmp_path, capsys):
    from napari_slpd.cli import main

    cohort, labels, follow, _ = annotated_cohort
    out = tmp_path / "report"
    assert main(["evaluate", str(cohort.root), "--annotations", str(follow), "--bootstrap", "20",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "prototypes @ region: mean Dice" in text and "Dice per class" in text
    assert "proalign: 12 annotated slide(s) without ProAlign labels" in text
    assert (out / "segmentation.json").exists() and (out / "plots" / "segmentation_overlay_prototypes.png").exists()
    assert "Segmentation" in (out / "report.html").read_text()
    both = tmp_path / "both"  # with --labels: one report holds the slide-level and the segmentation figures
    assert main(["evaluate", str(cohort.root), "--labels", str(labels), "--task", "class", "--repr", "region_mean",
                 "--protocol", "knn", "--annotations", str(follow), "--bootstrap", "20", "--out", str(both),
                 "--quiet", "--no-plots"]) == 0
    assert (both / "results.json").exists() and (both / "segmentation.json").exists()
    assert "Segmentation" in (both / "report.html").read_text() and "mean Dice" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", str(cohort.root), "--annotations", str(follow), "--seg-method", "nope"])
    assert main(["evaluate", str(cohort.root), "--annotations", str(tmp_path / "missing")]) == 2


def test_proalign_labels_and_named_prototypes(annotated_cohort, tmp_path):
    """ProAlign zero-shot labels matched by name or a mapping file, and names given to prototypes, score 1
    where they follow the annotation; an unmatched ProAlign class is reported. (Runs last: it adds
    ProAlign files and prototype names to the shared cohort.)"""
    from napari_slpd.labeling.names import PrototypeAnnotations
    from napari_slpd.prototypes.cache import load_prototypes
    from napari_slpd.proalign.cache import ProAlignResult, write_proalign

    cohort, _, follow, _ = annotated_cohort
    names = ["tumour", "stroma", "necrosis"]
    proalign_names = ["Tumor cells", "STROMA", "necrosis", "adipose"]
    named = PrototypeAnnotations.load(cohort)
    for s, groups in cohort.segmentation_groups.items():
        p = load_prototypes(cohort, s, check_stale=False)
        for k, g in enumerate(groups):
            named.set_label(s, k, name=names[g].upper(), save=False)
        step = p.tile_size_level0 / 2
        offsets = np.array([(0, 0), (step, 0), (0, step), (step, step)])
        patch_coords = (p.coords[:, None, :] + offsets[None]).reshape(-1, 2).astype(np.int64)
        patch_labels = np.repeat(groups[p.assignments], 4).astype(np.int32)
        n, d = patch_labels.size, 4
        write_proalign(cohort.proalign_path(s), ProAlignResult(
            s, proalign_names, ["#ff0000", "#00ff00", "#0000ff", "#ffff00"], np.zeros(16, np.float32),
            np.zeros(d, np.float32), np.zeros((4, d), np.float32), np.zeros((4, d), np.float32),
            np.zeros((4, d), np.float32), patch_coords, patch_labels, np.ones(n, np.float32), np.ones(n, np.float32),
            attrs={"patch_size_level0": step, "region_size_level0": p.tile_size_level0}))
    named.save()
    result = evaluate_segmentation(cohort, follow, SegmentationConfig(methods=["proalign", "named_prototypes"],
                                                                     n_bootstrap=20))
    # "Tumor cells" matches no class without a mapping: those units count as missed
    assert any("Tumor cells" in n for n in result.notes)
    assert result.pooled["proalign"]["region"]["figures"]["mean_dice"] < 1.0
    assert result.pooled["named_prototypes"]["patch"]["figures"]["mean_dice"] == pytest.approx(1.0)
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("name,class\ntumor cells,tumour\n")
    mapped = evaluate_segmentation(cohort, follow, SegmentationConfig(methods=["proalign"], mapping=str(mapping),
                                                                     n_bootstrap=20))
    for res in ("region", "patch"):
        assert mapped.pooled["proalign"][res]["figures"]["mean_dice"] == pytest.approx(1.0)


def test_label_mask_with_class_table(tmp_path):
    from PIL import Image

    mask = np.zeros((20, 30), np.uint8)  # 0 = not annotated (not in the table)
    mask[2:10, 3:15] = 7
    mask[12:18, 5:25] = 3
    Image.fromarray(mask).save(tmp_path / "S1.png")
    (tmp_path / "classes.csv").write_text("value,name\n3,Stroma\n7,Tumour\n")
    table = A.class_table_of(tmp_path)
    assert table == {3: "Stroma", 7: "Tumour"} and A.find_annotation(tmp_path, "S1") == tmp_path / "S1.png"
    # the mask covers the whole slide (300 x 200 level-0 px); raster at 10 px: one mask px per raster px
    raster, names = A.read_mask(tmp_path / "S1.png", table, (300, 200), 10.0, class_names=["tumour"])
    assert names == ["tumour", "Stroma"]
    np.testing.assert_array_equal(raster, np.select([mask == 7, mask == 3], [0, 1], -1))
    half, _ = A.read_mask(tmp_path / "S1.png", table, (300, 200), 20.0)  # coarser: the mask px at each centre
    np.testing.assert_array_equal(half, np.select([mask == 3, mask == 7], [0, 1], -1)[1::2, 1::2])
