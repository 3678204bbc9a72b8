"""A foundation-model preset through the whole path: `slpd extract` on a real slide with a checkpoint in its
published layout, the ViT-4K on its 1024-wide token grids, and an SLPD fine-tune on UNI-shaped features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import real_slide
from napari_slpd.models.presets import PRESETS


@pytest.fixture
def uni_checkpoint(tmp_path, monkeypatch):
    """UNI as published (pytorch_model.bin of timm's ViT-L/16 with layer scale), cut to 2 blocks."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, depth=2,
                                  init_values=1e-5, img_size=224, dynamic_img_size=True)
        with torch.no_grad():
            for block in model.blocks:
                block.ls1.gamma.normal_(0.0, 0.3)
                block.ls2.gamma.normal_(0.0, 0.3)
    path = tmp_path / "UNI" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    preset = PRESETS["uni_v1"]
    monkeypatch.setitem(PRESETS, "uni_v1", dataclasses.replace(preset, arch_kwargs={**preset.arch_kwargs,
                                                                                     "depth": 2}))
    return path


def test_slpd_extract_with_uni_on_a_real_slide(tmp_path, uni_checkpoint, capsys):
    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.engine import sequential_extract
    from napari_slpd.features.store import FeatureStore
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.slide import open_slide
    from napari_slpd.slides.tissue import detect_tissue

    out = tmp_path / "cohort"
    code = main(["extract", str(real_slide("cmu_svs")), "--out", str(out), "--encoder", "uni_v1",
                 "--checkpoint", str(uni_checkpoint.parent), "--region-px", "448", "--patch-px", "224",
                 "--target-mpp", "2.0", "--token-dtype", "float32", "--device", "cpu", "--workers", "1",
                 "--threads", "1", "--quiet"])
    assert code == 0, capsys.readouterr()
    cohort = Cohort(out, create=False)
    (slide_id,) = cohort.slide_ids()
    patch = build_patch_encoder("uni_v1", checkpoint=uni_checkpoint, device="cpu")
    region = build_region_encoder("hipt_vit4k", device="cpu", in_dim=1024)
    with open_slide(real_slide("cmu_svs")) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), GridConfig(448, 224, 2.0, 0.25))
        ref_tokens, ref_emb = sequential_extract(slide, grid, patch, region)
    with FeatureStore.open(cohort.features_path(slide_id), expect_token_dim=1024) as store:
        assert store.region_tokens.shape == (len(grid), 1024, 2, 2)
        np.testing.assert_allclose(store.tokens(), ref_tokens, atol=1e-4 * np.abs(ref_tokens).max())
        np.testing.assert_allclose(store.region_embeddings, ref_emb, atol=1e-4, rtol=1e-4)
        assert store.attrs["patch_encoder"].startswith("uni_v1 (pytorch_model.bin sha256:")
    # the grid is cut at the preset's magnification when --target-mpp is not given
    from napari_slpd.cli.extract import extraction_config
    from napari_slpd.cli import build_parser

    args = build_parser().parse_args(["extract", "x.svs", "--out", str(out), "--encoder", "uni_v1"])
    assert extraction_config(args).grid.target_mpp == PRESETS["uni_v1"].mpp == 0.5


def test_slpd_fine_tune_on_uni_shaped_token_grids(tmp_path):
    """SLPD's ViT-4K and trainer take patch features of any width: 1024 (UNI) here, 4 x 4 grids."""
    from src_training.config import preset
    from src_training.data import TokenGridIndex
    from src_training.events import read_events
    from napari_slpd.samples.token_cohort import write_synthetic_cohort
    from src_training.trainer import Trainer

    cohort = write_synthetic_cohort(tmp_path / "cohort", regions_per_slide=(8, 8, 8), token_dim=1024, grid=4,
                                    n_types=2, types_per_slide=1, seed=2)
    index = TokenGridIndex.from_cohort(cohort)
    assert index.token_dim == 1024
    cfg = preset("tiny").override({
        "views.global_crop": 3, "views.local_crop": 2, "views.n_local": 2, "views.scale_to_grid": False,
        "head.out_dim": 128, "head.hidden_dim": 64, "head.bottleneck_dim": 32, "optim.batch_size_per_gpu": 8,
        "optim.epochs": 2, "cluster.warm_epoch": 0, "cluster.min_num_region": 4, "run.threads": 1})
    result = Trainer(cfg, index, tmp_path / "run", events=tmp_path / "run" / "events.jsonl", resume="none").fit()
    assert result.status == "done"
    steps = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "step"]
    assert steps and all(np.isfinite(e["loss"]) for e in steps)
    assert any(e["intra_loss"] > 0 for e in steps)  # the prototype losses ran on the wide features
