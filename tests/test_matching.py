"""Prototype set similarity: Hungarian matching against the official brute force over permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_slpd.errors import PrototypeError
from napari_slpd.similarity import batch_set_similarity, brute_force_set_similarity, cross_assignment, match_prototypes, prototype_set_distance, prototype_set_similarity
from napari_slpd.similarity.matching import TopN, matching_upper_bounds, top_matches


def unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def permutation_max(A, B):
    """The official SLPD definition, written out independently: max over all K! permutations."""
    sim = A @ B.T
    K = sim.shape[0]
    return max(sum(sim[k, p[k]] for k in range(K)) for p in itertools.permutations(range(K)))


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
def test_hungarian_equals_all_permutations(K):
    rng = np.random.default_rng(K)
    for _ in range(20):
        A, B = unit(rng, K, 12), unit(rng, K, 12)
        S, pairs = prototype_set_similarity(A, B)
        assert S == pytest.approx(permutation_max(A, B), abs=1e-9)
        assert S == pytest.approx(brute_force_set_similarity(A, B)[0], abs=1e-9)
        # The pairs are a permutation and add up to S.
        assert sorted(k for k, _ in pairs) == list(range(K)) and sorted(l for _, l in pairs) == list(range(K))
        assert sum(A[k] @ B[l] for k, l in pairs) == pytest.approx(S, abs=1e-9)
        assert prototype_set_distance(A, B) == pytest.approx(K - S, abs=1e-9)


@pytest.mark.parametrize("K,L", [(2, 5), (5, 2), (3, 4), (6, 1), (4, 6)])
def test_rectangular_matching_is_the_best_injective_map(K, L):
    rng = np.random.default_rng(10 * K + L)
    for _ in range(10):
        A, B = unit(rng, K, 8), unit(rng, L, 8)
        S, pairs = prototype_set_similarity(A, B)
        ref, ref_pairs = brute_force_set_similarity(A, B)
        assert S == pytest.approx(ref, abs=1e-9)
        assert len(pairs) == min(K, L)
        assert len({k for k, _ in pairs}) == len({l for _, l in pairs}) == min(K, L)
        # Unmatched prototypes of the larger set count as partners at cosine 0.
        assert prototype_set_distance(A, B) == pytest.approx(max(K, L) - S, abs=1e-9)
        # Symmetric in its arguments.
        assert prototype_set_similarity(B, A)[0] == pytest.approx(S, abs=1e-9)


def test_distance_is_zero_for_a_reordered_copy_and_explains_the_match():
    rng = np.random.default_rng(0)
    A = unit(rng, 5, 16)
    perm = np.array([3, 0, 4, 1, 2])
    B = A[perm]
    assert prototype_set_distance(A, B) == pytest.approx(0.0, abs=1e-9)
    pairs = match_prototypes(A, B)
    assert {(p.k, p.l) for p in pairs} == {(int(perm[l]), l) for l in range(5)}
    assert all(p.similarity == pytest.approx(1.0) for p in pairs)
    # Explanations come most similar pair first.
    C = unit(rng, 5, 16)
    sims = [p.similarity for p in match_prototypes(A, C)]
    assert sims == sorted(sims, reverse=True)


def test_cross_assignment_is_the_per_prototype_argmax_not_a_matching():
    A = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    B = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    assert cross_assignment(A, B).tolist() == [0, 0, 2]  # two prototypes share their nearest: SLPD's l*
    _, pairs = prototype_set_similarity(A, B)
    assert sorted(l for _, l in pairs) == [0, 1, 2]  # whereas the matching is one-to-one
    rng = np.random.default_rng(1)
    A, B = unit(rng, 6, 10), unit(rng, 4, 10)
    assert np.array_equal(cross_assignment(A, B), np.argmax(A @ B.T, axis=1))


def test_batch_scores_equal_pairwise_hungarian():
    rng = np.random.default_rng(2)
    Q = unit(rng, 8, 24).astype(np.float32)
    C = unit(rng, 300, 8, 24).astype(np.float32)
    C[:50] = Q[rng.permutation(8)] + 0.01 * rng.standard_normal((50, 8, 24))  # greedy partners one-to-one
    scores = batch_set_similarity(Q, C)
    ref = np.array([prototype_set_similarity(Q, c)[0] for c in C])
    assert np.abs(scores - ref).max() < 1e-4  # float32 products vs float64


def test_upper_bounds_hold_and_exact_top_n_equals_a_full_sort():
    rng = np.random.default_rng(3)
    Q = unit(rng, 6, 16).astype(np.float32)
    blocks, ids = [], []
    start = 0
    for L, N in ((6, 400), (4, 50), (9, 80)):  # candidates with different numbers of prototypes
        C = unit(rng, N, L, 16).astype(np.float32)
        sims = np.einsum("ke,nle->nkl", Q, C)
        blocks.append(sims)
        ids.append(np.arange(start, start + N))
        start += N
    exact = np.concatenate([[hungarian(s) for s in b] for b in blocks])
    bounds = np.concatenate([matching_upper_bounds(b) for b in blocks])
    assert (bounds >= exact - 1e-6).all()
    all_ids = np.concatenate(ids)
    sizes = np.concatenate([np.full(b.shape[0], max(b.shape[1:])) for b in blocks])
    distance = sizes - exact
    for n in (1, 5, 25):
        top = top_matches(blocks, n, ids)
        order = np.lexsort((all_ids, distance))[:n]  # nearest first, ties by id
        assert [m.candidate for m in top] == all_ids[order].tolist()
        assert [m.similarity for m in top] == pytest.approx(exact[order].tolist(), abs=1e-6)
        assert [m.distance for m in top] == pytest.approx(distance[order].tolist(), abs=1e-6)
    collector = TopN(5)
    for b, i in zip(blocks, ids):
        collector.offer(b, i)
    assert collector.solved < 530 // 4  # the bound prunes most candidates


def hungarian(sim):
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(sim, maximize=True)
    return float(sim[r, c].sum())


def test_bad_prototype_sets_get_clear_messages():
    rng = np.random.default_rng(4)
    A = unit(rng, 4, 8)
    with pytest.raises(PrototypeError, match="different embedding sizes"):
        prototype_set_similarity(A, unit(rng, 4, 16))
    bad = A.copy()
    bad[2, 3] = np.nan
    with pytest.raises(PrototypeError, match="NaN"):
        prototype_set_distance(A, bad)
    with pytest.raises(PrototypeError, match="empty"):
        prototype_set_similarity(A, np.zeros((0, 8)))
    with pytest.raises(PrototypeError, match="2-D"):
        prototype_set_similarity(A, A[0])
    with pytest.raises(PrototypeError, match="limited"):
        brute_force_set_similarity(unit(rng, 10, 4), unit(rng, 10, 4))
    with pytest.raises(PrototypeError, match=r"\[N, L, 8\]"):
        batch_set_similarity(A, unit(rng, 3, 4, 9))
