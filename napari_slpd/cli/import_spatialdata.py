"""``slpd import-spatialdata ZARR_OR_FOLDER --out COHORT``: LazySlide's features into a cohort.

Each ``slide.zarr`` that LazySlide / wsidata wrote (``tables/<model>_tiles`` with ``shapes/tiles``) gives one
slide's patch features; the region token grids are assembled from the tiles' level-0 coordinates as for
CLAM/TRIDENT files (``slpd import-features``), so prototypes, similar slides, SLPD and evaluation run on
any encoder LazySlide ran. The slide file is found beside the zarr (wsidata's default place) or among
``--slides``. Needs the scverse extra.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from napari_slpd.cli.common import add_command, add_new_cohort_option, add_output_flags, add_pixel_size_arguments
from napari_slpd.errors import SlpdError


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "import-spatialdata", run,
        help="import LazySlide / wsidata feature tables (SpatialData zarr) as a cohort's patch features",
        description="Read one feature table of each slide.zarr written by LazySlide / wsidata and write it into "
        "the cohort as that slide's patch features, with region token grids assembled from the tile "
        "coordinates. Needs the scverse extra.",
    )
    parser.add_argument("stores", nargs="+", metavar="ZARR_OR_FOLDER", help="slide.zarr stores or folders of them")
    add_new_cohort_option(parser)
    parser.add_argument("--feature-key", default=None, metavar="MODEL",
                        help="LazySlide's model name (e.g. uni, resnet50) or the table key; needed when a store "
                             "holds several feature tables")
    parser.add_argument("--tile-key", default=None, help="tile collection of the features (LazySlide: tiles)")
    parser.add_argument("--slides", nargs="*", default=[], metavar="SLIDE_OR_FOLDER",
                        help="the slides, matched by name (default: the file beside each zarr)")
    parser.add_argument("--patches-per-region", type=int, default=16,
                        help="region side in patches, G (default 16)")
    parser.add_argument("--min-coverage", type=float, default=0.25,
                        help="fraction of a region's G x G patches that must exist to keep it (0.25)")
    parser.add_argument("--token-dtype", choices=("float16", "float32"), default="float16")
    add_pixel_size_arguments(parser, "the slides", fallback=False)
    parser.add_argument("--overwrite", action="store_true", help="replace features made from another source")
    add_output_flags(parser, json=False)


def expand_stores(items: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise SlpdError(f"{path} does not exist")
        if path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists():
            out.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_dir() and p.suffix == ".zarr" and not p.name.startswith("."))
        if not found:
            raise SlpdError(f"no .zarr stores in {path}")
        out.extend(found)
    return out


def run(args) -> int:
    from tqdm import tqdm

    from napari_slpd.scverse import require_scverse

    require_scverse("slpd import-spatialdata", ("spatialdata", "anndata"))
    from napari_slpd.cli.common import record_import
    from napari_slpd.cli.extract import format_summary
    from napari_slpd.cli.import_features import slides_by_id
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.import_h5 import import_patch_features
    from napari_slpd.scverse.importing import (patch_features_of, read_feature_table, slide_beside,
                                               slide_id_of_store)
    from napari_slpd.slides.slide import open_slide

    cohort = Cohort(args.out)
    stores = expand_stores(args.stores)
    slides = slides_by_id(args.slides)
    rows, registered = [], 0
    for store in tqdm(stores, desc="import", unit="slide", disable=args.quiet, file=sys.stderr):
        slide_id = slide_id_of_store(store)
        row = {"slide_id": slide_id, "path": str(store), "status": "error", "regions": 0, "computed": 0,
               "seconds": 0.0, "message": ""}
        t0 = time.perf_counter()
        try:
            table = read_feature_table(store, args.feature_key, args.tile_key)
            slide_path = slides.get(slide_id) or slide_beside(store)
            slide = open_slide(slide_path, mpp=args.mpp) if slide_path else None
            pixel_size = slide.pixel_size if slide is not None else None
            try:
                result = import_patch_features(
                    store, cohort.features_path(slide_id), grid_size=args.patches_per_region,
                    min_coverage=args.min_coverage, region_encoder="mean", slide=slide, slide_id=slide_id,
                    encoder_name=table.model, token_dtype=args.token_dtype, overwrite=args.overwrite,
                    patch_features=patch_features_of(table, slide), source_sha256=table.fingerprint(),
                )
            finally:
                if slide is not None:
                    slide.close()
            registered += record_import(cohort, row, result, slide_path, pixel_size,
                                        f"{table.key}: {result.n_patches} tiles, {result.dim}-d",
                                        "no slide beside the store or in --slides")
        except SlpdError as exc:
            row["message"] = str(exc)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
    print(format_summary(rows))
    print(f"registered {registered} slides in {cohort.registry_path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0
