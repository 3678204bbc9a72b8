"""Benchmark: regions per second of the fast tile reader against openslide read_region, same regions, same run.

Cases (each timed single-threaded and with one reading thread per core, fresh slides per round so
neither reader profits from a tile cache filled by an earlier round; medians of ``--repeats`` rounds):

* ``mosaic``: a 60,000 x 60,000 px pyramidal tiled-JPEG TIFF of real tiles (napari_slpd.samples.mosaic;
  ``--quick``: 16,384 px), random ``--region`` px regions at level 0 (own resolution);
* ``mosaic_40x_at_20x``: the same mosaic taken as a 40x scan read at 20x: regions of 2 x region px at
  level 0 wanted at region px. Fast: libjpeg's scaled IDCT (1/2) in the tile reader; openslide: full read
  then Pillow's bilinear halving (what the engine does without the fast reader);
* each real slide in ../shared/data/slides at level 0 (512-px regions).

Pixels: ``max_abs_diff`` / ``mean_abs_diff`` over every own-resolution read of both readers (0 means
identical); the 40x-at-20x difference (scaled IDCT vs full decode + resize) is reported on its own.
Prints readable lines, then ONE JSON line last. ``--device cuda`` adds nvJPEG reads (cuda_regions_per_s).

    python benchmarks/read_regions.py [--quick] [--side 60000] [--region 1024] [--n 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLIDES = Path(os.environ.get("SLPD_TEST_SLIDES", REPO.parent / "shared" / "data" / "slides"))
SOURCE = SLIDES / "cmu_small_region.svs"
OUT = REPO / "benchmarks" / "out"
REAL = ["cmu_small_region.svs", "tcga-cr-7395-01a-01-ts1.svs", "CropBreastSlide.tiff",
        "dicom-cmu-1-small-region-ybrfix", "dicom-cmu-1-small-region-napari-wsi"]


def mosaic(side: int) -> Path:
    from napari_slpd.samples.mosaic import build_mosaic

    path = OUT / f"mosaic_{side}.tiff"  # shared with benchmarks/extract.py
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        build_mosaic(path, SOURCE, width=side, height=side)
    return path


def cores() -> int:
    from napari_slpd.features.reading import available_cores

    return available_cores()


def regions(dims, size: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    W, H = dims
    return [(int(rng.integers(0, max(1, W - size))), int(rng.integers(0, max(1, H - size)))) for _ in range(n)]


def run_reads(read, boxes, threads: int) -> float:
    t0 = time.perf_counter()
    if threads <= 1:
        for box in boxes:
            read(box)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, boxes))
    return time.perf_counter() - t0


def maintained_readers():
    """Maintained readers measured beside ours when importable: {name: open(path) -> read(xy, size)}.

    tiffslide (tifffile + imagecodecs under openslide's API) is installed for the benchmark only
    (``pip install tiffslide``); cuCIM's CPU reader (``cucim.clara.CuImage``) from a cucim-cu12 wheel
    installed without its CUDA dependencies, e.g. ``pip install --no-deps --target DIR cucim-cu12`` and
    PYTHONPATH=DIR. Neither is a dependency of the package."""
    readers = {}
    try:
        import tiffslide

        def open_tiffslide(path):
            slide = tiffslide.TiffSlide(str(path))
            return (lambda xy, size: np.asarray(slide.read_region(xy, 0, (size, size), as_array=True))[..., :3],
                    slide.close)

        readers["tiffslide"] = open_tiffslide
    except ImportError:
        pass
    try:
        from cucim.clara import CuImage

        def open_cucim(path):
            image = CuImage(str(path))
            return (lambda xy, size: np.asarray(image.read_region(tuple(xy), (size, size), 0))[..., :3],
                    image.close)

        readers["cucim"] = open_cucim
    except ImportError:
        pass
    return readers


def own_resolution(path, size, boxes, threads, repeats, others=None):
    """(fast s, openslide s) medians, the pixel differences of one pass, our reader's name, and
    {maintained reader: (median s, diffs against openslide) or the error it raised} for ``others``."""
    from napari_slpd.slides.slide import open_slide

    others = others or {}
    fast_t, ref_t = [], []
    other_t = {name: [] for name in others}
    failed = {}
    for _ in range(repeats):
        for reader, store in (("auto", fast_t), ("openslide", ref_t)):
            with open_slide(path, reader=reader) as slide:
                store.append(run_reads(lambda xy, s=slide: s.read_region(xy, 0, (size, size)), boxes, threads))
        for name, opener in others.items():
            if name in failed:
                continue
            try:
                read, close = opener(path)
                try:
                    other_t[name].append(run_reads(lambda xy, r=read: r(xy, size), boxes, threads))
                finally:
                    close()
            except Exception as exc:  # a format the maintained reader does not handle
                failed[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
    with open_slide(path) as fast, open_slide(path, reader="openslide") as ref:
        name = fast.reader
        refs = [ref.read_region(xy, 0, (size, size)).astype(np.int16) for xy in boxes[:6]]
        diffs = [np.abs(fast.read_region(xy, 0, (size, size)).astype(np.int16) - r) for xy, r in zip(boxes, refs)]
    measured = {}
    for other, opener in others.items():
        if other in failed:
            measured[other] = failed[other]
            continue
        read, close = opener(path)
        try:
            d = [np.abs(read(xy, size).astype(np.int16) - r) for xy, r in zip(boxes, refs)]
        finally:
            close()
        measured[other] = (statistics.median(other_t[other]), d)
    return statistics.median(fast_t), statistics.median(ref_t), diffs, name, measured


def at_half(path, size, boxes, threads, repeats):
    """40x read at 20x: 2*size px at level 0 wanted at size px."""
    from PIL import Image

    from napari_slpd.slides.slide import open_slide

    def fast_read(slide, xy):
        out, scale = slide.read_region_reduced(xy, 0, (2 * size, 2 * size), max_scale=2)
        return out

    def ref_read(slide, xy):
        image = slide.read_region_image(xy, 0, (2 * size, 2 * size))
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))

    fast_t, ref_t = [], []
    for _ in range(repeats):
        for reader, store, fn in (("auto", fast_t, fast_read), ("openslide", ref_t, ref_read)):
            with open_slide(path, reader=reader) as slide:
                store.append(run_reads(lambda xy, s=slide, f=fn: f(s, xy), boxes, threads))
    with open_slide(path) as fast, open_slide(path, reader="openslide") as ref:
        diffs = [np.abs(fast_read(fast, xy).astype(np.int16) - ref_read(ref, xy).astype(np.int16)) for xy in boxes[:4]]
    return statistics.median(fast_t), statistics.median(ref_t), diffs


def cuda_rate(path, size, boxes, repeats) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from napari_slpd.slides.readers.gpu import cuda_reader_for
    from napari_slpd.slides.slide import open_slide

    times = []
    with open_slide(path) as slide:
        gpu = cuda_reader_for(slide)
        if gpu is None:
            return None
        gpu.read(boxes[0], 0, (size, size))
        torch.cuda.synchronize()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for xy in boxes:
                gpu.read(xy, 0, (size, size))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return len(boxes) / statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16,384-px mosaic, fewer regions (under 2 minutes)")
    parser.add_argument("--side", type=int, default=60_000)
    parser.add_argument("--region", type=int, default=1024, help="region side in px (1024)")
    parser.add_argument("--n", type=int, default=24, help="regions per round (24)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to add nvJPEG reads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not SOURCE.exists():
        print(f"source slide {SOURCE} is absent", file=sys.stderr)
        return 2
    side = 16_384 if args.quick else args.side
    n = 12 if args.quick else args.n
    repeats = 3 if args.quick else args.repeats
    ncores = cores()
    t0 = time.perf_counter()
    path = mosaic(side)
    print(f"mosaic {side} x {side} px ready in {time.perf_counter() - t0:.1f} s; {ncores} cores; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    from napari_slpd.slides.slide import open_slide

    with open_slide(path) as probe:
        dims = probe.dimensions
    boxes = regions(dims, args.region, n, args.seed)
    result = {}
    all_diffs = []
    others = maintained_readers()
    maintained = {}
    for threads, label in ((1, "1thread"), (ncores, "all_cores")):
        f, o, diffs, name, measured = own_resolution(path, args.region, boxes, threads, repeats, others)
        all_diffs += diffs
        result[f"mosaic_{label}"] = {"fast_regions_per_s": round(n / f, 2), "openslide_regions_per_s": round(n / o, 2),
                                     "ratio": round(o / f, 3)}
        line = f"mosaic {args.region}-px regions, {label}: {name} {n / f:.1f}/s, openslide {n / o:.1f}/s -> {o / f:.2f}x"
        for other, got in measured.items():
            if isinstance(got, str):
                maintained.setdefault(other, {})[f"error_{label}"] = got
                line += f"; {other}: {got}"
                continue
            t, d = got
            entry = maintained.setdefault(other, {})
            entry[f"regions_per_s_{label}"] = round(n / t, 2)
            entry[f"fast_vs_{other}_{label}"] = round(t / f, 3)  # > 1: ours is faster
            entry[f"{other}_vs_openslide_{label}"] = round(o / t, 3)
            entry["max_abs_diff_vs_openslide"] = int(max(x.max() for x in d))
            entry["mean_abs_diff_vs_openslide"] = round(float(np.mean([x.mean() for x in d])), 5)
            line += f"; {other} {n / t:.1f}/s ({t / f:.2f}x slower than ours, max diff {entry['max_abs_diff_vs_openslide']})"
        print(line, flush=True)
    half_diffs = []
    for threads, label in ((1, "1thread"), (ncores, "all_cores")):
        half_boxes = regions(dims, 2 * args.region, n, args.seed + 1)
        f, o, diffs = at_half(path, args.region, half_boxes, threads, repeats)
        half_diffs += diffs
        result[f"mosaic_40x_at_20x_{label}"] = {"fast_regions_per_s": round(n / f, 2),
                                               "openslide_regions_per_s": round(n / o, 2), "ratio": round(o / f, 3)}
        print(f"40x read at 20x ({2 * args.region} -> {args.region} px), {label}: scaled IDCT {n / f:.1f}/s, "
              f"openslide + resize {n / o:.1f}/s -> {o / f:.2f}x", flush=True)
    real = {}
    for name in REAL:
        p = SLIDES / name
        if not p.exists():
            continue
        with open_slide(p) as s:
            sboxes = regions(s.dimensions, 512, n, args.seed + 2)
        f1, o1, d, reader, _ = own_resolution(p, 512, sboxes, 1, repeats)
        fa, oa, _, _, m = own_resolution(p, 512, sboxes, ncores, repeats, others)
        all_diffs += d
        real[name] = {"reader": reader, "ratio_1thread": round(o1 / f1, 3), "ratio_all_cores": round(oa / fa, 3),
                      "fast_regions_per_s_all_cores": round(n / fa, 2), "max_abs_diff": int(max(x.max() for x in d))}
        for other, got in m.items():
            real[name][f"fast_vs_{other}_all_cores"] = got if isinstance(got, str) else round(got[0] / fa, 3)
        print(f"{name}: {reader}, 512-px regions: {o1 / f1:.2f}x single thread, {oa / fa:.2f}x all cores; "
              f"max diff {real[name]['max_abs_diff']}", flush=True)
    cuda = cuda_rate(path, args.region, boxes, repeats) if args.device.startswith("cuda") else None
    if args.device.startswith("cuda"):
        print(f"CUDA (nvJPEG) {args.region}-px regions: {cuda and round(cuda, 1)}/s", flush=True)
    max_diff = int(max(d.max() for d in all_diffs))
    mean_diff = float(np.mean([d.mean() for d in all_diffs]))
    print(json.dumps({
        "reads_vs_openslide": result["mosaic_all_cores"]["ratio"],
        "max_abs_diff": max_diff,
        "mean_abs_diff": round(mean_diff, 5),
        "cuda_regions_per_s": round(cuda, 2) if cuda else None,
        "reads_vs_openslide_1thread": result["mosaic_1thread"]["ratio"],
        "reads_40x_at_20x_vs_openslide": result["mosaic_40x_at_20x_all_cores"]["ratio"],
        "reads_40x_at_20x_vs_openslide_1thread": result["mosaic_40x_at_20x_1thread"]["ratio"],
        "scaled_max_abs_diff": int(max(d.max() for d in half_diffs)),
        "scaled_mean_abs_diff": round(float(np.mean([d.mean() for d in half_diffs])), 4),
        "tiffslide_regions_per_s": maintained.get("tiffslide", {}).get("regions_per_s_all_cores"),
        "fast_vs_tiffslide": maintained.get("tiffslide", {}).get("fast_vs_tiffslide_all_cores"),
        "cucim_regions_per_s": maintained.get("cucim", {}).get("regions_per_s_all_cores"),
        "fast_vs_cucim": maintained.get("cucim", {}).get("fast_vs_cucim_all_cores"),
        "maintained_readers": maintained,
        "fast_regions_per_s_all_cores": result["mosaic_all_cores"]["fast_regions_per_s"],
        "openslide_regions_per_s_all_cores": result["mosaic_all_cores"]["openslide_regions_per_s"],
        "real_slides": real,
        "region_px": args.region,
        "mosaic_side_px": side,
        "cores": ncores,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
