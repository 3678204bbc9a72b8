"""``slpd demo [--out DIR] [--screenshots-only]``: a processed sample cohort, opened in napari.

Builds a small labelled cohort of synthetic H&E slides (two tissue-composition classes, several slides per
case, a survival time; ``slpd sample-cohort``) plus the real test slides when ``../shared/data/slides`` is there, extracts region features with small CPU-friendly
settings, computes the prototypes and the cohort index, then opens napari with the slide, its tissue
outline, region grid and prototypes, every SLPD panel docked, the most similar slides listed and the
embedding map drawn. On a synthetic slide the labeling panel names the prototypes after the tissue classes
the slide was painted with (its ground truth); the fine-tune panel is set up for a short tiny run. Without a
display (no DISPLAY / WAYLAND_DISPLAY), or with ``--screenshots-only``, the same viewer runs on a virtual X
display (Xvfb), the tiny fine-tune run trains (unless ``--no-finetune``) and screenshots of the window, of
each panel and of the labeling and fine-tune panels in use are written to ``OUT/screenshots`` instead.

Everything is cached in ``OUT/cohort``: a second run starts at once. The cohort is built by
:mod:`napari_slpd.session.demo_cohort` (Qt-free), the viewer driven by :mod:`napari_slpd.widgets.demo`, the
virtual display started by :mod:`napari_slpd.testing.xvfb`; this module is the command.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from napari_slpd.cli.common import add_command
from napari_slpd.errors import SlpdError
from napari_slpd.session.demo_cohort import (DEMO_SLIDES, build_demo_cohort, demo_labels, demo_settings,
                                             evaluate_demo, pick_query_slide, process_cohort)
from napari_slpd.testing.xvfb import has_display, start_virtual_display
from napari_slpd.utils.device import DEVICE_CHOICES

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "demo", run,
        help="build and process a small sample cohort, then open it in napari (or save screenshots)",
        description="Build a sample cohort (synthetic slides + the real test slides when present), extract "
        "features with small settings, compute prototypes and similar slides, and show everything in napari. "
        "Without a display, screenshots are written instead.",
    )
    parser.add_argument("--out", default="slpd-demo", metavar="DIR",
                        help="folder for the cohort and screenshots (default ./slpd-demo)")
    parser.add_argument("--screenshots-only", action="store_true",
                        help="do not open a window: write screenshots to DIR/screenshots (automatic without a display)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="HIPT ViT-256 DINO checkpoint (without it the patch encoder is randomly initialised)")
    parser.add_argument("--region-checkpoint", default=None, metavar="PATH",
                        help="ViT-4K checkpoint (without it the region encoder is randomly initialised)")
    parser.add_argument("--slides", type=int, default=DEMO_SLIDES, metavar="N",
                        help=f"number of labelled synthetic slides (default {DEMO_SLIDES})")
    parser.add_argument("--no-real", action="store_true", help="leave out the real test slides")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="where models run")
    parser.add_argument("-k", type=int, default=4, help="prototypes per slide (default 4)")
    parser.add_argument("--docs-screenshots", default=None, metavar="DIR",
                        help="also write small copies of the screenshots (at most 1200 px wide) to DIR")
    parser.add_argument("--no-finetune", action="store_true",
                        help="with screenshots: do not run the short fine-tune demo (the panel is shown set up, "
                        "before Start)")


# -- the command ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from napari_slpd.session import Session

    for noisy in ("faiss.loader", "OpenGL.acceleratesupport"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out).expanduser().resolve()
    cohort_root = out / "cohort"
    say = print
    settings = demo_settings(args.checkpoint, args.region_checkpoint, args.device, args.k)
    if settings.features.random_init:
        which = []
        if args.checkpoint is None:
            which.append("patch encoder (HIPT ViT-256)")
        if args.region_checkpoint is None:
            which.append("region encoder (ViT-4K)")
        say(
            f"NOTE: the {' and the '.join(which)} {'are' if len(which) > 1 else 'is'} randomly initialised "
            "(no checkpoint given): the prototypes group regions by colour and texture statistics, not by "
            "learned morphology. Give --checkpoint/--region-checkpoint for meaningful features."
        )
    say(f"Building the demo cohort in {cohort_root}")
    t0 = time.perf_counter()
    paths = build_demo_cohort(cohort_root, args.slides, not args.no_real, say)
    session = Session.open(cohort_root, slides=paths, settings=settings)
    fs = settings.features
    say(f"Processing {len(session.slide_ids())} slides (regions of {fs.region_px} px cut into {fs.patch_px}-px patches "
        f"at {fs.target_mpp:g} um/px, K={args.k})")
    process_cohort(session, say)
    say("Evaluating the slide representations on the sample labels (class)")
    evaluation = evaluate_demo(session, cohort_root, say)
    slide_id = pick_query_slide(session)
    for match in session.similar_slides(slide_id, top_k=3):
        say(f"  similar to {slide_id}: {match.slide_id} (distance {match.distance:.3f})")

    screenshots_only = args.screenshots_only or not has_display()
    display = None
    if screenshots_only and not args.screenshots_only:
        say("No display found (DISPLAY/WAYLAND_DISPLAY unset): writing screenshots instead of opening a window.")
    if screenshots_only:
        display = start_virtual_display()
        if display is None and not has_display():
            raise SlpdError(
                "cannot take screenshots without a display: install Xvfb (apt-get install xvfb) or run under "
                "xvfb-run, e.g. `xvfb-run -a slpd demo --screenshots-only`"
            )
    try:
        from napari_slpd.widgets.demo import open_demo_viewer, write_demo_screenshots

        viewer, panels = open_demo_viewer(session, slide_id, say=say, device=args.device,
                                          labels=demo_labels(cohort_root), evaluation=evaluation)
        say(f"Demo ready after {time.perf_counter() - t0:.0f} s")
        if screenshots_only:
            docs = Path(args.docs_screenshots) if args.docs_screenshots else None
            write_demo_screenshots(viewer, panels, out / "screenshots", finetune=not args.no_finetune,
                                   docs_folder=docs, say=say)
            viewer.close()
            return 0
        import napari

        napari.run()
        return 0
    finally:
        if display is not None:
            display.stop()


def main(argv: list[str] | None = None) -> int:  # python -m napari_slpd.cli.demo
    parser = argparse.ArgumentParser(prog="slpd demo")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
