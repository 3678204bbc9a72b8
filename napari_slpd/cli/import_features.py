"""``slpd import-features H5_OR_FOLDER --out COHORT``: bring CLAM/TRIDENT patch features into a cohort.

Users who already ran UNI, CONCH, CTransPath, ... keep their features: each ``<slide>.h5`` (``features``
[N, D], ``coords`` [N, 2]) becomes a FeatureStore whose region token grids are assembled from the patch
coordinates, so prototypes and similar-slide search work on them directly. ``--slides`` points at the
slide files (matched by file stem): they give the pixel size, the level downsample of CLAM files cut
at level > 0, and let the slides be registered in the cohort (and viewed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from napari_slpd.cli.common import add_command, add_new_cohort_option, add_output_flags, add_pixel_size_arguments
from napari_slpd.errors import SlpdError


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "import-features", run_import,
        help="import CLAM/TRIDENT .h5 patch features (UNI, CONCH, ...) as region features",
        description="Assemble region token grids from CLAM/TRIDENT patch features by their coordinates and "
        "write one FeatureStore per slide into the cohort, so prototypes can be computed without "
        "extracting features again.",
    )
    parser.add_argument("h5", nargs="+", metavar="H5_OR_FOLDER", help=".h5 feature files or folders of them")
    add_new_cohort_option(parser)
    parser.add_argument("--slides", nargs="*", default=[], metavar="SLIDE_OR_FOLDER",
                        help="the slides, matched to feature files by name (for pixel size and registration)")
    parser.add_argument("--patches-per-region", type=int, default=16,
                        help="region side in patches, G (default 16: 4096 px regions of 256 px patches)")
    parser.add_argument("--min-coverage", type=float, default=0.25,
                        help="fraction of a region's G x G patches that must exist to keep it (0.25)")
    parser.add_argument("--encoder-name", default=None,
                        help="name of the model that made the features (e.g. uni, conch); recorded in the cache")
    parser.add_argument("--region-encoder", default="mean", choices=("mean", "hipt_vit4k"),
                        help="mean of the patches (default) or a ViT-4K whose input dim equals the features'")
    parser.add_argument("--region-checkpoint", default=None, metavar="PATH", help="ViT-4K weights")
    parser.add_argument("--device", default="auto", help="device for the region encoder (auto)")
    parser.add_argument("--token-dtype", choices=("float16", "float32"), default="float16")
    add_pixel_size_arguments(parser, "the slides")
    parser.add_argument("--overwrite", action="store_true", help="replace features made from another file")
    add_output_flags(parser, json=False)


def expand_h5(items: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.suffix.lower() in (".h5", ".hdf5") and not p.name.startswith("."))
            if not found:
                raise SlpdError(f"no .h5 files in {path}")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise SlpdError(f"{path} does not exist")
    return out


def slides_by_id(items: list[str]) -> dict[str, Path]:
    from napari_slpd.cli.extract import _registry_path
    from napari_slpd.features.slide_tasks import expand_slides
    from napari_slpd.slides.ids import slide_id_for

    return {slide_id_for(_registry_path(p)): _registry_path(p) for p in expand_slides(items)} if items else {}


def run_import(args) -> int:
    from tqdm import tqdm

    from napari_slpd.cli.extract import format_summary
    from napari_slpd.cohort import Cohort, slide_id_for
    from napari_slpd.cli.common import record_import
    from napari_slpd.features.import_h5 import import_patch_features
    from napari_slpd.slides.slide import open_slide

    cohort = Cohort(args.out)
    files = expand_h5(args.h5)
    slides = slides_by_id(args.slides)
    region_encoder = None
    rows, registered = [], 0
    for h5 in tqdm(files, desc="import", unit="slide", disable=args.quiet, file=sys.stderr):
        slide_id = slide_id_for(h5)
        row = {"slide_id": slide_id, "path": str(h5), "status": "error", "regions": 0, "computed": 0,
               "seconds": 0.0, "message": ""}
        t0 = time.perf_counter()
        try:
            slide_path = slides.get(slide_id)
            slide = open_slide(slide_path, mpp=args.mpp, mpp_fallback=args.mpp_fallback) if slide_path else None
            pixel_size = slide.pixel_size if slide is not None else None
            try:
                if args.region_encoder != "mean" and region_encoder is None:
                    from napari_slpd.features.import_h5 import read_patch_features
                    from napari_slpd.models.encoders import build_region_encoder

                    dim = read_patch_features(h5, slide).dim
                    region_encoder = build_region_encoder(args.region_encoder, args.region_checkpoint,
                                                          device=args.device, in_dim=dim)
                result = import_patch_features(
                    h5, cohort.features_path(slide_id), grid_size=args.patches_per_region,
                    min_coverage=args.min_coverage, region_encoder=region_encoder or "mean", slide=slide,
                    slide_id=slide_id, encoder_name=args.encoder_name, token_dtype=args.token_dtype,
                    overwrite=args.overwrite,
                )
            finally:
                if slide is not None:
                    slide.close()
            registered += record_import(cohort, row, result, slide_path, pixel_size,
                                        f"{result.n_patches} patches, {result.dim}-d", "no slide given (--slides)")
        except SlpdError as exc:
            row["message"] = str(exc)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
    print(format_summary(rows))
    print(f"registered {registered} slides in {cohort.registry_path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0
