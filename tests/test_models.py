"""ViT-256 / ViT-4K architecture and checkpoint loading in the official DINO layout."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from napari_slpd.errors import CheckpointError
from napari_slpd.utils.files import sha256_file
from napari_slpd.models.checkpoints import load_dino_checkpoint, read_checkpoint, save_dino_checkpoint
from napari_slpd.models.vit import interpolate_pos_embed, vit4k_xs, vit256_small


def _seeded(factory, seed):
    torch.manual_seed(seed)
    return factory().eval()


@pytest.fixture(scope="module")
def vit256_source():
    return _seeded(vit256_small, 1)


@pytest.fixture(scope="module")
def vit4k_source():
    return _seeded(vit4k_xs, 1)


def _fake_dino_head(in_dim: int) -> dict[str, torch.Tensor]:
    """A DINO head's keys (small out_dim: only the names matter, the loader must drop them)."""
    return {
        "mlp.0.weight": torch.randn(64, in_dim), "mlp.0.bias": torch.zeros(64),
        "mlp.2.weight": torch.randn(64, 64), "mlp.2.bias": torch.zeros(64),
        "mlp.4.weight": torch.randn(16, 64), "mlp.4.bias": torch.zeros(16),
        "last_layer.weight_g": torch.ones(32, 1), "last_layer.weight_v": torch.randn(32, 16),
    }


def _official_checkpoint(model: torch.nn.Module, teacher_prefix: str = "module.", student: bool = True) -> dict:
    """The layout of HIPT's vit256_small_dino.pth / vit4k_xs_dino.pth, written without our own saver."""
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    head = _fake_dino_head(model.embed_dim)
    teacher = {f"{teacher_prefix}backbone.{k}": v for k, v in backbone.items()}
    teacher.update({f"{teacher_prefix}head.{k}": v for k, v in head.items()})
    # the student differs, so loading the wrong entry would be noticed
    ckpt = {"teacher": teacher, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", lr=0.0005, local_crops_number=8),
            "dino_loss": {"center": torch.zeros(1, 32)}}
    if student:
        ckpt["student"] = {f"module.backbone.{k}": v + 1.0 for k, v in backbone.items()}
        ckpt["student"].update({f"module.head.{k}": v for k, v in head.items()})
    return ckpt


# ------------------------------------------------------------------------------------------------ architecture


def test_vit256_has_the_official_dino_vit_s16_parameters(vit256_source):
    model = vit256_source
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["cls_token"] == (1, 1, 384)
    assert shapes["pos_embed"] == (1, 197, 384)
    assert shapes["patch_embed.proj.weight"] == (384, 3, 16, 16)
    assert shapes["blocks.11.attn.qkv.weight"] == (1152, 384)
    assert shapes["blocks.11.attn.qkv.bias"] == (1152,)
    assert shapes["blocks.11.attn.proj.weight"] == (384, 384)
    assert shapes["blocks.11.mlp.fc1.weight"] == (1536, 384)
    assert shapes["blocks.11.mlp.fc2.weight"] == (384, 1536)
    assert shapes["norm.weight"] == (384,)
    assert "blocks.12.norm1.weight" not in shapes
    assert not any(k.startswith("head") for k in shapes)
    assert sum(p.numel() for p in model.parameters()) == 21_665_664  # DINO ViT-S/16
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert model.blocks[0].attn.num_heads == 6


def test_vit4k_has_the_official_hipt_parameters():
    model = vit4k_xs()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["phi.0.weight"] == (192, 384)
    assert shapes["phi.0.bias"] == (192,)
    assert shapes["cls_token"] == (1, 1, 192)
    assert shapes["pos_embed"] == (1, 197, 192)
    assert shapes["blocks.5.attn.qkv.weight"] == (576, 192)
    assert shapes["blocks.5.mlp.fc1.weight"] == (768, 192)
    assert shapes["norm.bias"] == (192,)
    assert "blocks.6.norm1.weight" not in shapes
    assert isinstance(model.phi[1], torch.nn.GELU) and isinstance(model.phi[2], torch.nn.Dropout)
    assert model.phi[2].p == 0.25
    assert model.blocks[0].attn.num_heads == 6


def test_vit4k_forward_shapes_and_readouts(vit4k_source):
    tokens = torch.randn(2, 384, 10, 10)
    with torch.no_grad():
        cls = vit4k_source(tokens)
        feats = vit4k_source.forward_features(tokens)
        attn = vit4k_source.get_last_selfattention(tokens)
        last = vit4k_source.get_intermediate_layers(tokens, n=2)
    assert cls.shape == (2, 192)
    assert feats.shape == (2, 101, 192)
    torch.testing.assert_close(feats[:, 0], cls)
    assert attn.shape == (2, 6, 101, 101)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 6, 101))
    assert len(last) == 2
    torch.testing.assert_close(last[-1], feats)


def test_fused_attention_matches_the_explicit_softmax_form(vit4k_source):
    block = vit4k_source.blocks[0]
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        fused = block.attn(x)
        attn = block.attn.attention_map(x)
        B, N, C = x.shape
        v = block.attn.qkv(x).reshape(B, N, 3, 6, C // 6).permute(2, 0, 3, 1, 4)[2]
        explicit = block.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid", [8, 14, 16])
def test_vit4k_accepts_other_grid_sizes(vit4k_source, grid):
    with torch.no_grad():
        out = vit4k_source(torch.randn(2, 384, grid, grid))
    assert out.shape == (2, 192)
    assert torch.isfinite(out).all()


def test_vit256_interpolates_position_embedding_for_128px(vit256_source):
    with torch.no_grad():
        tokens = vit256_source.forward_features(torch.randn(1, 3, 128, 128))
    assert tokens.shape == (1, 1 + 8 * 8, 384)
    assert torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit256_source(torch.randn(1, 3, 120, 128))


def test_pos_embed_interpolation_properties():
    pos = torch.randn(1, 197, 24)
    assert interpolate_pos_embed(pos, 14, 14) is pos  # native grid: untouched
    for g in (8, 16):
        out = interpolate_pos_embed(pos, g, g)
        assert out.shape == (1, 1 + g * g, 24)
        torch.testing.assert_close(out[:, 0], pos[:, 0])  # the [CLS] position is never resampled
    assert interpolate_pos_embed(pos, 8, 12).shape == (1, 1 + 96, 24)
    # bicubic weights sum to one: a constant embedding stays constant
    const = torch.full((1, 197, 4), 0.7)
    torch.testing.assert_close(interpolate_pos_embed(const, 16, 16), torch.full((1, 257, 4), 0.7))
    # offset 0.1 reproduces DINO/HIPT (scale factor (g + 0.1) / 14), which differs from sampling for size g
    grid = pos[:, 1:].reshape(1, 14, 14, 24).permute(0, 3, 1, 2)
    dino = F.interpolate(grid, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic")
    dino = dino.permute(0, 2, 3, 1).reshape(1, 256, 24)
    torch.testing.assert_close(interpolate_pos_embed(pos, 16, 16, offset=0.1)[:, 1:], dino)
    assert not torch.allclose(interpolate_pos_embed(pos, 16, 16, offset=0.0), interpolate_pos_embed(pos, 16, 16))


def test_drop_path_rate_is_applied_linearly_and_only_in_training():
    model = vit4k_xs(drop_path_rate=0.1)
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    tokens = torch.randn(4, 384, 6, 6)
    model.train()
    torch.manual_seed(0)
    a = model(tokens)
    b = model(tokens)
    assert not torch.allclose(a, b)  # stochastic depth + dropout in training
    a.sum().backward()
    assert model.phi[0].weight.grad is not None and model.pos_embed.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model(tokens))


# -------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("teacher_prefix", ["module.", ""])
def test_official_vit4k_checkpoint_loads(tmp_path, vit4k_source, teacher_prefix):
    path = tmp_path / "vit4k_xs_dino.pth"
    torch.save(_official_checkpoint(vit4k_source, teacher_prefix), path)
    model = _seeded(vit4k_xs, 2)
    report = load_dino_checkpoint(model, path)
    assert report.source_key == "teacher"
    assert report.loaded_keys == len(vit4k_source.state_dict())
    assert len(report.ignored_keys) == 8 and all(k.startswith("head.") for k in report.ignored_keys)
    assert report.sha256 == sha256_file(path)
    for k, v in vit4k_source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    tokens = torch.randn(2, 384, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), vit4k_source(tokens))
    load_dino_checkpoint(model, path, key="student")  # any entry can be chosen
    torch.testing.assert_close(model.norm.weight, vit4k_source.norm.weight + 1.0)


def test_official_vit256_checkpoint_loads(tmp_path, vit256_source):
    path = tmp_path / "vit256_small_dino.pth"
    torch.save(_official_checkpoint(vit256_source, student=False), path)
    model = _seeded(vit256_small, 2)
    report = load_dino_checkpoint(model, path)
    assert report.loaded_keys == 150
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit256_source(x))


def test_plain_and_compiled_state_dicts_load(tmp_path, vit4k_source):
    plain = tmp_path / "plain.pt"
    torch.save(vit4k_source.state_dict(), plain)
    model = vit4k_xs()
    report = load_dino_checkpoint(model, plain)
    assert report.source_key is None and report.stripped_prefixes == ()
    compiled = tmp_path / "compiled.pt"
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in vit4k_source.state_dict().items()}}, compiled)
    report = load_dino_checkpoint(vit4k_xs(), compiled)
    assert report.source_key == "state_dict" and report.stripped_prefixes == ("_orig_mod.",)


def test_mismatched_checkpoint_fails_listing_keys_and_shapes(tmp_path, vit4k_source):
    wrong = _seeded(lambda: vit4k_xs(input_embed_dim=1024), 4)  # e.g. trained on UNI tokens
    state = {f"backbone.{k}": v for k, v in wrong.state_dict().items() if not k.startswith("blocks.5.")}
    state["backbone.blocks.6.norm1.weight"] = torch.ones(192)
    path = tmp_path / "mismatch.pth"
    torch.save({"teacher": state}, path)
    model = _seeded(vit4k_xs, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_dino_checkpoint(model, path)
    msg = str(info.value)
    assert "missing keys (12)" in msg and "blocks.5.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.6.norm1.weight" in msg
    assert "shape mismatches (1): phi.0.weight: checkpoint (192, 1024) vs model (192, 384)" in msg
    # nothing was half-loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_vit256_checkpoint_into_vit4k_is_refused(tmp_path, vit256_source):
    path = tmp_path / "vit256.pth"
    torch.save(_official_checkpoint(vit256_source, student=False), path)
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): phi.0.weight, phi.0.bias"):
        load_dino_checkpoint(vit4k_xs(), path)


_EXECUTED: list[str] = []


def _side_effect():
    _EXECUTED.append("ran")
    return "payload"


class Exploit:
    """Unpickling this runs a function: exactly what weights_only=True must prevent."""

    def __reduce__(self):
        return (_side_effect, ())


def test_pickled_objects_are_refused_unless_allowed(tmp_path, vit4k_source):
    path = tmp_path / "pickled.pth"
    ckpt = _official_checkpoint(vit4k_source)
    ckpt["trap"] = Exploit()
    torch.save(ckpt, path)
    _EXECUTED.clear()
    with pytest.raises(CheckpointError) as info:
        load_dino_checkpoint(vit4k_xs(), path)
    assert "allow_pickle=True" in str(info.value)
    assert "_side_effect" in str(info.value)  # it says what the file would have run
    assert _EXECUTED == []
    report = load_dino_checkpoint(vit4k_xs(), path, allow_pickle=True)
    assert _EXECUTED == ["ran"] and report.loaded_keys == len(vit4k_source.state_dict())


def test_dino_args_namespace_is_accepted_without_pickle(tmp_path, vit4k_source):
    path = tmp_path / "with_args.pth"
    torch.save(_official_checkpoint(vit4k_source), path)
    obj = read_checkpoint(path)
    assert obj["args"].arch == "vit_small" and obj["epoch"] == 100


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated"])
def test_unreadable_files_raise_checkpoint_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    if content == "truncated":
        torch.save({"teacher": vit4k_xs().state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"" if content == "empty" else b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_dino_checkpoint(vit4k_xs(), path)


def test_missing_path_and_folder_and_wrong_content(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dino_checkpoint(vit4k_xs(), tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_dino_checkpoint(vit4k_xs(), tmp_path)
    path = tmp_path / "odd.pth"
    torch.save({"teacher": "nothing here", "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="top-level keys are: epoch, teacher"):
        load_dino_checkpoint(vit4k_xs(), path)


def test_save_dino_checkpoint_writes_the_official_layout(tmp_path, vit4k_source):
    path = tmp_path / "out" / "region_encoder.pth"
    head = torch.nn.Linear(192, 8)
    save_dino_checkpoint(vit4k_source, path, extra={"epoch": 3, "config": {"lr": 1e-3, "grid": [14, 6]}},
                         head=head)
    assert [p.name for p in path.parent.iterdir()] == ["region_encoder.pth"]  # no temp file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["config"]["grid"] == [14, 6]
    assert "backbone.phi.0.weight" in raw["teacher"] and "head.weight" in raw["teacher"]
    assert all(k.startswith(("backbone.", "head.")) for k in raw["teacher"])
    model = vit4k_xs().eval()
    report = load_dino_checkpoint(model, path)
    assert report.ignored_keys == ["head.bias", "head.weight"]
    tokens = torch.randn(1, 384, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), vit4k_source(tokens))


def test_save_refuses_values_that_need_pickle(tmp_path, vit4k_source):
    path = tmp_path / "bad.pth"
    with pytest.raises(CheckpointError, match=r"vars\(args\)"):
        save_dino_checkpoint(vit4k_source, path, extra={"args": argparse.Namespace(lr=1)})
    with pytest.raises(CheckpointError, match="must not contain 'teacher'"):
        save_dino_checkpoint(vit4k_source, path, extra={"teacher": {}})
    assert not path.exists()
    assert not [p for p in os.listdir(tmp_path)]
