"""Named presets of the pathology foundation models labs actually download.

A preset fixes everything that must not be left to a default: the architecture and its keyword arguments,
the normalisation and input size the model was trained with, how its output is pooled (Virchow's class
token + mean of patch tokens), the published output dimension and the magnification (um/px) it was
trained at, which is also the tiling default. ``slpd extract --encoder uni_v1 --checkpoint FOLDER_OR_FILE``
builds one; ``slpd encoders`` lists them.

Facts come from the model cards and from how TRIDENT and LazySlide build these models; weights are never
downloaded: every preset loads a local file or folder in the layout its publisher ships (see ``files``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from napari_slpd.errors import SlpdError

__all__ = ["EncoderPreset", "PRESETS", "get_preset", "register_preset", "preset_names", "default_mpp",
           "NORMALISATIONS"]

# per-channel mean / std of [0, 1] RGB, by the name the model cards use
NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # HIPT, kaiko, Midnight
    "openai_clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "hoptimus": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),  # H-optimus-0/1, H0-mini
    "lunit": ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)),
    "hibou": ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)),
}

# the families a preset can be built by (see napari_slpd.models.foundation)
FAMILIES = ("hipt", "timm", "transformers", "swin_convstem", "custom")
# how a model's output becomes one vector per patch
POOLINGS = ("model", "cls", "cls+mean", "pooler")


@dataclass(frozen=True)
class EncoderPreset:
    """One published patch encoder, as it has to be built to give its published features."""

    name: str                         # what users type: --encoder uni_v1
    title: str                        # "UNI (Mahmood Lab)"
    family: str                       # see FAMILIES
    architecture: str                 # timm model name, transformers model class, or builder import path
    dim: int                          # published output dimension
    input_size: int                   # px the model sees (patches are resized to it)
    normalisation: str                # key of NORMALISATIONS
    mpp: float                        # um/px the model was trained at: the tiling default (0.5 = 20x)
    weights_source: str               # where users get the weights
    files: tuple[str, ...]            # the files the checkpoint path must hold (a folder) or be (a file)
    licence: str
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. timm.create_model kwargs
    pooling: str = "model"
    interpolation: str = "bicubic"
    patch_size: int | None = None     # the ViT's own patch size (token grid of an input = input_size / it)
    notes: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.name}: unknown pooling {self.pooling!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"{self.name}: unknown normalisation {self.normalisation!r}")

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALISATIONS[self.normalisation][0]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALISATIONS[self.normalisation][1]

    @property
    def magnification(self) -> str:
        return f"{10 / self.mpp:g}x"

    def describe(self) -> dict[str, Any]:
        """What ``slpd encoders`` shows (and ``--json`` prints)."""
        return {"name": self.name, "title": self.title, "dim": self.dim, "input_size": self.input_size,
                "mpp": self.mpp, "magnification": self.magnification, "normalisation": self.normalisation,
                "mean": list(self.mean), "std": list(self.std), "pooling": self.pooling,
                "files": list(self.files), "weights_source": self.weights_source, "licence": self.licence,
                "family": self.family, "architecture": self.architecture, "notes": self.notes}


PRESETS: dict[str, EncoderPreset] = {}


def register_preset(preset: EncoderPreset, replace: bool = False) -> EncoderPreset:
    """Add a preset (plugins may add their own); a second preset of one name is refused unless ``replace``."""
    if preset.name in PRESETS and not replace:
        raise SlpdError(f"an encoder preset named {preset.name!r} already exists")
    PRESETS[preset.name] = preset
    return preset


def preset_names() -> list[str]:
    return list(PRESETS)


def default_mpp(spec: str) -> float:
    """The um/px regions are cut at by default: the preset's training magnification, else 0.5 (20x)."""
    preset = PRESETS.get(spec)
    return preset.mpp if preset is not None else 0.5


def get_preset(name: str) -> EncoderPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SlpdError(f"unknown encoder preset {name!r}; `slpd encoders` lists them: "
                        f"{', '.join(PRESETS)}") from None


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}  # resolved to timm / torch classes when built
_NC_ND = "CC-BY-NC-ND 4.0, gated"

for _preset in (
    EncoderPreset(
        "hipt_vit256", "HIPT ViT-256 (DINO ViT-S/16)", "hipt", "napari_slpd.models.vit:vit256_small", 384, 256,
        "half", 0.5, "github.com/mahmoodlab/HIPT (vit256_small_dino.pth)", ("vit256_small_dino.pth",),
        "Apache-2.0", interpolation="bilinear", patch_size=16,
        notes="random init without a checkpoint; the official DINO `teacher` layout otherwise"),
    EncoderPreset(
        "uni_v1", "UNI (Mahmood Lab)", "timm", "vit_large_patch16_224", 1024, 224, "imagenet", 0.5,
        "huggingface.co/MahmoodLab/UNI", ("pytorch_model.bin",), _NC_ND,
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        interpolation="bilinear", patch_size=16),
    EncoderPreset(
        "uni_v2", "UNI2-h (Mahmood Lab)", "timm", "vit_giant_patch14_224", 1536, 224, "imagenet", 0.5,
        "huggingface.co/MahmoodLab/UNI2-h", ("pytorch_model.bin",), _NC_ND,
        {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
         "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
         "dynamic_img_size": True, **_SWIGLU},
        interpolation="bilinear", patch_size=14),
    EncoderPreset(
        "virchow", "Virchow (Paige)", "timm", "vit_huge_patch14_224", 2560, 224, "imagenet", 0.5,
        "huggingface.co/paige-ai/Virchow", ("config.json", "pytorch_model.bin"), "Apache-2.0, gated",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
         "dynamic_img_size": True, **_SWIGLU},
        pooling="cls+mean", patch_size=14, notes="class token + mean of the patch tokens (the card's embedding)"),
    EncoderPreset(
        "virchow2", "Virchow2 (Paige)", "timm", "vit_huge_patch14_224", 2560, 224, "imagenet", 0.5,
        "huggingface.co/paige-ai/Virchow2", ("config.json", "pytorch_model.bin"), _NC_ND,
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "reg_tokens": 4,
         "dynamic_img_size": True, **_SWIGLU},
        pooling="cls+mean", patch_size=14,
        notes="class token + mean of the patch tokens, the 4 register tokens left out (the card's embedding)"),
    EncoderPreset(
        "hoptimus0", "H-optimus-0 (Bioptimus)", "timm", "vit_giant_patch14_reg4_dinov2", 1536, 224, "hoptimus",
        0.5, "huggingface.co/bioptimus/H-optimus-0", ("pytorch_model.bin",), "Apache-2.0",
        {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
        patch_size=14, notes="224 px at 0.5 um/px (the timm config's 518 is not the training input)"),
    EncoderPreset(
        "hoptimus1", "H-optimus-1 (Bioptimus)", "timm", "vit_giant_patch14_reg4_dinov2", 1536, 224, "hoptimus",
        0.5, "huggingface.co/bioptimus/H-optimus-1", ("pytorch_model.bin",), "non-commercial, gated",
        {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
        patch_size=14),
    EncoderPreset(
        "h0_mini", "H0-mini (Bioptimus)", "timm", "vit_base_patch14_reg4_dinov2", 768, 224, "hoptimus", 0.5,
        "huggingface.co/bioptimus/H0-mini", ("config.json", "model.safetensors"), "CC-BY-NC-ND 4.0, gated",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 4.0, "dynamic_img_size": True, **_SWIGLU},
        pooling="cls", patch_size=14, notes="class token (the card also offers class + mean, 1536)"),
    EncoderPreset(
        "gigapath", "Prov-GigaPath tile encoder (Microsoft)", "timm", "vit_giant_patch14_dinov2", 1536, 224,
        "imagenet", 0.5, "huggingface.co/prov-gigapath/prov-gigapath", ("pytorch_model.bin",),
        "Apache-2.0, gated",
        {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True},
        patch_size=16),
    EncoderPreset(
        "phikon", "Phikon (Owkin, iBOT ViT-B/16)", "transformers", "ViTModel", 768, 224, "imagenet", 0.5,
        "huggingface.co/owkin/phikon", ("config.json", "pytorch_model.bin"), "Owkin non-commercial",
        {"add_pooling_layer": False}, pooling="cls", interpolation="bilinear", patch_size=16),
    EncoderPreset(
        "phikon_v2", "Phikon-v2 (Owkin, DINOv2 ViT-L/16)", "transformers", "Dinov2Model", 1024, 224, "imagenet",
        0.5, "huggingface.co/owkin/phikon-v2", ("config.json", "model.safetensors"), "Owkin non-commercial",
        pooling="cls", interpolation="bilinear", patch_size=16),
    EncoderPreset(
        "hibou_b", "Hibou-B (HistAI)", "transformers", "Dinov2WithRegistersModel", 768, 224, "hibou", 0.5,
        "huggingface.co/histai/hibou-b", ("config.json", "model.safetensors"), "Apache-2.0",
        pooling="pooler", patch_size=14,
        notes="the published custom code is not run: the weights load into transformers' DINOv2 with registers"),
    EncoderPreset(
        "hibou_l", "Hibou-L (HistAI)", "transformers", "Dinov2WithRegistersModel", 1024, 224, "hibou", 0.5,
        "huggingface.co/histai/hibou-L", ("config.json", "model.safetensors"), "Apache-2.0",
        pooling="pooler", patch_size=14,
        notes="the published custom code is not run: the weights load into transformers' DINOv2 with registers"),
    EncoderPreset(
        "midnight", "Midnight-12k (kaiko.ai)", "transformers", "Dinov2Model", 3072, 224, "half", 0.5,
        "huggingface.co/kaiko-ai/midnight", ("config.json", "model.safetensors"), "MIT",
        pooling="cls+mean", patch_size=14, notes="class token + mean of the patch tokens (the card's embedding)"),
    EncoderPreset(
        "ctranspath", "CTransPath (as in CHIEF / TransPath)", "swin_convstem", "swin_tiny_patch4_window7_224", 768,
        224, "imagenet", 0.5, "huggingface.co/datasets/MahmoodLab/hest-bench fm_v1/ctranspath (CHIEF_CTransPath.pth)",
        ("CHIEF_CTransPath.pth",), "GPL-3.0", interpolation="bilinear", patch_size=4,
        notes="Swin-T with a convolutional stem; the 2022 timm layout is converted with timm's own filter"),
    EncoderPreset(
        "lunit_vits8", "Lunit DINO ViT-S/8", "timm", "vit_small_patch8_224", 384, 224, "lunit", 0.5,
        "huggingface.co/1aurent/vit_small_patch8_224.lunit_dino", ("config.json", "model.safetensors"),
        "Lunit non-commercial", {"img_size": 224, "dynamic_img_size": True}, patch_size=8),
)+tuple(
    EncoderPreset(
        f"kaiko_{size}{patch}", f"kaiko.ai ViT-{size[-1].upper()}/{patch}", "timm", arch, dim, 224, "half", 0.5,
        f"huggingface.co/1aurent/{arch}.kaiko_ai_towards_large_pathology_fms", ("config.json", "model.safetensors"),
        "see the model card (kaiko.ai)", {"img_size": img, "dynamic_img_size": True},
        interpolation="bilinear", patch_size=patch)
    for size, patch, arch, dim, img in (
        ("vits", 16, "vit_small_patch16_224", 384, 224), ("vits", 8, "vit_small_patch8_224", 384, 224),
        ("vitb", 16, "vit_base_patch16_224", 768, 224), ("vitb", 8, "vit_base_patch8_224", 768, 224),
        ("vitl", 14, "vit_large_patch14_reg4_dinov2", 1024, 518))
):
    register_preset(_preset)
del _preset


def _normalisation_name(mean, std) -> str:
    for name, (m, sd) in NORMALISATIONS.items():
        if tuple(mean) == m and tuple(std) == sd:
            return name
    raise ValueError(f"no normalisation named for mean {mean}, std {std}")


def _register_vision_language_presets() -> None:
    """CONCH v1 / v1.5 and the pathology CLIPs: their image towers, built by their own modules' builders."""
    from napari_slpd.models.conch import CONCH_PRESETS
    from napari_slpd.models.pathology_clip import CLIP_PRESETS

    for info in CONCH_PRESETS + CLIP_PRESETS:
        register_preset(EncoderPreset(
            info["name"], info["title"], "custom", info["builder"], int(info["dim"]), int(info["input_size"]),
            _normalisation_name(info["mean"], info["std"]), float(info["mpp"]), info["weights_source"],
            tuple(info["files"]), info["licence"], {"weight_names": tuple(info["weight_names"])},
            interpolation=info["interpolation"], notes=info.get("notes", "")))


_register_vision_language_presets()
