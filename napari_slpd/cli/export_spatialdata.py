"""``slpd export-spatialdata COHORT [SLIDE_ID ...] --out DIR``: the cohort for scverse.

Writes ``DIR/<slide_id>.zarr`` per slide, a SpatialData store that ``wsidata.open_wsi(slide,
store="DIR/<slide_id>.zarr")`` and LazySlide read as their own (patches as ``tiles`` with the patch
encoder's features, regions as ``regions``, tissue outlines, prototypes and label maps), and
``DIR/cohort.h5ad``: one row per slide for scanpy (a slide representation, the labels of ``--labels``, the
prototype sets). Needs the scverse extra (``pip install "napari-slpd[scverse]"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from napari_slpd.cli.common import add_cohort_argument, add_command, add_output_flags
from napari_slpd.errors import SlpdError


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "export-spatialdata", run,
        help="write each slide as a SpatialData zarr (wsidata / LazySlide layout) and the cohort as AnnData",
        description="Export a cohort's features, prototypes, label maps and tissue outlines for scverse: one "
        "SpatialData zarr per slide that wsidata / LazySlide open as their own, and one AnnData of slides "
        "(slide representation, labels, prototype sets) for scanpy. Needs the scverse extra.",
    )
    add_cohort_argument(parser)
    parser.add_argument("slides", nargs="*", metavar="SLIDE_ID", help="only these slides (default: all with features)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for <slide_id>.zarr and cohort.h5ad")
    parser.add_argument("--representation", default="region_mean",
                        help="slide representation in the cohort AnnData's X (default region_mean; see "
                             "`slpd evaluate COHORT --list`)")
    parser.add_argument("--also", nargs="*", default=[], metavar="NAME",
                        help="more slide representations, each as obsm['X_<name>']")
    parser.add_argument("--labels", default=None, metavar="CSV", help="slide labels to put in the cohort's obs")
    parser.add_argument("--no-cohort", action="store_true", help="only the per-slide zarr stores")
    parser.add_argument("--no-tissue", action="store_true", help="leave out the tissue outlines")
    parser.add_argument("--no-thumbnail", action="store_true", help="leave out the slide thumbnail image")
    parser.add_argument("--overwrite", action="store_true", help="replace stores that exist")
    add_output_flags(parser, json=False)


def run(args) -> int:
    from tqdm import tqdm

    from napari_slpd.cli.common import open_cohort
    from napari_slpd.scverse import require_scverse

    require_scverse("slpd export-spatialdata")
    from napari_slpd.scverse.export_cohort import cohort_anndata, write_cohort_anndata
    from napari_slpd.scverse.export_slide import export_slide_spatialdata

    cohort = open_cohort(args.cohort)
    with_features = [s for s in cohort.slide_ids() if cohort.features_path(s).exists()]
    if args.slides:
        unknown = [s for s in args.slides if s not in with_features]
        if unknown:
            raise SlpdError(f"no features for {', '.join(unknown)} in {cohort.root} (slides with features: "
                            f"{', '.join(with_features) or 'none'})")
        slide_ids = list(args.slides)
    else:
        slide_ids = with_features
    if not slide_ids:
        raise SlpdError(f"cohort {cohort.root} has no slide with features; run `slpd extract` or an import first")
    out = Path(args.out).expanduser()
    stores, failed = {}, 0
    for slide_id in tqdm(slide_ids, desc="export", unit="slide", disable=args.quiet, file=sys.stderr):
        path = out / f"{slide_id}.zarr"
        try:
            result = export_slide_spatialdata(cohort, slide_id, path, overwrite=args.overwrite,
                                              tissues=not args.no_tissue, thumbnail=not args.no_thumbnail)
        except SlpdError as exc:
            failed += 1
            print(f"{slide_id}: error: {exc}")
            continue
        stores[slide_id] = path
        tables = ", ".join(f"{k} ({n})" for k, n in result.tables.items())
        print(f"{slide_id}: {path}  tables {tables}; labels {', '.join(result.labels) or 'none'}")
        for note in result.notes:
            print(f"  note: {note}")
    if not args.no_cohort and stores:
        adata = cohort_anndata(cohort, list(stores), representation=args.representation, also=tuple(args.also),
                               labels_path=args.labels, stores=stores)
        h5ad = write_cohort_anndata(adata, out / "cohort.h5ad")
        print(f"cohort: {h5ad}  {adata.n_obs} slides x {adata.n_vars} ({args.representation})")
    print(f"open a slide with wsidata: wsidata.open_wsi(SLIDE_FILE, store='{out}/<slide_id>.zarr')")
    return 1 if failed else 0
