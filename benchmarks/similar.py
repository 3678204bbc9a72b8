"""Similar-slide search at cohort scale: build time, query latency, recall and speed-up over exact search.

A synthetic cohort with structure, so that nearest neighbours mean something: prototypes are drawn around
``--types`` tissue-type centres; subtypes shift a type's centre, cases (patients, ~6 slides each) shift it
again, and every slide adds its own noise. A slide's K prototypes are K distinct tissue types of its
case's repertoire. Its most similar slides are then the other slides of its case and the closest slides
of its subtype: a top 10 that mixes near-duplicates with a tight crowd of runners-up.

Measured in one process:
- ``build_s``: adding all slides to a CohortIndex with the IVF first stage (training included);
- ``query_ms_median``: one query (slide id -> 10 most similar slides with distances and matched pairs);
- ``recall_at_10``: overlap of those 10 with the exact top 10 (exact S over the whole cohort, bound-pruned);
- ``speedup_vs_exact``: brute-force exact search (the Hungarian algorithm against every slide, then sort;
  the official K!-permutation search is out of reach at K = 16) divided by the query time, on a sample of
  queries; the brute-force top 10 is checked to equal the exact one. The pruned exact path is timed too.

Usage: python benchmarks/similar.py [--quick] [--n-slides N] [--k 16] [--dim 192]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from napari_slpd.similarity.index import CohortIndex, IndexConfig  # noqa: E402


def synthetic_cohort(n_slides: int, k: int = 16, dim: int = 192, n_types: int = 512, slides_per_case: int = 6,
                     cases_per_subtype: int = 80, types_per_subtype: int = 32, types_per_case: int = 24,
                     seed: int = 0, chunk: int = 8192) -> np.ndarray:
    """[n_slides, k, dim] float32 L2-normalized prototypes with tissue-type / subtype / case structure."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        v = rng.standard_normal(shape, dtype=np.float32)
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
        return v

    types_per_case = max(types_per_case, k)
    types_per_subtype = max(types_per_subtype, types_per_case)
    n_types = max(n_types, types_per_subtype)
    centres = unit((n_types, dim))
    n_cases = max(1, n_slides // slides_per_case)
    n_sub = max(1, n_cases // cases_per_subtype)
    sub_types = np.stack([rng.choice(n_types, types_per_subtype, replace=False) for _ in range(n_sub)])
    sub_shift = unit((n_sub, types_per_subtype, dim)) * 0.5
    case_sub = rng.integers(n_sub, size=n_cases)
    case_slots = np.stack([rng.choice(types_per_subtype, types_per_case, replace=False) for _ in range(n_cases)])
    case_shift = unit((n_cases, types_per_case, dim)) * 0.45
    slide_case = rng.integers(n_cases, size=n_slides)
    # Type centre + subtype shift, per (subtype, type slot): the part of a prototype shared by a subtype.
    subtype_centres = centres[sub_types] + sub_shift
    noise_scale = np.float32(0.35 / np.sqrt(dim))  # per-component std: noise vectors of norm ~0.35
    out = np.empty((n_slides, k, dim), np.float32)
    for s0 in range(0, n_slides, chunk):
        s1 = min(n_slides, s0 + chunk)
        cases = slide_case[s0:s1]
        pick = np.argsort(rng.random((s1 - s0, types_per_case)), axis=1)[:, :k]  # which of the case's types
        slot = np.take_along_axis(case_slots[cases], pick, axis=1)  # index into the subtype's types
        v = out[s0:s1]
        rng.standard_normal(v.shape, dtype=np.float32, out=v)
        v *= noise_scale
        v += subtype_centres[case_sub[cases][:, None], slot]
        v += case_shift[cases[:, None], pick]
        v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return out


def brute_force_top(index: CohortIndex, slide_id: str, n: int) -> list[str]:
    """Exact top n by solving the assignment problem against every other slide (no pruning)."""
    from scipy.optimize import linear_sum_assignment

    q = index.prototypes(slide_id)
    ids = index.slide_ids
    store = index._store
    slots = np.array([store.key_to_slot[s] for s in ids])
    K = int(store.slot_count[slots[0]])
    sims = (store.vectors[: store.n_rows] @ q.T)[store.gather_rows(slots, K)].transpose(0, 2, 1)
    scores = np.empty(len(ids))
    for j in range(len(ids)):
        r, c = linear_sum_assignment(sims[j], maximize=True)
        scores[j] = sims[j][r, c].sum(dtype=np.float64)
    scores[ids.index(slide_id)] = -np.inf
    order = np.lexsort((slots, -scores))[:n]
    return [ids[j] for j in order]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 slides, fewer queries (under a minute)")
    parser.add_argument("--n-slides", type=int, default=None)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--queries", type=int, default=None, help="timed approximate queries")
    parser.add_argument("--exact-queries", type=int, default=None, help="queries whose exact top 10 is computed")
    parser.add_argument("--brute-queries", type=int, default=None, help="queries also answered by brute force")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_slides = args.n_slides or (10_000 if args.quick else 100_000)
    n_queries = args.queries or (100 if args.quick else 200)
    n_exact = min(n_queries, args.exact_queries or (50 if args.quick else 30))
    n_brute = min(n_exact, args.brute_queries or 3)

    t0 = time.perf_counter()
    X = synthetic_cohort(n_slides, args.k, args.dim, seed=args.seed)
    gen_s = time.perf_counter() - t0
    ids = [f"slide{i:06d}" for i in range(n_slides)]
    print(f"synthetic cohort: {n_slides} slides x {args.k} prototypes x {args.dim}-d in {gen_s:.1f} s", flush=True)

    config = IndexConfig(method="ivf")  # the large-cohort path, also for --quick (auto would pick exact)
    t0 = time.perf_counter()
    index = CohortIndex(config=config)
    index.add_arrays(ids, X, source="synthetic")
    build_s = time.perf_counter() - t0
    del X
    print(f"index build: {build_s:.1f} s ({index!r})", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    queries = [ids[i] for i in rng.choice(n_slides, n_queries, replace=False)]
    for q in queries[:3]:  # warm-up (page faults, faiss thread pool)
        index.query(q, n=10)
    approx, times = {}, []
    for q in queries:
        t = time.perf_counter()
        approx[q] = [r.slide_id for r in index.query(q, n=10)]
        times.append(time.perf_counter() - t)
    query_ms = 1000 * float(np.median(times))
    print(f"IVF queries: median {query_ms:.1f} ms, p90 {1000 * np.percentile(times, 90):.1f} ms over {len(times)}",
          flush=True)

    exact, exact_times = {}, []
    for q in queries[:n_exact]:
        t = time.perf_counter()
        exact[q] = [r.slide_id for r in index.query(q, n=10, method="exact")]
        exact_times.append(time.perf_counter() - t)
    recall = float(np.mean([len(set(approx[q]) & set(exact[q])) / 10 for q in exact]))
    exact_ms = 1000 * float(np.median(exact_times))
    print(f"exact (bound-pruned) queries: median {exact_ms:.1f} ms; recall@10 of IVF vs exact: {recall:.4f} "
          f"over {len(exact)} queries", flush=True)

    brute_times = []
    for q in queries[:n_brute]:
        t = time.perf_counter()
        top = brute_force_top(index, q, 10)
        brute_times.append(time.perf_counter() - t)
        if top != exact[q]:
            raise SystemExit(f"brute force and exact disagree for {q}: {top} vs {exact[q]}")
    brute_ms = 1000 * float(np.median(brute_times))
    speedup = brute_ms / query_ms
    print(f"brute-force exact (Hungarian vs every slide): median {brute_ms:.0f} ms over {len(brute_times)} queries; "
          f"same top 10 as the pruned exact path", flush=True)
    print(f"speed-up of IVF query vs brute-force exact: {speedup:.1f}x; vs pruned exact: {exact_ms / query_ms:.1f}x",
          flush=True)
    result = {
        "n_slides": n_slides,
        "k": args.k,
        "dim": args.dim,
        "build_s": round(build_s, 2),
        "query_ms_median": round(query_ms, 2),
        "query_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
        "recall_at_10": round(recall, 4),
        "speedup_vs_exact": round(speedup, 1),
        "speedup_vs_exact_pruned": round(exact_ms / query_ms, 1),
        "exact_pruned_ms_median": round(exact_ms, 1),
        "brute_force_ms_median": round(brute_ms, 1),
        "n_queries": len(times),
        "n_recall_queries": len(exact),
        "n_brute_queries": len(brute_times),
        "nlist": index._ivf.nlist,
        "nprobe": config.nprobe,
        "depth": config.depth,
        "cpu_threads": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
