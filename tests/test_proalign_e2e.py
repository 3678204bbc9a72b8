"""End to end on real slides with small settings: extract patch features with a (tiny, random) open_clip
image tower, then `slpd proalign` writes slide embeddings and named label maps into the cohort cache."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import real_slide

from napari_slpd.cli import main
from napari_slpd.cohort import Cohort
from napari_slpd.proalign import load_descriptions, load_proalign, text_prototypes, zero_shot_labels
from napari_slpd.proalign.cache import load_cohort_embeddings
from napari_slpd.testing.tiny_clip import write_tiny_clip

SLIDES = {"cmu_svs": None, "breast_tiff": 0.5}  # name -> user mpp (the breast TIFF's own is bogus)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("vlm"), seed=0)


@pytest.fixture(scope="module")
def cohort(tiny, tmp_path_factory):
    from napari_slpd.features.engine import ExtractionConfig, extract_slide
    from napari_slpd.slides.grid import GridConfig
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    paths = {name: real_slide(name) for name in SLIDES}
    cohort = Cohort(tmp_path_factory.mktemp("cohort"))
    patch_enc = build_patch_encoder(f"open_clip:{tiny.model_name}", tiny.checkpoint, device="cpu",
                                    open_clip_cfg=tiny.model_cfg)
    region_enc = build_region_encoder("mean", device="cpu", in_dim=patch_enc.dim)
    for name, path in paths.items():
        record = cohort.add_slide(path, mpp=SLIDES[name])
        config = ExtractionConfig(grid=GridConfig(region_px=512, patch_px=128, target_mpp=0.5, min_tissue=0.25),
                                  batch_size=64, num_workers=1, regions_per_chunk=8, device="cpu",
                                  mpp=SLIDES[name], token_dtype="float32")
        result = extract_slide(path, cohort.features_path(record.slide_id), patch_enc, region_enc, config)
        assert result.status == "extracted" and result.n_regions > 0, result.message
    return cohort


def _proalign(cohort, tiny, *extra):
    return main(["proalign", str(cohort.root), "--vlm", tiny.model_name, "--checkpoint", str(tiny.checkpoint),
                 "--model-config", str(tiny.config_path), "--descriptions", "lung", "--chunk-size", "100",
                 "--device", "cpu", *extra])


def test_proalign_cli_writes_embeddings_and_named_label_maps(cohort, tiny, capsys):
    from napari_slpd.features.store import FeatureStore
    from napari_slpd.proalign.vlm import VisionLanguageModel

    assert _proalign(cohort, tiny) == 0
    out = capsys.readouterr().out
    assert "2 written" in out
    lung = load_descriptions("lung")
    k, d = len(lung), tiny.embed_dim
    vlm = VisionLanguageModel.load(tiny.model_name, tiny.checkpoint, device="cpu", model_cfg=tiny.model_cfg)
    tp = text_prototypes(lung, vlm)
    for slide_id in cohort.slide_ids():
        res = load_proalign(cohort.proalign_path(slide_id))
        with FeatureStore.open(cohort.features_path(slide_id)) as store:
            feats = np.asarray(store.features[()])
            n, m = feats.shape[0], store.n_regions
            assert np.array_equal(res.region_coords, store.region_coords)
        assert res.names == lung.names and res.colors == lung.colors
        assert res.slide_embedding.shape == (k * d,) and res.slide_embedding_mean.shape == (d,)
        assert res.visual_prototypes.shape == (k, d) and res.text_prototypes.shape == (k, d)
        assert np.allclose(res.slide_embedding.reshape(k, d).mean(axis=0), res.slide_embedding_mean, atol=1e-6)
        assert res.patch_labels.shape == (n,) and res.patch_coords.shape == (n, 2)
        assert ((res.patch_confidence > 0) & (res.patch_confidence <= 1)).all()
        assert np.allclose(res.patch_attention.astype(np.float64).sum(axis=0), 1.0, atol=1e-4)
        # the cached labels are the zero-shot labels of the cached features
        labels, conf, _ = zero_shot_labels(feats, tp, device="cpu")
        assert np.array_equal(labels, res.patch_labels) and np.allclose(conf, res.patch_confidence, atol=1e-5)
        # every region got a name from its patches (region-major layout of the feature file)
        assert res.region_labels.shape == (m,) and (res.region_labels >= 0).all()
        assert set(res.region_label_names()) <= set(lung.names)
        assert (res.patch_region == np.repeat(np.arange(m), n // m)).all()
        assert res.attrs["organ"] == "lung" and res.attrs["vlm"] == vlm.model_id and res.attrs["tau"] == 0.05
        # usable by GeoJSON export: one feature per label present, named and coloured
        geo = res.region_geojson()
        named = {f["properties"]["classification"]["name"] for f in geo["features"]}
        assert named == set(res.region_label_names())
    ids, emb = load_cohort_embeddings(cohort)
    assert ids == cohort.slide_ids() and emb.shape == (2, k * d)


def test_rerun_skips_up_to_date_results_and_overwrite_recomputes(cohort, tiny, capsys):
    assert _proalign(cohort, tiny) == 0
    capsys.readouterr()
    assert _proalign(cohort, tiny) == 0
    assert "2 skipped" in capsys.readouterr().out
    slide_id = cohort.slide_ids()[0]
    before = cohort.proalign_path(slide_id).stat().st_mtime_ns
    assert _proalign(cohort, tiny, "--overwrite", "--slides", slide_id) == 0
    assert "1 written" in capsys.readouterr().out
    assert cohort.proalign_path(slide_id).stat().st_mtime_ns != before


def test_other_descriptions_are_a_new_setting(cohort, tiny, capsys):
    assert main(["proalign", str(cohort.root), "--vlm", tiny.model_name, "--checkpoint", str(tiny.checkpoint),
                 "--descriptions", "colorectal", "--device", "cpu"]) == 0
    assert "2 written" in capsys.readouterr().out
    res = load_proalign(cohort.proalign_path(cohort.slide_ids()[0]))
    assert res.names == load_descriptions("colorectal").names


def test_features_from_another_checkpoint_are_refused(cohort, tiny, tmp_path, capsys):
    other = write_tiny_clip(tmp_path, seed=1)  # same architecture and name, other weights
    def snapshot():
        return {s: p.read_bytes() if (p := cohort.proalign_path(s)).exists() else None for s in cohort.slide_ids()}

    before = snapshot()
    assert main(["proalign", str(cohort.root), "--vlm", other.model_name, "--checkpoint", str(other.checkpoint),
                 "--descriptions", "lung", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "another checkpoint" in err and f"--encoder open_clip:{tiny.model_name} --checkpoint" in err
    assert snapshot() == before


def test_missing_checkpoint_and_unknown_descriptions(cohort, tiny, tmp_path, capsys):
    assert main(["proalign", str(cohort.root), "--vlm", tiny.model_name, "--checkpoint", str(tmp_path / "x.pt"),
                 "--descriptions", "lung"]) == 2
    assert "Nothing is downloaded" in capsys.readouterr().err
    assert _proalign(cohort, tiny, "--slides", "nope") == 2
    assert "not in cohort" in capsys.readouterr().err
    assert main(["proalign", str(cohort.root), "--vlm", tiny.model_name, "--checkpoint", str(tiny.checkpoint),
                 "--descriptions", "pancreas"]) == 2
    assert "no prototype descriptions named 'pancreas'" in capsys.readouterr().err
