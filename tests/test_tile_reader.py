"""The fast tile reader against openslide: the correctness contract of issue 15.

Every real slide in ../shared/data/slides and a mosaic built here are read through both readers at the
same regions: at whole-pixel positions (every level-0 read) the pixels are equal; at fractional level
positions (levels whose downsample is not an integer) openslide's cairo/pixman bilinear shift is
reproduced within 3 levels (mean < 0.5); reduced-scale decoding (libjpeg's scaled IDCT) stays within the
tolerance of a resize; ViT features of both reads agree to 1e-4 (whole pixels) / 0.05 cosine distance.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.errors import SlideError
from napari_slpd.slides.slide import open_slide

SLIDES = ("cmu_svs", "tcga_jp2k_svs", "breast_tiff", "dicom_pyramid", "dicom_single")
EXPECTED_READER = {"cmu_svs": "tiles:aperio-jpeg", "tcga_jp2k_svs": "tiles:aperio-jpeg2000",
                   "breast_tiff": "tiles:generic-tiff-jpeg", "dicom_pyramid": "tiles:dicom-jpeg",
                   "dicom_single": "tiles:dicom-jpeg"}


def _slide_path(name):
    try:
        return real_slide(name)
    except Exception as exc:  # conftest names the slides; an unknown key means the fixture changed
        pytest.skip(f"slide {name} unavailable: {exc}")


def _regions(slide, level, n, rng):
    W, H = slide.dimensions
    out = []
    for _ in range(n):
        w, h = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        x, y = int(rng.integers(0, max(1, W - 50))), int(rng.integers(0, max(1, H - 50)))
        out.append(((x, y), level, (w, h)))
    return out


@pytest.mark.parametrize("name", SLIDES)
def test_fast_reader_matches_openslide_on_every_real_slide(name):
    path = _slide_path(name)
    rng = np.random.default_rng(1)
    with open_slide(path) as fast, open_slide(path, reader="openslide") as ref:
        assert fast.reader == EXPECTED_READER[name], fast.reader_note
        assert ref.reader == "openslide"
        for level in range(fast.level_count):
            whole = abs(fast.level_downsamples[level] - round(fast.level_downsamples[level])) < 1e-9
            diffs = []
            for where, lv, size in _regions(fast, level, 4, rng):
                a = fast.read_region(where, lv, size).astype(np.int16)
                b = ref.read_region(where, lv, size).astype(np.int16)
                assert a.shape == b.shape == (size[1], size[0], 3)
                diffs.append(np.abs(a - b))
            worst = max(int(d.max()) for d in diffs)
            mean = float(np.mean([d.mean() for d in diffs]))
            if whole:  # level 0 and integer downsamples: the same decoder, the same pixels
                assert worst == 0, (name, level, worst)
            else:  # openslide's sub-pixel shift (pixman bilinear, 7-bit weights), re-done in numpy
                assert worst <= 3 and mean < 0.5, (name, level, worst, mean)


def test_pyramid_chunks_and_read_region_image_come_from_the_tile_reader():
    with open_slide(real_slide("cmu_svs")) as fast, open_slide(real_slide("cmu_svs"), reader="openslide") as ref:
        a = fast.pyramid()[0][:700, :500].compute()
        b = ref.pyramid()[0][:700, :500].compute()
        np.testing.assert_array_equal(a, b)
        image = fast.read_region_image((100, 200), 0, (300, 200))
        np.testing.assert_array_equal(np.asarray(image), ref.read_region((100, 200), 0, (300, 200)))
        assert "reader=tiles:aperio-jpeg" in repr(fast)


def test_mosaic_matches_openslide_and_reduced_scale_is_close(tmp_path):
    from napari_slpd.samples.mosaic import build_mosaic

    info = build_mosaic(tmp_path / "m.tif", real_slide("cmu_svs"), width=6000, height=5000)
    rng = np.random.default_rng(2)
    with open_slide(info.path) as fast, open_slide(info.path, reader="openslide") as ref:
        assert fast.reader == "tiles:generic-tiff-jpeg"
        for where, lv, size in _regions(fast, 0, 8, rng):
            np.testing.assert_array_equal(fast.read_region(where, lv, size), ref.read_region(where, lv, size))
        # A 40x-like read at half resolution: scaled IDCT against openslide's full decode + box halving.
        where, size = (1000, 1200), (1024, 768)
        half, scale = fast.read_region_reduced(where, 0, size, max_scale=2)
        assert scale == 2 and half.shape == (384, 512, 3)
        full = ref.read_region(where, 0, size).astype(np.float32)
        box = full.reshape(384, 2, 512, 2, 3).mean(axis=(1, 3))
        diff = np.abs(half.astype(np.float32) - box)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12, (diff.mean(), diff.max())
        _, one = ref.read_region_reduced(where, 0, size, max_scale=2)
        assert one == 1  # openslide never scales


def test_vit_features_of_both_reads_agree():
    torch = pytest.importorskip("torch")
    from napari_slpd.models.encoders import build_patch_encoder

    torch.manual_seed(0)
    patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=64)
    with open_slide(real_slide("tcga_jp2k_svs"), mpp=0.5) as fast, \
            open_slide(real_slide("tcga_jp2k_svs"), mpp=0.5, reader="openslide") as ref:
        for level, where in ((0, (1500, 1200)), (1, (1501, 1203))):
            a = fast.read_region(where, level, (256, 256)).reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4)
            b = ref.read_region(where, level, (256, 256)).reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4)
            fa = patch.encode(torch.from_numpy(np.ascontiguousarray(a.reshape(16, 64, 64, 3)))).float()
            fb = patch.encode(torch.from_numpy(np.ascontiguousarray(b.reshape(16, 64, 64, 3)))).float()
            cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1)
            if level == 0:
                assert torch.allclose(fa, fb, atol=1e-4)
            assert float(cos.min()) > 0.99, (level, float(cos.min()))


def test_engine_reads_40x_bands_at_reduced_scale(tmp_path):
    from napari_slpd.features.reading import RegionReader, grid_decode_scale, resampling_id
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.tissue import detect_tissue
    from napari_slpd.samples.mosaic import build_mosaic

    # one level only, like a 40x SVS without a 20x level
    info = build_mosaic(tmp_path / "m40.tif", real_slide("cmu_svs"), width=4096, height=4096, min_level_px=4096)
    cfg = GridConfig(region_px=512, patch_px=64, target_mpp=0.5, min_tissue=0.0)
    with open_slide(info.path, mpp=0.25) as fast, open_slide(info.path, mpp=0.25, reader="openslide") as ref:
        grid = build_region_grid(fast, detect_tissue(fast), cfg)  # 1024 px at level 0 -> 512 px
        assert grid.read_size == 1024 and grid.read_level == 0
        assert grid_decode_scale(fast, cfg, 64) == 2 and grid_decode_scale(ref, cfg, 64) == 1
        assert resampling_id(2) != resampling_id(1)
        reader = RegionReader(fast, grid, 64)
        assert reader.scale == 2
        a = reader(0).astype(np.float32)
        b = RegionReader(ref, grid, 64)(0).astype(np.float32)
        assert a.shape == b.shape == (64, 64, 64, 3)
        assert np.abs(a - b).mean() < 2.0


def _damage_first_tile(src, dst):
    import tifffile

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        offset, count = int(page.dataoffsets[5]), int(page.databytecounts[5])
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x12\x34" * (count // 2))  # no SOI/SOF: no decoder takes it
    return 5


def test_damaged_tile_names_file_and_tile_and_never_breaks_the_pool(tmp_path):
    bad = tmp_path / "bad.tiff"
    index = _damage_first_tile(real_slide("breast_tiff"), bad)
    with open_slide(bad) as slide:
        assert slide.reader.startswith("tiles:")
        tw = slide.tile_size(0)[0]
        where = ((index % 8) * tw, 0)
        with pytest.raises(SlideError) as err:
            slide.read_region(where, 0, (tw, tw))
        message = str(err.value)
        assert str(bad) in message and "tile 5,0 of level 0" in message and "damaged" in message
        # openslide's path gives the same kind of error naming the file (openslide does not name tiles).
        with open_slide(bad, reader="openslide") as ref, pytest.raises(SlideError, match="cannot read .* of .*bad.tiff"):
            ref.read_region(where, 0, (tw, tw))
        # Many threads hitting the damaged tile and good ones: errors are raised per read, the pool lives.
        barrier = threading.Barrier(4)

        def work(k):
            barrier.wait()
            out = []
            for j in range(6):
                try:
                    out.append(slide.read_region((((k + j) % 8) * tw, 0), 0, (tw, tw)).shape)
                except SlideError as exc:
                    out.append(str(exc))
            return out

        with ThreadPoolExecutor(4) as pool:
            results = [r for rs in pool.map(work, range(4)) for r in rs]
        assert any(isinstance(r, tuple) for r in results) and any(isinstance(r, str) for r in results)
        # Parallel decoding through the shared pool reports the same error.
        with pytest.raises(SlideError, match="tile 5,0 of level 0"):
            slide.read_region_reduced((0, 0), 0, (2033, 1024), parallel=True)
        assert slide.read_region((0, 512), 0, (512, 512)).shape == (512, 512, 3)


def test_forced_readers_and_fallback_reason():
    with pytest.raises(SlideError, match="reader must be one of"):
        open_slide(real_slide("cmu_svs"), reader="fast")
    with open_slide(real_slide("cmu_svs"), reader="tiles") as slide:
        assert slide.reader == "tiles:aperio-jpeg"


def test_parallel_read_equals_serial_read():
    with open_slide(real_slide("cmu_svs")) as slide:
        a, _ = slide.read_region_reduced((10, 20), 0, (2000, 2500), parallel=True)
        b, _ = slide.read_region_reduced((10, 20), 0, (2000, 2500), parallel=False)
        np.testing.assert_array_equal(a, b)


@pytest.mark.cuda
def test_cuda_reader_matches_cpu_reader():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from napari_slpd.slides.readers.gpu import cuda_reader_for

    for name in ("cmu_svs", "breast_tiff", "dicom_pyramid"):
        with open_slide(real_slide(name)) as slide:
            gpu = cuda_reader_for(slide)
            assert gpu is not None
            cpu = slide.read_region((100, 150), 0, (1000, 800)).astype(np.int16)
            got = gpu.read((100, 150), 0, (1000, 800)).cpu().numpy().astype(np.int16)
            diff = np.abs(got - cpu)
            # nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a few levels.
            assert diff.mean() < 1.5 and diff.max() <= 16, (name, diff.mean(), diff.max())


@pytest.mark.cuda
def test_cuda_engine_feeds_gpu_decoded_tiles_within_tolerance_of_cpu_path(tmp_path):
    """On CUDA the engine decodes a tile-reader slide's JPEG tiles with nvJPEG and hands the CUDA tensor
    to the ViT. Patches: within nvJPEG's IDCT/upsampling rounding of the CPU path decoding in full
    (mean |diff| < 2 levels, max <= 40). Engine, same CUDA encoders, GPU decoding on and off, on a grid
    the CPU decodes in full too (so both name the same resampling and settings key): region tokens to
    cosine > 0.99 (min) / 0.998 (mean); only the GPU run names its decoder in the run settings. On a grid
    the CPU decodes at reduced scale, the GPU run names the full-decode resampling (another key)."""
    import json

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from napari_slpd.features.engine import GPU_DECODE, ExtractionConfig, extract_slide, extraction_settings
    from napari_slpd.features.reading import RESAMPLING, GpuRegionReader, RegionReader, gpu_region_reader
    from napari_slpd.features.store import FeatureStore
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.tissue import detect_tissue

    patch = build_patch_encoder("hipt_vit256", device="cuda", input_size=32)
    region = build_region_encoder("hipt_vit4k", device="cuda", in_dim=patch.dim)
    path = _slide_path("cmu_svs")
    scaled = GridConfig(region_px=512, patch_px=64, target_mpp=1.0, min_tissue=0.25)  # CPU: 1/4 decode
    full = GridConfig(region_px=256, patch_px=32, target_mpp=0.5, min_tissue=0.25)  # CPU: full decode
    with open_slide(path) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), scaled)
        gpu = gpu_region_reader(slide, grid, 32, "cuda")
        assert isinstance(gpu, GpuRegionReader)
        cpu_full = RegionReader(slide, grid, 32, reduced_decode=False)
        for i in range(min(4, len(grid))):
            item = gpu(i)
            assert item[0] == "gpu"  # level 0: whole-pixel positions, JPEG tiles
            got = gpu.finish(item)
            assert got.is_cuda and got.dtype == torch.uint8 and tuple(got.shape) == (64, 32, 32, 3)
            diff = np.abs(got.cpu().numpy().astype(np.int16) - cpu_full(i).astype(np.int16))
            assert diff.mean() < 2.0 and diff.max() <= 40, (i, diff.mean(), diff.max())
        on = extraction_settings(slide, ExtractionConfig(grid=scaled), patch, region)
        off = extraction_settings(slide, ExtractionConfig(grid=scaled, gpu_decode=False), patch, region)
        assert on["resampling"] == RESAMPLING and off["resampling"] != RESAMPLING
    outs = {}
    for gpu_decode in (True, False):
        out = tmp_path / f"gpu_decode_{gpu_decode}.h5"
        cfg = ExtractionConfig(grid=full, batch_size=128, regions_per_chunk=4, gpu_decode=gpu_decode)
        assert extract_slide(path, out, patch, region, cfg).status == "extracted"
        outs[gpu_decode] = out
    with FeatureStore.open(outs[True]) as a, FeatureStore.open(outs[False]) as b:
        assert json.loads(a.attrs["run_settings"]).get("region_decode") == GPU_DECODE
        assert "region_decode" not in json.loads(b.attrs["run_settings"])
        assert a.settings_key == b.settings_key
        np.testing.assert_array_equal(a.region_coords, b.region_coords)
        ta, tb = a.tokens(), b.tokens()
        cos = (ta * tb).sum(1) / (np.linalg.norm(ta, axis=1) * np.linalg.norm(tb, axis=1))
        assert cos.min() > 0.99 and cos.mean() > 0.998, (cos.min(), cos.mean())


def test_gpu_region_reader_geometry_on_cpu_with_a_stand_in_decoder():
    """GpuRegionReader's bands, resize and patch order, run on the CPU: a stand-in for CudaRegionReader
    'decodes' a prepared band with the CPU tile reader (torch CPU tensors). The patches match the CPU
    path decoding in full (Pillow's bilinear) to within the resize's rounding (mean < 0.2, max <= 2), so
    bands are cut, stacked and split into row-major patches the same way; the patch batcher's device
    path takes them; a region the GPU path refuses is read on the CPU in full, never at reduced scale."""
    torch = pytest.importorskip("torch")
    from napari_slpd.features.engine import _PatchBatcher
    from napari_slpd.features.reading import GpuRegionReader, RegionReader
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.readers.gpu import GpuUnsupported, PreparedRegion
    from napari_slpd.slides.tissue import detect_tissue

    class StandIn:
        device = torch.device("cpu")

        def __init__(self, slide, refuse=False):
            self.slide, self.refuse = slide, refuse

        def prepare(self, location, level, size):
            if self.refuse:
                raise GpuUnsupported("stand-in refuses")
            return PreparedRegion(level, tuple(location), tuple(size), (0, 0, 0, 0), [], [])

        def decode(self, prepared):
            return torch.from_numpy(self.slide.read_region(prepared.origin, prepared.level, prepared.size))

    grid_cfg = GridConfig(region_px=512, patch_px=64, target_mpp=1.0, min_tissue=0.25)
    with open_slide(_slide_path("cmu_svs")) as slide:
        grid = build_region_grid(slide, detect_tissue(slide), grid_cfg)
        assert RegionReader(slide, grid, 32).scale > 1  # the engine's CPU path would decode at 1/4 here
        cpu = RegionReader(slide, grid, 32, reduced_decode=False)
        assert cpu.scale == 1
        gpu = GpuRegionReader(RegionReader(slide, grid, 32), StandIn(slide))
        batcher = _PatchBatcher(None, 96, 32, pin=False, device=torch.device("cpu"))
        batcher.flush = lambda: None  # only the buffer's filling is checked here
        for i in range(min(3, len(grid))):
            got = gpu.finish(gpu(i))
            assert tuple(got.shape) == (64, 32, 32, 3) and got.dtype == torch.uint8
            want = cpu(i)
            diff = np.abs(got.numpy().astype(np.int16) - want.astype(np.int16))
            assert diff.mean() < 0.2 and diff.max() <= 2, (i, diff.mean(), diff.max())
            batcher.fill = 0
            batcher.add(got, np.empty((64, 8), np.float32))
            np.testing.assert_array_equal(batcher._tensor[:64].numpy(), got.numpy())
        # a region the GPU path does not take is read on the CPU and handed over as it is
        fallback = GpuRegionReader(RegionReader(slide, grid, 32), StandIn(slide, refuse=True))
        item = fallback(0)
        assert item[0] == "cpu"
        np.testing.assert_array_equal(fallback.finish(item).numpy(), cpu(0))


def test_cpu_extraction_never_imports_the_gpu_module(tmp_path):
    """A CPU run (settings, reading, encoding) leaves napari_slpd.slides.readers.gpu unimported."""
    import subprocess
    import sys

    code = f"""
import sys, torch
torch.set_num_threads(1)
from napari_slpd.features.engine import ExtractionConfig, extract_slide
from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder
from napari_slpd.slides.grid import GridConfig
patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=16)
region = build_region_encoder("hipt_vit4k", device="cpu", in_dim=patch.dim)
cfg = ExtractionConfig(grid=GridConfig(region_px=512, patch_px=64, target_mpp=1.0, min_tissue=0.25),
                       num_workers=1, regions_per_chunk=2)
r = extract_slide({str(_slide_path("cmu_svs"))!r}, {str(tmp_path / "f.h5")!r}, patch, region, cfg)
assert r.status == "extracted", r
print("gpu imported:", "napari_slpd.slides.readers.gpu" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gpu imported: False" in out.stdout
