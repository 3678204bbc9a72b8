"""Benchmark of region feature extraction (napari_slpd.features.engine). Prints ONE JSON line last.

(a) ``pipeline_vs_sequential``: the engine against HIPT's loop (find the regions, then read one region,
    encode its patches as one batch, encode its token grid, next region; nothing overlaps; save) on the
    same slide and model, end to end, in one process: sequential seconds / engine seconds. Both use the
    same tissue detection, fast tile reader and encoders, so the ratio is what the engine's parallel
    readers, its overlap of decoding with inference, its batching and its thread policy buy.
    ``pipeline_vs_sequential_openslide``: the engine (fast reader) against the same loop reading through
    openslide, as HIPT's extraction did and this project's did before the tile reader: what the whole
    change buys. The JSON names the reader of each side. Medians of ``--repeats`` alternated runs.
    The settings are decode-heavy (2048-px regions read at level 0, ViT-256 fed 16-px patches): the
    regime of a GPU, where the model outruns a reader many times over; on CPU a full-size ViT-256 is
    compute-bound and little can be overlapped. Best of ``--repeats`` alternated runs.
    ``pipeline_vs_sequential_1thread``: the same against the loop run with one torch thread (the better
    sequential setting on a small, busy machine), to separate overlap and batching from thread policy.
    ``compute_bound_ratio``: (a) with a heavier model (48-px input), for context.
(b) ``rss_ratio_4x_area``: peak RSS while extracting a mosaic 4x larger in area over the smaller one's,
    each in a fresh subprocess, the high-water mark reset after the models are loaded (memory must be
    bounded by batch, window and chunk, not by the slide).
(c) ``cuda_regions_per_s``: with CUDA, regions/s of the full HIPT configuration (4096-px regions of
    256-px patches at 0.5 um/px, ViT-256 at 256 px in bf16, ViT-4K) on a large mosaic; null otherwise.
    Tiles decoded on the GPU (nvJPEG, no host round trip); ``cuda_regions_per_s_cpu_decode``: the same
    with the CPU reader threads decoding (ExtractionConfig.gpu_decode=False).

Mosaics are built from the real CMU-1 small region tiles (napari_slpd.samples.mosaic) under benchmarks/out/.
On a shared machine the timings move with other programs' load: the load average is printed with them.
``cpu_bound_fraction``: CPU seconds of the engine run on one slide, end to end (opening it, the file
check, tissue detection, grid, readers, model, writing: the whole process's CPU time over the call, nothing
excluded; imports and model building happen before it) / (wall seconds x cores). One slide has a serial
start (tissue detection, the first regions' reads) and a tail (the last batches, writing) that nothing can
overlap. ``cpu_bound_fraction_slides``: the same over ``SLIDES_RUN`` slides extracted in one call of
``extract_slides`` (features/extract_many: the next slide's tissue and grid are made while the current one
is encoded, its reads start as soon as the current one's have), as a cohort is extracted;
``cpu_bound_fraction_slides_no_prefetch``: the same slides one after the other (extract_slide in a loop,
as before extract_slides), in the same run: what the overlap buys.
On a shared machine other programs take part of the cores: ``cpu_bound_fraction_of_available`` divides by
what they left (wall x cores - their CPU seconds over the run, from /proc/stat), and ``effective_cores``
is the speed-up 'cores' GIL-free hashing threads get over one, measured beside the runs (2.0 on an idle
2-core machine): the raw fraction cannot exceed about effective_cores / cores.
Usage: python benchmarks/extract.py [--quick] [--skip-rss] [--skip-compute-bound] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("SLPD_TEST_SLIDES", REPO.parent / "shared" / "data" / "slides")) / "cmu_small_region.svs"
OUT = REPO / "benchmarks" / "out"


def mosaic(side: int, name: str | None = None) -> Path:
    from napari_slpd.samples.mosaic import build_mosaic

    path = OUT / (name or f"mosaic_{side}.tiff")
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        build_mosaic(path, SOURCE, width=side, height=side)
    return path


def build_models(input_px: int, device: str = "cpu"):
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    patch = build_patch_encoder("hipt_vit256", device=device, input_size=input_px)
    region = build_region_encoder("hipt_vit4k", device=device, in_dim=patch.dim)
    return patch, region


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have been busy (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def effective_cores(n: int) -> float:
    """Speed-up of ``n`` threads hashing (GIL-free, no memory traffic to speak of) over one: the cores
    this process actually gets now. Median of 3."""
    import hashlib
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    data = b"\0" * (16 << 20)
    work = lambda _: hashlib.sha256(data).digest()  # noqa: E731
    ratios = []
    for _ in range(3):
        t0 = time.perf_counter()
        for k in range(2 * n):
            work(k)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(work, range(2 * n)))
        ratios.append(one / (time.perf_counter() - t0))
    return statistics.median(ratios)


def time_sequential(path: Path, grid_cfg, patch, region, folder: Path, reader: str = "auto") -> float:
    """HIPT's way end to end: find the tissue regions, then for each region read it, encode its patches as
    one batch and its token grid, nothing overlapping; save the slide's features at the end. ``reader``:
    "auto" (the fast tile reader) or "openslide"."""
    import h5py

    from napari_slpd.features.engine import sequential_extract
    from napari_slpd.slides.grid import build_region_grid
    from napari_slpd.slides.slide import open_slide
    from napari_slpd.slides.tissue import detect_tissue

    t0 = time.perf_counter()
    with open_slide(path, reader=reader) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), grid_cfg)
        tokens, embeddings = sequential_extract(slide, grid, patch, region)
    with h5py.File(folder / f"sequential_{time.monotonic_ns()}.h5", "w") as fh:
        fh["region_tokens"] = tokens.astype("float16")
        fh["region_embeddings"] = embeddings
        fh["region_coords"] = grid.coords
    return time.perf_counter() - t0


def time_engine(path: Path, config, patch, region, folder: Path) -> tuple[float, int, float, float | None]:
    """The engine end to end on the same slide: tissue, grid, reading, encoding, writing the store.
    Returns (seconds, regions, CPU seconds of the whole process: readers + model + the rest, CPU seconds
    other processes used meanwhile or None)."""
    from napari_slpd.features.engine import extract_slide

    out = folder / f"engine_{time.monotonic_ns()}.h5"
    busy0 = busy_cpu_seconds()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = extract_slide(path, out, patch, region, config)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    busy1 = busy_cpu_seconds()
    others = max(0.0, busy1 - busy0 - cpu) if busy0 is not None and busy1 is not None else None
    return seconds, result.n_computed, cpu, others


SLIDES_RUN = 3  # slides of the multi-slide measure (the same mosaic to distinct files)


def time_engine_slides(paths, config, patch, region, folder: Path, prefetch: bool = True):
    """``extract_slides`` over ``paths`` end to end (each slide to its own new file); returns what
    :func:`time_engine` returns, over the whole run."""
    from napari_slpd.features.extract_many import SlideJob, extract_slides

    jobs = [SlideJob(p, folder / f"slides_{time.monotonic_ns()}_{i}.h5", config) for i, p in enumerate(paths)]
    busy0 = busy_cpu_seconds()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    n = 0
    for _, result, error in extract_slides(jobs, patch, region, prefetch=prefetch):
        if error is not None:
            raise error
        n += result.n_computed
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    busy1 = busy_cpu_seconds()
    others = max(0.0, busy1 - busy0 - cpu) if busy0 is not None and busy1 is not None else None
    return seconds, n, cpu, others


def _fractions(runs, cores) -> tuple[float, float | None]:
    """Median CPU-bound fraction of (seconds, n, cpu, others) runs, and of what other programs left."""
    import statistics

    raw = [cpu / (seconds * cores) for seconds, _, cpu, _ in runs]
    avail = [min(1.0, cpu / max(1e-9, seconds * cores - others)) for seconds, _, cpu, others in runs
             if others is not None]
    return round(statistics.median(raw), 3), (round(statistics.median(avail), 3) if avail else None)


def pipeline_ratio(side: int, region_px: int, patch_px: int, input_px: int, repeats: int,
                   one_thread_baseline: bool = True, openslide_baseline: bool = True,
                   slides_fraction: bool = False) -> dict:
    """Sequential loops and the engine alternated ``repeats`` times on one slide; medians of each.

    The sequential loop runs with torch's default threads, as HIPT's did, reading with the fast tile
    reader (the engine's) and, with ``openslide_baseline``, through openslide. With
    ``one_thread_baseline`` each loop also runs once with one torch thread (the best a sequential loop can
    do on a small busy machine, where OpenMP threads stall behind other work): ``ratio_vs_one_thread``
    isolates what overlapping and batching buy beyond the thread policy.
    """
    import statistics

    import torch

    from napari_slpd.features.engine import ExtractionConfig, RegionReader, cpu_lanes
    from napari_slpd.features.reading import available_cores
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.slide import open_slide
    from napari_slpd.slides.tissue import detect_tissue

    grid_cfg = GridConfig(region_px=region_px, patch_px=patch_px, target_mpp=0.5, min_tissue=0.25)
    config = ExtractionConfig(grid=grid_cfg, batch_size=256, regions_per_chunk=16)  # defaults otherwise
    patch, region = build_models(input_px)
    threads = torch.get_num_threads()
    cores = available_cores()
    path = mosaic(side)
    with open_slide(path) as slide:
        reader_name = slide.reader
        grid = build_region_grid(slide, detect_tissue(slide), grid_cfg)
        # Warm-up: first-call costs (allocator, kernels) belong to neither method.
        patch.encode(RegionReader(slide, grid, input_px)(0))
    readers = ["auto"] + (["openslide"] if openslide_baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        seq = {r: [] for r in readers}
        seq1 = {r: [] for r in readers}
        eng, fractions, of_available, probes = [], [], [], []
        multi, single = [], []  # extract_slides runs with and without prefetching the next slide
        for k in range(repeats):
            for r in readers:
                seq[r].append(time_sequential(path, grid_cfg, patch, region, Path(tmp), r))
            probes.append(effective_cores(cores))
            seconds, n, cpu, others = time_engine(path, config, patch, region, Path(tmp))
            eng.append(seconds)
            # How close the engine runs to what the cores can do: CPU seconds / (wall x cores).
            fractions.append(cpu / (seconds * cores))
            if others is not None:  # ... and to what other programs left of them
                of_available.append(min(1.0, cpu / max(1e-9, seconds * cores - others)))
            assert n == len(grid)
            if slides_fraction:
                multi.append(time_engine_slides([path] * SLIDES_RUN, config, patch, region, Path(tmp)))
                single.append(time_engine_slides([path] * SLIDES_RUN, config, patch, region, Path(tmp),
                                                 prefetch=False))
            if one_thread_baseline and k == 0:
                torch.set_num_threads(1)
                try:
                    for r in readers:
                        seq1[r].append(time_sequential(path, grid_cfg, patch, region, Path(tmp), r))
                finally:
                    torch.set_num_threads(threads)
    med = statistics.median
    m_eng = med(eng)
    m_seq = {r: med(v) for r, v in seq.items()}
    m_seq1 = {r: med(v) if v else None for r, v in seq1.items()}
    ratio = lambda a: round(a / m_eng, 3) if a else None  # noqa: E731
    slides = _fractions(multi, cores) if multi else (None, None)
    slides_seq = _fractions(single, cores) if single else (None, None)
    return {
        "cpu_bound_fraction_slides": slides[0],
        "cpu_bound_fraction_slides_of_available": slides[1],
        "cpu_bound_fraction_slides_no_prefetch": slides_seq[0],
        "cpu_bound_fraction_slides_no_prefetch_of_available": slides_seq[1],
        "slides_s": round(med([r[0] for r in multi]), 3) if multi else None,
        "slides_no_prefetch_s": round(med([r[0] for r in single]), 3) if single else None,
        "regions": len(grid),
        "reader": reader_name,
        "engine_reader": reader_name,
        "sequential_reader": reader_name,
        "engine_lanes": cpu_lanes(config.torch_threads, False, config.batch_size),
        "sequential_s": round(m_seq["auto"], 3),
        "sequential_1thread_s": round(m_seq1["auto"], 3) if m_seq1["auto"] else None,
        "sequential_openslide_s": round(m_seq["openslide"], 3) if openslide_baseline else None,
        "sequential_openslide_1thread_s": (round(m_seq1["openslide"], 3)
                                           if openslide_baseline and m_seq1["openslide"] else None),
        "engine_s": round(m_eng, 3),
        "engine_runs_s": [round(v, 3) for v in eng],
        "ratio": ratio(m_seq["auto"]),
        "ratio_vs_one_thread": ratio(m_seq1["auto"]),
        "ratio_vs_openslide": ratio(m_seq["openslide"]) if openslide_baseline else None,
        "ratio_vs_openslide_one_thread": ratio(m_seq1["openslide"]) if openslide_baseline else None,
        "cpu_bound_fraction": round(med(fractions), 3),
        "cpu_bound_fraction_of_available": round(med(of_available), 3) if of_available else None,
        "effective_cores": round(med(probes), 2),
        "settings": f"{side}x{side} px mosaic, {region_px}-px regions of {patch_px}-px patches at 0.5 um/px, "
                    f"ViT-256 at {input_px} px + ViT-4K, CPU, {os.cpu_count()} cores, torch threads {threads}",
    }


# -- (b) peak RSS in subprocesses --------------------------------------------------------------------------

_RSS_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
from napari_slpd.features.engine import ExtractionConfig, extract_slide
from napari_slpd.slides.grid import GridConfig
from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return None

path = sys.argv[1]
patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=16)
region = build_region_encoder("hipt_vit4k", device="cpu")
config = ExtractionConfig(grid=GridConfig(region_px=1024, patch_px=128, target_mpp=0.5), batch_size=256,
                          regions_per_chunk=8)
ready = vm("VmRSS")
try:  # reset the high-water mark so the peak is the extraction's, not that of importing torch
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
with tempfile.TemporaryDirectory() as tmp:
    result = extract_slide(path, Path(tmp) / "f.h5", patch, region, config)
peak = vm("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"regions": result.n_computed, "rss_ready_mb": ready, "peak_rss_mb": peak,
                  "peak_is_extraction_only": reset}))
"""


def peak_rss(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], capture_output=True, text=True,
                          cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_ratio(side: int) -> dict:
    small = peak_rss(mosaic(side))
    large = peak_rss(mosaic(2 * side))
    return {"small": small, "large": large, "ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "settings": f"{side}^2 vs {2 * side}^2 px mosaics, 1024-px regions"}


# -- (c) CUDA throughput -------------------------------------------------------------------------------------


def cuda_throughput(side: int, compile_model: bool) -> dict | None:
    """Regions/s of the full HIPT configuration on CUDA, JPEG tiles decoded on the GPU (nvJPEG, fed to
    the ViT without a host round trip) and, for comparison, on the CPU reader threads."""
    import torch

    if not torch.cuda.is_available():
        return None
    from napari_slpd.features.engine import ExtractionConfig, extract_slide
    from napari_slpd.slides.grid import GridConfig

    patch, region = build_models(256, device="cuda")
    path = mosaic(side)
    out = {"device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        for gpu_decode in (True, False):
            config = ExtractionConfig(grid=GridConfig(region_px=4096, patch_px=256, target_mpp=0.5, min_tissue=0.25),
                                      batch_size=1024, regions_per_chunk=16, compile=compile_model,
                                      gpu_decode=gpu_decode)
            # Warm-up on a small mosaic (kernel selection, compile), then the timed run on the large one.
            extract_slide(mosaic(16384), Path(tmp) / f"warm{gpu_decode}.h5", patch, region, config)
            t0 = time.perf_counter()
            result = extract_slide(path, Path(tmp) / f"timed{gpu_decode}.h5", patch, region, config)
            seconds = time.perf_counter() - t0
            key = "" if gpu_decode else "_cpu_decode"
            out.update({f"regions{key}": result.n_computed, f"seconds{key}": round(seconds, 2),
                        f"regions_per_s{key}": round(result.n_computed / seconds, 2), "workers": config.workers})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller slides, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-compute-bound", action="store_true")
    parser.add_argument("--cuda-side", type=int, default=49152, help="side of the CUDA mosaic (px)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the patch encoder on CUDA")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: (c) runs whenever CUDA is present")
    args = parser.parse_args()
    if not SOURCE.exists():
        print(f"source slide {SOURCE} is absent", file=sys.stderr)
        return 2
    repeats = 1 if args.quick else args.repeats

    a = pipeline_ratio(side=8192 if args.quick else 14336, region_px=2048, patch_px=256, input_px=16,
                       repeats=repeats, slides_fraction=True)
    print(f"(a) decode-heavy: {a['settings']}; reader {a['reader']}; {a['regions']} regions (medians of {repeats}): "
          f"sequential {a['sequential_s']} s (one torch thread: {a['sequential_1thread_s']} s), engine "
          f"{a['engine_s']} s -> {a['ratio']}x ({a['ratio_vs_one_thread']}x against the one-thread loop); "
          f"sequential through openslide {a['sequential_openslide_s']} s (one thread "
          f"{a['sequential_openslide_1thread_s']} s) -> {a['ratio_vs_openslide']}x "
          f"({a['ratio_vs_openslide_one_thread']}x); CPU-bound fraction {a['cpu_bound_fraction']} "
          f"({a['cpu_bound_fraction_of_available']} of what other programs left; effective cores "
          f"{a['effective_cores']}); {SLIDES_RUN} slides in one run: CPU-bound fraction "
          f"{a['cpu_bound_fraction_slides']} ({a['cpu_bound_fraction_slides_of_available']} of what was left) "
          f"in {a['slides_s']} s, one after the other {a['cpu_bound_fraction_slides_no_prefetch']} "
          f"({a['cpu_bound_fraction_slides_no_prefetch_of_available']}) in {a['slides_no_prefetch_s']} s; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    compute = None
    if not args.skip_compute_bound:
        compute = pipeline_ratio(side=4096, region_px=1024, patch_px=128, input_px=48, repeats=1,
                                 one_thread_baseline=False, openslide_baseline=False)
        print(f"(a') compute-bound: {compute['settings']}; {compute['regions']} regions: sequential "
              f"{compute['sequential_s']} s, engine {compute['engine_s']} s -> {compute['ratio']}x", flush=True)
    b = None
    if not args.skip_rss:
        b = rss_ratio(side=4096)
        print(f"(b) peak RSS while extracting: {b['settings']}: {b['small']['regions']} regions "
              f"{b['small']['peak_rss_mb']:.0f} MB, {b['large']['regions']} regions {b['large']['peak_rss_mb']:.0f} MB "
              f"(models loaded: {b['small']['rss_ready_mb']:.0f} MB) -> {b['ratio']}x", flush=True)
    c = cuda_throughput(args.cuda_side, args.compile)
    if c is not None:
        print(f"(c) CUDA full HIPT configuration: {c}", flush=True)
    else:
        print("(c) no CUDA device: cuda_regions_per_s is null", flush=True)
    print(json.dumps({
        "pipeline_vs_sequential": a["ratio"],
        "cpu_bound_fraction": a["cpu_bound_fraction"],
        "rss_ratio_4x_area": b["ratio"] if b else None,
        "cuda_regions_per_s": c["regions_per_s"] if c else None,
        "cuda_regions_per_s_cpu_decode": c["regions_per_s_cpu_decode"] if c else None,
        "pipeline_vs_sequential_1thread": a["ratio_vs_one_thread"],
        "pipeline_vs_sequential_openslide": a["ratio_vs_openslide"],
        "pipeline_vs_sequential_openslide_1thread": a["ratio_vs_openslide_one_thread"],
        "cpu_bound_fraction_of_available": a["cpu_bound_fraction_of_available"],
        "cpu_bound_fraction_slides": a["cpu_bound_fraction_slides"],
        "cpu_bound_fraction_slides_of_available": a["cpu_bound_fraction_slides_of_available"],
        "cpu_bound_fraction_slides_no_prefetch": a["cpu_bound_fraction_slides_no_prefetch"],
        "cpu_bound_fraction_slides_no_prefetch_of_available": a["cpu_bound_fraction_slides_no_prefetch_of_available"],
        "slides_run": SLIDES_RUN,
        "effective_cores": a["effective_cores"],
        "engine_reader": a["engine_reader"],
        "sequential_reader": a["sequential_reader"],
        "sequential_openslide_reader": "openslide",
        "engine_lanes": a["engine_lanes"],
        "seconds": {k: a[k] for k in ("engine_s", "sequential_s", "sequential_1thread_s", "sequential_openslide_s",
                                      "sequential_openslide_1thread_s", "slides_s", "slides_no_prefetch_s")},
        "compute_bound_ratio": compute["ratio"] if compute else None,
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "regions": a["regions"],
        "cpu_cores": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
