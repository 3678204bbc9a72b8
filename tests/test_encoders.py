"""Patch encoders (HIPT ViT-256, timm, open_clip image tower) and region encoders (ViT-4K, mean)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.utils.files import sha256_file
from napari_slpd.models.checkpoints import save_dino_checkpoint
from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder
from napari_slpd.models.vit import vit4k_xs, vit256_small

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may reach the network (model hubs): any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _patches(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _normalise(batch: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# -------------------------------------------------------------------------------------------------- HIPT ViT-256


@pytest.fixture(scope="module")
def hipt_random():
    return build_patch_encoder("hipt_vit256", device="cpu", input_size=32)


def test_hipt_random_init_is_deterministic_and_recorded(hipt_random):
    assert hipt_random.model_id == "hipt_vit256 (random-init seed 0)"
    assert hipt_random.checkpoint_sha256 is None
    assert (hipt_random.name, hipt_random.dim, hipt_random.input_size) == ("hipt_vit256", 384, 32)
    assert hipt_random.mean == (0.5, 0.5, 0.5) and hipt_random.std == (0.5, 0.5, 0.5)
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    again = build_patch_encoder("hipt_vit256", device="cpu", input_size=32)
    assert torch.equal(torch.rand(1), expected_draw)  # the seeded build left the caller's RNG alone
    batch = _patches()
    a = hipt_random.encode(batch)
    assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == (2, 384)
    assert torch.equal(a, again.encode(batch))
    a += 1.0  # a normal tensor, not an inference-mode one
    other_seed = build_patch_encoder("hipt_vit256", device="cpu", input_size=32, seed=1)
    assert other_seed.model_id == "hipt_vit256 (random-init seed 1)"
    assert not torch.allclose(other_seed.encode(batch), hipt_random.encode(batch))


def test_hipt_checkpoint_features_match_the_source_model(tmp_path):
    torch.manual_seed(5)
    source = vit256_small().eval()
    path = tmp_path / "vit256_small_dino.pth"
    teacher = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    teacher["head.last_layer.weight_v"] = torch.randn(8, 4)
    torch.save({"teacher": teacher, "epoch": 1}, path)
    encoder = build_patch_encoder("hipt_vit256", checkpoint=path, device="cpu")
    sha = sha256_file(path)
    assert encoder.checkpoint_sha256 == sha
    assert encoder.model_id == f"hipt_vit256 (vit256_small_dino.pth sha256:{sha[:12]})"
    assert encoder.input_size == 256  # the model card's default
    batch = _patches(n=1, size=256)
    with torch.no_grad():
        expected = source(_normalise(batch, (0.5,) * 3, (0.5,) * 3))
    torch.testing.assert_close(encoder.encode(batch), expected, atol=1e-4, rtol=1e-4)
    assert encoder.settings()["checkpoint_sha256"] == sha


def test_normalisation_presets_and_overrides(hipt_random):
    imagenet = build_patch_encoder("hipt_vit256", device="cpu", input_size=32, mean="imagenet", std="imagenet")
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    batch = _patches()
    assert not torch.allclose(imagenet.encode(batch), hipt_random.encode(batch))
    assert imagenet.settings()["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(SlpdError, match="unknown normalisation preset"):
        build_patch_encoder("hipt_vit256", device="cpu", mean="kodak")
    with pytest.raises(SlpdError, match="one value per RGB channel"):
        build_patch_encoder("hipt_vit256", device="cpu", std=(0.5, 0.5))
    with pytest.raises(SlpdError, match="positive"):
        build_patch_encoder("hipt_vit256", device="cpu", std=(0.5, 0.0, 0.5))


def test_patches_are_resized_to_the_input_size(hipt_random):
    # a uniform patch stays the same uniform image at any size, so its features must not depend on the size
    colour = np.array([200, 120, 180], dtype=np.uint8)
    small = np.broadcast_to(colour, (1, 16, 16, 3)).copy()
    large = np.broadcast_to(colour, (1, 64, 64, 3)).copy()
    native = np.broadcast_to(colour, (1, 32, 32, 3)).copy()
    ref = hipt_random.encode(native)
    torch.testing.assert_close(hipt_random.encode(small), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hipt_random.encode(large), ref, atol=1e-4, rtol=1e-4)
    # and a textured patch: downsampling 64 -> 32 differs from encoding only the top-left 32 px
    textured = _patches(n=1, size=64)
    assert not torch.allclose(hipt_random.encode(textured), hipt_random.encode(textured[:, :32, :32]))


def test_numpy_and_torch_input_agree_and_bad_input_is_refused(hipt_random):
    batch = _patches()
    torch.testing.assert_close(hipt_random.encode(batch), hipt_random.encode(torch.from_numpy(batch)))
    assert hipt_random.encode(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 384)
    with pytest.raises(SlpdError, match="uint8"):
        hipt_random.encode(batch.astype(np.float32))
    with pytest.raises(SlpdError, match=r"\[B, H, W, 3\]"):
        hipt_random.encode(batch[0])
    with pytest.raises(SlpdError, match=r"\[B, H, W, 3\]"):
        hipt_random.encode(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(SlpdError, match="numpy array or torch tensor"):
        hipt_random.encode([[1, 2, 3]])


def test_unknown_specs_and_devices():
    with pytest.raises(SlpdError, match="unknown patch encoder 'uni'"):
        build_patch_encoder("uni")
    with pytest.raises(SlpdError, match="unknown region encoder"):
        build_region_encoder("hipt_vit256")
    with pytest.raises(SlpdError, match="timm has no model named"):
        build_patch_encoder("timm:no_such_model_xyz", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SlpdError, match="CUDA is not available"):
            build_patch_encoder("hipt_vit256", device="cuda")
    with pytest.raises(SlpdError, match="unknown device"):
        build_region_encoder("mean", device="tpu-ish")


# ---------------------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("model_name", ["test_vit", "test_resnet"])
def test_timm_encoder_loads_a_local_checkpoint(tmp_path, model_name):
    import timm

    torch.manual_seed(3)
    source = timm.create_model(model_name, pretrained=False, num_classes=5).eval()  # with a classifier
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    encoder = build_patch_encoder(f"timm:{model_name}", checkpoint=path, device="cpu")
    cfg = timm.data.resolve_model_data_config(source)
    assert encoder.input_size == cfg["input_size"][-1]
    assert encoder.mean == tuple(cfg["mean"]) and encoder.std == tuple(cfg["std"])
    assert encoder.checkpoint_sha256 == sha256_file(path)
    assert encoder.model_id.startswith(f"timm:{model_name} (pytorch_model.bin sha256:")
    batch = _patches(n=2, size=encoder.input_size)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(_normalise(batch, encoder.mean, encoder.std)),
                                       pre_logits=True)
    assert encoder.dim == expected.shape[1]
    torch.testing.assert_close(encoder.encode(batch), expected, atol=1e-4, rtol=1e-4)


def test_timm_random_init_is_deterministic_and_mismatch_is_listed(tmp_path):
    a = build_patch_encoder("timm:test_resnet", device="cpu", input_size=32)
    b = build_patch_encoder("timm:test_resnet", device="cpu", input_size=32)
    assert a.model_id == "timm:test_resnet (random-init seed 0)" and a.checkpoint_sha256 is None
    batch = _patches()
    torch.testing.assert_close(a.encode(batch), b.encode(batch))
    import timm

    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="(?s)missing keys .*unexpected keys"):
        build_patch_encoder("timm:test_resnet", checkpoint=path, device="cpu")


# ----------------------------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP saved the way open_clip checkpoints are: {"state_dict": {"module.<k>": ...}}."""
    import open_clip

    from napari_slpd.models.open_clip_loader import _register_config

    _register_config("slpd-tiny-clip-src", TINY_CLIP_CFG)
    torch.manual_seed(7)
    model = open_clip.create_model("slpd-tiny-clip-src", pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    return model, path


def test_open_clip_bundle_image_and_text_offline(tiny_clip):
    from napari_slpd.models.open_clip_loader import load_open_clip

    source, path = tiny_clip
    bundle = load_open_clip("slpd-tiny-clip", path, device="cpu", model_cfg=TINY_CLIP_CFG)
    assert (bundle.embed_dim, bundle.image_size, bundle.context_length) == (32, 32, 16)
    assert bundle.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # open_clip's default (OpenAI)
    assert bundle.checkpoint_sha256 == sha256_file(path)
    texts = ["tumor epithelium", "stroma", "lymphocytes"]
    emb = bundle.encode_text(texts)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        expected = F.normalize(source.encode_text(bundle.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-4)


def test_open_clip_patch_encoder_matches_the_image_tower(tiny_clip):
    source, path = tiny_clip
    encoder = build_patch_encoder("open_clip:slpd-tiny-clip", checkpoint=path, device="cpu",
                                  open_clip_cfg=TINY_CLIP_CFG)
    assert (encoder.dim, encoder.input_size) == (32, 32)
    assert encoder.model_id.startswith("open_clip:slpd-tiny-clip (open_clip_pytorch_model.bin sha256:")
    batch = _patches(n=3, size=32)
    with torch.no_grad():
        expected = source.encode_image(_normalise(batch, encoder.mean, encoder.std))
    torch.testing.assert_close(encoder.encode(batch), expected, atol=1e-4, rtol=1e-4)
    # a folder holding the weights under an open_clip file name works too
    again = build_patch_encoder("open_clip:slpd-tiny-clip", checkpoint=path.parent, device="cpu",
                                open_clip_cfg=TINY_CLIP_CFG)
    torch.testing.assert_close(again.encode(batch), encoder.encode(batch))


def test_open_clip_refuses_missing_weights_and_hub_sources(tmp_path, tiny_clip):
    from napari_slpd.models.open_clip_loader import load_open_clip

    with pytest.raises(CheckpointError, match="open_clip_pytorch_model.bin"):
        load_open_clip("slpd-tiny-clip", None, device="cpu", model_cfg=TINY_CLIP_CFG)
    with pytest.raises(CheckpointError, match=r"does not exist\. Nothing is downloaded"):
        load_open_clip("slpd-tiny-clip", tmp_path / "conch.bin", device="cpu", model_cfg=TINY_CLIP_CFG)
    with pytest.raises(CheckpointError, match="no open_clip weights in folder"):
        load_open_clip("slpd-tiny-clip", tmp_path, device="cpu", model_cfg=TINY_CLIP_CFG)
    with pytest.raises(SlpdError, match="HuggingFace hub"):
        load_open_clip("hf-hub:someone/some-clip", tmp_path, device="cpu")
    hf_tok = {**TINY_CLIP_CFG, "text_cfg": {**TINY_CLIP_CFG["text_cfg"], "hf_tokenizer_name": "bert-base-uncased"}}
    with pytest.raises(SlpdError, match="tokenizer_dir"):
        load_open_clip("slpd-tiny-hf-tok", tiny_clip[1], device="cpu", model_cfg=hf_tok)
    # the image tower alone does not need the tokenizer
    bundle = load_open_clip("slpd-tiny-hf-tok", tiny_clip[1], device="cpu", model_cfg=hf_tok, with_tokenizer=False)
    assert bundle.tokenizer is None
    with pytest.raises(SlpdError, match="no model config named"):
        load_open_clip("not-a-clip", tiny_clip[1], device="cpu")
    wrong = {**TINY_CLIP_CFG, "embed_dim": 48}
    with pytest.raises(CheckpointError, match=r"shape mismatches .*text_projection"):
        load_open_clip("slpd-tiny-clip-48", tiny_clip[1], device="cpu", model_cfg=wrong)


# ----------------------------------------------------------------------------------------------- region encoders


def test_mean_region_encoder():
    enc = build_region_encoder("mean", device="cpu", in_dim=8)
    tokens = np.random.default_rng(0).normal(size=(3, 8, 4, 4)).astype(np.float16)
    out = enc.encode(tokens)
    assert out.dtype == torch.float32 and out.shape == (3, 8)
    torch.testing.assert_close(out, torch.from_numpy(tokens).float().mean(dim=(2, 3)))
    assert (enc.dim, enc.model_id, enc.checkpoint_sha256) == (8, "mean", None)
    with pytest.raises(SlpdError, match=r"\[B, 8, G, G\]"):
        enc.encode(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(SlpdError, match="has no weights"):
        build_region_encoder("mean", checkpoint="x.pth")


def test_vit4k_random_init_is_deterministic_for_any_grid():
    a = build_region_encoder("hipt_vit4k", device="cpu")
    b = build_region_encoder("hipt_vit4k", device="cpu")
    assert a.model_id == "hipt_vit4k (random-init seed 0)" and a.checkpoint_sha256 is None
    assert (a.in_dim, a.dim) == (384, 192)
    for grid in (8, 16):
        tokens = torch.randn(2, 384, grid, grid)
        out = a.encode(tokens)
        assert out.shape == (2, 192)
        assert torch.equal(out, b.encode(tokens))
    assert a.encode(torch.zeros(0, 384, 16, 16)).shape == (0, 192)


@pytest.mark.parametrize("layout", ["official", "src_training"])
def test_vit4k_checkpoints_load(tmp_path, layout):
    torch.manual_seed(11)
    source = vit4k_xs().eval()
    path = tmp_path / "region.pth"
    if layout == "official":
        teacher = {f"module.backbone.{k}": v for k, v in source.state_dict().items()}
        teacher["module.head.mlp.0.weight"] = torch.randn(16, 192)
        torch.save({"teacher": teacher, "student": teacher, "epoch": 99}, path)
    else:
        save_dino_checkpoint(source, path, extra={"epoch": 3}, head=torch.nn.Linear(192, 4))
    enc = build_region_encoder("hipt_vit4k", checkpoint=path, device="cpu")
    assert enc.checkpoint_sha256 == sha256_file(path)
    assert enc.model_id == f"hipt_vit4k (region.pth sha256:{enc.checkpoint_sha256[:12]})"
    tokens = torch.randn(2, 384, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(tokens), source(tokens))


def test_vit4k_in_dim_must_match_the_checkpoint(tmp_path):
    path = tmp_path / "uni_region.pth"
    save_dino_checkpoint(vit4k_xs(input_embed_dim=32), path)
    enc = build_region_encoder("hipt_vit4k", checkpoint=path, device="cpu", in_dim=32)
    assert enc.encode(torch.randn(1, 32, 6, 6)).shape == (1, 192)
    with pytest.raises(CheckpointError, match=r"phi.0.weight: checkpoint \(192, 32\) vs model \(192, 384\)"):
        build_region_encoder("hipt_vit4k", checkpoint=path, device="cpu")


@pytest.mark.cuda
def test_cuda_matches_cpu_within_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    batch = _patches(n=4, size=64)
    cpu = build_patch_encoder("hipt_vit256", device="cpu", input_size=64).encode(batch)
    gpu_enc = build_patch_encoder("hipt_vit256", device="cuda", input_size=64)
    gpu = gpu_enc.encode(batch)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    assert F.cosine_similarity(cpu, gpu).min() > 0.99
    tokens = torch.randn(2, 384, 16, 16)
    r_cpu = build_region_encoder("hipt_vit4k", device="cpu").encode(tokens)
    r_gpu = build_region_encoder("hipt_vit4k", device="cuda").encode(tokens)
    assert F.cosine_similarity(r_cpu, r_gpu).min() > 0.99
