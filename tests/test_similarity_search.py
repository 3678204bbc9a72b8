"""Similar-slide search (napari_slpd.similarity): exact on every cohort regime, bounds that never prune a
true neighbour, reduced-precision margins, batch queries, incremental changes and format migration."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from napari_slpd.similarity import (
    CohortIndex,
    IndexConfig,
    int8_stage,
    prototype_set_similarity,
)
from napari_slpd.similarity.bounds import BoundStage
from napari_slpd.similarity.matching import dual_bounds, matching_upper_bounds

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from similar import make_cohort

REGIMES = ("unique", "shared-0.2", "shared-1.0", "random")


def reference(protos: np.ndarray, query: np.ndarray, n: int, skip: int | None = None):
    """(distances, indices) of the n nearest sets by max(K, L) - S, the Hungarian algorithm in float64
    against every set (ties by index)."""
    rows = []
    for i, P in enumerate(protos):
        if i != skip:
            rows.append((max(len(P), len(query)) - prototype_set_similarity(query, P)[0], i))
    rows.sort()
    return [d for d, _ in rows[:n]], [i for _, i in rows[:n]]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("precision", ["int8", "bfloat16", "float32"])
def test_top_k_equals_brute_force_on_every_regime(regime, precision):
    X = make_cohort(regime, 600, 8, 32, seed=3)
    ids = [f"s{i:04d}" for i in range(len(X))]
    index = CohortIndex(config=IndexConfig(precision=precision, device="cpu"))
    index.add_arrays(ids, X)
    for qi in (0, 17, 411):
        distances, order = reference(X, X[qi], 10, skip=qi)
        for method in ("auto", "exact"):
            got = index.query(ids[qi], n=10, method=method)
            assert [r.slide_id for r in got] == [ids[i] for i in order], (regime, method)
            assert [r.distance for r in got] == pytest.approx(distances, abs=1e-5)
            assert all(r.exact for r in got) and index.last_stats.exact
    assert index.stage().precision == precision


def test_the_bounds_never_prune_a_true_neighbour():
    """Property test over random cohorts: every first-stage bound is >= the true -(distance), and so are the
    row/column and dual bounds of the padded reduced-precision similarities; the top n equals the full sort."""
    rng = np.random.default_rng(0)
    int_checked = 0
    for trial in range(24):
        K = int(rng.integers(1, 9))
        dim = int(rng.choice([8, 24, 64]))
        sizes = rng.integers(1, 9, size=int(rng.integers(20, 120)))
        regime_scale = rng.choice([0.05, 0.5, 3.0])  # near-duplicates, shared structure, none
        base = rng.standard_normal((4, dim))
        sets = []
        for L in sizes:
            P = base[rng.integers(4, size=L)] + regime_scale * rng.standard_normal((L, dim))
            sets.append((P / np.linalg.norm(P, axis=1, keepdims=True)).astype(np.float32))
        query = base[rng.integers(4, size=K)] + regime_scale * rng.standard_normal((K, dim))
        query = (query / np.linalg.norm(query, axis=1, keepdims=True)).astype(np.float32)
        precision = ["int8", "bfloat16", "float32"][trial % 3]
        stage = BoundStage(dim, precision=precision)
        for slot, P in enumerate(sets):
            stage.add(np.array([slot]), P[None])
        bounds = stage.upper_bounds(query[None], len(sets))[0]
        true = np.array([prototype_set_similarity(query, P)[0] - max(K, len(P)) for P in sets])
        assert (bounds >= true - 1e-6).all(), trial
        for L in np.unique(sizes):
            slots = np.flatnonzero(sizes == L)
            padded = stage.padded_similarities(slots)
            exact = np.einsum("ke,nle->nkl", query.astype(np.float64), np.stack([sets[s] for s in slots]))
            assert (padded >= exact - 1e-7).all()
            tight = matching_upper_bounds(padded)
            if K == L:
                tight = np.minimum(tight, dual_bounds(padded) + 1e-5)
                assert (dual_bounds(exact) + 1e-9 >= true[slots] + max(K, L)).all()
            assert (tight - max(K, L) >= true[slots] - 1e-6).all()
            if precision == "int8" and K == L:  # the integer row/column/dual bounds
                int_bound = int8_stage.tight_bounds(stage, slots)
                int_checked += 1
                assert (int_bound - K >= true[slots] - 1e-9).all(), trial
                assert (int_bound <= tight + 0.05 * K).all()  # and as tight as those on padded floats
        # And the search built on them is exact for every n.
        index = CohortIndex(config=IndexConfig(precision=precision, device="cpu"))
        index.add_many((f"s{i:03d}", P) for i, P in enumerate(sets))
        for n in (1, 5, len(sets)):
            got = index.query(query, n=n)
            order = np.lexsort((np.arange(len(sets)), -true))[:n]
            assert [r.distance for r in got] == pytest.approx((-true[order]).tolist(), abs=1e-5)


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_rounding_margin_holds_on_near_parallel_vectors(precision):
    rng = np.random.default_rng(1)
    Q = rng.standard_normal((16, 192)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    X = Q[None] + 1e-3 * rng.standard_normal((50, 16, 192)).astype(np.float32)  # cosines ~1: largest rounding
    X /= np.linalg.norm(X, axis=2, keepdims=True)
    X[7, 3] = -X[7, 3]  # a negative row maximum somewhere
    X[9] *= 0  # a slide of zero vectors (scale 1, all codes 0)
    stage = BoundStage(192, precision=precision)
    stage.add(np.arange(50), X)
    bounds = stage.upper_bounds(Q[None], 50)[0]
    true = np.array([prototype_set_similarity(Q, P)[0] - 16 for P in X])
    # safe, and not uselessly loose (int8: the stored codes' error, ~0.009 per prototype, summed over 16)
    tight = np.ones(50, bool)
    tight[7] = False  # the row-max bound itself is ~1 loose there (q_3's partner is its opposite)
    assert (bounds >= true).all() and (bounds - true < 0.3)[tight].all()
    padded = stage.padded_similarities(np.arange(50))
    exact = np.einsum("ke,nle->nkl", Q.astype(np.float64), X.astype(np.float64))
    assert (padded >= exact).all() and (padded - exact < 0.03).all()


@pytest.mark.parametrize("regime", ["random", "shared-0.5"])
def test_int8_search_is_exact_over_many_blocks(regime):
    """More int8 blocks than workers (256 slides each), candidates' codes gathered across them."""
    n = 256 * 12 + 77
    X = make_cohort(regime, n, 8, 24, seed=11)
    ids = [f"s{i:05d}" for i in range(n)]
    index = CohortIndex(config=IndexConfig(precision="int8", device="cpu"))
    index.add_arrays(ids, X)
    assert index.stage().groups[8].n_blocks_used == 13
    for qi in (3, 2321):
        got = index.query(ids[qi], n=10)
        ref = index.query(ids[qi], n=10, method="exact")
        assert [r.slide_id for r in got] == [r.slide_id for r in ref]
        assert [r.distance for r in got] == pytest.approx([r.distance for r in ref], abs=1e-6)


def test_int8_first_stage_bounds_do_not_depend_on_how_blocks_are_grouped(monkeypatch):
    """The first stage combines row maxima per ~2 MB of them: one block at a time gives the same bounds."""
    from napari_slpd.similarity import int8_stage

    X = make_cohort("random", 256 * 9 + 5, 8, 24, seed=3)
    index = CohortIndex(config=IndexConfig(precision="int8", device="cpu"))
    index.add_arrays([f"s{i}" for i in range(len(X))], X)
    stage = index.stage()
    query_sets = (X[:16], np.concatenate([X[:16], X[16:32, :2]], axis=1))  # K = 8, and K = 10 > L
    grouped = [stage.upper_bounds(q, index._store.n_slots) for q in query_sets]
    monkeypatch.setattr(int8_stage, "_MAXIMA_BYTES", 1)
    single = [stage.upper_bounds(q, index._store.n_slots) for q in query_sets]
    for a, b in zip(grouped, single):
        assert np.isfinite(a).sum() == a.size and np.array_equal(a, b)


def test_int8_codes_are_exact_integers_with_measured_errors():
    from napari_slpd.similarity import int8_codes

    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 16, 192)).astype(np.float32)
    X /= np.linalg.norm(X, axis=2, keepdims=True)
    codes, scale, err = int8_codes.encode_sets(X)
    assert codes.dtype == np.int8 and np.abs(codes).max() == 127
    recon = codes * scale[:, None, None]
    assert (np.linalg.norm(X - recon, axis=2).max(axis=1) <= err).all() and (err < 0.02).all()
    q_codes, q_scale, eq, qn = int8_codes.encode_queries(X[:3])
    assert q_codes.shape == (192, 2 * 3 * 16) and (eq < 1e-3).all()  # hi/lo: ~254x below a plain code
    hi, lo = q_codes[:, : 3 * 16].T.astype(np.float64), q_codes[:, 3 * 16 :].T.astype(np.float64)
    approx = ((hi + lo / int8_codes.LO_FACTOR).reshape(3, 16, 192)) * q_scale[:, None, None]
    assert np.allclose(np.linalg.norm(X[:3] - approx, axis=2), eq, atol=2e-9)
    with pytest.raises(ValueError, match="int8 codes"):
        int8_codes.encode_queries(np.zeros((1, 2, int8_codes.MAX_DIM + 1), np.float32))


def test_batch_queries_and_knn_arrays_equal_single_queries():
    X = make_cohort("shared-0.5", 500, 6, 24, seed=5)
    ids = [f"s{i:03d}" for i in range(len(X))]
    index = CohortIndex(config=IndexConfig(device="cpu"))
    index.add_arrays(ids, X)
    index.add("odd", X[3][:4])  # another K in the same cohort
    queries = ids[:40] + ["odd"]
    many = index.query_many(queries, n=7, exclude=[["s005"]] * len(queries))
    for q, rows in zip(queries, many):
        single = index.query(q, n=7, exclude=["s005"])
        assert [(r.slide_id, round(r.distance, 6)) for r in rows] == [(r.slide_id, round(r.distance, 6)) for r in single]
        assert q not in [r.slide_id for r in rows] and "s005" not in [r.slide_id for r in rows]
    nn_ids, nn_d = index.nearest(ids[:5], n=3)
    assert nn_ids.shape == nn_d.shape == (5, 3)
    assert nn_ids[2].tolist() == [r.slide_id for r in index.query(ids[2], n=3)]
    assert np.all(np.diff(nn_d, axis=1) >= -1e-9)
    small = CohortIndex(config=IndexConfig(device="cpu"))
    small.add_arrays(ids[:3], X[:3])
    ids3, d3 = small.nearest(ids[:1], n=5)  # fewer slides than asked: padded
    assert ids3[0, 2] is None and np.isnan(d3[0, 2]) and ids3[0, 1] is not None


def test_add_remove_keep_the_search_exact():
    X = make_cohort("random", 300, 5, 16, seed=7)
    ids = [f"s{i:03d}" for i in range(len(X))]
    index = CohortIndex(config=IndexConfig(device="cpu"))
    index.add_arrays(ids[:200], X[:200])
    index.query(ids[0])  # the first stage exists from here on and must follow every change
    index.add_arrays(ids[200:], X[200:])
    for sid in ids[50:150]:
        index.remove(sid)
    index.add("dup", X[0])
    index.add("s010", -X[10])  # replaced
    live = {s: index.prototypes(s) for s in index.slide_ids}
    names = sorted(live)
    distances, order = reference([live[s] for s in names], X[0], 8, skip=names.index("s000"))
    got = index.query("s000", n=8)
    assert [r.slide_id for r in got] == [names[i] for i in order] and got[0].slide_id == "dup"
    assert [r.distance for r in got] == pytest.approx(distances, abs=1e-5)
    assert len(index.stage()) == len(index) == 201


def test_format_1_index_is_migrated(tmp_path):
    """A version-1 index (faiss IVF file, method "ivf" in its settings) loads, answers exactly, and
    CohortIndex.open saves it again as version 2 without the faiss file."""
    from test_cohort_index import structured_cohort
    from test_prototypes import clustered_embeddings
    from test_prototypes import make_cohort as make_slide_cohort

    from napari_slpd.prototypes import compute_cohort_prototypes
    from napari_slpd.similarity.store import IVFStage

    rng = np.random.default_rng(8)
    slides = {f"s{i}": clustered_embeddings(rng, n_per=(8, 6, 4), dim=16)[0] for i in range(4)}
    cohort = make_slide_cohort(tmp_path / "c", slides)
    compute_cohort_prototypes(cohort, k=3)
    index = CohortIndex.open(cohort)
    folder = cohort.index_dir
    manifest = json.loads((folder / "cohort.json").read_text())
    # Rewrite it as format 1 would have: version 1, an IVF file beside the arrays, IVF settings.
    ivf = IVFStage.build(index._store, 16, 64, 0)
    ivf_name = manifest["arrays"].replace(".npz", ".faiss")
    ivf.save(folder / ivf_name)
    manifest.update(version=1, ivf=ivf_name, ivf_trained_on=ivf.trained_on,
                    config={"method": "ivf", "exact_max_prototypes": 262144, "nprobe": 8, "depth": 128})
    (folder / "cohort.json").write_text(json.dumps(manifest))
    old = CohortIndex.load(folder)
    assert old.loaded_version == 1 and old.config.method == "auto"
    assert [r.slide_id for r in old.query("s0", n=3)] == [r.slide_id for r in index.query("s0", n=3)]
    migrated = CohortIndex.open(cohort)
    saved = json.loads((folder / "cohort.json").read_text())
    assert saved["version"] == 2 and saved["ivf"] is None and not (folder / ivf_name).exists()
    assert migrated.slide_ids == index.slide_ids
    assert structured_cohort is not None


@pytest.mark.cuda
def test_cuda_first_stage_answers_like_the_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    X = make_cohort("shared-0.5", 3000, 16, 64, seed=9)
    ids = [f"s{i:04d}" for i in range(len(X))]
    cpu = CohortIndex(config=IndexConfig(device="cpu"))
    cpu.add_arrays(ids, X)
    gpu = CohortIndex(config=IndexConfig(device="cuda"))
    gpu.add_arrays(ids, X)
    assert gpu.stage().device.startswith("cuda")
    for q in ids[:20]:
        assert [(r.slide_id, round(r.distance, 5)) for r in gpu.query(q, n=10)] == \
               [(r.slide_id, round(r.distance, 5)) for r in cpu.query(q, n=10)]
    many = gpu.query_many(ids[:32], n=5)
    assert [r.slide_id for r in many[7]] == [r.slide_id for r in cpu.query(ids[7], n=5)]
