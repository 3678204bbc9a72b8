"""``slpd sample-cohort OUT --slides N --classes C [--seed S]``: labelled synthetic slides to try evaluation.

Writes N procedural H&E slides of C tissue-composition classes (two subtypes each, two or three slides
per case) into OUT, plus OUT/labels.csv (slide_id, case_id, class, subtype, time, event). Then::

    slpd extract OUT --out OUT/cohort --region-px 256 --patch-px 64 --input-size 64
    slpd prototypes OUT/cohort
    slpd evaluate OUT/cohort --labels OUT/labels.csv --task class --out OUT/evaluation

Slides already in OUT are kept (a second run only writes labels.csv again).
"""

from __future__ import annotations

import sys

from napari_slpd.cli.common import add_command, add_output_flags
from napari_slpd.errors import SlpdError


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "sample-cohort", run,
        help="write labelled synthetic slides (tissue-composition classes, cases, survival) to try evaluation",
        description="Paint N synthetic H&E slides of C tissue-composition classes (with subtypes and several "
        "slides per case) into OUT and write OUT/labels.csv with class, subtype, case and a survival time "
        "that depends on the composition. `slpd extract OUT --out COHORT` takes the folder as it is.",
    )
    parser.add_argument("out", metavar="OUT", help="folder for the slides and labels.csv (created)")
    parser.add_argument("--slides", type=int, default=24, help="number of slides (default 24)")
    parser.add_argument("--classes", type=int, default=3, help="number of classes, 2 to 9 (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--size", default="2048x1536", metavar="WxH", help="slide size in px (default 2048x1536)")
    parser.add_argument("--mpp", type=float, default=0.5, help="pixel size in um/px (default 0.5)")
    add_output_flags(parser, json=False, quiet_help="no progress output")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise SlpdError(f"--size must look like 2048x1536, not {text!r}") from exc
    return w, h


def run(args) -> int:
    from napari_slpd.samples.sample_cohort import SampleCohortSpec, write_sample_cohort

    width, height = _size(args.size)
    spec = SampleCohortSpec(n_slides=args.slides, n_classes=args.classes, seed=args.seed, width=width,
                            height=height, mpp=args.mpp)
    say = None if args.quiet else (lambda text: print(text, file=sys.stderr))
    cohort = write_sample_cohort(args.out, spec, say=say)
    counts: dict[str, int] = {}
    for s in cohort.slides:
        counts[s.class_name] = counts.get(s.class_name, 0) + 1
    cases = len({s.case_id for s in cohort.slides})
    print(f"{len(cohort.slides)} slides of {cases} cases in {cohort.folder}: "
          + ", ".join(f"{n} {name}" for name, n in counts.items()))
    print(f"labels: {cohort.labels}")
    print(f"ground-truth tissue annotations (QuPath GeoJSON): {cohort.annotations}")
    print(f"next: slpd extract {cohort.folder} --out {cohort.folder / 'cohort'}")
    return 0
