"""``slpd prototypes COHORT [-k 4]``: K prototypes per slide of a cohort, cached, and the cohort index.

Each slide with extracted features gets K prototypes (K-means of its region embeddings, or of its patch
features with ``--source features``), saved to ``COHORT/prototypes/<slide_id>.h5``. Files made with the
same settings from the same features are reused. Then the cohort's similarity index is brought up to
date and saved in ``COHORT/index`` (``slpd similar`` uses it).

Exit status: 0 when every slide with features has prototypes, 1 when some failed (they keep any older
prototypes), 2 on bad input (no such cohort, no slides, no features at all).
"""

from __future__ import annotations

import json

from napari_slpd.cli.common import (ProgressBar, add_cohort_argument, add_command, add_output_flags, open_cohort,
                                    table)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "prototypes", run,
        help="compute K prototypes per slide (K-means of region embeddings) and the cohort index",
        description="Summarize each slide of a cohort by K prototypes (K-means of its region embeddings, "
        "SLPD settings: faiss, niter 10, nredo 5, seed 0), cache them, and build the cohort's similar-slide "
        "index. Slides with fewer regions than K get fewer prototypes (reported).",
    )
    add_cohort_argument(parser)
    parser.add_argument("-k", "--k", type=int, default=4,
                        help="prototypes per slide (default 4; SLPD: 4 NSCLC, 2 BRCA)")
    parser.add_argument("--source", choices=("region_embeddings", "features"), default="region_embeddings",
                        help="cluster region embeddings (default) or patch features (patch-resolution label maps)")
    parser.add_argument("--min-regions", type=int, default=None, metavar="N",
                        help="leave out slides with fewer regions (SLPD's min_num_region: 32 NSCLC, 16 BRCA)")
    parser.add_argument("--seed", type=int, default=0, help="K-means seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda: faiss GPU K-means when available")
    parser.add_argument("--slides", nargs="+", metavar="SLIDE_ID", default=None, help="only these slides")
    parser.add_argument("--overwrite", action="store_true", help="recompute even up-to-date prototypes")
    parser.add_argument("--no-index", action="store_true", help="do not update the cohort index")
    add_output_flags(parser, json_help="print one JSON object instead of a table")


def format_table(report) -> str:
    rows = []
    for r in report.results:
        sizes = " ".join(f"{100 * s:.0f}%" for s in r.sizes) if r.sizes else ""
        rows.append((r.slide_id, r.status, "" if r.k is None else r.k, "" if r.n_regions is None else r.n_regions,
                     sizes, r.message))
    return table(("slide", "status", "K", "regions", "prototype sizes", "note"), rows)


def summary(report) -> str:
    counts = {}
    for r in report.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    text = f"{len(report.results)} slides ({parts}); K = {report.k} from {report.source}"
    return text + ("; cancelled" if report.cancelled else "")


def run(args) -> int:
    from napari_slpd.prototypes.cache import compute_cohort_prototypes
    from napari_slpd.similarity.index import CohortIndex

    cohort = open_cohort(args.cohort)
    bar = ProgressBar("prototypes", enabled=not (args.quiet or args.json))
    try:
        report = compute_cohort_prototypes(
            cohort, k=args.k, source=args.source, seed=args.seed, min_regions=args.min_regions,
            device=args.device, overwrite=args.overwrite, slide_ids=args.slides, progress=bar,
        )
    finally:
        bar.close()
    index_info = None
    if not args.no_index and report.usable:
        bar = ProgressBar("cohort index", enabled=not (args.quiet or args.json))
        try:
            index = CohortIndex.open(cohort, progress=bar)
        finally:
            bar.close()
        index_info = {"slides": len(index), "prototypes": index.n_prototypes,
                      "method": "ivf" if index.uses_ivf else "exact", "path": str(cohort.index_dir)}
    if args.json:
        out = report.to_dict()
        out["index"] = index_info
        print(json.dumps(out, indent=2))
    else:
        print(format_table(report))
        print(summary(report))
        for warning in report.warnings:
            print(f"warning: {warning}")
        if index_info:
            print(f"cohort index: {index_info['slides']} slides, {index_info['prototypes']} prototypes "
                  f"({index_info['method']}), saved in {index_info['path']}")
    if report.failed or report.cancelled:
        return 1
    return 0
