"""Random-weight vision-language checkpoints written in their published layouts, for tests.

Every writer keeps the published widths and every architectural part (CONCH's captioning pooler and decoder,
PLIP's tokenizer files, BiomedCLIP's BERT text tower) and reduces only depths, so loading goes through the same
code as the real files. Weights are random and non-trivial (LayerNorm gains and biases included).

The CONCH tokenizer written here has CONCH's structure (byte-level BPE, uncased, NFD + accent stripping,
``<start_of_text> ... <end_of_text>`` template, 32,007 ids with the same special tokens) but a made-up
vocabulary: CONCH's own file is not redistributable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["write_conch_v1", "write_conch_v15", "write_plip", "write_quiltnet", "write_biomedclip",
           "write_conch_tokenizer", "perturb_"]


def perturb_(module_or_state, seed: int, scale: float = 0.05) -> None:
    """Give every tensor random values (LayerNorm-like gains around 1)."""
    gen = torch.Generator().manual_seed(seed)
    items = module_or_state.items() if isinstance(module_or_state, dict) else module_or_state.state_dict().items()
    with torch.no_grad():
        for name, t in items:
            if t.is_floating_point():
                gain = 1.0 if (name.endswith("weight") and t.ndim == 1) else 0.0
                t.copy_(gain + torch.randn(t.shape, generator=gen) * scale)


@dataclass
class WrittenModel:
    folder: Path
    weights: Path
    preset: str


def write_conch_tokenizer(path: str | os.PathLike, vocab_size: int = 32007) -> Path:
    """A byte-level BPE tokenizer with CONCH's structure and special tokens (ids 0-6), ``vocab_size`` ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<pad>", "<start_of_text>", "<end_of_text>", "<|person|>", "<|mrn|>", "<|specimen_id|>",
                "<|date|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    pairs = [("Ġ", "t"), ("Ġ", "a"), ("i", "n"), ("e", "r"), ("o", "n"), ("m", "a"), ("Ġ", "s"), ("Ġt", "u"),
             ("m", "o"), ("Ġtu", "mo"), ("u", "r"), ("Ġtumo", "ur"), ("a", "l"), ("c", "e"), ("Ġs", "t"),
             ("Ġst", "r"), ("o", "ma"), ("Ġstr", "oma")]
    for a, b in pairs:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"filler{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>", pair="$A $B:1",
        special_tokens=[("<start_of_text>", 1), ("<end_of_text>", 2)])
    path = Path(path)
    tok.save(str(path))
    return path


def _conch_extra_keys(state: dict, seed: int, decoder_layers: int, width: int = 768, vocab: int = 32007,
                      queries: int = 256) -> None:
    """CONCH's captioning pooler (256 queries, 768-d), its LayerNorm, the multimodal decoder and logit_scale."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen) * 0.02  # noqa: E731
    state["visual.attn_pool_caption.query"] = rnd(queries, width)
    state["visual.attn_pool_caption.attn.in_proj_weight"] = rnd(3 * width, width)
    state["visual.attn_pool_caption.attn.in_proj_bias"] = rnd(3 * width)
    state["visual.attn_pool_caption.attn.out_proj.weight"] = rnd(width, width)
    state["visual.attn_pool_caption.attn.out_proj.bias"] = rnd(width)
    for ln in ("ln_q", "ln_k"):
        state[f"visual.attn_pool_caption.{ln}.weight"] = 1 + rnd(width)
        state[f"visual.attn_pool_caption.{ln}.bias"] = rnd(width)
    state["visual.ln_caption.weight"], state["visual.ln_caption.bias"] = 1 + rnd(width), rnd(width)

    def block(prefix: str, cross: bool) -> None:
        names = ["ln_1", "ln_2"] + (["ln_1_kv"] if cross else [])
        for ln in names:
            state[f"{prefix}.{ln}.weight"], state[f"{prefix}.{ln}.bias"] = 1 + rnd(width), rnd(width)
        state[f"{prefix}.attn.in_proj_weight"], state[f"{prefix}.attn.in_proj_bias"] = rnd(3 * width, width), \
            rnd(3 * width)
        state[f"{prefix}.attn.out_proj.weight"], state[f"{prefix}.attn.out_proj.bias"] = rnd(width, width), rnd(width)
        state[f"{prefix}.mlp.c_fc.weight"], state[f"{prefix}.mlp.c_fc.bias"] = rnd(4 * width, width), rnd(4 * width)
        state[f"{prefix}.mlp.c_proj.weight"], state[f"{prefix}.mlp.c_proj.bias"] = rnd(width, 4 * width), rnd(width)

    for i in range(decoder_layers):
        block(f"text_decoder.resblocks.{i}", cross=False)
        block(f"text_decoder.cross_attn.{i}", cross=True)
    state["text_decoder.ln_final.weight"], state["text_decoder.ln_final.bias"] = 1 + rnd(width), rnd(width)
    state["text_decoder.text_projection"] = rnd(width, vocab)
    state["logit_scale"] = torch.tensor(4.6052)


def write_conch_v1(folder: str | os.PathLike, seed: int = 0, vision_layers: int = 1, text_layers: int = 1,
                   decoder_layers: int = 1, tokenizer: bool = True) -> WrittenModel:
    """A CONCH v1 folder: ``pytorch_model.bin`` (CoCa state dict, published key names; ``visual.trunk`` at 448
    px) and, with ``tokenizer``, a CONCH-structured ``conch_byte_level_bpe_uncased.json``."""
    from napari_slpd.models.conch import ConchV1, ConchV1Arch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConchV1(ConchV1Arch(vision_layers=vision_layers, text_layers=text_layers))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(state, seed)
    _conch_extra_keys(state, seed + 1, decoder_layers)
    weights = folder / "pytorch_model.bin"
    torch.save(state, weights)
    if tokenizer:
        write_conch_tokenizer(folder / "conch_byte_level_bpe_uncased.json")
    return WrittenModel(folder, weights, "conch_v1")


def write_conch_v15(folder: str | os.PathLike, seed: int = 0, layers: int = 1, pos_tokens: int = 197
                    ) -> WrittenModel:
    """A CONCH v1.5 folder: ``pytorch_model_vision.bin`` (``trunk.*``, ``attn_pool_contrast.*``,
    ``ln_contrast.*``); the position embedding stored for ``pos_tokens`` tokens (197: 224-px grid)."""
    from napari_slpd.models.conch import ConchV15Arch, ConchV15Vision

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConchV15Vision(ConchV15Arch(), layers=layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(state, seed)
    state["trunk.pos_embed"] = torch.randn(1, pos_tokens, 1024, generator=torch.Generator().manual_seed(seed)) * .02
    weights = folder / "pytorch_model_vision.bin"
    torch.save(state, weights)
    return WrittenModel(folder, weights, "conch_v15")


def _clip_bpe_files(folder: Path) -> None:
    """CLIP's tokenizer files (vocab.json, merges.txt) from the BPE vocabulary that ships with open_clip."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF's CLIP spelling
    vocab = {hf_names.get(k, k): v for k, v in tok.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}), encoding="utf-8")


def write_plip(folder: str | os.PathLike, seed: int = 0, layers: int = 1) -> WrittenModel:
    """A PLIP folder: transformers CLIPModel (ViT-B/32 widths, projection 512) ``config.json`` +
    ``pytorch_model.bin``, CLIP tokenizer files and ``preprocessor_config.json``."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(text_config={"num_hidden_layers": layers}, vision_config={"num_hidden_layers": layers,
                        "patch_size": 32}, projection_dim=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    perturb_(model, seed)
    config.save_pretrained(str(folder))
    weights = folder / "pytorch_model.bin"
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    _clip_bpe_files(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": 224, "feature_extractor_type": "CLIPFeatureExtractor"}), encoding="utf-8")
    return WrittenModel(folder, weights, "plip")


_OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def write_quiltnet(folder: str | os.PathLike, seed: int = 0, layers: int = 1) -> WrittenModel:
    """A QuiltNet-B-32 folder: ``open_clip_config.json`` (open_clip's ViT-B-32 with ``layers`` blocks per
    tower) + ``open_clip_pytorch_model.bin``."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(open_clip.get_model_config("ViT-B-32")))
    cfg["vision_cfg"]["layers"] = layers
    cfg["text_cfg"]["layers"] = layers
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": _OPENAI}),
                                                 encoding="utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained=None, load_weights=False)
    perturb_(model, seed)
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return WrittenModel(folder, weights, "quiltnet")


BIOMEDCLIP_TEXT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"


def biomedclip_model_cfg(text_model: str = BIOMEDCLIP_TEXT) -> dict:
    """BiomedCLIP's published open_clip model config (text tower named by its hub id)."""
    return {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": text_model, "hf_tokenizer_name": text_model, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    }


def _bert_tokenizer_files(folder: Path, vocab_size: int = 30522) -> None:
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["tumour", "tumor", "stroma", "necrosis", "lung", "adeno", "##carcinoma", "with", "of", "the", "cells",
              "gland", "##s", ",", ".", "-", "immune", "normal", "alveolar", "tissue"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789") + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    words += [f"filler{i}" for i in range(vocab_size - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}), encoding="utf-8")


def bert_config(layers: int = 1) -> dict:
    """PubMedBERT-base's architecture (BERT-base, vocabulary 30,522) with ``layers`` layers."""
    return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522, "hidden_size": 768,
            "num_hidden_layers": layers, "num_attention_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "pad_token_id": 0}


def write_biomedclip(folder: str | os.PathLike, seed: int = 0, text_layers: int = 1,
                     bert_config_in_folder: bool = False) -> WrittenModel:
    """A BiomedCLIP folder: the published ``open_clip_config.json`` (text tower named by its hub id),
    ``open_clip_pytorch_model.bin`` (timm ViT-B/16 at full depth, BERT text tower with ``text_layers`` layers)
    and PubMedBERT-style tokenizer files (vocab.txt, tokenizer_config.json). The BERT ``config.json`` is written
    only with ``bert_config_in_folder`` (otherwise the loader reads the architecture from the weights)."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bert_dir = folder / "_bert" if not bert_config_in_folder else folder
    bert_dir.mkdir(exist_ok=True)
    (bert_dir / "config.json").write_text(json.dumps(bert_config(text_layers)), encoding="utf-8")
    build_cfg = biomedclip_model_cfg(str(bert_dir))
    name = f"slpd-test-biomedclip-{seed}-{text_layers}"
    cfg_dir = folder / "_cfg"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / f"{name}.json").write_text(json.dumps(build_cfg), encoding="utf-8")
    open_clip.add_model_config(cfg_dir / f"{name}.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_text=False)
    perturb_(model, seed)
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": biomedclip_model_cfg(), "preprocess_cfg": _OPENAI}), encoding="utf-8")
    _bert_tokenizer_files(folder)
    if not bert_config_in_folder:
        shutil.rmtree(bert_dir)
    shutil.rmtree(cfg_dir)
    return WrittenModel(folder, weights, "biomedclip")


def extract_tiny_cohort(root: str | os.PathLike, slide: str | os.PathLike, patch_encoder, mpp: float | None = None):
    """A one-slide cohort whose patch features come from ``patch_encoder`` (coarse grid: a few dozen patches at
    2 um/px), with mean-pooled region embeddings. Returns the Cohort."""
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.engine import ExtractionConfig, extract_slide
    from napari_slpd.models.encoders import build_region_encoder
    from napari_slpd.slides.grid import GridConfig

    cohort = Cohort(root)
    record = cohort.add_slide(slide, mpp=mpp)
    region_enc = build_region_encoder("mean", device="cpu", in_dim=patch_encoder.dim)
    config = ExtractionConfig(grid=GridConfig(region_px=256, patch_px=128, target_mpp=2.0, min_tissue=0.25),
                              batch_size=16, num_workers=1, regions_per_chunk=4, device="cpu", mpp=mpp,
                              token_dtype="float32")
    result = extract_slide(slide, cohort.features_path(record.slide_id), patch_encoder, region_enc, config)
    if result.status != "extracted" or result.n_regions == 0:
        raise RuntimeError(f"tiny cohort extraction failed: {result.status} {result.message}")
    return cohort
