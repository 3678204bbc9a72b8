"""Benchmark: opening and viewing a 60,000 x 60,000 px pyramidal slide through napari_slpd.slides.slide.

Builds a mosaic of real tiles (napari_slpd.samples.mosaic), then measures, in the same process:

* first frame: open the slide and compute the coarsest pyramid level (what napari draws first), against
  plain openslide reading the same tiles with read_region;
* random fields of view (1024 x 1024 screen px at random levels): tiles read per field, and the time of
  our dask chunk reads against plain openslide.read_region of exactly the same tile boxes (both with a
  fresh handle per round, so neither profits from the other's tile cache).

Prints a few readable lines, then ONE JSON line last:
  first_frame_s, tiles_per_fov, overhead_vs_openslide (our time / plain openslide time, sync scheduler),
  and extras (first_frame_openslide_s, threaded_vs_openslide, peak_rss_mb, ...).

    python benchmarks/open_slide.py [--side 60000] [--fov 1024] [--n-fov 30] [--source SLIDE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from napari_slpd.samples.mosaic import build_mosaic  # noqa: E402
from napari_slpd.slides.slide import open_slide  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "slides" / "cmu_small_region.svs"


def chunk_boxes(array, y0, y1, x0, x1):
    """The (y, x, h, w) boxes of the dask chunks a slice touches: the tiles napari would have read."""
    ys = np.cumsum((0,) + array.chunks[0])
    xs = np.cumsum((0,) + array.chunks[1])
    boxes = []
    for i in range(len(ys) - 1):
        if ys[i + 1] <= y0 or ys[i] >= y1:
            continue
        for j in range(len(xs) - 1):
            if xs[j + 1] <= x0 or xs[j] >= x1:
                continue
            boxes.append((int(ys[i]), int(xs[j]), int(ys[i + 1] - ys[i]), int(xs[j + 1] - xs[j])))
    return boxes


def plain_openslide_read(path, level, boxes):
    import openslide

    handle = openslide.OpenSlide(str(path))
    ds = handle.level_downsamples[level]
    t0 = time.perf_counter()
    for y, x, h, w in boxes:
        np.asarray(handle.read_region((round(x * ds), round(y * ds)), level, (w, h)))
    elapsed = time.perf_counter() - t0
    handle.close()
    return elapsed


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM on Linux; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=60_000, help="mosaic side in px (60000)")
    parser.add_argument("--fov", type=int, default=1024, help="field of view side in screen px (1024)")
    parser.add_argument("--n-fov", type=int, default=30, help="random fields of view per round (30)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; medians are reported (3)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="real slide the tiles come from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"source slide {args.source} not found (give --source)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        info = build_mosaic(Path(tmp) / "mosaic.tif", args.source, width=args.side, height=args.side)
        build_s = time.perf_counter() - t0
        print(f"mosaic {info.width} x {info.height} px, {len(info.level_dimensions)} levels, "
              f"{info.file_bytes / 1e6:.1f} MB, built in {build_s:.2f} s")

        # -- first frame --------------------------------------------------------------------------------
        ours_first, plain_first, first_tiles = [], [], 0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            slide = open_slide(info.path)
            coarsest = slide.pyramid()[-1]
            coarsest.compute()
            ours_first.append(time.perf_counter() - t0)
            first_tiles = slide.read_calls
            reader_name = slide.reader  # the fast tile reader where it applies (napari_slpd.slides.readers)
            level = slide.level_count - 1
            boxes = chunk_boxes(coarsest, 0, coarsest.shape[0], 0, coarsest.shape[1])
            slide.close()
            import openslide

            t0 = time.perf_counter()
            handle = openslide.OpenSlide(str(info.path))
            handle.close()
            open_s = time.perf_counter() - t0
            plain_first.append(open_s + plain_openslide_read(info.path, level, boxes))
        print(f"first frame: {statistics.median(ours_first) * 1e3:.1f} ms ({first_tiles} tiles); "
              f"plain openslide {statistics.median(plain_first) * 1e3:.1f} ms")

        # -- random fields of view ----------------------------------------------------------------------
        rng = np.random.default_rng(args.seed)
        with open_slide(info.path) as probe:
            pyramid = probe.pyramid()
            levels = [lv for lv, a in enumerate(pyramid[: probe.level_count]) if min(a.shape[:2]) > 2 * args.fov]
            fovs = []
            for _ in range(args.n_fov):
                level = int(rng.choice(levels))
                h, w = pyramid[level].shape[:2]
                y, x = int(rng.integers(0, h - args.fov)), int(rng.integers(0, w - args.fov))
                fovs.append((level, y, x, chunk_boxes(pyramid[level], y, y + args.fov, x, x + args.fov)))

        ours_sync, ours_threaded, plain, tiles = [], [], [], []
        for _ in range(args.rounds):
            # plain openslide, fresh handle
            total = 0.0
            import openslide

            handle = openslide.OpenSlide(str(info.path))
            t0 = time.perf_counter()
            for level, _, _, boxes in fovs:
                ds = handle.level_downsamples[level]
                for y, x, h, w in boxes:
                    np.asarray(handle.read_region((round(x * ds), round(y * ds)), level, (w, h)))
            total = time.perf_counter() - t0
            handle.close()
            plain.append(total)
            for scheduler, store in (("sync", ours_sync), ("threads", ours_threaded)):
                slide = open_slide(info.path)
                pyramid = slide.pyramid()
                per_fov = []
                t0 = time.perf_counter()
                for level, y, x, _ in fovs:
                    before = slide.read_calls
                    pyramid[level][y : y + args.fov, x : x + args.fov].compute(scheduler=scheduler)
                    per_fov.append(slide.read_calls - before)
                store.append(time.perf_counter() - t0)
                tiles = per_fov
                slide.close()
        expected = [len(b) for *_, b in fovs]
        assert tiles == expected, "a field of view read other tiles than the ones it covers"
        overhead = statistics.median(ours_sync) / statistics.median(plain)
        threaded = statistics.median(ours_threaded) / statistics.median(plain)
        print(f"{args.n_fov} fields of view of {args.fov} px: {statistics.mean(tiles):.1f} tiles each; "
              f"ours {statistics.median(ours_sync):.3f} s (sync), {statistics.median(ours_threaded):.3f} s "
              f"(threads) vs plain openslide {statistics.median(plain):.3f} s")

    result = {
        "first_frame_s": round(statistics.median(ours_first), 4),
        "first_frame_openslide_s": round(statistics.median(plain_first), 4),
        "first_frame_tiles": first_tiles,
        "tiles_per_fov": round(float(statistics.mean(tiles)), 2),
        "tiles_per_fov_max": int(max(tiles)),
        "overhead_vs_openslide": round(overhead, 3),
        "reader": reader_name,
        "threaded_vs_openslide": round(threaded, 3),
        "fov_px": args.fov,
        "n_fov": args.n_fov,
        "mosaic_side_px": args.side,
        "mosaic_levels": len(info.level_dimensions),
        "mosaic_build_s": round(build_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
