"""``slpd evaluate`` and ``slpd sample-cohort`` on small inputs."""

from __future__ import annotations

import json

import numpy as np

from napari_slpd.cli import main
from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort


def test_evaluate_list_and_json(tmp_path, capsys):
    cohort, labels = write_embedding_cohort(tmp_path / "c", SyntheticCohortSpec(n_slides=16, n_classes=2,
                                                                                separation=3.0, noise=0.2))
    assert main(["evaluate", str(cohort.root), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "region_mean" in listing and "not computed" in listing and "slpd proalign" in listing
    out = tmp_path / "report"
    code = main(["evaluate", str(cohort.root), "--labels", str(labels), "--task", "class", "--repr", "region_mean",
                 "--protocol", "knn", "--protocol", "linear", "--folds", "4", "--bootstrap", "20", "--json",
                 "--out", str(out), "--no-plots"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert {r["protocol"] for r in payload["results"]} == {"knn", "linear"}
    assert (out / "results.json").exists() and (out / "report.html").exists()


def test_evaluate_bad_labels_exit_2(tmp_path, capsys):
    cohort, _ = write_embedding_cohort(tmp_path / "c", SyntheticCohortSpec(n_slides=8, n_classes=2), prototypes=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,class\nslide_00000,a\nnope,b\n")
    assert main(["evaluate", str(cohort.root), "--labels", str(bad), "--require-known"]) == 2
    assert "not in the cohort: nope" in capsys.readouterr().err
    # by default the unknown slide is skipped; the one left has one class, which cannot be evaluated
    assert main(["evaluate", str(cohort.root), "--labels", str(bad)]) == 2
    assert "has one class only ('a')" in capsys.readouterr().err


def test_sample_cohort_plan_and_labels(tmp_path):
    from napari_slpd.samples.sample_cohort import SampleCohortSpec, plan_sample_cohort, write_sample_cohort

    plans = plan_sample_cohort(SampleCohortSpec(n_slides=12, n_classes=3, seed=1))
    assert len(plans) == 12 and len({p["class"] for p in plans}) == 3
    cases = {}
    for p in plans:  # slides of a case share class and subtype
        cases.setdefault(p["case_id"], set()).add((p["class"], p["subtype"]))
    assert all(len(v) == 1 for v in cases.values()) and len(cases) < 12
    cohort = write_sample_cohort(tmp_path / "s", SampleCohortSpec(n_slides=4, n_classes=2, width=512, height=512))
    assert len(list((tmp_path / "s").glob("*.svs"))) == 4
    assert cohort.labels.read_text().splitlines()[0] == "slide_id,case_id,class,subtype,time,event"
    # The painted tissue is written as QuPath GeoJSON; rasterised back it is the design's class map.
    from napari_slpd.evaluation.segmentation.annotations import rasterize, read_geojson
    from napari_slpd.samples.sample_cohort import TISSUES
    from napari_slpd.samples.synthetic import design_slide

    plan = plan_sample_cohort(SampleCohortSpec(n_slides=4, n_classes=2, width=512, height=512))[0]
    design = design_slide(512, 512, plan["seed"], 0.5, plan["composition"])
    raster, names = rasterize(read_geojson(cohort.annotations / f"{plan['slide_id']}.geojson"), (512, 512),
                              design.class_px, class_names=list(TISSUES))
    assert names == list(TISSUES)
    np.testing.assert_array_equal(raster, design.classes.astype(np.int16) - 1)
