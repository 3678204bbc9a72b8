"""A 60,000 x 60,000 px pyramidal mosaic of real tiles: opening and viewing it stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import real_slide
from napari_slpd.slides.slide import open_slide

SIDE = 60_000


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    from napari_slpd.samples.mosaic import build_mosaic

    source = real_slide("cmu_svs")
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.tif"
    return build_mosaic(path, source, width=SIDE, height=SIDE, tile=256)


def test_mosaic_is_a_real_pyramid(mosaic):
    assert (mosaic.width, mosaic.height) == (SIDE, SIDE)
    assert len(mosaic.level_dimensions) >= 6
    assert mosaic.file_bytes < 20_000_000  # repeated tiles are stored once
    assert mosaic.distinct_tiles < 200 < mosaic.total_tiles
    with open_slide(mosaic.path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.dimensions == (SIDE, SIDE)
        assert slide.level_count == len(mosaic.level_dimensions)
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        assert slide.tile_size(0) == (256, 256)
        # Pixels are the source's pixels, repeated with the crop's period (JPEG re-encoding tolerance).
        with open_slide(real_slide("cmu_svs")) as source:
            want = source.read_region(mosaic.crop_origin, 0, (512, 512)).astype(np.int16)
        for k in (0, 7):
            x, y = k * mosaic.period, 3 * mosaic.period
            got = slide.read_region((x, y), 0, (512, 512)).astype(np.int16)
            assert np.abs(got - want).mean() < 4


def test_open_and_coarsest_level_bounded_tiles_and_memory(mosaic):
    script = textwrap.dedent(
        f"""
        import json, resource, time

        def peak_rss_mb():
            # VmHWM is this process's own peak; ru_maxrss would carry the parent's peak over fork/exec.
            try:
                with open("/proc/self/status") as fh:
                    for line in fh:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024
            except OSError:
                pass
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        t0 = time.perf_counter()
        from napari_slpd.slides.slide import open_slide
        slide = open_slide({str(mosaic.path)!r})
        pyramid = slide.pyramid()
        coarsest = pyramid[-1].compute()
        elapsed = time.perf_counter() - t0
        print(json.dumps({{
            "reads": slide.read_calls,
            "chunks": int(pyramid[-1].npartitions),
            "shape": list(coarsest.shape),
            "mean": float(coarsest.mean()),
            "levels": len(pyramid),
            "seconds": elapsed,
            "peak_rss_mb": peak_rss_mb(),
        }}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["levels"] == len(mosaic.level_dimensions)  # real levels, no virtual ones needed
    assert max(stats["shape"][:2]) <= 1024
    assert stats["reads"] == stats["chunks"] <= 16  # one read per tile of the coarsest level
    assert 100 < stats["mean"] < 250  # tissue and glass, not black or blank
    assert stats["peak_rss_mb"] < 500, stats


def test_random_fields_of_view_touch_only_their_tiles(mosaic):
    rng = np.random.default_rng(0)
    with open_slide(mosaic.path) as slide:
        pyramid = slide.pyramid()
        for level in (0, 2):
            h, w = pyramid[level].shape[:2]
            for _ in range(3):
                y, x = int(rng.integers(0, h - 1024)), int(rng.integers(0, w - 1024))
                slide.reset_read_calls()
                fov = pyramid[level][y : y + 1024, x : x + 1024].compute()
                tiles = (((y + 1023) // 256) - y // 256 + 1) * (((x + 1023) // 256) - x // 256 + 1)
                assert slide.read_calls == tiles <= 25
                assert fov.shape == (1024, 1024, 3)


def test_tissue_and_grid_on_the_mosaic(mosaic):
    from napari_slpd.slides.grid import GridConfig, build_region_grid
    from napari_slpd.slides.tissue import detect_tissue

    with open_slide(mosaic.path) as slide:
        mask = detect_tissue(slide)
        assert max(mask.mask.shape) <= 2048
        assert 0.2 < mask.fraction < 0.8
        assert slide.read_calls < 100  # read from a low-resolution level, in blocks
        grid = build_region_grid(slide, mask, GridConfig())  # SPEC defaults: 4096 px at 0.5 um/px
        assert grid.region_size_level0 == round(4096 * 0.5 / slide.mpp)
        assert 20 < len(grid) <= (SIDE // grid.region_size_level0) ** 2
        assert grid.read_level == 0 and grid.patches_per_side == 16
