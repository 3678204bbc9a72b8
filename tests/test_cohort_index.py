"""The cohort index (bounded and reference paths, add/remove, save/load, cohort sync) and region retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_prototypes import clustered_embeddings, make_cohort, write_feature_file

from napari_slpd.errors import PrototypeError
from napari_slpd.prototypes import compute_cohort_prototypes
from napari_slpd.similarity import (
    CohortIndex,
    IndexConfig,
    RegionIndex,
    prototype_set_similarity,
)


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def structured_cohort(rng, n_slides, k=8, dim=32, n_types=64, per_case=5):
    """Slides of a case share tissue types and their case-specific variant: neighbours mean something."""
    centres = unit(rng, n_types, dim)
    n_cases = n_slides // per_case
    case_types = np.stack([rng.choice(n_types, k + 4, replace=False) for _ in range(n_cases)])
    case_shift = unit(rng, n_cases, k + 4, dim) * 0.5
    out = np.empty((n_slides, k, dim), np.float32)
    for s in range(n_slides):
        c = s % n_cases
        slots = rng.choice(k + 4, k, replace=False)
        out[s] = centres[case_types[c, slots]] + case_shift[c, slots] + unit(rng, k, dim) * 0.4
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def brute_force_ranking(protos: dict[str, np.ndarray], query: str, n: int):
    """(S, distance, slide id) of the n nearest slides by distance max(K, L) - S, computed pair by pair."""
    rows = []
    for sid, P in protos.items():
        if sid != query:
            S = prototype_set_similarity(protos[query], P)[0]
            rows.append((S, max(len(P), len(protos[query])) - S, sid))
    rows.sort(key=lambda t: (t[1], t[2]))
    return rows[:n]


def test_exact_queries_rank_like_brute_force_and_explain_the_match():
    rng = np.random.default_rng(0)
    protos = {f"s{i:03d}": unit(rng, 4, 16) for i in range(150)}
    protos.update({f"m{i}": unit(rng, 3, 16) for i in range(10)})  # slides whose K was capped
    index = CohortIndex()
    for sid, P in protos.items():
        index.add(sid, P)
    assert len(index) == 160 and not index.uses_ivf
    for query in ("s007", "m3"):
        results = index.query(query, n=12)
        ref = brute_force_ranking(protos, query, 12)
        assert [r.slide_id for r in results] == [sid for _, _, sid in ref]
        for r, (S, distance, _) in zip(results, ref):
            K = min(protos[query].shape[0], protos[r.slide_id].shape[0])
            assert r.similarity == pytest.approx(S, abs=1e-5)
            assert r.distance == pytest.approx(distance, abs=1e-5)
            assert len(r.pairs) == K and sum(p.similarity for p in r.prototype_pairs) == pytest.approx(S, abs=1e-5)
            assert all(p.similarity == pytest.approx(float(protos[query][p.k] @ protos[r.slide_id][p.l]), abs=1e-5)
                       for p in r.prototype_pairs)
        assert query not in [r.slide_id for r in results]
        assert [r.rank for r in results] == list(range(1, 13))
    # A query by prototype set (e.g. a slide outside the cohort) and the query slide itself when asked.
    by_array = index.query(protos["s007"], n=3)
    assert by_array[0].slide_id == "s007" and by_array[0].distance == pytest.approx(0.0, abs=1e-5)
    assert index.query("s007", n=1, include_self=True)[0].slide_id == "s007"
    assert "s002" not in [r.slide_id for r in index.query("s007", n=159, exclude=["s002"])]


def test_add_remove_replace_and_the_first_stage_stays_in_step():
    rng = np.random.default_rng(2)
    X = structured_cohort(rng, 600, k=4, dim=16)
    ids = [f"s{i}" for i in range(600)]
    for method in ("exact", "auto"):
        index = CohortIndex(config=IndexConfig(method=method, device="cpu"))
        index.add_arrays(ids, X)
        top = index.query("s0", n=5)
        gone = top[0].slide_id
        assert index.remove(gone) and not index.remove(gone) and gone not in index
        after = index.query("s0", n=5)
        assert gone not in [r.slide_id for r in after]
        assert [r.slide_id for r in after[:4]] == [r.slide_id for r in top[1:]]
        index.add(gone, X[ids.index(gone)])
        assert [r.slide_id for r in index.query("s0", n=5)] == [r.slide_id for r in top]
        index.add("s0-copy", X[0])  # new slide identical to the query
        assert index.query("s0", n=1)[0].slide_id == "s0-copy"
        index.add("s0-copy", -X[0])  # replaced: now the opposite
        assert "s0-copy" not in [r.slide_id for r in index.query("s0", n=20)]
        for sid in ids[100:500]:  # many removals: storage is compacted, ids stay valid
            index.remove(sid)
        assert len(index) == 201 and index._store.dead_rows < 400 * 4
        assert [r.slide_id for r in index.query("s1", n=5)] == \
               [r.slide_id for r in index.query("s1", n=5, method="exact")]
        if method == "auto":
            assert len(index.stage()) == len(index) and index.last_stats.exact


def test_bad_queries_and_inputs_get_clear_messages():
    rng = np.random.default_rng(3)
    index = CohortIndex()
    with pytest.raises(PrototypeError, match="empty"):
        index.query(unit(rng, 4, 8))
    index.add("a", unit(rng, 4, 8))
    index.add("b", unit(rng, 4, 8))
    with pytest.raises(PrototypeError, match="8-d ones"):
        index.add("c", unit(rng, 4, 16))
    with pytest.raises(PrototypeError, match="not in the cohort index"):
        index.query("zzz")
    with pytest.raises(PrototypeError, match="another encoder"):
        index.query(unit(rng, 4, 16))
    bad = unit(rng, 4, 8)
    bad[0, 0] = np.nan
    with pytest.raises(PrototypeError, match="NaN"):
        index.query(bad)
    with pytest.raises(PrototypeError, match="NaN"):
        index.add("d", bad)
    with pytest.raises(PrototypeError, match="at least 1"):
        index.query("a", n=0)
    with pytest.raises(PrototypeError, match="method"):
        IndexConfig(method="hnsw")
    assert IndexConfig.from_dict({"method": "ivf", "nprobe": 8}).method == "auto"  # format-1 settings
    assert [r.slide_id for r in index.query("a", n=10)] == ["b"]  # fewer slides than asked


def test_save_load_roundtrip_is_atomic(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    X = structured_cohort(rng, 400, k=4, dim=16)
    ids = [f"s{i}" for i in range(400)]
    for method in ("exact", "auto"):
        folder = tmp_path / method
        index = CohortIndex(config=IndexConfig(method=method, device="cpu"))
        index.add_arrays(ids, X)
        index.remove("s5")
        index.save(folder)
        loaded = CohortIndex.load(folder)
        assert loaded.slide_ids == index.slide_ids and not loaded.uses_ivf
        for q in ("s0", "s17"):
            assert [(r.slide_id, round(r.distance, 6)) for r in loaded.query(q, n=8)] == \
                   [(r.slide_id, round(r.distance, 6)) for r in index.query(q, n=8)]
        loaded.add("new", X[0])  # ids keep working after a reload (slot numbers are preserved)
        assert loaded.query("s0", n=1)[0].slide_id == "new"
        first = json.loads((folder / "cohort.json").read_text())
        # A save that fails half-way leaves the previous index readable and untouched.
        import napari_slpd.similarity.persistence as index_module

        def broken_savez(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(index_module.np, "savez", broken_savez)
        with pytest.raises(OSError, match="disk full"):
            loaded.save(folder)
        monkeypatch.undo()
        assert json.loads((folder / "cohort.json").read_text()) == first
        assert "new" not in CohortIndex.load(folder)
        assert not list(folder.glob("*.partial"))
        loaded.save(folder)  # the next save replaces the generation and removes the old files
        files = sorted(p.name for p in folder.iterdir())
        assert len(files) == 2 and first["arrays"] not in files
        assert "new" in CohortIndex.load(folder)


def test_cohort_index_follows_the_prototype_cache(tmp_path):
    rng = np.random.default_rng(5)
    slides = {f"s{i}": clustered_embeddings(rng, n_per=(8, 6, 4), dim=16)[0] for i in range(5)}
    cohort = make_cohort(tmp_path / "c", slides)
    with pytest.raises(PrototypeError, match="no slide of cohort .* has prototypes"):
        CohortIndex.build(cohort)
    compute_cohort_prototypes(cohort, k=3, slide_ids=["s0", "s1", "s2", "s3"])
    index = CohortIndex.open(cohort)
    assert index.slide_ids == ["s0", "s1", "s2", "s3"] and "s4" in index.skipped
    assert index.source == "region_embeddings"
    assert (cohort.index_dir / "cohort.json").exists()
    compute_cohort_prototypes(cohort, k=3)  # s4 gets prototypes
    compute_cohort_prototypes(cohort, k=2, slide_ids=["s1"], overwrite=True)
    cohort.remove_slide("s2")
    index = CohortIndex.open(cohort)
    assert index.slide_ids == ["s0", "s1", "s3", "s4"]
    assert index.prototypes("s1").shape == (2, 16)
    reloaded = CohortIndex.load(cohort.index_dir)
    assert reloaded.stamps == index.stamps
    changes = reloaded.sync(cohort)
    assert changes == {"added": [], "updated": [], "removed": []}
    # Prototypes of patch features (8-d here) for some slides only cannot be mixed in; for all, they replace.
    compute_cohort_prototypes(cohort, k=3, source="features", slide_ids=["s0"])
    with pytest.raises(PrototypeError, match=r"different sizes.*8-d: 1 slide\(s\) \(s0\)"):
        CohortIndex.open(cohort)
    compute_cohort_prototypes(cohort, k=3, source="features")
    switched = CohortIndex.open(cohort)
    assert switched.source == "features" and switched.dim == 8 and len(switched) == 4
    compute_cohort_prototypes(cohort, k=3)
    assert CohortIndex.open(cohort).source == "region_embeddings"
    # Mismatched embedding sizes across slides: one clear message naming them; the cache is untouched.
    write_feature_file(cohort.features_path("s3"), rng.standard_normal((12, 24)), settings_key="other")
    compute_cohort_prototypes(cohort, k=3)
    with pytest.raises(PrototypeError, match=r"different sizes.*16-d: 3 slide\(s\).*24-d: 1 slide\(s\) \(s3\)"):
        CohortIndex.build(cohort)
    with pytest.raises(PrototypeError, match=r"different sizes.*\(s0, s1, s4\); 24-d: 1 slide\(s\) \(s3\)"):
        CohortIndex.open(cohort)  # the saved index (16-d) against the cache (s3 now 24-d)
    assert CohortIndex.load(cohort.index_dir).prototypes("s3").shape == (3, 16)


def test_region_retrieval_exact_and_ivf(tmp_path):
    rng = np.random.default_rng(6)
    embeddings = {f"s{i}": clustered_embeddings(rng, n_per=(10, 10, 10), dim=16, spread=0.5)[0] for i in range(4)}
    cohort = make_cohort(tmp_path / "c", embeddings)
    index = RegionIndex.open(cohort)
    assert len(index) == 120 and (cohort.index_dir / "regions-region_embeddings.json").exists()
    all_vecs = np.concatenate([embeddings[s] for s in sorted(embeddings)])
    all_vecs /= np.linalg.norm(all_vecs, axis=1, keepdims=True)
    owners = [(s, i) for s in sorted(embeddings) for i in range(30)]
    hits = index.query("s1", 4, n=6)
    sims = all_vecs @ all_vecs[34]
    sims[34] = -np.inf
    expected = [owners[j] for j in np.argsort(-sims, kind="stable")[:6]]
    assert [(h.slide_id, h.region_index) for h in hits] == expected
    assert hits[0].similarity == pytest.approx(float(np.max(sims)), abs=1e-5)
    with h5py_file(cohort.features_path(hits[0].slide_id)) as fh:
        assert tuple(fh["region_coords"][hits[0].region_index]) == hits[0].coords
    others = index.query("s1", 4, n=10, exclude_same_slide=True)
    assert all(h.slide_id != "s1" for h in others)
    by_vector = index.query(vector=embeddings["s2"][7], n=1)
    assert (by_vector[0].slide_id, by_vector[0].region_index) == ("s2", 7)
    with pytest.raises(PrototypeError, match="no region 30"):
        index.query("s1", 30)
    # The IVF path (forced with a tiny exact limit) finds the same neighbours here.
    ivf = RegionIndex(exact_max_vectors=50, nprobe=64)
    for s in sorted(embeddings):
        ivf.add(s, embeddings[s], np.zeros((30, 2)))
    assert ivf._ivf is not None
    assert [(h.slide_id, h.region_index) for h in ivf.query("s1", 4, n=6)] == expected
    ivf.remove("s0")
    assert all(h.slide_id != "s0" for h in ivf.query("s1", 4, n=20))
    loaded = RegionIndex.load(cohort.index_dir)
    assert [(h.slide_id, h.region_index) for h in loaded.query("s1", 4, n=6)] == expected


def h5py_file(path):
    import h5py

    return h5py.File(path, "r")
