"""Helpers of the fault tests: small cohorts and encoders, leftover files."""

from __future__ import annotations

from pathlib import Path

INPUT_PX = 32  # ViT-256 at 32 px: 4 patch tokens + [CLS], cheap on CPU, same architecture


def leftovers(folder: Path) -> list[str]:
    """Temporary/partial files anywhere under ``folder`` (there must be none after a failed write)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if ".partial" in p.name and p.is_file())


def embedding_cohort(root: Path, n_slides: int = 6, k: int = 3, prototypes: bool = True, **spec):
    from napari_slpd.samples.embedding_cohort import SyntheticCohortSpec, write_embedding_cohort

    spec = SyntheticCohortSpec(n_slides=n_slides, k=k, regions=spec.pop("regions", (12, 20)), **spec)
    cohort, _ = write_embedding_cohort(root, spec, prototypes=prototypes)
    return cohort



_ENCODERS = {}


def tiny_encoders():
    """(patch, region) encoders small enough for CPU tests (built once per process)."""
    if "pair" not in _ENCODERS:
        import torch

        from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

        torch.set_num_threads(1)
        patch = build_patch_encoder("hipt_vit256", device="cpu", input_size=INPUT_PX)
        region = build_region_encoder("mean", device="cpu", in_dim=patch.dim)
        _ENCODERS["pair"] = (patch, region)
    return _ENCODERS["pair"]


def extraction_config(**kw):
    from napari_slpd.features.engine import ExtractionConfig
    from napari_slpd.slides.grid import GridConfig

    base = dict(grid=GridConfig(region_px=512, patch_px=64, target_mpp=1.0, min_tissue=0.25), batch_size=96,
                regions_per_chunk=2, num_workers=1, torch_threads=1)
    base.update(kw)
    return ExtractionConfig(**base)
