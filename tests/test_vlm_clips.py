"""PLIP (transformers CLIPModel folder), QuiltNet and BiomedCLIP (open_clip hub folders) from random-weight
checkpoints in their published layouts, loaded through the `--vlm` path and compared with the reference library
called directly (transformers / open_clip); a ProAlign run on a one-slide cohort with each."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import real_slide

from napari_slpd.cli import main
from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.testing.vlm_checkpoints import (bert_config, biomedclip_model_cfg, extract_tiny_cohort,
                                                 write_biomedclip, write_plip, write_quiltnet)

TEXTS = ["lung adenocarcinoma with acinar glands", "stroma", "necrosis, immune cells - alveolar tissue"]
IMAGES = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))


def _load(preset, folder, **kw):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    return VisionLanguageModel.load(preset, folder, device="cpu", **kw)


def _image_module_matches(vlm, ref_image):
    with torch.inference_mode():
        ours = vlm.patch_encoder().module(IMAGES)
    assert ours.shape == (2, 512) and torch.allclose(ours, ref_image, atol=1e-5)


def _proalign_run(vlm, folder, tmp_path, capsys, preset):
    from napari_slpd.proalign import load_proalign

    cohort = extract_tiny_cohort(tmp_path / "cohort", real_slide("cmu_svs"), vlm.patch_encoder())
    assert main(["proalign", str(cohort.root), "--vlm", preset, "--checkpoint", str(folder), "--descriptions",
                 "lung", "--device", "cpu"]) == 0
    assert "1 written" in capsys.readouterr().out
    res = load_proalign(cohort.proalign_path(cohort.slide_ids()[0]))
    assert res.slide_embedding_mean.shape == (512,) and res.attrs["vlm"] == vlm.model_id
    return cohort


def _features(out):
    """transformers 4 returns a tensor, 5 a model output whose pooler_output is projected."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# -- PLIP --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plip(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_plip(tmp_path_factory.mktemp("plip"), seed=0)


def test_plip_equals_transformers_clip(plip, tmp_path, capsys):
    from transformers import AutoTokenizer, CLIPModel

    from napari_slpd.models.vlm_presets import preset_patch_encoder

    vlm = _load("plip", plip.folder)
    assert vlm.spec == "plip" and vlm.embed_dim == 512 and vlm.image_size == 224
    ref = CLIPModel.from_pretrained(str(plip.folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(plip.folder), local_files_only=True)
    with torch.no_grad():
        ref_text = _features(ref.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt")))
        ref_image = _features(ref.get_image_features(pixel_values=IMAGES))
    assert torch.allclose(vlm.encode_text(TEXTS), F.normalize(ref_text, dim=-1), atol=1e-5)
    _image_module_matches(vlm, ref_image)
    enc = preset_patch_encoder("plip", plip.folder, device="cpu")
    assert enc.model_id == vlm.model_id and enc.dim == 512
    with torch.inference_mode():
        assert torch.allclose(enc.module(IMAGES), ref_image, atol=1e-5)
    _proalign_run(vlm, plip.folder, tmp_path, capsys, "plip")


def test_plip_folder_without_tokenizer_or_config_says_what_is_missing(plip, tmp_path):
    (tmp_path / "config.json").write_text((plip.folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").symlink_to(plip.weights)
    with pytest.raises(CheckpointError, match="no CLIP tokenizer files.*vocab.json"):
        _load("plip", tmp_path)
    with pytest.raises(CheckpointError, match="needs the model folder with open_clip_config.json.*use --vlm plip"):
        _load("quiltnet", plip.folder)


# -- QuiltNet ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quilt(tmp_path_factory):
    return write_quiltnet(tmp_path_factory.mktemp("quilt"), seed=0)


def test_quiltnet_equals_open_clip(quilt, tmp_path, capsys):
    import open_clip

    vlm = _load("quiltnet", quilt.folder)
    assert vlm.spec == "quiltnet" and vlm.embed_dim == 512
    ref = open_clip.create_model(f"local-dir:{quilt.folder}").eval()
    tok = open_clip.get_tokenizer(f"local-dir:{quilt.folder}")
    with torch.no_grad():
        ref_text = ref.encode_text(tok(TEXTS), normalize=True)
        ref_image = ref.encode_image(IMAGES)
    assert torch.allclose(vlm.encode_text(TEXTS), ref_text, atol=1e-5)
    _image_module_matches(vlm, ref_image)
    from napari_slpd.models.pathology_clip import build_quiltnet_image

    with torch.inference_mode():
        assert torch.allclose(build_quiltnet_image(quilt.weights)(IMAGES), ref_image, atol=1e-5)
    _proalign_run(vlm, quilt.folder, tmp_path, capsys, "quiltnet")


# -- BiomedCLIP --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def biomed(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_biomedclip(tmp_path_factory.mktemp("biomed"), seed=0, text_layers=2)


def _biomedclip_reference(biomed, tmp_path):
    """open_clip called directly with BiomedCLIP's config, the text tower's config.json in a local folder."""
    import open_clip

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(bert_config(2)))
    (tmp_path / "ref-biomedclip.json").write_text(json.dumps(biomedclip_model_cfg(str(bert))))
    open_clip.add_model_config(tmp_path / "ref-biomedclip.json")
    model = open_clip.create_model("ref-biomedclip", pretrained=str(biomed.weights)).eval()
    return model, open_clip.get_tokenizer(f"local-dir:{biomed.folder}")


@pytest.fixture(scope="module")
def biomed_vlm(biomed):
    return _load("biomedclip", biomed.folder)   # BERT config read from the weights' shapes


def test_biomedclip_equals_open_clip_without_the_hub(biomed, biomed_vlm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vlm = biomed_vlm
    assert vlm.spec == "biomedclip" and vlm.embed_dim == 512
    ref, tok = _biomedclip_reference(biomed, tmp_path)
    with torch.no_grad():
        ref_text = ref.encode_text(tok(TEXTS), normalize=True)
        ref_image = ref.encode_image(IMAGES)
    assert tok(TEXTS).shape == (3, 256)
    assert torch.allclose(vlm.encode_text(TEXTS), ref_text, atol=1e-5)
    _image_module_matches(vlm, ref_image)


@pytest.mark.slow  # a full-depth ViT-B/16 (BiomedCLIP's timm tower cannot be made shallower) over a slide
def test_proalign_runs_on_biomedclip_features(biomed_vlm, tmp_path):
    from napari_slpd.proalign import load_descriptions, load_proalign, run_proalign

    cohort = extract_tiny_cohort(tmp_path / "cohort", real_slide("cmu_svs"), biomed_vlm.patch_encoder())
    outcomes = run_proalign(cohort, biomed_vlm, load_descriptions("lung"))
    assert [o.status for o in outcomes] == ["written"]
    assert load_proalign(outcomes[0].path).slide_embedding_mean.shape == (512,)


def test_biomedclip_layout_errors(biomed, tmp_path):
    with pytest.raises(CheckpointError, match="use --vlm biomedclip"):
        _load("quiltnet", biomed.folder)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        (bare / name).symlink_to(biomed.folder / name)
    with pytest.raises(SlpdError, match="vocab.txt and tokenizer_config.json"):
        _load("biomedclip", bare)
