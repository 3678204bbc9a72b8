"""``slpd region-encoders COHORT [--use VERSION] [--json]``: the region encoders a cohort holds region
embeddings of (the extraction's and each SLPD fine-tune's), and switching between them.

Each feature file keeps one set of region embeddings per region encoder beside its token grids
(``napari_slpd.features.store``); switching only selects another set (nothing is recomputed) and brings
the prototypes and the similar-slides index along (``napari_slpd.session.versions``). Compare versions
with ``slpd evaluate COHORT --labels CSV --repr region_mean@KEY region_mean@OTHER``.
"""

from __future__ import annotations

import json

from napari_slpd.cli.common import add_cohort_argument, add_command, add_output_flags, open_session, table


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "region-encoders", run,
        help="list the region encoders the cohort has embeddings of; switch between them (--use)",
        description="List the region-embedding versions of a cohort (one per region encoder: the extraction's "
        "and each fine-tune's 'Use checkpoint'), or make one the cohort's with --use (instant: nothing is "
        "recomputed; prototypes and the similar-slides index follow).",
    )
    add_cohort_argument(parser)
    parser.add_argument("--use", metavar="VERSION", default=None,
                        help="key, checkpoint sha256 prefix, model id or checkpoint path of the version to select")
    add_output_flags(parser, quiet=False)


def run(args) -> int:
    from napari_slpd.errors import SlpdError

    session = open_session(args.cohort)
    report = session.use_region_encoder(args.use) if args.use else None
    encoders = session.region_encoders()
    if not encoders:
        raise SlpdError(f"no slide of {session.root} has features yet; run `slpd extract` first")
    if args.json:
        out = {"cohort": str(session.root), "region_encoders": [e.to_dict() for e in encoders]}
        if report is not None:
            out["switched"] = {"key": report.key, "slides": len(report.switched) + len(report.already),
                               "missing": report.missing, "prototypes_restored": len(report.prototypes_restored)}
        print(json.dumps(out, indent=1))
        return 0
    if report is not None:
        print(report.summary())
    print(format_region_encoders(encoders))
    return 0


def format_region_encoders(encoders) -> str:
    """One line per version: selected on every slide (yes) or some, slides with it of slides with features."""
    return table(("key", "selected", "slides", "dim", "origin", "label"),
                 [(e.key, "yes" if e.selected else ("some" if e.n_selected else ""),
                   f"{e.n_slides}/{e.n_with_features}", e.dim, e.origin, e.label) for e in encoders],
                 right=("slides", "dim"))
