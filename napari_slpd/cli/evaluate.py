"""``slpd evaluate COHORT --labels CSV``: slide-level figures of every representation, with the papers' protocols.

Reads a labels file (or a Patho-Bench split file), evaluates each slide representation the cohort caches
(``--list`` shows them) with KNN, linear probe, ABMIL, Cox survival and retrieval, prints one table per
task and, with ``--out``, writes the report folder (results.json, folds.csv, predictions.csv,
embeddings/, plots, report.html; see napari_slpd.evaluation.report).

Exit status: 0 done, 2 bad input (labels, representation never computed, ...), 130 interrupted (no
half-written report is left behind).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from napari_slpd.cli.common import (ProgressBar, add_cohort_argument, add_command, add_output_flags, open_session,
                                    table)
from napari_slpd.errors import SlpdError
from napari_slpd.evaluation.protocol_names import PROTOCOLS


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "evaluate", run,
        help="slide-level evaluation (KNN, linear probe, ABMIL, Cox, retrieval) of the cohort's representations",
        description="Evaluate the cohort's slide representations on labelled tasks with the HIPT/SLPD/PANTHER "
        "protocols: 10-fold CV grouped by case and stratified, mean ± std over folds, bootstrap 95%% CI, paired "
        "comparison between representations.",
    )
    add_cohort_argument(parser)
    parser.add_argument("--labels", metavar="CSV", help="labels CSV/TSV (slide_id, task columns, optional "
                        "case_id, split, time/event) or a Patho-Bench split file (fold_0, fold_1, ...)")
    parser.add_argument("--annotations", metavar="DIR", default=None,
                        help="segmentation evaluation: a folder of SLIDE_ID.geojson (QuPath export, classified "
                        "polygons) or SLIDE_ID.png/.tif/.npy label masks with classes.csv (value,name); scores "
                        "prototype maps, ProAlign zero-shot labels and named prototypes (Dice, IoU, pixel accuracy)")
    parser.add_argument("--seg-method", action="append", metavar="NAME", default=None,
                        choices=("prototypes", "proalign", "named_prototypes"),
                        help="segmentation method (repeatable; default: every one whose inputs exist)")
    parser.add_argument("--seg-mapping", metavar="CSV", default=None,
                        help="CSV name,class: label names of a method (ProAlign classes, prototype names) -> "
                        "annotation classes, where the names differ")
    parser.add_argument("--list", action="store_true", help="list the representations this cohort offers and exit")
    parser.add_argument("--task", action="append", metavar="COL", default=None,
                        help="task column to evaluate (repeatable; default: every label column; 'survival' for "
                        "time/event)")
    parser.add_argument("--repr", action="append", metavar="NAME", default=None, dest="representations",
                        help="representation (repeatable; default: every available one, see --list)")
    parser.add_argument("--protocol", action="append", metavar="NAME", default=None,
                        choices=PROTOCOLS,
                        help="protocol (repeatable; default: all that apply): knn, linear, abmil, cox, retrieval")
    parser.add_argument("--out", metavar="DIR", default=None, help="write the report folder here")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds, bootstrap and ABMIL (default 0)")
    parser.add_argument("--folds", type=int, default=None,
                        help="cross-validation folds (default: from the data, at most 10 and at most the number of "
                        "cases of the smallest class; a notice says when fewer than 10)")
    parser.add_argument("--k", type=int, default=5, help="KNN neighbours (default 5)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--device", default="auto", help="ABMIL device: auto | cpu | cuda (default auto)")
    parser.add_argument("--time-col", default="time", help="survival time column (default time)")
    parser.add_argument("--event-col", default="event", help="survival event column (default event)")
    parser.add_argument("--case-col", default="case_id", help="case (patient) column (default case_id)")
    parser.add_argument("--slide-col", default="slide_id", help="slide id column (default slide_id)")
    parser.add_argument("--ordinal", action="append", metavar="COL", default=[],
                        help="treat this label column as ordinal (quadratic kappa); integer columns with 3+ "
                        "levels are ordinal already")
    parser.add_argument("--require-known", action="store_true",
                        help="fail when the labels list slides that are not in the cohort (default: skip them, "
                        "with a count)")
    parser.add_argument("--ignore-unknown", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--no-plots", action="store_true", help="report without plots (faster)")
    add_output_flags(parser, json_help="print results.json's content instead of tables")


def format_list(infos) -> str:
    return table(("representation", "kinds", "slides", "what / how to compute"),
                 [(info.name, "+".join(info.kinds), info.n_slides,
                   info.description if info.available else f"not computed: {info.note}") for info in infos])


def _cell(figure: dict) -> str:
    mean, std, lo, hi = figure["mean"], figure["std"], figure["ci_low"], figure["ci_high"]
    if mean is None or not math.isfinite(mean):
        return "n/a"
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and math.isfinite(lo) else ""
    return f"{mean:.3f} ± {std:.3f}{ci}"


def format_tables(result) -> str:
    """One table per task: representations x protocols, each cell the primary figure, then comparisons."""
    lines = []
    for task, info in result.tasks.items():
        rs = [r for r in result.results if r.task == task]
        if not rs:
            continue
        protocols = list(dict.fromkeys(r.protocol for r in rs))
        reps = list(dict.fromkeys(r.representation for r in rs))
        header = ["representation"] + [f"{p} ({next(r.primary for r in rs if r.protocol == p)})" for p in protocols]
        rows = []
        for rep in reps:
            row = [rep]
            for p in protocols:
                found = [r for r in rs if r.representation == rep and r.protocol == p]
                row.append(_cell(found[0].figure()) if found else "")
            rows.append(row)
        t = info.to_dict()
        lines.append(f"task {task} ({info.kind}{', ordinal' if info.ordinal else ''}): {t['n_slides']} slides, "
                     f"{t['n_cases']} cases, {len(info.data.folds)} folds; mean ± std over folds [bootstrap 95% CI]")
        lines.append(table(header, rows, rule=True, last_free=False))  # every column holds figures
        for name, r in [(f"{r.representation}/{r.protocol}", r) for r in rs if r.protocol in ("knn", "linear", "abmil")]:
            extra = ", ".join(f"{m} {_cell(f)}" for m, f in r.summary.items() if m != "auc")
            lines.append(f"  {name}: {extra}")
        comps = [c for c in result.comparisons if c.task == task]
        if comps:
            lines.append("  paired comparisons (A - B, primary metric, paired bootstrap):")
            for c in comps:
                if math.isfinite(c.difference):
                    lines.append(f"    {c.protocol}: {c.a} - {c.b} = {c.difference:+.3f} "
                                 f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}], p = {c.p_value:.3g}")
        lines.append("")
    return "\n".join(lines).rstrip()


def run(args) -> int:
    import logging

    ours = logging.getLogger("napari_slpd")
    level = ours.level
    if not getattr(args, "verbose", False):  # the console shows tables and skips, not engine details
        ours.setLevel(logging.WARNING)
    try:
        return _run(args)
    finally:
        ours.setLevel(level)


def _run(args) -> int:
    from napari_slpd.evaluation.engine import EvaluationConfig
    from napari_slpd.evaluation.labels import LabelsConfig
    from napari_slpd.evaluation.protocols import AbmilConfig, KnnConfig
    from napari_slpd.evaluation.segmentation import SegmentationConfig

    session = open_session(args.cohort)
    if args.list:
        infos = session.representations()
        if args.json:
            print(json.dumps([i.to_dict() for i in infos], indent=1))
        else:
            print(format_list(infos))
        return 0
    if not args.labels and not args.annotations:
        raise SlpdError("--labels CSV (slide-level tasks) or --annotations DIR (segmentation) is required, or --list "
                        "to see the representations")
    config = EvaluationConfig(
        tasks=args.task, representations=args.representations, protocols=args.protocol, n_folds=args.folds,
        seed=args.seed, n_bootstrap=args.bootstrap, allow_unknown=not args.require_known,
        labels=LabelsConfig(slide_col=args.slide_col, case_col=args.case_col, time_col=args.time_col,
                            event_col=args.event_col, ordinal=list(args.ordinal)),
        knn=KnnConfig(k=args.k), abmil=AbmilConfig(device=args.device),
    )
    seg_config = SegmentationConfig(methods=args.seg_method, n_bootstrap=args.bootstrap, seed=args.seed,
                                    mapping=args.seg_mapping)
    bar = ProgressBar("evaluate", enabled=not (args.quiet or args.json), unit="step")
    try:
        run = session.evaluate(args.labels, config, annotations=args.annotations, segmentation=seg_config,
                               progress=bar)
    finally:
        bar.close()
    result, seg = run.result, run.segmentation
    out = _write_report(args, session.cohort, result, seg)
    if args.json:
        from napari_slpd.evaluation.report import json_safe

        payload = json_safe(result.to_dict()) if result is not None else json_safe(seg.to_dict())
        if result is not None and seg is not None:
            payload["segmentation"] = json_safe(seg.to_dict())
        if out is not None:
            payload["report"] = str(out)
        print(json.dumps(payload, indent=1, default=str))
        return 0
    if result is not None:
        for line in result.report.lines():
            print(line)
        print()
        print(format_tables(result))
    if seg is not None:
        if result is not None:
            print()
        print("\n".join(seg.lines()))
    if out is not None:
        print(f"\nreport: {out / 'report.html'}")
    if result is not None:
        print(f"({result.seconds:.1f} s)", file=sys.stderr)
    return 0


def _write_report(args, cohort, result, seg):
    """The report folder of ``--out`` (None without it): the full report, or the segmentation's alone."""
    if not args.out:
        return None
    if result is None:
        from napari_slpd.evaluation.segmentation.report import write_segmentation_report

        return write_segmentation_report(seg, args.out, plots=not args.no_plots)
    from napari_slpd.evaluation.report import write_report

    bar = ProgressBar("report", enabled=not (args.quiet or args.json), unit="step")
    try:
        return write_report(result, args.out, cohort=cohort, plots=not args.no_plots, progress=bar, segmentation=seg)
    finally:
        bar.close()
