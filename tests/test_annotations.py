"""Prototype names: persistence in the cohort, stale names after re-clustering (reported, carried over by
region overlap or discarded, never misapplied), propagation through the prototype set matching with a
preview, and ProAlign zero-shot suggestions.

``build_labeled_cohort`` is shared with the other test files of the labeling and fine-tune panels: a real
cohort folder whose slides are copies of a real slide file, with FeatureStores written through the
features module. Each slide is cut into vertical bands of known tissue "types" (a type = a direction of
the patch-feature space plus noise), so every prototype has a ground truth.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.labeling import (PrototypeAnnotations, StaleAnnotationsError, accept_suggestions,
                                     default_color, plan_propagation, prototype_identity)
from napari_slpd.proalign.suggestions import proalign_suggestions
from napari_slpd.cohort import Cohort
from napari_slpd.errors import PrototypeError, SlpdError

TYPE_NAMES = ("tumour", "stroma", "necrosis")
SLIDE_W, SLIDE_H = 2220, 2967  # cmu_small_region.svs


@dataclass
class LabeledCohort:
    cohort: Cohort
    slide_ids: list[str]
    types: dict[str, np.ndarray] = field(default_factory=dict)  # slide_id -> [M] type of each region
    directions: np.ndarray | None = None  # [n_types, D]


def build_labeled_cohort(
    root: Path,
    directions: np.ndarray | None = None,
    n_slides: int = 3,
    rows: int = 5,
    cols: int = 6,
    grid: int = 4,
    size: int = 256,
    dim: int = 32,
    noise: float = 0.05,
    seed: int = 0,
    patch_encoder: str = "open_clip:slpd-tiny-clip (synthetic)",
    patch_encoder_sha256: str = "",
    with_prototypes: int | None = 3,
) -> LabeledCohort:
    """A cohort of ``n_slides`` slides (copies of the real CMU slide) with complete feature files.

    Region type = band of columns; slide s rotates the band order by s, so every slide holds every type
    and prototypes of one type match across slides. Patch features are ``direction[type]`` plus noise
    (unit directions: ``directions`` given, e.g. a VLM's text prototypes, or random); token grids are the
    patch features of each region; region embeddings come from a seeded random ViT-4K, the encoder a real
    extraction would record. ``with_prototypes``: K of the prototypes computed and cached (None: none).
    """
    from napari_slpd.features.store import RegionChunk, StoreLayout, write_store
    from napari_slpd.models.encoders import build_region_encoder

    source = real_slide("cmu_svs")
    rng = np.random.default_rng(seed)
    n_types = len(TYPE_NAMES)
    if directions is None:
        directions = rng.normal(size=(n_types, dim))
    directions = np.asarray(directions, np.float64)
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    dim = directions.shape[1]
    cohort = Cohort(root)
    encoder = build_region_encoder("hipt_vit4k", device="cpu", in_dim=dim)
    out = LabeledCohort(cohort, [], {}, directions.astype(np.float32))
    patch = size // grid
    (root / "slides").mkdir(parents=True, exist_ok=True)
    for s in range(n_slides):
        path = root / "slides" / f"case_{s}.svs"
        if not path.exists():
            shutil.copyfile(source, path)
        record = cohort.add_slide(path, mpp=0.499, mpp_source="metadata")
        rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        coords = np.stack([96 + cc.ravel() * size, 128 + rr.ravel() * size], 1).astype(np.int64)
        band = cc.ravel() * n_types // cols
        types = (band + s) % n_types
        m = len(types)
        feats = directions[types][:, None, :] + noise * rng.normal(size=(m, grid * grid, dim))
        feats = feats.astype(np.float32)  # [M, G*G, D] row-major patches
        tokens = feats.reshape(m, grid, grid, dim).transpose(0, 3, 1, 2).copy()  # [M, D, G, G]
        embeddings = encoder.encode(tokens).numpy()
        py, px = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
        offsets = np.stack([px.ravel(), py.ravel()], 1) * patch
        patch_coords = (coords[:, None, :] + offsets[None]).reshape(-1, 2).astype(np.int64)
        settings = {"slide_id": record.slide_id, "patch_encoder": patch_encoder,
                    "patch_encoder_sha256": patch_encoder_sha256, "region_encoder": encoder.model_id,
                    "region_encoder_sha256": "", "region_px": size, "patch_px": patch, "target_mpp": 0.5}
        attrs = {**settings, "slide_path": str(path), "region_size_level0": size, "mpp": 0.499,
                 "mpp_source": "metadata", "patches_per_side": grid, "patch_size_level0": float(patch),
                 "slide_width": SLIDE_W, "slide_height": SLIDE_H}
        layout = StoreLayout(m, dim, grid, embeddings.shape[1], "float32", patch_features=True)
        chunk = RegionChunk(tokens, embeddings, coords, np.ones(m, np.float32),
                            feats.reshape(-1, dim), patch_coords)
        write_store(cohort.features_path(record.slide_id), layout, settings, chunk, attrs=attrs,
                    coords_attrs={"patch_size": patch, "patch_level": 0, "patch_size_level0": float(patch)})
        out.slide_ids.append(record.slide_id)
        out.types[record.slide_id] = types
    if with_prototypes:
        from napari_slpd.prototypes import compute_cohort_prototypes

        report = compute_cohort_prototypes(cohort, k=with_prototypes, device="cpu")
        assert not report.failed, report.to_dict()
    return out


def type_of_prototypes(lab: LabeledCohort, slide_id: str, protos) -> dict[int, int]:
    """prototype -> the tissue type most of its regions have (the ground truth of the fixture)."""
    types = lab.types[slide_id]
    return {k: int(np.bincount(types[protos.assignments == k], minlength=3).argmax()) for k in range(protos.k)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_labeled_cohort(tmp_path_factory.mktemp("labeled"))


@pytest.fixture
def fresh(lab, tmp_path):
    """A private copy of the module's cohort (tests here change names and prototypes)."""
    root = tmp_path / "cohort"
    shutil.copytree(lab.cohort.root, root)
    return LabeledCohort(Cohort(root), list(lab.slide_ids), dict(lab.types), lab.directions)


def _protos(cohort, slide_id):
    from napari_slpd.prototypes import load_prototypes

    return load_prototypes(cohort, slide_id)


def test_fixture_prototypes_recover_the_tissue_types(lab):
    for sid in lab.slide_ids:
        protos = _protos(lab.cohort, sid)
        mapping = type_of_prototypes(lab, sid, protos)
        assert sorted(mapping.values()) == [0, 1, 2]  # one prototype per type
        for k, t in mapping.items():
            assert (lab.types[sid][protos.assignments == k] == t).all()


def test_names_and_colours_persist_across_reopening(fresh):
    sid = fresh.slide_ids[0]
    ann = PrototypeAnnotations.load(fresh.cohort)
    ann.rename(sid, 1, "  invasive   carcinoma ")
    ann.recolor(sid, 1, "#AA0000")
    ann.recolor(sid, 2, (0.0, 0.5, 1.0))
    reopened = PrototypeAnnotations.load(Cohort(fresh.cohort.root, create=False))
    labels = reopened.labels(sid)
    assert labels[1].name == "invasive carcinoma" and labels[1].color == "#aa0000" and labels[1].source == "user"
    assert labels[2].name == "prototype 2" and labels[2].color == "#0080ff"
    names, colors = reopened.styles(sid)
    assert names == {0: "prototype 0", 1: "invasive carcinoma", 2: "prototype 2"}
    assert colors[0] == default_color(0)
    data = json.loads(fresh.cohort.annotations_path.read_text())
    stored = data["slides"][sid]["prototypes"]
    assert stored["identity"] == prototype_identity(_protos(fresh.cohort, sid).centroids) and stored["k"] == 3
    assert not list(fresh.cohort.root.glob(".annotations.json.*"))  # written atomically, nothing left over
    with pytest.raises(PrototypeError, match="no prototype 7"):
        ann.rename(sid, 7, "x")
    with pytest.raises(SlpdError, match="empty"):
        ann.rename(sid, 0, "   ")
    with pytest.raises(SlpdError, match="hex"):
        ann.recolor(sid, 0, "#12345g")
    reopened.clear(sid, 1)
    assert 1 not in PrototypeAnnotations.load(fresh.cohort).labels(sid)


def test_stale_names_are_reported_not_misapplied_and_can_be_carried_over(fresh):
    from napari_slpd.prototypes import save_prototypes

    sid = fresh.slide_ids[1]
    ann = PrototypeAnnotations.load(fresh.cohort)
    protos = _protos(fresh.cohort, sid)
    truth = type_of_prototypes(fresh, sid, protos)
    for k, t in truth.items():
        ann.rename(sid, k, TYPE_NAMES[t])
    # "Re-clustering": the same partition, numbered differently, with other centroids (a new encoder).
    perm = np.array([2, 0, 1])
    rng = np.random.default_rng(5)
    new_centroids = rng.normal(size=protos.centroids.shape).astype(np.float32)
    new_centroids /= np.linalg.norm(new_centroids, axis=1, keepdims=True)
    protos.centroids = new_centroids[np.argsort(perm)]
    protos.assignments = perm[protos.assignments]
    save_prototypes(fresh.cohort.prototypes_path(sid), protos)

    ann = PrototypeAnnotations.load(fresh.cohort)
    state = ann.state(sid)
    assert state.status == "stale" and "recomputed" in state.message
    assert [s.slide_id for s in ann.stale_slides()] == [sid]
    with pytest.raises(StaleAnnotationsError):
        ann.labels(sid)
    with pytest.raises(StaleAnnotationsError):
        ann.rename(sid, 0, "x")  # never written over stale names silently
    assert ann.styles(sid)[0] == {k: f"prototype {k}" for k in range(3)}  # display falls back to defaults
    plan = ann.plan_carry_over(sid)
    assert all(c.action == "set" and c.similarity == pytest.approx(1.0) for c in plan)
    report = ann.carry_over()
    assert report == {sid: "3 name(s) carried over"}
    new_truth = type_of_prototypes(fresh, sid, _protos(fresh.cohort, sid))
    labels = PrototypeAnnotations.load(fresh.cohort).labels(sid)
    assert {k: lab.name for k, lab in labels.items()} == {k: TYPE_NAMES[t] for k, t in new_truth.items()}

    # K changes to 2 by merging two types: the merged type's names cannot both survive.
    merged = _protos(fresh.cohort, sid)
    merged.assignments = np.where(merged.assignments == 2, 1, merged.assignments)
    merged.centroids = merged.centroids[:2]
    merged.sizes = merged.sizes[:2]
    save_prototypes(fresh.cohort.prototypes_path(sid), merged)
    ann = PrototypeAnnotations.load(fresh.cohort)
    plan = ann.plan_carry_over(sid)
    assert sum(c.action == "set" for c in plan) == 2 and sum(c.action == "skip" for c in plan) == 1
    assert ann.discard_stale() == [sid] and ann.labels(sid) == {}


def test_propagation_preview_follows_the_prototype_matching(fresh):
    src, t1, t2 = fresh.slide_ids
    ann = PrototypeAnnotations.load(fresh.cohort)
    protos = {sid: _protos(fresh.cohort, sid) for sid in fresh.slide_ids}
    truth = {sid: type_of_prototypes(fresh, sid, protos[sid]) for sid in fresh.slide_ids}
    k_src = next(k for k, t in truth[src].items() if t == 0)
    ann.set_label(src, k_src, name="tumour", color="#ff0000")
    # A person already named t2's tumour prototype differently.
    k_t2 = next(k for k, t in truth[t2].items() if t == 0)
    ann.rename(t2, k_t2, "carcinoma")

    plan = plan_propagation(fresh.cohort, src, k_src, "tumour", [t1, t2, src], annotations=ann)
    assert [c.slide_id for c in plan] == [t1, t2]  # the source itself is never a target
    c1, c2 = plan
    assert c1.action == "set" and truth[t1][c1.proto_idx] == 0 and c1.similarity > 0.9
    assert c1.new.color == "#ff0000" and c1.new.source == "propagated" and c1.new.origin == f"{src}:{k_src}"
    assert c2.action == "skip" and c2.proto_idx == k_t2 and "by a person" in c2.reason
    assert "->" in c1.describe() and "not changed" in c2.describe()
    assert PrototypeAnnotations.load(fresh.cohort).labels(t1) == {}  # a preview writes nothing

    applied = ann.apply(plan)
    assert [c.slide_id for c in applied] == [t1]
    labels = PrototypeAnnotations.load(fresh.cohort).labels(t1)
    assert labels[c1.proto_idx].name == "tumour" and labels[c1.proto_idx].confidence == pytest.approx(c1.similarity)
    again = plan_propagation(fresh.cohort, src, k_src, "tumour", [t1, t2], annotations=ann, overwrite_user=True)
    assert [c.action for c in again] == ["unchanged", "set"]

    # A preview made before the target's prototypes were recomputed is refused.
    from napari_slpd.prototypes import compute_slide_prototypes

    compute_slide_prototypes(fresh.cohort, t2, k=2, device="cpu")
    with pytest.raises(StaleAnnotationsError):
        ann.apply(again)


def _proalign_result(lab, slide_id, protos, flip_region=None):
    """A ProAlign result as napari_slpd.proalign writes it: patch labels from the ground-truth types."""
    from napari_slpd.features.store import FeatureStore
    from napari_slpd.proalign.cache import ProAlignResult

    with FeatureStore.open(lab.cohort.features_path(slide_id)) as store:
        coords = store.region_coords
        g2 = store.grid_size ** 2
        patch_coords = store.coords
    types = lab.types[slide_id]
    patch_labels = np.repeat(types, g2).astype(np.int32)
    rng = np.random.default_rng(0)
    noisy = rng.random(len(patch_labels)) < 0.1  # 10 % of patches disagree
    patch_labels[noisy] = (patch_labels[noisy] + 1) % 3
    conf = np.full(len(patch_labels), 0.8, np.float32)
    k, d = 3, 8
    return ProAlignResult(
        slide_id=slide_id, names=list(TYPE_NAMES), colors=["#d62728", "#2ca02c", "#7f7f7f"],
        slide_embedding=np.zeros(k * d, np.float32), slide_embedding_mean=np.zeros(d, np.float32),
        prototype_embeddings=np.zeros((k, d), np.float32), visual_prototypes=np.zeros((k, d), np.float32),
        text_prototypes=np.zeros((k, d), np.float32), patch_coords=patch_coords, patch_labels=patch_labels,
        patch_confidence=conf, patch_similarity=conf, patch_region=np.repeat(np.arange(len(coords)), g2),
        region_coords=coords if flip_region is None else coords[::-1].copy(),
    )


def test_proalign_suggestions_name_prototypes_by_their_patches(fresh):
    sid = fresh.slide_ids[0]
    protos = _protos(fresh.cohort, sid)
    truth = type_of_prototypes(fresh, sid, protos)
    suggestions = proalign_suggestions(_proalign_result(fresh, sid, protos), protos)
    assert {s.proto_idx: s.name for s in suggestions} == {k: TYPE_NAMES[t] for k, t in truth.items()}
    for s in suggestions:
        assert 0.85 < s.share < 0.95 and s.mean_confidence == pytest.approx(0.8)
        assert s.confidence == pytest.approx(s.share * 0.8) and s.runner_up in TYPE_NAMES
    with pytest.raises(SlpdError, match="other regions"):
        proalign_suggestions(_proalign_result(fresh, sid, protos, flip_region=True), protos)

    ann = PrototypeAnnotations.load(fresh.cohort)
    user_k = suggestions[0].proto_idx
    ann.rename(sid, user_k, "my own name")
    accepted = accept_suggestions(ann, sid, suggestions)  # "accept all" keeps a person's names
    assert len(accepted) == 2
    labels = PrototypeAnnotations.load(fresh.cohort).labels(sid)
    assert labels[user_k].name == "my own name"
    other = next(s for s in suggestions if s.proto_idx != user_k)
    assert labels[other.proto_idx].source == "proalign" and labels[other.proto_idx].color == other.color
    assert labels[other.proto_idx].confidence == pytest.approx(other.confidence)
