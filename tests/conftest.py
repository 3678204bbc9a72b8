"""Shared fixtures: the real slides in ../shared/data/slides and a folder for test artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_slpd.viewer.gl_compat import preload_triton

# Before any test draws a napari canvas under Xvfb (see napari_slpd.viewer.gl_compat): GUI tests that build
# timm/open_clip models after a viewer has drawn would otherwise crash the test process.
preload_triton()

REPO_ROOT = Path(__file__).resolve().parents[1]
SLIDES_DIR = Path(os.environ.get("SLPD_TEST_SLIDES", REPO_ROOT.parent / "shared" / "data" / "slides"))
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"

# name -> path of the file openslide is given, for each real slide described in MANIFEST.md
REAL_SLIDES = {
    "cmu_svs": SLIDES_DIR / "cmu_small_region.svs",
    "tcga_jp2k_svs": SLIDES_DIR / "tcga-cr-7395-01a-01-ts1.svs",
    "breast_tiff": SLIDES_DIR / "CropBreastSlide.tiff",
    "dicom_pyramid": SLIDES_DIR / "dicom-cmu-1-small-region-ybrfix" / "level-0-frames-0-30.dcm",
    "dicom_single": SLIDES_DIR / "dicom-cmu-1-small-region-napari-wsi",
}


def real_slide(name: str) -> Path:
    path = REAL_SLIDES[name]
    if not path.exists():
        pytest.skip(f"real test slide {path} is absent (expected ../shared/data/slides beside the repo)")
    if path.is_dir():
        dcm = sorted(path.glob("*.dcm"))
        if not dcm:
            pytest.skip(f"no .dcm file in {path}")
        return dcm[0]
    return path


@pytest.fixture(params=sorted(REAL_SLIDES))
def any_real_slide(request) -> Path:
    return real_slide(request.param)


@pytest.fixture
def slides_dir() -> Path:
    if not SLIDES_DIR.exists():
        pytest.skip(f"real test slides folder {SLIDES_DIR} is absent")
    return SLIDES_DIR


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave screenshots and reports for a person to look at (git-ignored)."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR
