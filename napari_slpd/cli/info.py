"""``slpd info SLIDE``: what a pathologist wants to know about a slide before extracting features."""

from __future__ import annotations

import argparse
import json
import sys

from napari_slpd.cli.common import add_command, add_output_flags, add_pixel_size_arguments
from napari_slpd.errors import PixelSizeError, SlpdError


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "info", run,
        help="describe a slide: format, size, levels, pixel size, tissue, regions",
        description="Describe whole-slide images: format, size, pyramid levels, pixel size (um/px), "
        "objective, associated images, tissue fraction and how many regions the SLPD grid keeps.",
    )
    parser.add_argument("slides", nargs="+", metavar="SLIDE", help="slide file (or folder of a DICOM series)")
    add_pixel_size_arguments(parser, "the file")
    parser.add_argument("--region-px", type=int, default=4096, help="region side at target um/px (4096)")
    parser.add_argument("--patch-px", type=int, default=256, help="patch side (256)")
    parser.add_argument("--target-mpp", type=float, default=0.5, help="um/px regions are cut at (0.5 = 20x)")
    parser.add_argument("--min-tissue", type=float, default=0.25, help="tissue fraction a region needs")
    add_output_flags(parser, quiet=False, json_help="print one JSON object per slide")


def describe(path, args) -> dict:
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.slide import open_slide
    from napari_slpd.slides.tissue import detect_tissue

    config = GridConfig(region_px=args.region_px, patch_px=args.patch_px, target_mpp=args.target_mpp,
                        min_tissue=args.min_tissue)
    with open_slide(path, mpp=args.mpp, mpp_fallback=args.mpp_fallback) as slide:
        mask = detect_tissue(slide)
        info = {
            "path": str(slide.path),
            "slide_id": slide.slide_id,
            "format": slide.vendor,
            "reader": slide.reader,
            "reader_note": getattr(slide, "reader_note", ""),
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "levels": [
                {"width": w, "height": h, "downsample": round(ds, 4)}
                for (w, h), ds in zip(slide.level_dimensions, slide.level_downsamples)
            ],
            "mpp": slide.mpp,
            "mpp_source": slide.pixel_size.source,
            "mpp_stated": slide.pixel_size.raw,
            "objective_power": slide.objective_power,
            "associated_images": slide.associated_image_names,
            "tissue_fraction": round(mask.fraction, 4),
        }
        if slide.mpp is not None:
            w_mm = slide.dimensions[0] * slide.mpp / 1000
            h_mm = slide.dimensions[1] * slide.mpp / 1000
            info["size_mm"] = [round(w_mm, 3), round(h_mm, 3)]
        try:
            grid = build_region_grid(slide, mask, config)
        except PixelSizeError as exc:
            info.update(regions=None, regions_note=str(exc))
        else:
            info.update(regions=len(grid), region_size_level0=grid.region_size_level0,
                        read_level=grid.read_level, regions_note=grid.reason)
    return info


def format_info(info: dict, args) -> str:
    lines = [f"{info['path']}"]
    lines.append(f"  format          {info['format']}")
    if "reader" in info:
        note = f" ({info['reader_note']})" if info.get("reader_note") else ""
        lines.append(f"  reader          {info['reader']}{note}")
    size = f"{info['width']} x {info['height']} px"
    if "size_mm" in info:
        size += f"  ({info['size_mm'][0]:.2f} x {info['size_mm'][1]:.2f} mm)"
    lines.append(f"  size            {size}")
    levels = ", ".join(f"{lv['width']}x{lv['height']} (/{lv['downsample']:g})" for lv in info["levels"])
    lines.append(f"  levels          {len(info['levels'])}: {levels}")
    if info["mpp"] is not None:
        mpp = f"{info['mpp']:.4g} um/px ({info['mpp_source']})"
        if info["mpp_source"] != "metadata" and info["mpp_stated"] is not None:
            mpp += f"; the file states {info['mpp_stated']:g}"
    elif info["mpp_source"] == "implausible":
        mpp = (f"unknown: the file states {info['mpp_stated']:g} um/px, which is not plausible "
               "(give --mpp or --mpp-fallback)")
    else:
        mpp = "unknown: not in the file (give --mpp or --mpp-fallback)"
    lines.append(f"  pixel size      {mpp}")
    objective = f"{info['objective_power']:g}x" if info["objective_power"] else "not stated"
    lines.append(f"  objective       {objective}")
    lines.append(f"  associated      {', '.join(info['associated_images']) or 'none'}")
    lines.append(f"  tissue          {info['tissue_fraction']:.1%} of the slide")
    grid = f"{args.region_px} px at {args.target_mpp:g} um/px, >= {args.min_tissue:.0%} tissue"
    if info["regions"] is None:
        lines.append(f"  regions         unknown ({grid}): pixel size unknown")
    else:
        text = f"{info['regions']} ({grid}; {info['region_size_level0']} level-0 px, level {info['read_level']})"
        if info["regions_note"]:
            text += f"\n                  {info['regions_note']}"
        lines.append(f"  regions         {text}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    failures = []
    for path in args.slides:
        try:
            info = describe(path, args)
        except SlpdError as exc:
            if len(args.slides) == 1:
                raise
            failures.append(str(exc))
            print(f"slpd info: error: {exc}", file=sys.stderr)
            continue
        print(json.dumps(info) if args.json else format_info(info, args))
    return 2 if failures else 0
