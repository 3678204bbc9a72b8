"""Shared by tests/test_widgets_*.py: tiny settings and a processed cohort of real slides, made once.

The cohort holds the real CMU-1 small region as SVS and as a DICOM pyramid (the same tissue through two
readers: each must be the other's nearest slide), the real breast TIFF (its bogus pixel size replaced by a
user value) and one synthetic slide. Features use a random-init ViT-256 seeing 16 px (one token) on 64-px patches of
256-px regions at 1 um/px (about a dozen regions per real slide), so extraction takes seconds on a CPU.
The folder lives in pytest's base temp folder, so a second test module reuses the cache.
"""

from __future__ import annotations

from pathlib import Path

from conftest import REAL_SLIDES, SLIDES_DIR

K = 3


def tiny_settings(**feature_overrides):
    from napari_slpd.session import FeatureSettings, PrototypeSettings, SessionSettings

    features = dict(region_px=256, patch_px=64, patch_input_px=16, target_mpp=1.0, batch_size=256,
                    num_workers=1, device="cpu")
    features.update(feature_overrides)
    return SessionSettings(features=FeatureSettings(**features), prototypes=PrototypeSettings(k=K), top_k=5)


def real_slide_paths() -> dict[str, Path]:
    """name -> path of the real slides the cohort uses (those present)."""
    wanted = {
        "cmu_small_region": REAL_SLIDES["cmu_svs"],
        "dicom-cmu-1-small-region-ybrfix": REAL_SLIDES["dicom_pyramid"].parent,
        "CropBreastSlide": REAL_SLIDES["breast_tiff"],
    }
    return {name: path for name, path in wanted.items() if path.exists()}


def build_processed_cohort(root: Path):
    """The cohort described above, with features and prototypes (cached in ``root``)."""
    import pytest

    from napari_slpd.samples.synthetic import write_synthetic_slide
    from napari_slpd.session import Session

    if not SLIDES_DIR.exists():
        pytest.skip(f"real test slides folder {SLIDES_DIR} is absent")
    real = real_slide_paths()
    if "cmu_small_region" not in real or "dicom-cmu-1-small-region-ybrfix" not in real:
        pytest.skip("the CMU-1 small region SVS and DICOM test slides are needed")
    root.mkdir(parents=True, exist_ok=True)
    synthetic = root / "synthetic-7.svs"
    if not synthetic.exists():
        write_synthetic_slide(synthetic, width=2048, height=1536, seed=7)
    session = Session.open(root, slides=[*real.values(), synthetic], settings=tiny_settings())
    if "CropBreastSlide" in real:
        session.set_slide_mpp("CropBreastSlide", 0.5)  # the file states a bogus 264.58 um/px
    results = session.extract()
    failed = [f"{r.slide_id}: {r.status} {r.message}" for r in results if r.status not in ("extracted", "skipped")]
    assert not failed, failed
    outcome = session.ensure_prototypes()
    assert all(v == "ok" for v in outcome.values()), outcome
    return session
