"""Similar-slide search at cohort scale, on several cohort regimes in one run.

Regimes (synthetic prototype sets, L2-normalized, K prototypes of E dimensions per slide):
- ``unique``: today's cohort: 512 tissue types, subtypes and cases (~6 slides) shift a type's centre, so a
  query's true neighbours own near-duplicate prototypes (the easy case for a per-prototype shortlist);
- ``shared-<noise>``: 40 tissue types, each present in 20-60 % of slides (as stroma, tumour, fat or
  lymphocytes are); a slide's K prototypes are noisy members of its types (repeated when it has fewer
  than K types); noise vectors of norm 0.2, 0.5 and 1.0 (small to large);
- ``random``: uniformly random prototypes (no structure at all: the worst case for any pruning).

For each: ``build_s`` (adding all slides + the first stage), ``memory_mb`` (index arrays),
``query_ms_median`` / ``query_ms_p90`` (slide id -> exact 10 most similar, with matched pairs),
``recall_at_10`` and ``mean_distance_excess`` (returned top-10 mean distance / exact - 1) against the
reference (``method="exact"``: float32 product against every prototype + exact solves) over the queries,
the reference checked against brute force (Hungarian against every slide) on a few queries, whose time
gives ``speedup_vs_exact_bruteforce``. A ``cuda_query_ms_median`` when CUDA is present (else null).
``first_stage_floor`` (int8 first stage): one query's int8 products against every stored code alone
(read by the kernel from memory, or copied block by block first; in cache; a plain read of the codes),
in the same process: the least that any search reading every stored prototype once spends on this
machine (the uniformly random regime leaves nothing to prune before that read).

Usage: python benchmarks/similar.py [--quick] [--n-slides N] [--regimes unique,random] [--queries 100]
       [--precision auto|int8|bfloat16|float32] [--no-floor]
The last line printed is one JSON object (worst regime first-class: query_ms_median, recall_at_10_min).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from napari_slpd.similarity.index import CohortIndex, IndexConfig

REGIMES = ("unique", "shared-0.2", "shared-0.5", "shared-1.0", "random")


def _unit(v: np.ndarray) -> np.ndarray:
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return v


def unique_types_cohort(n_slides: int, k: int = 16, dim: int = 192, n_types: int = 512, slides_per_case: int = 6,
                        cases_per_subtype: int = 80, types_per_subtype: int = 32, types_per_case: int = 24,
                        seed: int = 0, chunk: int = 8192) -> np.ndarray:
    """[n_slides, k, dim] float32: tissue-type / subtype / case structure, near-duplicates within a case."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        return _unit(rng.standard_normal(shape, dtype=np.float32))

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
    subtype_centres = centres[sub_types] + sub_shift
    noise_scale = np.float32(0.35 / np.sqrt(dim))
    out = np.empty((n_slides, k, dim), np.float32)
    for s0 in range(0, n_slides, chunk):
        s1 = min(n_slides, s0 + chunk)
        cases = slide_case[s0:s1]
        pick = np.argsort(rng.random((s1 - s0, types_per_case)), axis=1)[:, :k]
        slot = np.take_along_axis(case_slots[cases], pick, axis=1)
        v = out[s0:s1]
        rng.standard_normal(v.shape, dtype=np.float32, out=v)
        v *= noise_scale
        v += subtype_centres[case_sub[cases][:, None], slot]
        v += case_shift[cases[:, None], pick]
        _unit(v)
    return out


def shared_types_cohort(n_slides: int, k: int = 16, dim: int = 192, noise: float = 0.5, n_types: int = 40,
                        prevalence=(0.2, 0.6), seed: int = 0, chunk: int = 8192) -> np.ndarray:
    """[n_slides, k, dim] float32: ``n_types`` types each present in a fraction of slides drawn from
    ``prevalence``; prototypes = type centre + a noise vector of norm ~``noise``, normalized."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((n_types, dim), dtype=np.float32))
    p = rng.uniform(*prevalence, size=n_types)
    out = np.empty((n_slides, k, dim), np.float32)
    scale = np.float32(noise / np.sqrt(dim))
    for s0 in range(0, n_slides, chunk):
        s1 = min(n_slides, s0 + chunk)
        c = s1 - s0
        present = rng.random((c, n_types)) < p
        present[np.arange(c), rng.integers(n_types, size=c)] = True  # at least one type
        order = np.argsort(rng.random((c, n_types)) + (~present) * 2.0, axis=1)  # present types first, shuffled
        m = present.sum(axis=1)
        cols = np.arange(k)[None, :] % m[:, None]  # repeat types when a slide has fewer than k
        types = np.take_along_axis(order, cols, axis=1)
        v = out[s0:s1]
        rng.standard_normal(v.shape, dtype=np.float32, out=v)
        v *= scale
        v += centres[types]
        _unit(v)
    return out


def random_cohort(n_slides: int, k: int = 16, dim: int = 192, seed: int = 0, chunk: int = 8192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n_slides, k, dim), np.float32)
    for s0 in range(0, n_slides, chunk):
        v = out[s0 : s0 + chunk]
        rng.standard_normal(v.shape, dtype=np.float32, out=v)
        _unit(v)
    return out


def make_cohort(regime: str, n_slides: int, k: int, dim: int, seed: int) -> np.ndarray:
    if regime == "unique":
        return unique_types_cohort(n_slides, k, dim, seed=seed)
    if regime.startswith("shared-"):
        return shared_types_cohort(n_slides, k, dim, noise=float(regime.split("-", 1)[1]), seed=seed)
    if regime == "random":
        return random_cohort(n_slides, k, dim, seed=seed)
    raise SystemExit(f"unknown regime {regime!r}; known: {', '.join(REGIMES)}")


def _process_cpu() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workers() -> int:
    from napari_slpd.similarity.workers import n_workers

    return n_workers()


def first_stage_floor(index: CohortIndex, query: np.ndarray, reps: int = 15) -> dict:
    """What any search that reads every stored prototype once as an int8 code spends at least, on this
    machine, in this process: one query's products against every stored code (its 16 hi columns only, no
    maxima, no bounds: torch's VNNI kernel on the search's workers), read by the kernel from memory
    (``int8_product_direct_ms``) and copied block by block into a buffer first (``int8_product_copied_ms``,
    the first stage's way); ``int8_product_ms``: the faster of the two; ``int8_product_in_cache_ms``: the
    same number of products on one block kept in cache (the kernel's compute alone); ``read_codes_ms``: a
    plain sum over the codes (the memory alone). Medians of ``reps``."""
    import torch

    from napari_slpd.similarity import int8_codes
    from napari_slpd.similarity.workers import map_ranges, thread_buffer

    stage = index.stage()
    if stage.precision != "int8":
        return {}
    hi = torch.from_numpy(np.ascontiguousarray(int8_codes.encode_queries(query[None])[0][:, : query.shape[0]]))
    work = [(g, b) for g in stage.groups.values() for b in range(g.n_blocks_used)]

    def products(source: str):
        def run(i0: int, i1: int) -> None:
            for g, b in work[i0:i1]:
                block = g.data[0 if source == "cache" else b].view(-1, stage.dim)
                if source == "copied":
                    block = thread_buffer(tuple(block.shape), torch.int8, "codes").copy_(block)
                torch._int_mm(block, hi, out=thread_buffer((block.shape[0], hi.shape[1]), torch.int32))
        map_ranges(run, len(work))

    def read(i0: int, i1: int) -> None:
        for g, b in work[i0:i1]:
            g.data[b].view(-1).view(torch.int64).sum()

    timings = {"int8_product_direct_ms": lambda: products("memory"),
               "int8_product_copied_ms": lambda: products("copied"),
               "int8_product_in_cache_ms": lambda: products("cache"),
               "read_codes_ms": lambda: map_ranges(read, len(work))}
    times = {name: [] for name in timings}
    for fn in timings.values():
        fn()
    for _ in range(reps):  # interleaved, so that the machine's drifts touch every figure alike
        for name, fn in timings.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {name: round(1000 * float(np.median(t)), 2) for name, t in times.items()}
    out["int8_product_ms"] = min(out["int8_product_direct_ms"], out["int8_product_copied_ms"])
    return out


def run_regime(regime: str, args, n_slides: int) -> dict:
    t0 = time.perf_counter()
    X = make_cohort(regime, n_slides, args.k, args.dim, args.seed)
    gen_s = time.perf_counter() - t0
    ids = [f"slide{i:06d}" for i in range(n_slides)]
    t0 = time.perf_counter()
    index = CohortIndex(config=IndexConfig(device="cpu", precision=args.precision))
    index.add_arrays(ids, X, source="synthetic")
    del X
    gc.collect()
    index.stage()
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 1)
    queries = [ids[i] for i in rng.choice(n_slides, args.queries, replace=False)]
    for q in queries[:3]:  # warm-up (page faults, thread pools)
        index.query(q, n=10)
    times, cpu, main_cpu, got, rescored, solved = [], [], [], {}, [], []
    load_before = os.getloadavg()
    for q in queries:
        c0, m0, t = _process_cpu(), time.thread_time(), time.perf_counter()
        got[q] = index.query(q, n=10)
        times.append(time.perf_counter() - t)
        main_cpu.append(time.thread_time() - m0)
        cpu.append(_process_cpu() - c0)
        rescored.append(index.last_stats.rescored)
        solved.append(index.last_stats.solved)
    load_after = os.getloadavg()
    floor = first_stage_floor(index, index.prototypes(queries[0])) if args.floor else {}
    # CPU seconds of the query: all threads (process CPU time), of which the calling thread's (serial part);
    # the rest ran on the first stage's workers, in parallel. An unloaded machine with ``workers`` cores
    # would answer in about serial + rest / workers: the figure a loaded machine's wall time cannot show.
    workers = _workers()
    idle_estimate = [m + (c - m) / workers for c, m in zip(cpu, main_cpu)]
    exact_all = all(r.exact for rows in got.values() for r in rows)
    query_ms = 1000 * float(np.median(times))
    ref, ref_times = {}, []
    for q in queries[: args.reference_queries]:
        t = time.perf_counter()
        ref[q] = index.query(q, n=10, method="exact", )
        ref_times.append(time.perf_counter() - t)
    recall = float(np.mean([len({r.slide_id for r in got[q]} & {r.slide_id for r in ref[q]}) / 10 for q in ref]))
    excess = float(np.mean([np.mean([r.distance for r in got[q]]) / np.mean([r.distance for r in ref[q]]) - 1
                            for q in ref]))
    distances_equal = all(np.allclose([r.distance for r in got[q]], [r.distance for r in ref[q]], atol=1e-5)
                          for q in ref)
    brute_times = []
    for q in queries[: args.brute_queries]:
        t = time.perf_counter()
        brute = index.query(q, n=10, method="bruteforce", )
        brute_times.append(time.perf_counter() - t)
        if [r.slide_id for r in brute] != [r.slide_id for r in ref[q]]:
            raise SystemExit(f"{regime}: brute force and the reference disagree for {q}")
    cuda_ms = None
    if args.cuda:
        cuda = CohortIndex(config=IndexConfig(device="cuda"))
        cuda._store = index._store
        cuda.stage()
        for q in queries[:3]:
            cuda.query(q, n=10)
        ct = []
        for q in queries:
            t = time.perf_counter()
            rows = cuda.query(q, n=10)
            ct.append(time.perf_counter() - t)
            if [r.slide_id for r in rows] != [r.slide_id for r in got[q]]:
                raise SystemExit(f"{regime}: CUDA and CPU answers differ for {q}")
        cuda_ms = round(1000 * float(np.median(ct)), 2)
        del cuda
    result = {
        "regime": regime,
        "generate_s": round(gen_s, 1),
        "build_s": round(build_s, 2),
        "memory_mb": round(index.nbytes / 2**20, 1),
        "first_stage": f"{index.stage().precision}/{index.stage().device}",
        "query_ms_median": round(query_ms, 2),
        "query_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
        "query_cpu_ms_median": round(1000 * float(np.median(cpu)), 2),
        "query_main_thread_cpu_ms_median": round(1000 * float(np.median(main_cpu)), 2),
        "query_ms_unloaded_estimate_median": round(1000 * float(np.median(idle_estimate)), 2),
        "workers": workers,
        "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)],
        "recall_at_10": round(recall, 4),
        "mean_distance_excess": round(excess, 6),
        "distances_equal_reference": distances_equal,
        "exact_flag": exact_all,
        "rescored_median": int(np.median(rescored)),
        "solved_median": int(np.median(solved)),
        "reference_ms_median": round(1000 * float(np.median(ref_times)), 1),
        "bruteforce_ms_median": round(1000 * float(np.median(brute_times)), 1) if brute_times else None,
        "cuda_query_ms_median": cuda_ms,
        "first_stage_floor": floor,
        "n_queries": len(times),
        "n_recall_queries": len(ref),
    }
    print(json.dumps(result), flush=True)
    del index
    gc.collect()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 slides")
    parser.add_argument("--n-slides", type=int, default=None)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--queries", type=int, default=100, help="timed queries per regime")
    parser.add_argument("--reference-queries", type=int, default=None,
                        help="queries also answered by the float32 reference (default: all)")
    parser.add_argument("--brute-queries", type=int, default=2, help="queries also answered by brute force")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", help="first stage: auto, int8, bfloat16, float32")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the first-stage floor (int8 products alone, in and out of cache)")
    args = parser.parse_args(argv)
    n_slides = args.n_slides or (10_000 if args.quick else 100_000)
    args.reference_queries = args.reference_queries or args.queries
    import torch

    args.cuda = torch.cuda.is_available()
    regimes = [r for r in args.regimes.split(",") if r]
    print(f"{n_slides} slides x {args.k} prototypes x {args.dim}-d; regimes: {', '.join(regimes)}; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    rows = [run_regime(r, args, n_slides) for r in regimes]
    worst = max(rows, key=lambda r: r["query_ms_median"])
    worst_cpu = max(rows, key=lambda r: r["query_cpu_ms_median"])
    brute = [r["bruteforce_ms_median"] for r in rows if r["bruteforce_ms_median"]]
    cuda = [r["cuda_query_ms_median"] for r in rows if r["cuda_query_ms_median"] is not None]
    result = {
        "n_slides": n_slides,
        "k": args.k,
        "dim": args.dim,
        "query_ms_median": worst["query_ms_median"],
        "worst_regime": worst["regime"],
        "query_cpu_ms_median": worst_cpu["query_cpu_ms_median"],
        "query_ms_unloaded_estimate_median": max(r["query_ms_unloaded_estimate_median"] for r in rows),
        "worst_cpu_regime": worst_cpu["regime"],
        "load_average_1min": [min(r["load_average_1min"][0] for r in rows),
                              max(r["load_average_1min"][1] for r in rows)],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "recall_at_10_min": min(r["recall_at_10"] for r in rows),
        "mean_distance_excess_max": max(r["mean_distance_excess"] for r in rows),
        "speedup_vs_exact_bruteforce": round(float(np.median(brute)) / worst["query_ms_median"], 1) if brute else None,
        "speedup_vs_float32_reference": round(worst["reference_ms_median"] / worst["query_ms_median"], 1),
        "cuda_query_ms_median": max(cuda) if cuda else None,
        # the least a search reading every stored prototype once (int8) spends here: the worst regime's
        # query time against it (first_stage_floor says why it bounds this machine's query times)
        "int8_product_ms": worst.get("first_stage_floor", {}).get("int8_product_ms"),
        "all_exact": all(r["exact_flag"] and r["distances_equal_reference"] for r in rows),
        "regimes": {r["regime"]: {k: v for k, v in r.items() if k != "regime"} for r in rows},
        "cpu_threads": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
