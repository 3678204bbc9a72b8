"""napari sample-data commands (File > Open Sample): a synthetic slide painted on first use, and the real
test slides of ../shared/data/slides when they are there."""

from __future__ import annotations

from pathlib import Path

from napari_slpd.errors import SlpdError
from napari_slpd.samples.synthetic import real_slides_dir, synthetic_slide_path


def _real_slide(relative: str) -> Path:
    folder = real_slides_dir()
    path = folder / relative
    if not folder.is_dir():
        raise SlpdError(
            f"the real sample slides folder {folder} does not exist; this sample needs the shared test data "
            "(set SLPD_SLIDES_DIR to its location) - the synthetic sample needs no data"
        )
    if not path.exists():
        raise SlpdError(f"sample slide {path} is missing from {folder}")
    return path


def _layers_for(path: Path) -> list:
    from napari_slpd.viewer.reader import read_slide_layers

    return read_slide_layers(path)


def synthetic_slide_sample() -> list:
    """napari sample: a synthetic H&E pyramid (written once to the temp folder)."""
    return _layers_for(synthetic_slide_path(0))


def cmu_small_region_sample() -> list:
    return _layers_for(_real_slide("cmu_small_region.svs"))


def tcga_jpeg2000_sample() -> list:
    return _layers_for(_real_slide("tcga-cr-7395-01a-01-ts1.svs"))


def breast_tiff_sample() -> list:
    return _layers_for(_real_slide("CropBreastSlide.tiff"))
