"""Extraction engine and ``slpd extract`` on the real slides, with small regions and a small-input ViT-256."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, real_slide
from napari_slpd.errors import FeatureStoreError, SlideError
from napari_slpd.features.engine import (
    ExtractionConfig,
    RegionReader,
    RegionStream,
    extract_slide,
    sequential_extract,
)
from napari_slpd.features.store import FeatureStore, partial_path_for
from napari_slpd.slides.grid import GridConfig, build_region_grid
from napari_slpd.slides.slide import open_slide
from napari_slpd.slides.tissue import detect_tissue

INPUT_PX = 32  # ViT-256 at 32 px: 4 patch tokens + [CLS], cheap on CPU, same architecture
GRID = GridConfig(region_px=512, patch_px=64, target_mpp=1.0, min_tissue=0.25)  # G = 8
DATASETS = ("region_tokens", "region_embeddings", "region_coords", "region_coverage", "features", "coords")


@pytest.fixture(scope="module")
def encoders():
    import torch

    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    # One torch thread: CI machines are small and shared; OpenMP threads competing with the readers for
    # two cores stall at every barrier. Also makes the numbers repeatable run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=INPUT_PX)
    region = build_region_encoder("hipt_vit4k", device="cpu", in_dim=patch.dim)
    yield patch, region
    torch.set_num_threads(threads)


def config(**kw) -> ExtractionConfig:
    base = dict(grid=GRID, batch_size=96, regions_per_chunk=2, num_workers=2, torch_threads=1)
    base.update(kw)
    return ExtractionConfig(**base)


def datasets(path: Path) -> dict:
    with h5py.File(path, "r") as fh:
        data = {name: fh[name][()] for name in DATASETS if name in fh}
        data["_resume/ends"] = fh["_resume/ends"][()]
        data["attrs"] = {k: fh.attrs[k] for k in fh.attrs}
    return data


def test_extract_real_slide_matches_reference_and_tissue(tmp_path, encoders):
    patch, region = encoders
    path = real_slide("cmu_svs")
    out = tmp_path / "features" / "cmu.h5"
    calls = []
    result = extract_slide(path, out, patch, region, config(), progress=lambda d, t: calls.append((d, t)))
    assert result.status == "extracted" and result.n_regions == result.n_computed >= 3
    assert calls[-1] == (result.n_regions, result.n_regions)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # monotone progress
    assert not partial_path_for(out).exists()

    with open_slide(path) as slide:
        mask = detect_tissue(slide)
        grid = build_region_grid(slide, mask, GRID)
        ref_tokens, ref_emb = sequential_extract(slide, grid, patch, region)
        W, H = slide.dimensions
    M, G = len(grid), GRID.patches_per_side
    with FeatureStore.open(out, expect_token_dim=384, expect_embed_dim=192) as store:
        assert store.region_tokens.shape == (M, 384, G, G)
        assert store.region_embeddings.shape == (M, 192)
        assert store.features.shape == (M * G * G, 384)
        # coords: the grid's, inside the slide, on tissue
        np.testing.assert_array_equal(store.region_coords, grid.coords)
        size0 = store.region_size_level0
        assert size0 == grid.region_size_level0
        assert (store.region_coords >= 0).all()
        assert (store.region_coords[:, 0] + size0 <= W).all() and (store.region_coords[:, 1] + size0 <= H).all()
        cover = mask.coverage_many(store.region_coords, size0)
        assert (cover >= GRID.min_tissue).all()
        np.testing.assert_allclose(store.region_coverage, cover, rtol=1e-5)
        np.testing.assert_array_equal(store.coords, grid.patch_coords())
        # the cache equals an independent HIPT-style computation (float16 storage of tokens)
        np.testing.assert_allclose(store.tokens(), ref_tokens, atol=5e-3 * np.abs(ref_tokens).max())
        np.testing.assert_allclose(store.region_embeddings, ref_emb, atol=1e-4, rtol=1e-4)
        # patch features are the token grids in CLAM order (region-major, row-major inside)
        feats = store.features[()].reshape(M, G, G, 384).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(feats, ref_tokens, atol=1e-4)
        assert store.attrs["patch_encoder"] == patch.model_id and store.attrs["mpp_source"] == "metadata"
        assert store.coords_attrs["patch_level"] == 0
        assert store.coords_attrs["patch_size"] == round(grid.patch_size_level0)


def test_second_run_computes_nothing_and_settings_never_mix(tmp_path, encoders):
    patch, region = encoders
    path = real_slide("cmu_svs")
    out = tmp_path / "cmu.h5"
    extract_slide(path, out, patch, region, config())
    mtime = out.stat().st_mtime_ns

    class Exploding:
        def __getattr__(self, name):
            return getattr(patch, name)

        def encode(self, batch):
            raise AssertionError("a skipped slide must not be encoded")

    again = extract_slide(path, out, Exploding(), region, config(num_workers=0))
    assert again.status == "skipped" and again.n_computed == 0
    assert out.stat().st_mtime_ns == mtime

    other = config(grid=GridConfig(region_px=512, patch_px=128, target_mpp=1.0))
    with pytest.raises(FeatureStoreError, match="other settings"):
        extract_slide(path, out, patch, region, other)
    replaced = extract_slide(path, out, patch, region, config(grid=other.grid, overwrite=True))
    assert replaced.status == "extracted"
    with FeatureStore.open(out) as store:
        assert store.grid_size == 4


KILL_SCRIPT = r"""
import sys
from napari_slpd.features.engine import ExtractionConfig, extract_slide
from napari_slpd.slides.grid import GridConfig
from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder
patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=int(sys.argv[3]))
region = build_region_encoder("hipt_vit4k", device="cpu")
cfg = ExtractionConfig(grid=GridConfig(region_px=512, patch_px=64, target_mpp=0.5), batch_size=96,
                       regions_per_chunk=1, num_workers=1, torch_threads=1)
def progress(done, total):
    print(f"done {done} {total}", flush=True)
extract_slide(sys.argv[1], sys.argv[2], patch, region, cfg, progress=progress)
print("finished", flush=True)
"""


def test_killed_run_resumes_to_identical_file(tmp_path, encoders):
    patch, region = encoders
    path = real_slide("cmu_svs")
    grid = GridConfig(region_px=512, patch_px=64, target_mpp=0.5)
    full = tmp_path / "full.h5"
    # The uninterrupted run: other worker count and chunking of reads, same batches within chunks.
    extract_slide(path, full, patch, region, config(grid=grid, regions_per_chunk=1, num_workers=3))

    killed = tmp_path / "killed.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path), str(killed), str(INPUT_PX)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    total = None
    try:
        for line in proc.stdout:
            if line.startswith("done"):
                done, total = map(int, line.split()[1:])
                if done >= 2:  # two chunks (of one region) are recorded
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and total is not None and total > 3
    assert partial_path_for(killed).exists() and not killed.exists()

    resumed = extract_slide(path, killed, patch, region, config(grid=grid, regions_per_chunk=1, num_workers=1))
    assert resumed.status == "extracted" and resumed.resumed_from >= 2
    assert resumed.n_computed == total - resumed.resumed_from
    a, b = datasets(full), datasets(killed)
    assert a.keys() == b.keys()
    attrs_a, attrs_b = a.pop("attrs"), b.pop("attrs")
    assert attrs_a.keys() == attrs_b.keys()
    for key in attrs_a:
        np.testing.assert_array_equal(attrs_a[key], attrs_b[key], err_msg=key)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # bit for bit


def test_cancel_keeps_finished_chunks_and_resumes(tmp_path, encoders):
    patch, region = encoders
    path = real_slide("cmu_svs")
    out = tmp_path / "c.h5"
    stop = threading.Event()

    def progress(done, total):
        if done >= 2:
            stop.set()

    first = extract_slide(path, out, patch, region, config(), progress=progress, cancel=stop)
    assert first.status == "cancelled" and "resume" in first.message
    assert partial_path_for(out).exists() and not out.exists()
    with pytest.raises(FeatureStoreError, match="did not finish"):
        FeatureStore.open(out)
    second = extract_slide(path, out, patch, region, config(), cancel=lambda: False)
    assert second.status == "extracted" and second.resumed_from >= 2
    assert second.n_computed == second.n_regions - second.resumed_from
    FeatureStore.open(out).close()


def test_region_stream_order_and_bounded_window():
    """Output order is the region order whatever the worker timing; reads never run ahead of the window."""
    lock = threading.Lock()
    state = {"outstanding": 0, "max": 0}
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(40)]

    def read(i):
        with lock:
            state["outstanding"] += 1
            state["max"] = max(state["max"], state["outstanding"])
        time.sleep(delays[i])
        return np.full(3, i)

    stream = RegionStream(read, range(40), num_workers=4, queue_size=5)
    got = []
    for i, value in stream:
        assert value[0] == i
        got.append(i)
        with lock:
            state["outstanding"] -= 1  # consumed: leaves the window
    stream.close()
    assert got == list(range(40))
    assert state["max"] <= 5

    def failing(i):
        if i == 3:
            raise SlideError("tile 3 is damaged")
        return i

    with pytest.raises(SlideError, match="damaged"):
        list(RegionStream(failing, range(10), num_workers=2, queue_size=3))


def test_reader_image_path_matches_array_path_and_stream_reports_reads_finished():
    class ArraysOnly:  # a slide without read_region_image: the reader resizes from arrays
        def __init__(self, slide):
            self.read_region = slide.read_region

    # openslide: the fast tile reader would decode these 2x-shrunk bands at reduced scale (test_tile_reader)
    with open_slide(real_slide("cmu_svs"), reader="openslide") as slide:
        grid = build_region_grid(slide, detect_tissue(slide), GRID)
        for index in (0, len(grid) - 1):
            fast = RegionReader(slide, grid, 64)(index)
            np.testing.assert_array_equal(fast, RegionReader(ArraysOnly(slide), grid, 64)(index))
        # A region hanging over the slide's edge is composited onto white the same way on both paths.
        W, H = slide.dimensions
        edge = slide.read_region((W - 100, H - 60), 0, (300, 200))
        assert edge.flags.writeable and edge.shape == (200, 300, 3)
        assert np.array_equal(np.asarray(slide.read_region_image((W - 100, H - 60), 0, (300, 200))), edge)
        assert (edge[100:, 150:] == 255).all()

    release = threading.Event()
    stream = RegionStream(lambda i: release.wait(5) and i, range(3), num_workers=2, queue_size=2)
    assert not stream.reads_finished()  # one index still pending, two reads running
    release.set()
    assert [i for i, _ in stream] == [0, 1, 2]
    assert stream.reads_finished()
    stream.close()
    assert RegionStream(lambda i: i, range(2), num_workers=0, queue_size=1).reads_finished()


def test_batches_bound_memory_and_reader_cuts_patches_row_major(encoders):
    patch, region = encoders
    sizes = []

    class Recording:
        dim, input_size = patch.dim, patch.input_size

        def encode(self, batch):
            sizes.append(len(batch))
            return patch.encode(batch)

    path = real_slide("cmu_svs")
    with open_slide(path) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), GRID)
        reader = RegionReader(slide, grid, 64)
        patches = reader(0)
        G = GRID.patches_per_side
        x0, y0 = grid.coords[0]
        whole = slide.read_region((int(x0), int(y0)), grid.read_level, (grid.read_size, grid.read_size))
    from PIL import Image

    resized = np.asarray(Image.fromarray(whole).resize((G * 64, G * 64), Image.Resampling.BILINEAR, reducing_gap=3.0))
    # patch (r, c) = rows r*64.., cols c*64.. of the resized region (band edges may differ by rounding)
    for r, c in [(0, 0), (0, G - 1), (G - 1, 0), (3, 5)]:
        diff = np.abs(patches[r * G + c].astype(int) - resized[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64])
        assert np.median(diff) <= 2

    from napari_slpd.features.engine import _PatchBatcher

    batcher = _PatchBatcher(Recording(), batch_size=50, patch_px=64, pin=False)
    out = np.empty((3 * G * G, patch.dim), np.float32)
    for k in range(3):
        batcher.add(patches, out[k * G * G : (k + 1) * G * G])
    batcher.flush()
    assert max(sizes) <= 50 and sum(sizes) == 3 * G * G
    np.testing.assert_allclose(out[: G * G], out[G * G : 2 * G * G], atol=1e-5)


def test_empty_and_bad_slides(tmp_path, encoders):
    patch, region = encoders
    too_big = config(grid=GridConfig(region_px=4096, patch_px=256, target_mpp=0.5))
    result = extract_slide(real_slide("cmu_svs"), tmp_path / "e.h5", patch, region, too_big)
    assert result.status == "empty" and "smaller than one region" in result.message
    assert not (tmp_path / "e.h5").exists() and not partial_path_for(tmp_path / "e.h5").exists()
    with pytest.raises(SlideError, match="does not exist"):
        extract_slide(tmp_path / "nope.svs", tmp_path / "n.h5", patch, region, config())
    from napari_slpd.errors import PixelSizeError

    with pytest.raises(PixelSizeError, match="--mpp"):
        extract_slide(real_slide("tcga_jp2k_svs"), tmp_path / "t.h5", patch, region, config())


def test_cli_extract_summary_registry_skip_and_per_slide_messages(tmp_path, slides_dir, capsys):
    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort

    cohort = tmp_path / "cohort"
    slides = [str(real_slide("cmu_svs")), str(real_slide("tcga_jp2k_svs")), str(real_slide("breast_tiff")),
              str(slides_dir / "dicom-cmu-1-small-region-napari-wsi")]
    args = [*slides, "--out", str(cohort), "--region-px", "512", "--patch-px", "128", "--target-mpp", "2.0",
            "--input-size", str(INPUT_PX), "--device", "cpu", "--workers", "1", "--threads", "1", "--quiet"]
    code = main(["extract", *args])
    text = capsys.readouterr().out
    assert code == 1  # two slides state no usable pixel size: error rows, not a crash
    assert "tcga-cr-7395-01a-01-ts1" in text and "not in the file" in text and "--mpp" in text
    assert "implausible 264.583" in text
    assert "4 slides: 2 error, 2 extracted" in text
    ids = Cohort(cohort).slide_ids()
    assert ids == ["cmu_small_region", "dicom-cmu-1-small-region-napari-wsi"]
    for slide_id in ids:
        FeatureStore.open(Cohort(cohort).features_path(slide_id)).close()

    code = main(["extract", *args, "--mpp-fallback", "level0"])
    text = capsys.readouterr().out
    assert code == 0 and "2 skipped" in text and "1 extracted" in text and "1 empty" in text
    breast = next(line for line in text.splitlines() if line.startswith("CropBreastSlide"))
    assert "empty" in breast and "smaller than one region" in breast  # a clear per-slide message
    entry = json.loads((cohort / "registry" / "tcga-cr-7395-01a-01-ts1.json").read_text())
    assert entry["mpp"] == 0.5 and entry["mpp_source"] == "level0-assumed"
    assert "CropBreastSlide" not in Cohort(cohort).slide_ids()  # no features: not registered


@pytest.mark.cuda
def test_cuda_extraction_matches_cpu_and_never_mixes_precisions(tmp_path, encoders):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    cpu_patch, cpu_region = encoders
    patch = build_patch_encoder("hipt_vit256", device="cuda", input_size=INPUT_PX)
    region = build_region_encoder("hipt_vit4k", device="cuda", in_dim=patch.dim)
    path = real_slide("cmu_svs")
    cpu_out, gpu_out = tmp_path / "cpu.h5", tmp_path / "gpu.h5"
    extract_slide(path, cpu_out, cpu_patch, cpu_region, config())
    stop = threading.Event()
    partial = extract_slide(path, gpu_out, cpu_patch, cpu_region, config(),
                            progress=lambda d, t: d >= 2 and stop.set(), cancel=stop)
    assert partial.status == "cancelled"
    # a CPU (float32) partial file is not continued in bf16: the GPU run starts the slide over
    # gpu_decode=False: this test isolates precision (GPU decoding: tests/test_tile_reader.py)
    result = extract_slide(path, gpu_out, patch, region, config(compile=True, batch_size=128, gpu_decode=False))
    assert result.status == "extracted" and result.resumed_from == 0
    with FeatureStore.open(cpu_out) as a, FeatureStore.open(gpu_out) as b:
        assert json.loads(b.attrs["run_settings"])["precision"] == "bfloat16"
        assert a.settings_key == b.settings_key  # same meaning, other precision
        np.testing.assert_array_equal(a.region_coords, b.region_coords)
        ta, tb = a.tokens(), b.tokens()
        cos = (ta * tb).sum(1) / (np.linalg.norm(ta, axis=1) * np.linalg.norm(tb, axis=1))
        assert cos.min() > 0.98  # bf16 autocast vs float32


def test_cpu_lanes_encode_concurrent_batches_in_order(tmp_path, encoders):
    """torch_threads="auto" on CPU: concurrent patch-encoder batches on one intra-op thread each (lanes).
    Every patch's features land in its own row, the same as one synchronous lane's to float rounding."""
    from napari_slpd.features.engine import _PatchBatcher, cpu_lanes

    patch, _ = encoders
    assert cpu_lanes("auto", on_cuda=True, batch_size=256) == 1 and cpu_lanes(1, False, 256) == 1
    assert 1 <= cpu_lanes("auto", False, 256) <= 8
    rng = np.random.default_rng(0)
    regions = [rng.integers(0, 255, (n, INPUT_PX, INPUT_PX, 3), dtype=np.uint8) for n in (40, 7, 64, 33)]
    outs = {}
    for lanes in (1, 3):
        batcher = _PatchBatcher(patch, 50, INPUT_PX, pin=False, lanes=lanes)
        assert batcher.batch_size == (50 if lanes == 1 else 17)
        got = [np.full((len(r), patch.dim), np.nan, np.float32) for r in regions]
        for r, out in zip(regions, got):
            batcher.add(r, out)
        batcher.drain()
        assert batcher.regions_encoded == len(regions)
        batcher.close()
        outs[lanes] = got
    for a, b in zip(outs[1], outs[3]):
        assert np.isfinite(b).all()
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # the engine end to end with lanes: the same features as one fixed thread, to float rounding
    path = real_slide("cmu_svs")
    extract_slide(path, tmp_path / "lanes.h5", patch, encoders[1], config(torch_threads="auto"))
    extract_slide(path, tmp_path / "one.h5", patch, encoders[1], config(torch_threads=1))
    with FeatureStore.open(tmp_path / "lanes.h5") as a, FeatureStore.open(tmp_path / "one.h5") as b:
        np.testing.assert_allclose(a.tokens(), b.tokens(), atol=2e-3)


def test_fast_tissue_filters_equal_scipy():
    """Tissue detection's median, closing and opening (shifted views) and saturation (uint8 max/min) give
    scipy's and the float formula's results exactly: the masks, hence the grids, do not change."""
    from scipy import ndimage

    from napari_slpd.slides import tissue as T

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 5), (2, 2), (7, 3), (50, 61), (300, 257)]:
        a = rng.random(shape, dtype=np.float32)
        a[a < 0.3] = 0
        np.testing.assert_array_equal(T._median3(a), ndimage.median_filter(a, size=3))
    for r in (1, 2, 3):
        structure = T._disk(r)
        for shape in [(1, 1), (3, 4), (10, 10), (120, 97)]:
            m = rng.random(shape) < 0.6
            np.testing.assert_array_equal(T._closing(m, structure),
                                          ndimage.binary_closing(m, structure=structure, border_value=0))
            np.testing.assert_array_equal(T._opening(m, structure), ndimage.binary_opening(m, structure=structure))
    img = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    f = img.astype(np.float32) / 255.0
    cmax, cmin = f.max(-1), f.min(-1)
    sat, value = T.saturation_value(img)
    np.testing.assert_array_equal(sat, np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0).astype(np.float32))
    np.testing.assert_array_equal(value, cmax)


class _Gate:
    """A patch encoder that holds each batch of ``size`` patches starting once an event ``after`` was traced
    until an event ``until`` is traced (or 60 s pass: then ``timed_out``, and nothing more is held). A
    pipeline that drains - waits for that batch before going on - cannot reach ``until`` while it is held:
    the order decides, not timing. (The batches held are a chunk's last, partial ones: no other batch has
    their size.)"""

    def __init__(self, encoder, size, after, until):
        self.encoder, self.size, self.after, self.until = encoder, size, after, until
        self.timed_out = False
        self.held = 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, batch):
        from napari_slpd.features import engine

        trace = engine._TRACE
        if not self.timed_out and len(batch) == self.size and any(self.after(e) for e in list(trace)):
            if not any(self.until(e) for e in list(trace)):
                self.held += 1
            for _ in range(600):
                if any(self.until(e) for e in list(trace)):
                    break
                time.sleep(0.1)
            else:
                self.timed_out = True
        return self.encoder.encode(batch)


def test_pipeline_never_drains_between_chunks_or_slides(tmp_path, encoders, monkeypatch):
    """The next chunk's regions are fed while the last batch of the chunk before is still being encoded;
    the next slide's grid is built and its reads started while the last batch of the slide before is still
    being encoded; the features are those of extract_slide one slide at a time, bit for bit."""
    from napari_slpd.features import engine
    from napari_slpd.features.extract_many import SlideJob, extract_slides

    patch, region = encoders
    monkeypatch.setattr(engine, "cpu_lanes", lambda *a: 2)  # two lanes even on a one-core machine
    cfg = config(torch_threads="auto", num_workers=2)  # 2 regions of 64 patches a chunk, batches of 48
    G2 = GRID.patches_per_side ** 2
    assert (cfg.regions_per_chunk, G2, cfg.batch_size // 2) == (2, 64, 48)  # partial batches: 32 or 16
    path = real_slide("cmu_svs")
    with open_slide(path) as slide:
        M = len(build_region_grid(slide, detect_tissue(slide), GRID))
    assert M > 2
    sid = "cmu_small_region"
    # within a slide: chunk 0's last batch (32 patches) is held until chunk 1's first region is queued
    monkeypatch.setattr(engine, "_TRACE", [])
    gate = _Gate(patch, 32, lambda e: e == ("region-queued", sid, 1), lambda e: e == ("region-queued", sid, 2))
    extract_slide(path, tmp_path / "one.h5", gate, region, cfg)
    assert not gate.timed_out, "the engine waited for a chunk's batches before feeding the next"

    # across slides: slide a's last batch is held until slide b's grid is built and its reads started
    trace = []
    monkeypatch.setattr(engine, "_TRACE", trace)
    last = (M * G2 - 1) % 128 % 48 + 1  # patches in the last batch of the slide
    gate = _Gate(patch, last, lambda e: e == ("region-queued", sid, M - 1), lambda e: e[0] == "next-reads-started")
    jobs = [SlideJob(path, tmp_path / "a.h5", cfg), SlideJob(path, tmp_path / "b.h5", cfg)]
    results = list(extract_slides(jobs, gate, region))
    assert not gate.timed_out, "the next slide waited for the last batch of the slide before"
    assert [(r.status, e) for _, r, e in results] == [("extracted", None), ("extracted", None)]
    names = [e[0] for e in trace]
    written = [i for i, n in enumerate(names) if n == "chunk-written"]
    a_last_written = written[(M + 1) // 2 - 1]
    assert names.count("next-reads-started") == 1 and names.index("next-reads-started") < a_last_written
    assert [i for i, n in enumerate(names) if n == "grid-built"][1] < a_last_written
    one, a, b = datasets(tmp_path / "one.h5"), datasets(tmp_path / "a.h5"), datasets(tmp_path / "b.h5")
    for name in DATASETS:
        np.testing.assert_array_equal(one[name], a[name], err_msg=name)
        np.testing.assert_array_equal(one[name], b[name], err_msg=name)


def test_extract_slides_isolates_a_bad_slide_and_stops_when_cancelled(tmp_path, encoders):
    from napari_slpd.features.extract_many import SlideJob, extract_slides

    patch, region = encoders
    cmu = real_slide("cmu_svs")
    jobs = [SlideJob(tmp_path / "missing.svs", tmp_path / "m.h5", config()),
            SlideJob(cmu, tmp_path / "a.h5", config()),
            SlideJob(real_slide("tcga_jp2k_svs"), tmp_path / "t.h5", config()),  # no pixel size
            SlideJob(cmu, tmp_path / "a.h5", config())]  # the same file again: skipped once written
    got = [(job.out_path.name, r.status if r else type(e).__name__) for job, r, e in extract_slides(jobs, patch, region)]
    assert got == [("m.h5", "SlideError"), ("a.h5", "extracted"), ("t.h5", "PixelSizeError"), ("a.h5", "skipped")]

    stop = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        if done >= 2:
            stop.set()

    jobs = [SlideJob(cmu, tmp_path / "c1.h5", config(), progress), SlideJob(cmu, tmp_path / "c2.h5", config())]
    out = list(extract_slides(jobs, patch, region, cancel=stop))
    assert [r.status for _, r, _ in out] == ["cancelled"]
    assert partial_path_for(tmp_path / "c1.h5").exists() and not (tmp_path / "c2.h5").exists()
    assert not partial_path_for(tmp_path / "c2.h5").exists()


def test_extract_slides_read_error_mid_slide_and_early_stop(tmp_path, encoders, monkeypatch):
    """A read that fails in the middle of one slide ends that slide with its error while the next slide
    (prepared and reading beside it) is extracted as extract_slide extracts it; a caller that stops
    iterating leaves no reader, lane or preparing thread behind."""
    from napari_slpd.errors import SlideError
    from napari_slpd.features import engine
    from napari_slpd.features.extract_many import SlideJob, extract_slides

    patch, region = encoders
    cmu = real_slide("cmu_svs")
    cfg = config(num_workers=2)
    extract_slide(cmu, tmp_path / "ref.h5", patch, region, cfg)
    read = engine.RegionReader.__call__
    bad = tmp_path / "bad.h5"
    bad_slides = set()  # ids of the Slide objects opened for bad.h5

    def failing(self, index):
        if index == 3 and id(self.slide) in bad_slides:
            raise SlideError(f"cannot read region {index} of {self.slide.path}: damaged tile")
        return read(self, index)

    import napari_slpd.features.extract_many as many

    real_prepare = many.prepare_slide

    def prepare(slide, out, *a, **kw):
        prepared = real_prepare(slide, out, *a, **kw)
        if Path(out) == bad:
            bad_slides.add(id(prepared.slide))
        return prepared

    monkeypatch.setattr(engine.RegionReader, "__call__", failing)
    monkeypatch.setattr(many, "prepare_slide", prepare)
    trace = []
    monkeypatch.setattr(engine, "_TRACE", trace)
    jobs = [SlideJob(cmu, bad, cfg), SlideJob(cmu, tmp_path / "good.h5", cfg)]
    before = threading.active_count()
    got = list(extract_slides(jobs, patch, region))
    assert isinstance(got[0][2], SlideError) and "damaged tile" in str(got[0][2])
    assert got[1][1].status == "extracted" and got[1][2] is None
    assert partial_path_for(bad).exists() or not bad.exists()
    ref, good = datasets(tmp_path / "ref.h5"), datasets(tmp_path / "good.h5")
    for name in DATASETS:
        np.testing.assert_array_equal(ref[name], good[name], err_msg=name)

    monkeypatch.setattr(many, "prepare_slide", real_prepare)
    jobs = [SlideJob(cmu, tmp_path / f"s{i}.h5", cfg) for i in range(3)]
    run = extract_slides(jobs, patch, region)
    job, result, error = next(run)
    assert result.status == "extracted" and error is None
    run.close()  # the second slide was prepared (and maybe reading): it is closed, its threads end
    for _ in range(50):
        if threading.active_count() <= before:
            break
        time.sleep(0.1)
    assert threading.active_count() <= before, [t.name for t in threading.enumerate()]
    assert not (tmp_path / "s1.h5").exists() and not partial_path_for(tmp_path / "s1.h5").exists()
