"""CONCH v1 (both towers, tokenizer) and CONCH v1.5 from random-weight checkpoints in their published layouts.

The reference is an independent construction written here from CONCH's published code (github.com/mahmoodlab/
CONCH, conch/open_clip_custom: coca_model.py, vision_tower.py, transformer.py, custom_tokenizer.py) and TRIDENT's
conchv1_5.py: plain tensor algebra on the raw state dict (explicit patch embedding, per-head softmax attention,
layer norms, CoCa's class-token mask), with no module of napari_slpd, timm or nn.MultiheadAttention, and the
tokenizer through transformers' PreTrainedTokenizerFast as CONCH's ``tokenize`` does. When CONCH's own package
is installed, its CoCa is compared too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import real_slide

from napari_slpd.cli import main
from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.testing.vlm_checkpoints import (extract_tiny_cohort, write_conch_tokenizer, write_conch_v1,
                                                 write_conch_v15)

TEXTS = ["Lung adenocarcinoma, acinar pattern", "stroma", "Éosinophils and NECROSIS; débris!", "tumour " * 200]


# -- independent reference --------------------------------------------------------------------------------
def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _attend(q, k, v, heads, mask=None):
    b, lq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask[:, None]
    return (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(b, lq, d)


def _vit(x, sd, p, heads, ls=False):
    """timm ViT forward_features from raw weights (class token, abs. positions, pre-norm blocks, final norm)."""
    x = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[p + "pos_embed"]
    i = 0
    while f"{p}blocks.{i}.norm1.weight" in sd:
        b = f"{p}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        a = F.linear(_attend(q, k, v, heads), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + (a * sd[b + "ls1.gamma"] if ls else a)
        h = _ln(x, sd, b + "norm2", 1e-6)
        m = F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + (m * sd[b + "ls2.gamma"] if ls else m)
        i += 1
    return _ln(x, sd, p + "norm", 1e-6)


def conch_v1_image(sd, x, project):
    tokens = _vit(x, sd, "visual.trunk.", 12)
    p = "visual.attn_pool_contrast."
    kv = _ln(tokens, sd, p + "ln_k", 1e-5)
    q = _ln(sd[p + "query"], sd, p + "ln_q", 1e-5)[None].expand(x.shape[0], -1, -1)
    bq, bk, bv = sd[p + "attn.in_proj_bias"].chunk(3)
    out = _attend(F.linear(q, sd[p + "attn.q_proj_weight"], bq), F.linear(kv, sd[p + "attn.k_proj_weight"], bk),
                  F.linear(kv, sd[p + "attn.v_proj_weight"], bv), 8)
    pooled = _ln(F.linear(out, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])[:, 0], sd,
                 "visual.ln_contrast", 1e-5)
    return pooled @ sd["visual.proj_contrast"] if project else pooled


def conch_v1_text(sd, tokens):
    text = tokens[:, :-1]
    b, n = text.shape
    x = torch.cat([sd["text.token_embedding.weight"][text], sd["text.cls_emb"].expand(b, 1, -1)], 1)
    x = x + sd["text.positional_embedding"][: n + 1]
    mask = torch.full((b, n + 1, n + 1), float("-inf"))
    for r in range(n + 1):
        mask[:, r, : r + 1] = 0.0
    mask[:, n, :] = float("-inf")  # the class token: column 0, and column j where token j-1 is not padding
    mask[:, n, 0] = 0.0
    mask[:, n, 1:] = torch.where(text != 0, 0.0, float("-inf"))
    i = 0
    while f"text.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"text.transformer.resblocks.{i}."
        h = _ln(x, sd, p + "ln_1", 1e-5)
        q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        x = x + F.linear(_attend(q, k, v, 12, mask), sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = _ln(x, sd, p + "ln_2", 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return _ln(x[:, -1], sd, "text.ln_final", 1e-5) @ sd["text.text_projection"]


def conch_tokenize(tokenizer_file, texts):
    """CONCH's custom_tokenizer.tokenize through transformers (max_length 127, padding, then one more <pad>)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token="<start_of_text>",
                                               eos_token="<end_of_text>", pad_token="<pad>")
    ids = tok(list(texts), max_length=127, add_special_tokens=True, return_token_type_ids=False, truncation=True,
              padding="max_length", return_tensors="pt")["input_ids"]
    return F.pad(ids, (0, 1), value=tok.pad_token_id)


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conch(tmp_path_factory):
    pytest.importorskip("tokenizers")
    return write_conch_v1(tmp_path_factory.mktemp("conch"), seed=0)


@pytest.fixture(scope="module")
def state(conch):
    return torch.load(conch.weights, weights_only=True)


@pytest.fixture(scope="module")
def vlm(conch):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    return VisionLanguageModel.load("conch_v1", conch.folder, device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(5))


# -- CONCH v1 ----------------------------------------------------------------------------------------------
def test_conch_tokenizer_matches_conch_tokenize(conch):
    from napari_slpd.models.conch import ConchTokenizer

    tok_file = conch.folder / "conch_byte_level_bpe_uncased.json"
    ours = ConchTokenizer(tok_file)(TEXTS)
    ref = conch_tokenize(tok_file, TEXTS)
    assert ours.shape == (4, 128) and torch.equal(ours, ref)
    assert ours[0, 0] == 1 and (ours[:, -1] == 0).all() and (ours[3, :127] != 0).all()  # truncated, no pad


def test_conch_v1_text_and_image_equal_the_reference(vlm, state, conch, images):
    assert vlm.spec == "conch_v1" and vlm.embed_dim == 512 and vlm.image_size == 448
    assert vlm.model_id.startswith("conch_v1 (pytorch_model.bin sha256:")
    with torch.no_grad():
        tokens = conch_tokenize(conch.folder / "conch_byte_level_bpe_uncased.json", TEXTS)
        ref_text = F.normalize(conch_v1_text(state, tokens), dim=-1)
        assert torch.allclose(vlm.encode_text(TEXTS), ref_text, atol=1e-5)
        pooled = conch_v1_image(state, images, project=False)
        joint = conch_v1_image(state, images, project=True)
    enc = vlm.patch_encoder()
    assert enc.dim == 512 and enc.card.mean[0] == pytest.approx(0.48145466) and enc.card.interpolation == "bicubic"
    with torch.inference_mode():
        feats = enc.module(images)
        assert torch.allclose(feats, pooled, atol=1e-5)              # TRIDENT's conch_v1 features
        assert torch.allclose(vlm.joint_features(feats)[:], joint, atol=1e-5)
    assert (joint - pooled).abs().max() > 1e-2                       # the projection is not the identity


def test_conch_v1_preset_builder_gives_tridents_features(conch, state, vlm, images):
    from napari_slpd.models.conch import CONCH_PRESETS, build_conch_v1_image
    from napari_slpd.models.vlm_presets import import_builder, preset_patch_encoder

    preset = {p["name"]: p for p in CONCH_PRESETS}["conch_v1"]
    assert import_builder(preset["builder"]) is build_conch_v1_image
    enc = preset_patch_encoder("conch_v1", conch.folder, device="cpu")
    assert enc.dim == preset["dim"] == 512 and enc.input_size == preset["input_size"] == 448
    assert enc.model_id == vlm.model_id  # what slpd extract records is what proalign checks
    with torch.inference_mode():
        assert torch.allclose(enc.module(images), conch_v1_image(state, images, project=False), atol=1e-5)


def test_conch_v1_matches_conchs_own_code_when_installed(conch, state, vlm, images):
    pytest.importorskip("conch.open_clip_custom")
    import json
    from importlib.resources import files

    from conch.open_clip_custom import CoCa

    cfg = json.loads(files("conch.open_clip_custom").joinpath("model_configs/conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text", None)
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = cfg["multimodal_cfg"]["layers"] = 1
    model = CoCa(**cfg).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        tokens = conch_tokenize(conch.folder / "conch_byte_level_bpe_uncased.json", TEXTS)
        ref_text = F.normalize(model.encode_text(tokens, normalize=False), dim=-1)
        ref_image = model.encode_image(images, proj_contrast=False, normalize=False)
    assert torch.allclose(vlm.encode_text(TEXTS), ref_text, atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(vlm.patch_encoder().module(images), ref_image, atol=1e-5)


def test_missing_and_wrong_tokenizer_say_which_file(conch, tmp_path):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    (tmp_path / "pytorch_model.bin").symlink_to(conch.weights)
    with pytest.raises(CheckpointError, match="conch_byte_level_bpe_uncased.json.*github.com/mahmoodlab/CONCH"):
        VisionLanguageModel.load("conch_v1", tmp_path, device="cpu")
    write_conch_tokenizer(tmp_path / "tokenizer.json", vocab_size=30000)
    with pytest.raises(CheckpointError, match="not CONCH's tokenizer"):
        VisionLanguageModel.load("conch_v1", tmp_path, device="cpu")
    # the tokenizer may also be given on its own
    other = VisionLanguageModel.load("conch_v1", tmp_path / "pytorch_model.bin", device="cpu",
                                     tokenizer=conch.folder / "conch_byte_level_bpe_uncased.json")
    assert other.embed_dim == 512


def test_conch_checkpoint_given_to_another_loader_names_the_preset(conch):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    with pytest.raises(CheckpointError, match=r"CONCH v1 CoCa checkpoint.*use --vlm conch_v1"):
        VisionLanguageModel.load("ViT-B-16", conch.weights, device="cpu")
    with pytest.raises(SlpdError, match="needs the model folder with config.json.*use --vlm conch_v1"):
        VisionLanguageModel.load("plip", conch.folder, device="cpu")


def test_proalign_runs_on_conch_v1_features(conch, vlm, tmp_path, capsys):
    from napari_slpd.proalign import load_descriptions, load_proalign

    cohort = extract_tiny_cohort(tmp_path / "cohort", real_slide("cmu_svs"), vlm.patch_encoder())
    assert main(["proalign", str(cohort.root), "--vlm", "conch_v1", "--checkpoint", str(conch.folder),
                 "--descriptions", "lung", "--device", "cpu"]) == 0
    assert "1 written" in capsys.readouterr().out
    assert main(["proalign", str(cohort.root), "--vlm", "quiltnet", "--checkpoint", str(conch.folder),
                 "--descriptions", "lung", "--device", "cpu"]) == 2
    assert "use --vlm conch_v1" in capsys.readouterr().err
    res = load_proalign(cohort.proalign_path(cohort.slide_ids()[0]))
    k = len(load_descriptions("lung"))
    assert res.slide_embedding.shape == (k * 512,) and res.attrs["vlm"] == vlm.model_id
    # patch labels are the zero-shot labels of the projected cached features
    from napari_slpd.features.store import FeatureStore
    from napari_slpd.proalign import text_prototypes, zero_shot_labels

    with FeatureStore.open(cohort.features_path(cohort.slide_ids()[0])) as store:
        joint = vlm.joint_features(np.asarray(store.features[()]))[:]
    labels, _, _ = zero_shot_labels(joint.numpy(), text_prototypes(load_descriptions("lung"), vlm), device="cpu")
    assert np.array_equal(labels, res.patch_labels)


# -- CONCH v1.5 --------------------------------------------------------------------------------------------
def conch_v15_reference(sd, x):
    """TRIDENT's CONCHVisionTower at 448 px: stored position embedding onto 14 x 14 (bilinear, when stored for
    another grid), then bicubic with scale factor 28.1 / 14 as its forward pass; ViT-L with layer scale; one-query
    pooler (q / kv / out projections, 8 heads); ln_contrast."""
    pos = sd["trunk.pos_embed"]
    if pos.shape[1] != 197:
        g = int(math.sqrt(pos.shape[1] - 1))
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(14, 14), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 196, -1)], 1)
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic")
    sd = {**sd, "trunk.pos_embed": torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 784, -1)], 1)}
    tokens = _vit(x, sd, "trunk.", 16, ls=True)
    p = "attn_pool_contrast."
    q = F.linear(_ln(sd[p + "query"], sd, p + "ln_q", 1e-5), sd[p + "to_q.weight"])[None].expand(x.shape[0], -1, -1)
    k, v = F.linear(_ln(tokens, sd, p + "ln_k", 1e-5), sd[p + "to_kv.weight"]).chunk(2, -1)
    out = F.linear(_attend(q, k, v, 8), sd[p + "to_out.weight"])[:, 0]
    return _ln(out, sd, "ln_contrast", 1e-5)


@pytest.mark.parametrize("pos_tokens", [197, 785])
def test_conch_v15_equals_the_reference(tmp_path, pos_tokens, conch):
    from napari_slpd.models.vlm_presets import preset_patch_encoder

    written = write_conch_v15(tmp_path, seed=2, layers=1, pos_tokens=pos_tokens)
    sd = torch.load(written.weights, weights_only=True)
    x = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    enc = preset_patch_encoder("conch_v15", written.folder, device="cpu")
    assert enc.dim == 768 and enc.card.mean == (0.485, 0.456, 0.406) and enc.card.interpolation == "bilinear"
    with torch.inference_mode():
        ours = enc.module(x)
    with torch.no_grad():
        assert torch.allclose(ours, conch_v15_reference(sd, x), atol=1e-5)
    if pos_tokens == 197:
        with pytest.raises(CheckpointError, match="use --vlm conch_v1"):
            preset_patch_encoder("conch_v15", conch.weights, device="cpu")
