"""``slpd prototypes`` and ``slpd similar``: tables, JSON, exit codes, and end to end on the real slides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.cli import main
from napari_slpd.cohort import Cohort
from test_prototypes import clustered_embeddings, file_digest, make_cohort, write_feature_file


@pytest.fixture
def cohort(tmp_path):
    rng = np.random.default_rng(0)
    base = clustered_embeddings(rng, n_per=(10, 8, 6, 6), dim=16)[0]
    slides = {
        "alpha": base,
        "alpha-recut": base + 0.02 * rng.standard_normal(base.shape).astype(np.float32),  # same tissue
        "beta": clustered_embeddings(rng, n_per=(12, 9, 9), dim=16)[0],
        "gamma": clustered_embeddings(rng, n_per=(15, 15), dim=16)[0],
        "tiny": base[:3],
    }
    return make_cohort(tmp_path / "cohort", slides)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prototypes_then_similar_table_and_json(cohort, capsys):
    code, out, _ = run_cli(capsys, "prototypes", str(cohort.root), "-k", "4", "--quiet")
    assert code == 0
    assert "5 slides (5 computed); K = 4 from region_embeddings" in out
    assert "K capped from 4 to 3: the slide has only 3 regions" in out
    assert "cohort index: 5 slides, 19 prototypes (exact)" in out
    assert all(cohort.prototypes_path(s).exists() for s in cohort.slide_ids())

    code, out, _ = run_cli(capsys, "similar", str(cohort.root), "alpha", "-n", "3")
    assert code == 0
    lines = out.splitlines()
    assert "slides most similar to alpha (4 prototypes of region_embeddings; 5 slides indexed" in lines[0]
    assert lines[1].split()[:4] == ["rank", "slide", "distance", "S"]
    first = lines[2].split()
    assert first[:2] == ["1", "alpha-recut"] and float(first[2]) < 0.01
    assert "0->0 (1.00)" in lines[2] or "->" in lines[2]

    code, out, _ = run_cli(capsys, "similar", str(cohort.root), "alpha", "-n", "10", "--json")
    data = json.loads(out)
    assert data["query"] == "alpha" and data["k"] == 4 and data["method"] == "exact"
    ranked = data["results"]
    assert [r["slide_id"] for r in ranked][0] == "alpha-recut" and len(ranked) == 4
    assert [r["distance"] for r in ranked] == sorted(r["distance"] for r in ranked)
    assert all(r["distance"] == pytest.approx(max(4, r["n_prototypes"]) - r["similarity"], abs=1e-5) for r in ranked)
    assert sorted(p["query"] for p in ranked[0]["pairs"]) == [0, 1, 2, 3]
    exact = json.loads(run_cli(capsys, "similar", str(cohort.root), "alpha", "--json", "--exact")[1])
    assert [r["slide_id"] for r in exact["results"]] == [r["slide_id"] for r in ranked]

    # A second run reuses everything; JSON output carries the per-slide report.
    code, out, _ = run_cli(capsys, "prototypes", str(cohort.root), "-k", "4", "--json")
    data = json.loads(out)
    assert code == 0 and {s["status"] for s in data["slides"]} == {"current"} and data["index"]["slides"] == 5


def test_region_retrieval_from_the_command_line(cohort, capsys):
    code, out, _ = run_cli(capsys, "similar", str(cohort.root), "alpha", "--region", "2", "-n", "3",
                           "--other-slides", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["results"]) == 3
    # "tiny" holds copies of alpha's first regions; "alpha-recut" a slightly noisy copy of every region.
    assert [(h["slide_id"], h["region_index"]) for h in data["results"][:2]] == [("tiny", 2), ("alpha-recut", 2)]
    assert data["results"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    code, out, _ = run_cli(capsys, "similar", str(cohort.root), "alpha", "--region", "2", "-n", "2")
    assert code == 0 and "regions most similar to region 2 of alpha" in out and "level-0 x, y" in out


def test_bad_input_gives_clear_messages_and_keeps_the_cache(tmp_path, cohort, capsys):
    code, _, err = run_cli(capsys, "prototypes", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err
    empty = Cohort(tmp_path / "empty")
    (empty.root / "cohort.json").write_text('{"slides": {}}')
    code, _, err = run_cli(capsys, "prototypes", str(empty.root))
    assert code == 2 and "has no slides" in err
    code, _, err = run_cli(capsys, "similar", str(cohort.root), "alpha")
    assert code == 2 and "no prototypes yet" in err and "slpd prototypes" in err

    assert run_cli(capsys, "prototypes", str(cohort.root), "-k", "3", "--quiet")[0] == 0
    digest = file_digest(cohort.prototypes_path("beta"))
    bad = np.random.default_rng(1).standard_normal((20, 16)).astype(np.float32)
    bad[3] = np.nan
    write_feature_file(cohort.features_path("beta"), bad, settings_key="re-extracted")
    code, out, _ = run_cli(capsys, "prototypes", str(cohort.root), "-k", "3", "--quiet")
    assert code == 1 and "failed" in out and "NaN" in out
    assert file_digest(cohort.prototypes_path("beta")) == digest  # the old prototypes are kept
    code, _, err = run_cli(capsys, "similar", str(cohort.root), "beta")
    assert code == 2 and "out of date" in err  # and they are known to be stale
    code, _, err = run_cli(capsys, "similar", str(cohort.root), "nope")
    assert code == 2 and "not in cohort" in err

    write_feature_file(cohort.features_path("gamma"), np.random.default_rng(2).standard_normal((20, 32)),
                       settings_key="other-encoder")
    code, out, err = run_cli(capsys, "prototypes", str(cohort.root), "-k", "3", "--quiet")
    assert code == 2 and "different sizes" in out + err and "32-d: 1 slide(s) (gamma)" in err


def test_end_to_end_on_the_real_slides(tmp_path, slides_dir, capsys):
    pytest.importorskip("napari_slpd.features.engine", reason="the features module (extraction) is not there yet")
    slides = [real_slide("cmu_svs"), real_slide("tcga_jp2k_svs"), real_slide("breast_tiff"),
              slides_dir / "dicom-cmu-1-small-region-napari-wsi"]
    root = tmp_path / "cohort"
    # Small, few regions (1 to 12 per slide) and a 32-px ViT-256: the pipeline, not the model, is tested.
    code, out, _ = run_cli(capsys, "extract", *map(str, slides), "--out", str(root), "--region-px", "512",
                           "--patch-px", "128", "--target-mpp", "1.0", "--input-size", "32", "--device", "cpu",
                           "--workers", "1", "--mpp-fallback", "level0", "--quiet")
    assert code == 0, out
    cohort = Cohort(root)
    ids = cohort.slide_ids()
    assert len(ids) == 4

    code, out, _ = run_cli(capsys, "prototypes", str(root), "-k", "4", "--quiet", "--json")
    report = json.loads(out)
    assert code == 0 and [s["status"] for s in report["slides"]] == ["computed"] * 4
    assert report["index"]["slides"] == 4
    capped = [s for s in report["slides"] if s["n_regions"] < 4]
    assert capped and all(s["k"] == s["n_regions"] and "capped" in s["message"] for s in capped)

    from napari_slpd.features.store import FeatureStore
    from napari_slpd.prototypes import load_prototypes

    for slide_id in ids:
        protos = load_prototypes(cohort, slide_id)
        with FeatureStore.open(cohort.features_path(slide_id)) as store:
            assert np.array_equal(protos.coords, store.region_coords)
            lm = protos.label_map()
            # Every region's top-left pixel is labelled with that region's prototype.
            for i, (x, y) in enumerate(store.region_coords):
                assert lm.tile_at(x + 0.5, y + 0.5) == i and lm.label_at(x, y) == protos.assignments[i]
        code, out, _ = run_cli(capsys, "similar", str(root), slide_id, "-n", "3", "--json")
        ranked = json.loads(out)["results"]
        assert code == 0 and len(ranked) == 3 and slide_id not in [r["slide_id"] for r in ranked]
        assert [r["distance"] for r in ranked] == sorted(r["distance"] for r in ranked)
    # The SVS and the DICOM export of the same scan are each other's nearest slide.
    top = json.loads(run_cli(capsys, "similar", str(root), "cmu_small_region", "--json")[1])["results"][0]
    assert top["slide_id"] == "dicom-cmu-1-small-region-napari-wsi" and top["distance"] < 0.05
    code, out, _ = run_cli(capsys, "prototypes", str(root), "-k", "4", "--source", "features", "--quiet",
                           "--no-index", "--json")
    assert code == 0 and {s["status"] for s in json.loads(out)["slides"]} == {"computed"}
    patches = load_prototypes(cohort, "cmu_small_region", source="features")
    with FeatureStore.open(cohort.features_path("cmu_small_region")) as store:
        assert np.array_equal(patches.coords, store.coords) and patches.n_regions == 4 * 16
        region_map = protos_map(cohort, store)
    patch_map = patches.label_map()
    assert patch_map.scale == pytest.approx(region_map.scale / 4) and patch_map.shape == (8, 8)
    for i, (x, y) in enumerate(patches.coords):
        assert patch_map.tile_at(x + 0.5, y + 0.5) == i


def protos_map(cohort, store):
    from napari_slpd.prototypes import label_map

    return label_map(np.zeros(store.n_regions, np.int64), store.region_coords, store.region_size_level0)
