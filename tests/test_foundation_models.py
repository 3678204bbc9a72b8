"""The published pathology foundation models, each from a checkpoint written in its publisher's layout.

For every preset, a model is built the way its model card builds it (timm / transformers called directly,
with the card's arguments), given random non-trivial weights, saved in the published layout and loaded by
name the way `slpd extract` loads it; its features must equal the reference library's on the same patches
(ToTensor + the card's Normalize), and have the published dimension. The giants are built with 2 blocks:
every width, token and MLP feature is kept, only depth is cut (the preset's depth is patched to match).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_slpd.errors import CheckpointError, SlpdError
from napari_slpd.models import presets as preset_module
from napari_slpd.models.encoders import build_patch_encoder
from napari_slpd.models.presets import PRESETS

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DEPTH = 2


def _swiglu():
    import timm

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


# name -> (timm architecture, the model card's create_model kwargs, normalisation, pooling, dim, layout)
TIMM_CARDS = {
    "uni_v1": ("vit_large_patch16_224", lambda: dict(img_size=224, patch_size=16, init_values=1e-5,
                                                     dynamic_img_size=True), IMAGENET, "model", 1024, "bin"),
    "uni_v2": ("vit_giant_patch14_224", lambda: dict(img_size=224, patch_size=14, num_heads=24, init_values=1e-5,
                                                     embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True,
                                                     reg_tokens=8, dynamic_img_size=True, **_swiglu()),
               IMAGENET, "model", 1536, "bin"),
    "virchow": ("vit_huge_patch14_224", lambda: dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375,
                                                     global_pool="", dynamic_img_size=True, **_swiglu()),
                IMAGENET, "cls+mean", 2560, "timm_folder_bin"),
    "virchow2": ("vit_huge_patch14_224", lambda: dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375,
                                                      global_pool="", reg_tokens=4, dynamic_img_size=True,
                                                      **_swiglu()),
                 IMAGENET, "cls+mean", 2560, "timm_folder_bin"),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", lambda: dict(img_size=224, global_pool="token", init_values=1e-5,
                                                                dynamic_img_size=True), HOPTIMUS, "model", 1536, "bin"),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", lambda: dict(img_size=224, global_pool="token", init_values=1e-5,
                                                                dynamic_img_size=True), HOPTIMUS, "model", 1536, "bin"),
    "h0_mini": ("vit_base_patch14_reg4_dinov2", lambda: dict(img_size=224, init_values=1e-5, dynamic_img_size=True,
                                                             **_swiglu()), HOPTIMUS, "cls", 768, "timm_folder"),
    "gigapath": ("vit_giant_patch14_dinov2", lambda: dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                          num_heads=24, mlp_ratio=5.33334, dynamic_img_size=True),
                 IMAGENET, "model", 1536, "bin"),
    "lunit_vits8": ("vit_small_patch8_224", lambda: dict(img_size=224), LUNIT, "model", 384, "timm_folder"),
    "kaiko_vits16": ("vit_small_patch16_224", lambda: dict(img_size=224), HALF, "model", 384, "timm_folder"),
    "kaiko_vitb8": ("vit_base_patch8_224", lambda: dict(img_size=224), HALF, "model", 768, "timm_folder"),
    "kaiko_vitl14": ("vit_large_patch14_reg4_dinov2", lambda: dict(img_size=518, dynamic_img_size=True), HALF,
                     "model", 1024, "timm_folder"),
}


def _patches(n=3, size=224, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, size // 8, size // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)  # some structure, not only noise


def _to_tensor_normalised(patches: np.ndarray, norm) -> torch.Tensor:
    """torchvision's ToTensor + Normalize, as the model cards write their transforms."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*norm)])
    return torch.stack([tf(p) for p in patches])


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random non-trivial weights: layer scales and norms too (1e-5 layer scale would hide every block)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or name.endswith(("gamma", "lambda1")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "weight" in name or
                                                                      "gamma" in name else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


@pytest.fixture
def reduced_depth(monkeypatch):
    """Give a preset 2 blocks (its widths and tokens unchanged) for the time of one test."""

    def apply(name: str) -> None:
        preset = PRESETS[name]
        if preset.family in ("timm",):
            kwargs = {**preset.arch_kwargs, "depth": DEPTH}
            monkeypatch.setitem(PRESETS, name, dataclasses.replace(preset, arch_kwargs=kwargs))
    return apply


def _timm_config(arch: str, kwargs: dict, norm) -> dict:
    plain = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))}
    return {"architecture": arch, "num_classes": 0, "model_args": plain,
            "pretrained_cfg": {"input_size": [3, 224, 224], "mean": list(norm[0]), "std": list(norm[1]),
                               "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0}}


def _write_timm_layout(model, arch: str, kwargs: dict, norm, layout: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return folder / "pytorch_model.bin"
    (folder / "config.json").write_text(json.dumps(_timm_config(arch, kwargs, norm)))
    if layout == "timm_folder_bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def _pool(reference: torch.nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "model":
        return reference(x)
    tokens = reference.forward_features(x)
    if pooling == "cls":
        return tokens[:, 0]
    return torch.cat([tokens[:, 0], tokens[:, reference.num_prefix_tokens:].mean(1)], dim=-1)


@pytest.mark.parametrize("name", sorted(TIMM_CARDS))
def test_timm_presets_equal_the_model_card(tmp_path, name, reduced_depth):
    import timm

    arch, card_kwargs, norm, pooling, dim, layout = TIMM_CARDS[name]
    kwargs = card_kwargs()
    with torch.device("meta"):  # every weight is drawn by _perturb: timm's own initialisation would be wasted
        reference = timm.create_model(arch, pretrained=False, num_classes=0, depth=DEPTH, weight_init="skip",
                                      **kwargs)
    reference = _perturb(reference.to_empty(device="cpu"))
    path = _write_timm_layout(reference, arch, {**kwargs, "depth": DEPTH}, norm, layout, tmp_path / name)
    reduced_depth(name)

    encoder = build_patch_encoder(name, checkpoint=path, device="cpu")
    patches = _patches()
    with torch.inference_mode():
        expected = _pool(reference, _to_tensor_normalised(patches, norm), pooling)
    got = encoder.encode(patches)
    assert got.shape == (3, dim) == tuple(expected.shape) and encoder.dim == PRESETS[name].dim == dim
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * max(scale, 1.0), name
    assert encoder.card.mean == pytest.approx(norm[0]) and encoder.card.std == pytest.approx(norm[1])
    assert encoder.model_id.startswith(f"{name} (") and encoder.checkpoint_sha256


class _CTransPathStem(torch.nn.Module):
    """CTransPath's convolutional stem as its paper's code defines it (the test's own reference)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **_):
        super().__init__()
        size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.img_size, self.patch_size = size, (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.proj = torch.nn.Sequential(
            torch.nn.Conv2d(3, 12, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(12), torch.nn.ReLU(),
            torch.nn.Conv2d(12, 24, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
            torch.nn.Conv2d(24, embed_dim, 1))
        self.norm = norm_layer(embed_dim) if norm_layer else torch.nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _to_2022_swin_layout(state: dict) -> dict:
    """timm's current Swin names -> the 2022 layout CTransPath checkpoints were saved in (downsample at the
    end of a stage, relative position indices and attention masks stored)."""
    import re

    out = {}
    for key, value in state.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key] = value
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return out


def test_ctranspath_in_its_published_layout(tmp_path):
    import timm

    with torch.random.fork_rng():
        reference = _perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                                               embed_layer=_CTransPathStem))
        for module in reference.modules():  # non-trivial running statistics in the stem's batch norms
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "CHIEF_CTransPath.pth"
    torch.save({"model": _to_2022_swin_layout(reference.state_dict())}, path)
    encoder = build_patch_encoder("ctranspath", checkpoint=path, device="cpu")
    patches = _patches()
    with torch.inference_mode():
        expected = reference(_to_tensor_normalised(patches, IMAGENET))
    got = encoder.encode(patches)
    assert got.shape == (3, 768)
    assert float((got - expected).abs().max()) <= 1e-5 * max(float(expected.abs().max()), 1.0)


# ------------------------------------------------------------------------------------------- transformers

TRANSFORMERS_CARDS = {
    # name -> (model class, config kwargs of the published model (depth cut), normalisation, pooling, dim)
    "phikon": ("ViTModel", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, image_size=224,
                                patch_size=16, layer_norm_eps=1e-12, qkv_bias=True), IMAGENET, "cls", 768),
    "phikon_v2": ("Dinov2Model", dict(hidden_size=1024, num_attention_heads=16, image_size=224, patch_size=16,
                                      mlp_ratio=4, layerscale_value=1.0), IMAGENET, "cls", 1024),
    "hibou_b": ("Dinov2WithRegistersModel", dict(hidden_size=768, num_attention_heads=12, image_size=224,
                                                 patch_size=14, num_register_tokens=4, use_swiglu_ffn=True),
                HIBOU, "cls", 768),
    "midnight": ("Dinov2Model", dict(hidden_size=1536, num_attention_heads=24, image_size=224, patch_size=14,
                                     use_swiglu_ffn=True), HALF, "cls+mean", 3072),
}


def _transformers_reference(name: str, folder: Path):
    import transformers

    cls_name, kwargs, norm, pooling, dim = TRANSFORMERS_CARDS[name]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(num_hidden_layers=DEPTH, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = _perturb(cls(config, add_pooling_layer=False) if cls_name == "ViTModel" else cls(config))
    model.save_pretrained(str(folder))
    if name == "hibou_b":  # the published config: dinov2 type, custom code named (never run by us)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="dinov2", architectures=["Dinov2ModelWithRegisters"],
                   auto_map={"AutoModel": "modeling_dinov2.Dinov2ModelWithRegisters"})
        (folder / "config.json").write_text(json.dumps(cfg))
    return model, norm, pooling, dim


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_CARDS))
def test_transformers_presets_equal_the_library(tmp_path, name):
    pytest.importorskip("transformers")
    folder = tmp_path / name
    reference, norm, pooling, dim = _transformers_reference(name, folder)
    encoder = build_patch_encoder(name, checkpoint=folder, device="cpu")
    patches = _patches()
    with torch.inference_mode():
        tokens = reference(pixel_values=_to_tensor_normalised(patches, norm)).last_hidden_state
        prefix = 1 + int(getattr(reference.config, "num_register_tokens", 0) or 0)
        expected = tokens[:, 0] if pooling == "cls" else torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], -1)
    got = encoder.encode(patches)
    assert got.shape == (3, dim) and encoder.dim == dim
    assert float((got - expected).abs().max()) <= 1e-5 * max(float(expected.abs().max()), 1.0)
    # the weights file inside the folder works as well as the folder
    weights = next(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert build_patch_encoder(name, checkpoint=weights, device="cpu").checkpoint_sha256 == encoder.checkpoint_sha256


# ------------------------------------------------------------------------------------------ wrong layouts


def test_a_wrong_checkpoint_names_the_right_preset(tmp_path, reduced_depth):
    import timm

    # a UNI checkpoint given as Virchow2
    uni = tmp_path / "uni"
    reference = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, depth=DEPTH,
                                  init_values=1e-5)
    _write_timm_layout(reference, "vit_large_patch16_224", {}, IMAGENET, "bin", uni)
    reduced_depth("virchow2")
    with pytest.raises(CheckpointError, match=r"try --encoder uni_v1"):
        build_patch_encoder("virchow2", checkpoint=uni / "pytorch_model.bin", device="cpu")
    # the same UNI file given as a plain timm name without layer scale: still the hint
    # a transformers Dinov2 folder given as UNI
    pytest.importorskip("transformers")
    _transformers_reference("phikon_v2", tmp_path / "phikon2")
    reduced_depth("uni_v1")
    with pytest.raises(CheckpointError, match=r"Dinov2Model.*--encoder phikon_v2"):
        build_patch_encoder("uni_v1", checkpoint=tmp_path / "phikon2", device="cpu")
    # a Phikon (ViT) folder given as Phikon-v2: named, not a key listing
    _transformers_reference("phikon", tmp_path / "phikon")
    with pytest.raises(CheckpointError, match=r"model_type 'vit'.*--encoder phikon\b"):
        build_patch_encoder("phikon_v2", checkpoint=tmp_path / "phikon", device="cpu")
    # a transformers weights file without its config.json
    lone = tmp_path / "lone"
    lone.mkdir()
    (tmp_path / "phikon" / "model.safetensors").rename(lone / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"needs the whole folder: config.json"):
        build_patch_encoder("phikon", checkpoint=lone / "model.safetensors", device="cpu")


def test_a_uni_checkpoint_of_another_depth_is_refused_with_the_sizes(tmp_path):
    import timm

    reference = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, depth=DEPTH,
                                  init_values=1e-5)
    _write_timm_layout(reference, "vit_large_patch16_224", {}, IMAGENET, "bin", tmp_path / "uni")
    with pytest.raises(CheckpointError, match=r"architecture of uni_v1 but not its depth"):
        build_patch_encoder("uni_v1", checkpoint=tmp_path / "uni" / "pytorch_model.bin", device="cpu")


def test_presets_are_complete_and_unknown_names_are_listed():
    for name in ("uni_v1", "uni_v2", "virchow", "virchow2", "hoptimus0", "hoptimus1", "h0_mini", "gigapath",
                 "phikon", "phikon_v2", "ctranspath", "lunit_vits8", "kaiko_vits16", "kaiko_vits8", "kaiko_vitb16",
                 "kaiko_vitb8", "kaiko_vitl14", "hibou_b", "hibou_l", "midnight", "hipt_vit256"):
        preset = PRESETS[name]
        info = preset.describe()
        assert info["dim"] > 0 and info["files"] and info["licence"] and 0.1 < info["mpp"] <= 2.0
    assert PRESETS["virchow2"].dim == 2560 and PRESETS["uni_v2"].dim == 1536 and PRESETS["midnight"].dim == 3072
    with pytest.raises(SlpdError, match="uni_v1"):
        build_patch_encoder("uni", device="cpu")
    with pytest.raises(SlpdError, match="already exists"):
        preset_module.register_preset(PRESETS["uni_v1"])


def test_position_embeddings_of_another_grid_are_resampled_with_timms_helper(tmp_path, reduced_depth):
    """A ViT-L/16 saved for 256-px inputs (16 x 16 position embeddings) loads into UNI's 224-px grid."""
    import timm
    from timm.layers import resample_abs_pos_embed

    source = _perturb(timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, depth=DEPTH,
                                        init_values=1e-5, img_size=256))
    _write_timm_layout(source, "vit_large_patch16_224", {}, IMAGENET, "bin", tmp_path / "uni256")
    reduced_depth("uni_v1")
    encoder = build_patch_encoder("uni_v1", checkpoint=tmp_path / "uni256" / "pytorch_model.bin", device="cpu")
    expected = resample_abs_pos_embed(source.pos_embed.detach(), (14, 14), num_prefix_tokens=1)
    assert torch.equal(encoder.module.pos_embed.detach(), expected)
    assert encoder.encode(_patches(n=1)).shape == (1, 1024)


def test_slpd_encoders_lists_presets_and_checks_a_folder(tmp_path, capsys):
    from napari_slpd.cli import main

    assert main(["encoders"]) == 0
    listing = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in listing
    assert main(["encoders", "virchow2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dim"] == 2560 and info["pooling"] == "cls+mean" and info["mpp"] == 0.5
    folder = tmp_path / "phikon_v2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 1024,
                                                    "architectures": ["Dinov2Model"]}))
    (folder / "model.safetensors").write_bytes(b"")
    assert main(["encoders", "uni_v1", "--check", str(folder)]) == 1
    assert "it looks like phikon_v2" in capsys.readouterr().out
    assert main(["encoders", "phikon_v2", "--check", str(folder)]) == 0
