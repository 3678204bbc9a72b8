"""``slpd similar COHORT SLIDE_ID [-n 10]``: the cohort's slides most similar to one slide, and why.

Slides are ranked by the prototype set distance (K - S, S the best one-to-one matching of the two slides'
prototypes by cosine); each row lists the matched prototype pairs, most similar first, as
``query prototype -> its match (cosine)``. With ``--region I``, the regions of the cohort most similar to
region I of the slide instead. Uses (and updates) the index kept in ``COHORT/index``.
"""

from __future__ import annotations

import json

from napari_slpd.cli.prototypes import ProgressBar, open_cohort


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "similar",
        help="rank the cohort's slides by similarity to a slide (prototype set distance), with explanations",
        description="Rank the slides of a cohort by their prototype set distance to SLIDE_ID (run "
        "`slpd prototypes COHORT` first) and show which prototypes matched. With --region, find the most "
        "similar regions across the cohort instead.",
    )
    parser.add_argument("cohort", metavar="COHORT", help="cohort folder")
    parser.add_argument("slide_id", metavar="SLIDE_ID", help="the query slide's id (file stem)")
    parser.add_argument("-n", "--n", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--exact", action="store_true", help="exact ranking over the whole cohort (slower)")
    parser.add_argument("--region", type=int, default=None, metavar="I",
                        help="find the regions most similar to region I of the slide instead")
    parser.add_argument("--other-slides", action="store_true", help="with --region: only other slides' regions")
    parser.add_argument("--source", choices=("region_embeddings", "features"), default="region_embeddings",
                        help="with --region: region embeddings (default) or patch features")
    parser.add_argument("--pairs", type=int, default=4, metavar="P", help="matched pairs shown per row (table)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _table(header: tuple, rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def run_slides(args, cohort) -> int:
    from napari_slpd.prototypes.cache import load_prototypes
    from napari_slpd.similarity.index import CohortIndex

    cohort.slide(args.slide_id)  # a clear error for an unknown slide
    query = load_prototypes(cohort, args.slide_id)
    bar = ProgressBar("cohort index", enabled=not (args.quiet or args.json))
    try:
        index = CohortIndex.open(cohort, progress=bar)
    finally:
        bar.close()
    method = "exact" if args.exact else None
    results = index.query(query, n=args.n, method=method)
    used = "exact" if (args.exact or not index.uses_ivf) else "ivf"
    if args.json:
        print(json.dumps({
            "query": args.slide_id, "k": query.k, "source": query.source, "method": used,
            "cohort_slides": len(index), "results": [r.to_dict() for r in results],
        }, indent=2))
        return 0
    print(f"slides most similar to {args.slide_id} ({query.k} prototypes of {query.source}; "
          f"{len(index)} slides indexed, {used} search); distance = K - S, 0 for identical prototype sets")
    rows = []
    for r in results:
        shown = ", ".join(f"{p.k}->{p.l} ({p.similarity:.2f})" for p in r.pairs[: args.pairs])
        if len(r.pairs) > args.pairs:
            shown += f", +{len(r.pairs) - args.pairs} more"
        rows.append((r.rank, r.slide_id, f"{r.distance:.3f}", f"{r.similarity:.3f}", shown))
    print(_table(("rank", "slide", "distance", "S", "matched prototypes: query->match (cosine)"), rows))
    if not results:
        print("(no other slide of the cohort has prototypes)")
    return 0


def run_regions(args, cohort) -> int:
    from napari_slpd.similarity.regions import RegionIndex

    cohort.slide(args.slide_id)
    bar = ProgressBar("region index", enabled=not (args.quiet or args.json))
    try:
        index = RegionIndex.open(cohort, source=args.source, progress=bar)
    finally:
        bar.close()
    hits = index.query(args.slide_id, args.region, n=args.n, exclude_same_slide=args.other_slides)
    if args.json:
        print(json.dumps({"query": {"slide_id": args.slide_id, "region_index": args.region},
                          "source": args.source, "results": [h.to_dict() for h in hits]}, indent=2))
        return 0
    print(f"regions most similar to region {args.region} of {args.slide_id} ({args.source}, cosine)")
    rows = [(i, h.slide_id, h.region_index, f"{h.coords[0]}, {h.coords[1]}", f"{h.similarity:.3f}")
            for i, h in enumerate(hits, start=1)]
    print(_table(("rank", "slide", "region", "level-0 x, y", "similarity"), rows))
    return 0


def run(args) -> int:
    cohort = open_cohort(args.cohort)
    if args.region is not None:
        return run_regions(args, cohort)
    return run_slides(args, cohort)
