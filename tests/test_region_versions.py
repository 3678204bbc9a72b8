"""Versions of region embeddings (issue 11, item 3): "Use checkpoint" keeps the earlier region embeddings
beside the new ones; switching back restores bit-identical region embeddings, prototypes and cohort index
without recomputing anything; old (unversioned) files migrate without losing data; evaluation gets a loader
for every version."""

from __future__ import annotations

import h5py
import numpy as np
import pytest


def _state(session, ids):
    """Everything that must come back bit for bit: embeddings, prototype files, index answers."""
    from napari_slpd.features.store import FeatureStore

    emb, protos, proto_bytes, keys = {}, {}, {}, {}
    for sid in ids:
        with FeatureStore.open(session.cohort.features_path(sid)) as store:
            emb[sid] = store.region_embeddings.copy()
            keys[sid] = store.settings_key
        p = session.prototypes(sid, compute=False)
        protos[sid] = (p.centroids.copy(), p.assignments.copy(), p.similarity.copy())
        with h5py.File(session.cohort.prototypes_path(sid), "r") as fh:
            proto_bytes[sid] = {k: fh[k][()].tobytes() for k in ("centroids", "assignments", "similarity", "sizes")}
    similar = {sid: [(m.slide_id, m.distance, m.similarity, m.pairs) for m in session.similar_slides(sid, 5)]
               for sid in ids}
    regions = [(m.slide_id, m.region, m.distance) for m in session.similar_regions(ids[0], 0, 5)]
    return emb, protos, proto_bytes, keys, similar, regions


def _assert_same(a, b):
    emb_a, protos_a, bytes_a, keys_a, sim_a, reg_a = a
    emb_b, protos_b, bytes_b, keys_b, sim_b, reg_b = b
    for sid in emb_a:
        assert emb_a[sid].tobytes() == emb_b[sid].tobytes()
        for x, y in zip(protos_a[sid], protos_b[sid]):
            assert x.tobytes() == y.tobytes()
        assert bytes_a[sid] == bytes_b[sid]
    assert keys_a == keys_b
    assert sim_a == sim_b
    assert reg_a == reg_b


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from test_annotations import build_labeled_cohort

    return build_labeled_cohort(tmp_path_factory.mktemp("versions") / "cohort", rows=3, cols=4, n_slides=3)


def test_use_checkpoint_then_switch_back_is_bit_identical(lab, tmp_path):
    import torch

    from napari_slpd.session.use_checkpoint import use_checkpoint
    from napari_slpd.features.store import (VERSIONS_GROUP, FeatureStore, load_region_embeddings,
                                            region_embedding_versions)
    from napari_slpd.session.versions import (cohort_region_encoders, region_embedding_sources,
                                               selected_region_encoder, use_region_encoder)
    from napari_slpd.models.checkpoints import save_dino_checkpoint
    from napari_slpd.models.vit import vit4k_xs
    from napari_slpd.session import FeatureSettings, PrototypeSettings, Session, SessionSettings

    ids = lab.slide_ids
    path0 = lab.cohort.features_path(ids[0])
    with h5py.File(path0, "r") as fh:  # written like every file before versions existed
        assert VERSIONS_GROUP not in fh and isinstance(fh.get("region_embeddings", getlink=True), h5py.HardLink)
        raw = fh["region_embeddings"][()]
    (old,) = region_embedding_versions(path0)  # one implicit version: the recorded encoder's
    assert old.selected and old.origin == "extraction" and "random-init" in old.key
    assert load_region_embeddings(path0).tobytes() == raw.tobytes()

    session = Session(lab.cohort.root, SessionSettings(
        features=FeatureSettings(patch_encoder="open_clip:slpd-tiny-clip", region_px=256, patch_px=64, device="cpu"),
        prototypes=PrototypeSettings(k=3)))
    session.index()
    before = _state(session, ids)

    torch.manual_seed(3)
    checkpoint = save_dino_checkpoint(vit4k_xs(input_embed_dim=32), tmp_path / "run" / "teacher_vit4k.pth",
                                      extra={"epoch": 4})
    report = use_checkpoint(session, checkpoint)
    assert [r.status for r in report.reencoded] == ["reencoded"] * 3
    assert report.previous_version == old.key and report.version != old.key
    assert "switch back" in report.summary()
    after = _state(session, ids)
    assert not np.allclose(after[0][ids[0]], before[0][ids[0]])
    assert after[3][ids[0]] != before[3][ids[0]]  # the file's settings key names the new encoder

    # The old file's data moved, unchanged, into the versions group; the new version sits beside it.
    with h5py.File(path0, "r") as fh:
        assert set(fh[VERSIONS_GROUP]) == {old.key, report.version}
        assert fh[VERSIONS_GROUP][old.key][()].tobytes() == raw.tobytes()
        assert isinstance(fh.get("region_embeddings", getlink=True), h5py.SoftLink)
    encoders = cohort_region_encoders(lab.cohort)
    assert [e.key for e in encoders] == [old.key, report.version]
    assert [e.selected for e in encoders] == [False, True] and all(e.complete for e in encoders)
    assert encoders[1].checkpoint == str(checkpoint.resolve()) and "epoch 4" in encoders[1].label
    assert selected_region_encoder(lab.cohort) == report.version
    assert load_region_embeddings(path0, old.key).tobytes() == raw.tobytes()
    assert load_region_embeddings(path0, encoders[1].sha256[:20]).tobytes() == after[0][ids[0]].tobytes()
    with pytest.raises(Exception, match="has no region embeddings of version 'nope'"):
        load_region_embeddings(path0, "nope")

    # Switching back: nothing recomputed (no K-means: the kept prototype files come back), all identical.
    import napari_slpd.prototypes.cache as cache

    calls = []
    original = cache.compute_prototypes
    cache.compute_prototypes = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        back = use_region_encoder(session, old.key)
    finally:
        cache.compute_prototypes = original
    assert calls == [] and sorted(back.switched) == sorted(ids) and sorted(back.prototypes_restored) == sorted(ids)
    assert session.settings.features.region_checkpoint is None  # the seeded random initialisation again
    _assert_same(_state(session, ids), before)
    # ... and forth again, to the fine-tuned version, also identical.
    again = use_region_encoder(session, str(checkpoint))
    assert again.key == report.version
    assert session.settings.features.region_checkpoint == str(checkpoint.resolve())
    _assert_same(_state(session, ids), after)
    # "Use checkpoint" with a checkpoint already encoded re-encodes nothing.
    assert [r.status for r in use_checkpoint(session, checkpoint).reencoded] == ["current"] * 3

    # Evaluation sees every version, by key, and "current" (the selected one).
    sources = dict(region_embedding_sources(lab.cohort))
    assert set(sources) == {"current", old.key, report.version}
    assert sources[old.key](ids[0]).tobytes() == raw.tobytes()
    assert sources["current"](ids[0]).tobytes() == after[0][ids[0]].tobytes()
    with FeatureStore.open(path0) as store:
        assert store.region_embedding_version == report.version
        assert store.load_region_embeddings(old.key).tobytes() == raw.tobytes()


def test_cancelled_use_checkpoint_selects_nothing_and_resumes(lab, tmp_path):
    import torch

    from napari_slpd.session.use_checkpoint import use_checkpoint
    from napari_slpd.features.store import region_embedding_versions
    from napari_slpd.session.versions import selected_region_encoder
    from napari_slpd.models.checkpoints import save_dino_checkpoint
    from napari_slpd.models.vit import vit4k_xs
    from napari_slpd.session import FeatureSettings, PrototypeSettings, Session, SessionSettings

    session = Session(lab.cohort.root, SessionSettings(
        features=FeatureSettings(patch_encoder="open_clip:slpd-tiny-clip", region_px=256, patch_px=64, device="cpu"),
        prototypes=PrototypeSettings(k=3)))
    selected = selected_region_encoder(lab.cohort)
    torch.manual_seed(11)
    other = save_dino_checkpoint(vit4k_xs(input_embed_dim=32), tmp_path / "other.pth")
    calls = []

    def cancel_after_first_slide():
        calls.append(1)
        return len(calls) > 2

    report = use_checkpoint(session, other, cancel=cancel_after_first_slide)
    assert report.cancelled and report.reencoded[0].status == "reencoded"
    assert selected_region_encoder(lab.cohort) == selected  # nothing switched
    n_versions = len(region_embedding_versions(lab.cohort.features_path(lab.slide_ids[0])))
    done = use_checkpoint(session, other)
    assert [r.status for r in done.reencoded] == ["current", "reencoded", "reencoded"]
    assert len(region_embedding_versions(lab.cohort.features_path(lab.slide_ids[0]))) == n_versions
    assert selected_region_encoder(lab.cohort) == done.version


def test_migrate_store_keeps_data(tmp_path):
    from test_feature_store import SETTINGS, make_data, write

    from napari_slpd.features.store import (VERSION_ATTR, VERSIONS_GROUP, FeatureStore, add_region_embedding_version,
                                            migrate_store, region_embedding_versions,
                                            select_region_embedding_version)

    data = make_data()
    path = write(tmp_path / "s.h5", data).final_path
    with FeatureStore.open(path) as store:
        key0, attrs0 = store.region_embedding_version, dict(store.attrs)
    assert migrate_store(path) and not migrate_store(path)
    with FeatureStore.open(path) as store:
        np.testing.assert_array_equal(store.region_embeddings, data["embeddings"])
        assert store.settings_key == attrs0["settings_key"] and store.attrs[VERSION_ATTR] == key0
    new = np.ones_like(data["embeddings"])
    v = add_region_embedding_version(path, new, "hipt_vit4k (file sha256:abcdef0123456789)", "abcdef0123456789",
                                     select=False)
    assert v.key == "abcdef012345" and not v.selected
    with FeatureStore.open(path) as store:  # not selected: the file reads as before
        np.testing.assert_array_equal(store.region_embeddings, data["embeddings"])
    select_region_embedding_version(path, v.key)
    with FeatureStore.open(path) as store:
        np.testing.assert_array_equal(store.region_embeddings, new)
        assert store.settings_key != attrs0["settings_key"] and store.attrs["region_encoder_sha256"] == "abcdef0123456789"
    # A switch interrupted after the link moved but before the root attributes: readers follow the link.
    with h5py.File(path, "r+") as fh:
        del fh["region_embeddings"]
        fh["region_embeddings"] = h5py.SoftLink(f"/{VERSIONS_GROUP}/{key0}")
    with FeatureStore.open(path) as store:
        np.testing.assert_array_equal(store.region_embeddings, data["embeddings"])
        assert store.settings_key == attrs0["settings_key"]
    select_region_embedding_version(path, key0)
    assert [x.selected for x in region_embedding_versions(path)] == [True, False]
    assert SETTINGS  # the fixture's settings are what the file records


def test_cli_lists_and_switches_region_encoders(lab, capsys):
    import json

    from napari_slpd.cli import main
    from napari_slpd.session.versions import cohort_region_encoders, selected_region_encoder

    encoders = cohort_region_encoders(lab.cohort)
    assert len(encoders) >= 2  # the module's earlier tests used checkpoints
    assert main(["region-encoders", str(lab.cohort.root)]) == 0
    table = capsys.readouterr().out
    assert all(e.key in table for e in encoders) and "yes" in table
    first = encoders[0].key
    assert main(["region-encoders", str(lab.cohort.root), "--use", first, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["switched"]["key"] == first and selected_region_encoder(lab.cohort) == first
    assert [e["selected"] for e in out["region_encoders"]] == [e.key == first for e in encoders]
    assert main(["region-encoders", str(lab.cohort.root), "--use", "nope"]) == 2
    assert "has no region embeddings of 'nope'" in capsys.readouterr().err


def test_cli_and_panel_session_offer_the_same_representations(lab, capsys):
    """`slpd evaluate --list` and the Evaluation panel both ask the Session: every region-embedding version is
    a representation in both (the CLI used to see only the current one unless a panel had run before)."""
    import json

    from napari_slpd.cli import main
    from napari_slpd.evaluation.representations import set_region_embedding_sources
    from napari_slpd.session import Session
    from napari_slpd.session.versions import cohort_region_encoders

    set_region_embedding_sources(None)  # as in a fresh `slpd` process
    assert main(["evaluate", str(lab.cohort.root), "--list", "--json"]) == 0
    cli = [(r["name"], r["n_slides"], r["available"]) for r in json.loads(capsys.readouterr().out)]
    keys = [e.key for e in cohort_region_encoders(lab.cohort)]
    assert len(keys) >= 2 and all(f"region_mean@{k}" in {name for name, _, _ in cli} for k in keys)
    panel = [(i.name, i.n_slides, i.available) for i in Session(lab.cohort.root, create=False).representations()]
    assert cli == panel
