"""``slpd similar COHORT SLIDE_ID [-n 10]``: the cohort's slides most similar to one slide, and why.

Slides are ranked by the prototype set distance (K - S, S the best one-to-one matching of the two slides'
prototypes by cosine); each row lists the matched prototype pairs, most similar first, as
``query prototype -> its match (cosine)``. With ``--region I``, the regions of the cohort most similar to
region I of the slide instead; with ``--prototype K`` (or ``--pattern-of-region I``, a region click), the
slides whose prototypes best match that one prototype. The ranking is the Similar slides panel's (one code
path: :class:`napari_slpd.session.Session`), slides whose prototypes or features were made with other
settings left out. Uses (and updates) the index kept in ``COHORT/index``.
"""

from __future__ import annotations

import json

from napari_slpd.cli.common import (ProgressBar, add_cohort_argument, add_command, add_output_flags, open_cohort,
                                    table)
from napari_slpd.errors import SlpdError


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "similar", run,
        help="rank the cohort's slides by similarity to a slide (prototype set distance), with explanations",
        description="Rank the slides of a cohort by their prototype set distance to SLIDE_ID (run "
        "`slpd prototypes COHORT` first) and show which prototypes matched. With --region, find the most "
        "similar regions across the cohort instead.",
    )
    add_cohort_argument(parser)
    parser.add_argument("slide_id", metavar="SLIDE_ID", help="the query slide's id (file stem)")
    parser.add_argument("-n", "--n", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--exact", action="store_true", help="exact ranking over the whole cohort (slower)")
    parser.add_argument("--region", type=int, default=None, metavar="I",
                        help="find the regions most similar to region I of the slide instead")
    parser.add_argument("--prototype", type=int, default=None, metavar="K",
                        help="rank slides by their best match to prototype K of the slide instead")
    parser.add_argument("--pattern-of-region", type=int, default=None, metavar="I",
                        help="rank slides by their best match to the prototype of region I (what a click on "
                             "region I asks in the Similar slides panel)")
    parser.add_argument("--other-slides", action="store_true", help="with --region: only other slides' regions")
    parser.add_argument("--source", choices=("region_embeddings", "features"), default="region_embeddings",
                        help="with --region: region embeddings (default) or patch features")
    parser.add_argument("--pairs", type=int, default=4, metavar="P", help="matched pairs shown per row (table)")
    add_output_flags(parser, json_help="print one JSON object instead of a table")


def query_session(cohort, slide_id: str):
    """The Session that answers ``slpd similar``: the panel's engine on the cohort, with the cohort's saved
    settings (the panel's) and the prototype settings the query slide's prototypes were computed with, so
    that slides whose prototypes or features were made otherwise are left out exactly as in the panel.
    A cohort made on the command line (no saved settings) takes its feature settings from the query
    slide's feature file. Nothing is written into the cohort's settings."""
    from dataclasses import replace

    from napari_slpd.features.store import read_store_attrs
    from napari_slpd.prototypes.cache import load_prototypes, read_attrs
    from napari_slpd.session import Session
    from napari_slpd.session.settings import SessionSettings

    cohort.slide(slide_id)  # a clear error for an unknown slide
    query = load_prototypes(cohort, slide_id)  # clear errors: no prototypes yet, or out of date
    if query.source != "region_embeddings":
        raise SlpdError(
            f"the prototypes of {slide_id!r} were computed from {query.source}; similar slides are ranked by "
            f"prototypes of region embeddings (as in the Similar slides panel): run `slpd prototypes {cohort.root}` "
            "without --source"
        )
    attrs = read_attrs(cohort.prototypes_path(slide_id))
    saved = cohort.load_settings()
    settings = SessionSettings.from_dict(saved)[0] if saved else SessionSettings()
    min_regions = int(attrs.get("min_regions", -1))
    settings.prototypes = replace(
        settings.prototypes, k=int(attrs.get("k_requested", attrs.get("k", query.k))),
        seed=int(attrs.get("seed", 0)), niter=int(attrs.get("niter", 10)), nredo=int(attrs.get("nredo", 5)),
        min_regions=None if min_regions < 0 else min_regions,
    )
    if not saved:
        features = read_store_attrs(cohort.features_path(slide_id))
        made = {key: features[key] for key in ("patch_encoder", "region_encoder") if features.get(key)}
        made.update({key: int(features[key]) for key in ("region_px", "patch_px") if key in features})
        if "target_mpp" in features:
            made["target_mpp"] = float(features["target_mpp"])
        settings.features = replace(settings.features, **made)
    return Session(cohort.root, settings=settings, create=False)


def run_slides(args, cohort) -> int:
    session = query_session(cohort, args.slide_id)
    query = session.prototypes(args.slide_id, compute=False)
    bar = ProgressBar("cohort index", enabled=not (args.quiet or args.json))
    try:
        index = session.index(compute=False, index_progress=bar)
    finally:
        bar.close()
    method = "exact" if args.exact else None
    if args.prototype is not None or args.pattern_of_region is not None:
        return _print_prototype_ranking(args, session, query)
    results = session.similar_slides(args.slide_id, top_k=args.n, method=method, compute=False)
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
        pairs = r.prototype_pairs
        shown = ", ".join(f"{p.k}->{p.l} ({p.similarity:.2f})" for p in pairs[: args.pairs])
        if len(pairs) > args.pairs:
            shown += f", +{len(pairs) - args.pairs} more"
        rows.append((r.rank, r.slide_id, f"{r.distance:.3f}", f"{r.similarity:.3f}", shown))
    print(table(("rank", "slide", "distance", "S", "matched prototypes: query->match (cosine)"), rows))
    if not results:
        print("(no other slide of the cohort has prototypes)")
    return 0


def _print_prototype_ranking(args, session, query) -> int:
    """Slides ranked by their best match to one prototype of the query slide (a region click's question)."""
    k = args.prototype
    if args.pattern_of_region is not None:
        region = int(args.pattern_of_region)
        if not 0 <= region < len(query.assignments):
            raise SlpdError(f"{args.slide_id} has {len(query.assignments)} regions; there is no region {region}")
        k = int(query.assignments[region])
    results = session.similar_to_prototype(args.slide_id, k, top_k=args.n, compute=False)
    if args.json:
        print(json.dumps({"query": args.slide_id, "prototype": k, "region": args.pattern_of_region,
                          "k": query.k, "source": query.source, "method": "prototype",
                          "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    print(f"slides whose prototypes best match prototype {k} of {args.slide_id} (cosine); "
          "distance = 1 - cosine")
    rows = [(r.rank, r.slide_id, f"{r.distance:.3f}", f"{r.pairs[0][0]}->{r.pairs[0][1]} "
             f"({r.pair_similarities[0]:.2f})") for r in results]
    print(table(("rank", "slide", "distance", "matched prototype: query->match (cosine)"), rows))
    if not results:
        print("(no other slide of the cohort has prototypes for these settings)")
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
    print(table(("rank", "slide", "region", "level-0 x, y", "similarity"), rows))
    return 0


def run(args) -> int:
    cohort = open_cohort(args.cohort)
    if args.region is not None:
        return run_regions(args, cohort)
    return run_slides(args, cohort)
