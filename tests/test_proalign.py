"""ProAlign core: the VLM from a local open_clip checkpoint, text/visual prototypes, slide embedding, labels,
region label maps and the result cache. A tiny CLIP (random weights, the real BPE tokenizer) is created
here, saved in open_clip's checkpoint format and loaded back by path."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from napari_slpd.errors import CheckpointError, FeatureStoreError, PrototypeError
from napari_slpd.proalign import (
    Cancelled,
    ProAlignConfig,
    align_slide,
    attention_pool,
    attention_weights,
    load_descriptions,
    slide_embedding,
    text_prototypes,
    visual_prototypes,
    zero_shot_labels,
)
from napari_slpd.proalign.cache import ProAlignCacheError, ProAlignResult, load_proalign, write_proalign
from napari_slpd.proalign.core import patch_region_index, region_labels
from napari_slpd.testing.tiny_clip import write_tiny_clip

TAU = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def vlm(tiny):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    return VisionLanguageModel.load(tiny.model_name, tiny.checkpoint, device="cpu", model_cfg=tiny.model_cfg)


def _direct_softmax_pool(v: np.ndarray, q: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """sum_n softmax_n(cos(v_n, q_k)/tau) v_hat_n computed in one go in float64 (the reference)."""
    v = torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(torch.tensor(q, dtype=torch.float64), dim=1)
    w = torch.softmax(v @ q.T / tau, dim=0)  # [N, K]
    return (w.T @ v).numpy(), w.numpy()


def _clustered_features(n=600, d=32, k=5, seed=0):
    """Patch features around k directions (so prototypes attract distinct patches), plus the directions."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    owner = rng.integers(0, k, n)
    feats = centers[owner] * 3.0 + 0.8 * rng.standard_normal((n, d))
    # raw (unnormalized) features with varying norms, as an image tower gives them
    feats *= rng.uniform(0.5, 4.0, (n, 1))
    return feats.astype(np.float32), centers.astype(np.float32), owner


# -- the vision-language model -----------------------------------------------------------------------------
def test_vlm_loads_tiny_clip_by_path_and_embeds_normalized(vlm, tiny):
    assert vlm.embed_dim == 32 and vlm.image_size == tiny.image_size
    assert vlm.spec == "open_clip:slpd-tiny-clip"
    assert vlm.checkpoint_sha256 and vlm.model_id.startswith("open_clip:slpd-tiny-clip (slpd-tiny-clip.pt sha256:")
    text = vlm.encode_text(["an H&E image of lung adenocarcinoma", "necrosis", "background"])
    assert text.shape == (3, 32) and text.dtype == torch.float32
    assert torch.allclose(text.norm(dim=1), torch.ones(3), atol=1e-5)
    # different texts through the real tokenizer give different embeddings
    assert not torch.allclose(text[0], text[1])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)  # resized to the model's 32 px
    emb = vlm.encode_images(images)
    assert emb.shape == (5, 32) and torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)


def test_vlm_text_matches_open_clip_directly(vlm, tiny):
    import open_clip

    model = open_clip.create_model(tiny.model_name, pretrained=str(tiny.checkpoint))
    model.eval()
    tok = open_clip.get_tokenizer(tiny.model_name)
    texts = ["dense lymphocytic infiltrate", "adipose tissue"]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
    assert torch.allclose(vlm.encode_text(texts), ref, atol=1e-5)


def test_vlm_images_match_the_features_engine_encoder(vlm, tiny):
    """encode_images = normalize(the "open_clip:<name>" patch encoder the features engine uses)."""
    from napari_slpd.models.encoders import build_patch_encoder

    enc = build_patch_encoder(f"open_clip:{tiny.model_name}", tiny.checkpoint, device="cpu",
                              open_clip_cfg=tiny.model_cfg)
    assert enc.model_id == vlm.model_id and enc.dim == vlm.embed_dim
    images = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    ref = torch.nn.functional.normalize(enc.encode(images), dim=-1)
    assert torch.allclose(vlm.encode_images(images), ref, atol=1e-5)


def test_vlm_tiny_coca_checkpoint_in_training_layout(tmp_path):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    coca = write_tiny_clip(tmp_path, kind="coca", wrap_state_dict=True, seed=3)
    model = VisionLanguageModel.load(f"open_clip:{coca.model_name}", coca.checkpoint, device="cpu",
                                     model_cfg=coca.model_cfg)
    t = model.encode_text(["tumour", "stroma"])
    i = model.encode_images(np.zeros((2, 32, 32, 3), np.uint8))
    assert t.shape == i.shape == (2, 32)
    assert torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)


def test_vlm_missing_checkpoint_says_what_to_provide(tiny, tmp_path):
    from napari_slpd.proalign.vlm import VisionLanguageModel

    with pytest.raises(CheckpointError, match="Nothing is downloaded"):
        VisionLanguageModel.load(tiny.model_name, tmp_path / "absent.pt", device="cpu", model_cfg=tiny.model_cfg)
    with pytest.raises(CheckpointError, match="--checkpoint"):
        VisionLanguageModel.load(tiny.model_name, None, device="cpu", model_cfg=tiny.model_cfg)


def _fake_store(vlm, dim=32, encoder=None, sha=None, features=True):
    attrs = {"patch_encoder": encoder if encoder is not None else vlm.model_id,
             "patch_encoder_sha256": sha if sha is not None else vlm.checkpoint_sha256}
    feats = np.zeros((4, dim), np.float32) if features else None
    return SimpleNamespace(attrs=attrs, features=feats, path="slide.h5")


def test_check_feature_store_accepts_same_model_and_explains_mismatches(vlm):
    vlm.check_feature_store(_fake_store(vlm))
    with pytest.raises(FeatureStoreError, match=r"--encoder open_clip:slpd-tiny-clip --checkpoint"):
        vlm.check_feature_store(_fake_store(vlm, encoder="hipt_vit256 (random-init seed 0)", dim=384))
    with pytest.raises(FeatureStoreError, match="another checkpoint"):
        vlm.check_feature_store(_fake_store(vlm, sha="0" * 64))
    with pytest.raises(FeatureStoreError, match="16-d but open_clip:slpd-tiny-clip embeds into 32-d"):
        vlm.check_feature_store(_fake_store(vlm, dim=16))
    with pytest.raises(FeatureStoreError, match="holds no patch features"):
        vlm.check_feature_store(_fake_store(vlm, features=False))


# -- text prototypes -------------------------------------------------------------------------------------
def test_text_prototypes_are_normalized_means_of_description_embeddings(vlm):
    desc = load_descriptions("kidney")
    tp = text_prototypes(desc, vlm)
    assert tp.embeddings.shape == (len(desc), 32)
    assert np.allclose(np.linalg.norm(tp.embeddings, axis=1), 1.0, atol=1e-5)
    assert tp.names == desc.names and tp.colors == desc.colors and tp.model_id == vlm.model_id
    for k in (0, len(desc) - 1):
        e = vlm.encode_text(list(desc.prototypes[k].descriptions)).double()
        ref = torch.nn.functional.normalize(e.mean(dim=0), dim=0).numpy()
        assert np.allclose(tp.embeddings[k], ref, atol=1e-5)


# -- aggregation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1000, 97, 7])
def test_visual_prototypes_and_slide_embedding_match_direct_formula(chunk):
    feats, centers, _ = _clustered_features(n=300 if chunk == 7 else 1000)
    t = centers + 0.3 * np.random.default_rng(5).standard_normal(centers.shape).astype(np.float32)
    p = visual_prototypes(feats, t, tau=TAU, chunk_size=chunk, device="cpu")
    p_ref, _ = _direct_softmax_pool(feats, t, TAU)
    assert p.shape == (5, 32) and np.allclose(p, p_ref, atol=1e-5)
    s_cat, s_mean = slide_embedding(feats, p, tau=TAU, chunk_size=chunk, device="cpu")
    s_ref, _ = _direct_softmax_pool(feats, p_ref, TAU)
    assert s_cat.shape == (5 * 32,) and s_mean.shape == (32,)
    assert np.allclose(s_cat, s_ref.reshape(-1), atol=1e-5)
    assert np.allclose(s_mean, s_ref.mean(axis=0), atol=1e-5)


def test_align_slide_matches_separate_functions_and_attention_sums_to_one():
    feats, centers, _ = _clustered_features()
    cfg = ProAlignConfig(tau=TAU, chunk_size=128, device="cpu")
    a = align_slide(feats, centers, cfg)
    p_ref, _ = _direct_softmax_pool(feats, centers, TAU)
    s_ref, w_ref = _direct_softmax_pool(feats, p_ref, TAU)
    assert np.allclose(a.visual_prototypes, p_ref, atol=1e-5)
    assert np.allclose(a.prototype_embeddings, s_ref, atol=1e-5)
    assert np.allclose(a.slide_embedding, s_ref.reshape(-1), atol=1e-5)
    assert a.attention.shape == (len(feats), 5)
    assert np.allclose(a.attention.astype(np.float64).sum(axis=0), 1.0, atol=1e-5)
    assert np.allclose(a.attention, w_ref, atol=1e-6)
    # the standalone attention weights agree and sum to one too
    w = attention_weights(feats, p_ref, tau=TAU, chunk_size=77, device="cpu")
    assert np.allclose(w.astype(np.float64).sum(axis=0), 1.0, atol=1e-5)
    assert np.allclose(w, w_ref, atol=1e-6)


def test_slide_embedding_is_permutation_invariant_over_patches():
    feats, centers, _ = _clustered_features(n=777)
    perm = np.random.default_rng(9).permutation(len(feats))
    cfg = ProAlignConfig(tau=TAU, chunk_size=100, device="cpu")
    a, b = align_slide(feats, centers, cfg), align_slide(feats[perm], centers, cfg)
    assert np.allclose(a.slide_embedding, b.slide_embedding, atol=1e-5)
    assert np.allclose(a.slide_embedding_mean, b.slide_embedding_mean, atol=1e-5)
    assert np.allclose(a.visual_prototypes, b.visual_prototypes, atol=1e-5)
    assert np.array_equal(a.labels[perm], b.labels)
    assert np.allclose(a.attention[perm], b.attention, atol=1e-6)


def test_streaming_is_stable_for_extreme_logits_and_low_tau():
    feats, centers, _ = _clustered_features(n=300)
    # tau 1e-3: logits up to 1000, a naive exp overflows; the streamed log-sum-exp must not
    p = attention_pool(feats, centers, tau=1e-3, chunk_size=64, device="cpu")
    p_ref, _ = _direct_softmax_pool(feats, centers, 1e-3)
    assert np.isfinite(p).all() and np.allclose(p, p_ref, atol=1e-5)


def test_aggregation_pulls_prototypes_towards_their_clusters():
    feats, centers, owner = _clustered_features(n=1000)
    p = visual_prototypes(feats, centers, tau=TAU, device="cpu")
    cos = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ centers.T
    assert (cos.argmax(axis=1) == np.arange(5)).all()
    labels, conf, sim = zero_shot_labels(feats, centers, tau=TAU, device="cpu")
    assert (labels == owner).mean() > 0.95


def test_zero_shot_labels_confidence_and_similarity_match_direct():
    feats, centers, _ = _clustered_features(n=500)
    labels, conf, sim = zero_shot_labels(feats, centers, tau=TAU, chunk_size=33, device="cpu")
    v = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    t = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    cos = v.astype(np.float64) @ t.T.astype(np.float64)
    prob = torch.softmax(torch.tensor(cos / TAU), dim=1).numpy()
    assert labels.dtype == np.int32 and np.array_equal(labels, cos.argmax(axis=1))
    assert np.allclose(conf, prob.max(axis=1), atol=1e-5)
    assert np.allclose(sim, cos.max(axis=1), atol=1e-5)
    assert ((conf > 1.0 / 5) & (conf <= 1.0)).all()


class _CountingRows:
    """An [N, D] array that records how many rows each read asks for (like an h5py dataset)."""

    def __init__(self, array):
        self.array, self.shape, self.max_rows, self.reads = array, array.shape, 0, 0

    def __getitem__(self, item):
        block = self.array[item]
        self.max_rows = max(self.max_rows, len(block))
        self.reads += 1
        return block


def test_100k_patches_are_streamed_in_bounded_chunks():
    rng = np.random.default_rng(0)
    feats = _CountingRows(rng.standard_normal((100_000, 32)).astype(np.float32))
    t = rng.standard_normal((8, 32)).astype(np.float32)
    a = align_slide(feats, t, ProAlignConfig(chunk_size=16384, device="cpu"), return_attention=False)
    assert feats.max_rows <= 16384 and feats.reads == 2 * int(np.ceil(100_000 / 16384))
    assert a.slide_embedding.shape == (8 * 32,) and a.attention is None and len(a.labels) == 100_000


def test_h5py_dataset_gives_the_same_result_as_an_array(tmp_path):
    feats, centers, _ = _clustered_features(n=700)
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh.create_dataset("features", data=feats, chunks=(64, 32))
    cfg = ProAlignConfig(chunk_size=128, device="cpu")
    with h5py.File(tmp_path / "f.h5", "r") as fh:
        a = align_slide(fh["features"], centers, cfg)
    b = align_slide(feats, centers, cfg)
    assert np.allclose(a.slide_embedding, b.slide_embedding, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    feats, centers, _ = _clustered_features(n=50)
    with pytest.raises(PrototypeError, match="no patch features"):
        align_slide(np.zeros((0, 32), np.float32), centers)
    with pytest.raises(PrototypeError, match="same vision-language model"):
        align_slide(feats, centers[:, :16])
    bad = feats.copy()
    bad[17, 3] = np.nan
    with pytest.raises(PrototypeError, match="patch 17"):
        align_slide(bad, centers, ProAlignConfig(chunk_size=8, device="cpu"))
    with pytest.raises(Exception, match="tau"):
        ProAlignConfig(tau=0)


def test_cancel_stops_within_a_slide_and_progress_counts_both_passes():
    feats, centers, _ = _clustered_features(n=1000)
    calls = []
    cfg = ProAlignConfig(chunk_size=100, device="cpu")
    align_slide(feats, centers, cfg, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (20, 20) and len(calls) == 20
    event = threading.Event()

    def progress(done, total):
        if done == 3:
            event.set()

    with pytest.raises(Cancelled):
        align_slide(feats, centers, ProAlignConfig(chunk_size=100, device="cpu"), progress=progress, cancel=event)


@pytest.mark.cuda
def test_align_slide_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    feats, centers, _ = _clustered_features(n=5000)
    a = align_slide(feats, centers, ProAlignConfig(chunk_size=1000, device="cpu"))
    b = align_slide(feats, centers, ProAlignConfig(chunk_size=1000, device="cuda"))
    assert np.allclose(a.slide_embedding, b.slide_embedding, atol=1e-4)
    assert (a.labels == b.labels).mean() > 0.999


# -- regions ---------------------------------------------------------------------------------------------
def test_patch_region_index_region_major_lattice_and_loose_layouts():
    region_coords = np.array([[0, 0], [100, 0], [0, 100], [300, 300]])
    g = 2  # 2 x 2 patches of 50 px per 100-px region, region-major
    patches = np.concatenate([[c + [0, 0], c + [50, 0], c + [0, 50], c + [50, 50]] for c in region_coords])
    assert np.array_equal(patch_region_index(patches, region_coords, 100, g * g), np.repeat(np.arange(4), 4))
    # shuffled patches plus one outside every region: lattice lookup
    order = np.random.default_rng(0).permutation(len(patches))
    shuffled = np.concatenate([patches[order], [[200, 200]]])
    expect = np.concatenate([np.repeat(np.arange(4), 4)[order], [-1]])
    assert np.array_equal(patch_region_index(shuffled, region_coords, 100, g * g), expect)
    # regions off any lattice: box test
    loose = region_coords + np.array([[0, 0], [7, 0], [0, 3], [1, 1]])
    pts = np.array([[10, 10], [110, 5], [5, 150], [350, 350], [99, 99], [1000, 0]])
    assert np.array_equal(patch_region_index(pts, loose, 100), [0, 1, 2, 3, 0, -1])


def test_region_labels_majority_vote_with_confidence_tiebreak():
    labels = np.array([0, 0, 1, 2, 2, 1, 1, 0])
    conf = np.array([.9, .8, .5, .6, .6, .9, .9, .1])
    region = np.array([0, 0, 0, 1, 1, 1, 1, -1])  # region 2 has no patch; the last patch has no region
    r = region_labels(labels, conf, region, n_regions=3, k=3)
    # region 0: votes 0,0,1 -> 0; region 1: 2,2,1,1 tie -> label 1 has more confidence (1.8 vs 1.2)
    assert r.labels.tolist() == [0, 1, -1]
    assert np.allclose(r.vote_share, [2 / 3, 0.5, 0.0])
    assert np.allclose(r.confidence, [0.85, 0.9, 0.0])


# -- cache -----------------------------------------------------------------------------------------------
def _result(n=20, k=3, d=8):
    rng = np.random.default_rng(0)
    att = rng.random((n, k)).astype(np.float32)
    return ProAlignResult(
        slide_id="s1", names=["tumour", "stroma", "necrosis"][:k], colors=["#d62728", "#f7b6d2", "#7f7f7f"][:k],
        slide_embedding=rng.random(k * d, dtype=np.float32), slide_embedding_mean=rng.random(d, dtype=np.float32),
        prototype_embeddings=rng.random((k, d), dtype=np.float32),
        visual_prototypes=rng.random((k, d), dtype=np.float32), text_prototypes=rng.random((k, d), dtype=np.float32),
        patch_coords=rng.integers(0, 1000, (n, 2)), patch_labels=rng.integers(0, k, n).astype(np.int32),
        patch_confidence=rng.random(n, dtype=np.float32), patch_similarity=rng.random(n, dtype=np.float32),
        patch_region=np.arange(n) // 4, patch_attention=att / att.sum(0),
        region_coords=np.array([[0, 0], [100, 0], [200, 0], [0, 100], [100, 100]]),
        region_labels=np.array([0, 1, 2, 1, -1], np.int32), region_vote_share=np.ones(5, np.float32),
        region_confidence=np.ones(5, np.float32),
        attrs={"tau": 0.05, "settings_key": "abc", "region_size_level0": 100.0, "vlm": "open_clip:x"},
    )


def test_result_round_trip_and_named_label_maps(tmp_path):
    path = write_proalign(tmp_path / "proalign" / "s1.h5", _result())
    loaded = load_proalign(path)
    ref = _result()
    assert loaded.names == ref.names and loaded.colors == ref.colors and loaded.slide_id == "s1"
    for name in ("slide_embedding", "patch_labels", "patch_attention", "region_labels", "patch_coords"):
        assert np.array_equal(getattr(loaded, name), getattr(ref, name)), name
    assert loaded.attrs["tau"] == 0.05 and loaded.region_size_level0 == 100.0
    assert loaded.region_label_names() == ["tumour", "stroma", "necrosis", "stroma", ""]
    assert abs(sum(loaded.label_fractions().values()) - 1.0) < 1e-9
    geo = loaded.region_geojson()
    assert {f["properties"]["classification"]["name"] for f in geo["features"]} == {"tumour", "stroma", "necrosis"}


def test_failed_write_keeps_the_previous_result(tmp_path):
    path = write_proalign(tmp_path / "s1.h5", _result())
    broken = _result()
    broken.patch_confidence = broken.patch_confidence[:5]
    with pytest.raises(ProAlignCacheError, match="patch_confidence"):
        write_proalign(path, broken)
    broken = _result()
    broken.slide_embedding = None
    with pytest.raises(ProAlignCacheError, match="slide_embedding is missing"):
        write_proalign(path, broken)
    assert np.array_equal(load_proalign(path).slide_embedding, _result().slide_embedding)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.h5"]  # no temporary file left behind
    with pytest.raises(ProAlignCacheError, match="slpd proalign"):
        load_proalign(tmp_path / "absent.h5")
