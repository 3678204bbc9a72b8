"""Benchmark: KNN with the prototype set distance, 10-fold CV, through the cohort index vs exact Hungarian.

A synthetic cohort of N slides x 16 prototypes (192-d, as region embeddings) that looks like a real one:
prototypes are noisy copies of tissue-type centres shared by all classes (a class only prefers some
types), each case has three slides, and every tenth slide is a near-duplicate of the one before it (so
distances have near-ties). KNN (k = 5) 10-fold CV grouped by case runs twice in one process:

- ``index``: evaluation's own path (napari_slpd.evaluation.protocols.knn.knn_sets -> evaluation.set_distance
  -> CohortIndex exact queries, bound-pruned assignment solves);
- ``exact``: every pair's distance by the Hungarian algorithm (scipy), then the k nearest training slides.

The last line of output is JSON: n_slides, k, folds, knn_set_s (index path), exact_s (all pairs + KNN),
speedup_vs_exact, auc_agreement (fraction of folds whose AUC equals the exact one to 1e-6), auc_index /
auc_exact (mean over folds), neighbour_agreement (fraction of test slides with the same k neighbours).

    python benchmarks/evaluate.py            # 10,000 slides
    python benchmarks/evaluate.py --quick    # 1,000 slides
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def knn_from_distances(D: np.ndarray, y: np.ndarray, folds, k: int, n_classes: int):
    """Per fold (test indices, proba [n_test, C], neighbours [n_test, k]) from a full distance matrix; ties by
    slide order (stable sort), as evaluation.set_distance documents for the reference."""
    out = []
    for fold in folds:
        sub = D[np.ix_(fold.test, fold.train)]
        order = np.argsort(sub, axis=1, kind="stable")[:, :k]
        neighbours = fold.train[order]
        proba = np.zeros((fold.test.size, n_classes))
        for c in range(n_classes):
            proba[:, c] = (y[neighbours] == c).sum(axis=1) / k
        out.append((fold.test, proba, neighbours))
    return out


def exact_distance_rows(sets: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """[len(rows), N] prototype set distances of the ``rows`` slides to every slide, one Hungarian solve per
    pair, as evaluation.set_distance.exact_distance_matrix does (the same cost per pair)."""
    from scipy.optimize import linear_sum_assignment

    stacked = np.stack([np.asarray(s, np.float64) for s in sets])
    out = np.zeros((len(rows), len(sets)))
    for r, i in enumerate(rows):
        block = np.matmul(stacked, stacked[i].T).transpose(0, 2, 1)
        for j in range(len(sets)):
            if j != i:
                sim = block[j]
                a, b = linear_sum_assignment(sim, maximize=True)
                out[r, j] = max(sim.shape) - float(sim[a, b].sum())
    return out


def _full_comparison(args, n, ids, sets, y, folds, preds, knn_set_s) -> int:
    """Exact all pairs, measured in full: times, fold AUC agreement and neighbour agreement."""
    from napari_slpd.evaluation.metrics import macro_ovr_auc
    from napari_slpd.evaluation.set_distance import (
        build_set_index,
        exact_distance_matrix,
        nearest_sets,
    )

    t0 = time.perf_counter()
    last = [t0]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 30:
            last[0] = now
            print(f"  exact: {done}/{total} rows, {now - t0:.0f} s", file=sys.stderr)

    D = exact_distance_matrix(sets, progress=progress)
    exact = knn_from_distances(D, y, folds, args.k, args.classes)
    exact_s = time.perf_counter() - t0
    print(f"exact path: all {n * (n - 1) // 2} pairs + KNN in {exact_s:.1f} s", file=sys.stderr)

    # Neighbours of the index path, for the agreement figure (queried again: the timing above stays clean).
    index = build_set_index(ids, sets)
    position = {s: i for i, s in enumerate(ids)}
    agree_folds, same_neighbours, tested = 0, 0, 0
    auc_index, auc_exact = [], []
    rng = np.random.default_rng(args.seed)
    for fold, (test, proba_exact, neighbours_exact) in zip(folds, exact):
        rows = preds.rows_of_fold(fold.index)
        a_index = macro_ovr_auc(y[preds.index[rows]], preds.proba[rows])
        a_exact = macro_ovr_auc(y[test], proba_exact)
        auc_index.append(a_index)
        auc_exact.append(a_exact)
        agree_folds += int(abs(a_index - a_exact) <= 1e-6)
        # neighbour sets on a sample of each fold's test slides (querying all would double the index time)
        exclude = [ids[i] for i in np.setdiff1d(np.arange(n), fold.train)]
        for r in rng.choice(test.size, size=min(20, test.size), replace=False):
            got = {position[s] for s, _ in nearest_sets(index, ids[test[r]], args.k, exclude)}
            same_neighbours += int(got == set(neighbours_exact[r].tolist()))
            tested += 1
    result = {
        "n_slides": n,
        "prototypes_per_slide": args.prototypes,
        "dim": args.dim,
        "k": args.k,
        "folds": args.folds,
        "knn_set_s": round(knn_set_s, 3),
        "exact_s": round(exact_s, 3),
        "speedup_vs_exact": round(exact_s / knn_set_s, 2),
        "auc_agreement": agree_folds / len(folds),
        "auc_index": round(float(np.mean(auc_index)), 6),
        "auc_exact": round(float(np.mean(auc_exact)), 6),
        "neighbour_agreement": round(same_neighbours / max(1, tested), 4),
    }
    result["exact_measured"] = True
    result["exact_measured_fraction"] = 1.0
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 slides instead of 10,000")
    parser.add_argument("--slides", type=int, default=None, help="number of slides (overrides --quick)")
    parser.add_argument("--prototypes", type=int, default=16)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-rows", type=int, default=None,
                        help="time the exact path on this many random query rows (each against every other slide) "
                             "and extrapolate to all pairs; default: all rows up to 2,000 slides, else 300")
    args = parser.parse_args(argv)
    n = args.slides or (1000 if args.quick else 10_000)
    exact_rows = args.exact_rows or (n if n <= 2000 else 300)

    from napari_slpd.evaluation.labels import Task
    from napari_slpd.evaluation.protocols import KnnConfig, TaskData
    from napari_slpd.evaluation.protocols.knn import knn_sets
    from napari_slpd.evaluation.set_distance import (
        build_set_index,
        nearest_sets,
    )
    from napari_slpd.evaluation.splits import make_folds
    from napari_slpd.samples.embedding_cohort import synthetic_prototype_sets

    t0 = time.perf_counter()
    sets, y, cases = synthetic_prototype_sets(n, k=args.prototypes, dim=args.dim, n_classes=args.classes,
                                              seed=args.seed)
    folds = make_folds(y, cases, args.folds, seed=args.seed)
    ids = [f"slide_{i:05d}" for i in range(n)]
    data = TaskData(Task("class", "classification", [str(c) for c in range(args.classes)]), ids, cases, folds, y=y,
                    seed=args.seed)
    print(f"synthetic cohort: {n} slides x {args.prototypes} prototypes ({args.dim}-d), "
          f"{len(set(cases.tolist()))} cases, made in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    t0 = time.perf_counter()
    preds = knn_sets(data, sets, KnnConfig(k=args.k))
    knn_set_s = time.perf_counter() - t0
    print(f"index path: KNN {args.folds}-fold CV in {knn_set_s:.1f} s", file=sys.stderr)

    if exact_rows >= n:
        return _full_comparison(args, n, ids, sets, y, folds, preds, knn_set_s)
    # Exact all pairs would take hours here: time the same Hungarian solves on a fixed random subset of
    # query rows (each row: every other slide), extrapolate to the n (n - 1) / 2 pairs, and check the
    # index's neighbours against the exact ones on those rows.
    rng = np.random.default_rng(args.seed + 7)
    rows = np.sort(rng.choice(n, exact_rows, replace=False))
    fold_of = np.empty(n, np.int64)
    for fold in folds:
        fold_of[fold.test] = fold.index
    t0 = time.perf_counter()
    row_distances = exact_distance_rows(sets, rows)
    rows_s = time.perf_counter() - t0
    pairs_measured = exact_rows * (n - 1)
    exact_s = rows_s * (n * (n - 1) / 2) / pairs_measured
    index = build_set_index(ids, sets)
    same = 0
    for r, i in enumerate(rows):
        fold = folds[fold_of[i]]
        d = row_distances[r, fold.train]
        exact_nb = set(fold.train[np.argsort(d, kind="stable")[: args.k]].tolist())
        exclude = [ids[j] for j in fold.test]
        got = {int(s.split("_")[1]) for s, _ in nearest_sets(index, ids[i], args.k, exclude)}
        same += int(got == exact_nb)
    result = {
        "n_slides": n,
        "prototypes_per_slide": args.prototypes,
        "dim": args.dim,
        "k": args.k,
        "folds": args.folds,
        "knn_set_s": round(knn_set_s, 3),
        "exact_s": round(exact_s, 1),
        "exact_measured": False,
        "exact_measured_fraction": round(pairs_measured / (n * (n - 1) / 2), 4),
        "exact_measured_rows": exact_rows,
        "exact_measured_s": round(rows_s, 2),
        "speedup_vs_exact": round(exact_s / knn_set_s, 2),
        "auc_agreement": None,
        "auc_agreement_note": "fold AUCs need every exact row: not computed at this size (see the --quick run); "
                              "neighbour_agreement compares the index's k neighbours with exact ones on the timed rows",
        "neighbour_agreement": round(same / exact_rows, 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
