"""Fault 1: the disk fills up while a cache file is written (a real small tmpfs filled to the brim).

For each writer: a StorageError whose message names the folder and the space needed, the previous file
byte-for-byte intact, no partial/temporary file left, and the same call succeeding once space is freed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from faults.faults_support import embedding_cohort, leftovers
from napari_slpd.errors import StorageError

pytestmark = pytest.mark.faults


def _assert_full_message(exc: StorageError, folder: Path) -> None:
    text = str(exc)
    assert exc.kind == "full"
    assert str(folder) in text, text
    assert "needs" in text and "free" in text, text
    assert "--cache" in text and "run again" in text, text


@pytest.fixture
def full_cohort(small_disk):
    """A synthetic 6-slide cohort with prototypes and an index on a 6 MB tmpfs."""
    from napari_slpd.similarity.index import CohortIndex

    disk = small_disk(6 << 20)
    cohort = embedding_cohort(disk.path / "cohort")
    CohortIndex.open(cohort)
    return disk, cohort


def test_prototypes_on_a_full_disk_keep_the_old_file_and_resume(full_cohort):
    from napari_slpd.prototypes.cache import compute_cohort_prototypes, load_prototypes

    disk, cohort = full_cohort
    ids = cohort.slide_ids()
    before = {s: cohort.prototypes_path(s).read_bytes() for s in ids}
    filler = disk.fill(leave=2048)
    with pytest.raises(StorageError) as info:
        compute_cohort_prototypes(cohort, k=4, overwrite=True, device="cpu")
    _assert_full_message(info.value, cohort.root / "prototypes")
    assert {s: cohort.prototypes_path(s).read_bytes() for s in ids} == before  # previous files intact
    assert leftovers(disk.path) == []
    filler.unlink()  # space freed: the same command finishes
    report = compute_cohort_prototypes(cohort, k=4, overwrite=True, device="cpu")
    assert {r.status for r in report.results} == {"computed"}
    assert all(load_prototypes(cohort, s).k == 4 for s in ids)


def test_index_save_on_a_full_disk_keeps_the_old_index_whole(full_cohort):
    from napari_slpd.similarity.index import CohortIndex

    disk, cohort = full_cohort
    index_files = sorted(p.name for p in cohort.index_dir.iterdir())
    old = CohortIndex.load(cohort.index_dir)
    grown = CohortIndex.load(cohort.index_dir)
    grown.add("extra", np.eye(3, old.dim, dtype=np.float32))
    filler = disk.fill(leave=1024)
    with pytest.raises(StorageError) as info:
        grown.save(cohort.index_dir)
    _assert_full_message(info.value, cohort.index_dir)
    assert sorted(p.name for p in cohort.index_dir.iterdir()) == index_files  # no new generation left over
    again = CohortIndex.load(cohort.index_dir)
    assert again.slide_ids == old.slide_ids
    # Opening the index on the full disk still answers queries (saved later), and says why it was not saved.
    cohort.prototypes_path(cohort.slide_ids()[0]).touch()  # its stamp changes: open() must save
    opened = CohortIndex.open(cohort)
    assert opened.save_error and "not enough space" in opened.save_error
    assert opened.query(cohort.slide_ids()[0], n=2)
    filler.unlink()
    grown.save(cohort.index_dir)
    assert "extra" in CohortIndex.load(cohort.index_dir).slide_ids


def test_annotations_and_exports_on_a_full_disk(full_cohort):
    from napari_slpd.export.geojson import prototype_geojson, write_geojson
    from napari_slpd.export import ClassStyle
    from napari_slpd.export.tiff import write_label_map_tiff
    from napari_slpd.labeling.names import PrototypeAnnotations

    disk, cohort = full_cohort
    slide = cohort.slide_ids()[0]
    names = PrototypeAnnotations.load(cohort)
    names.rename(slide, 0, "tumour")
    saved = cohort.annotations_path.read_bytes()

    coords = np.stack(np.meshgrid(np.arange(40) * 256, np.arange(40) * 256), -1).reshape(-1, 2).astype(np.int64)
    labels = np.arange(len(coords)) % 3
    styles = {k: ClassStyle(f"class {k}", "#ff0000") for k in range(3)}
    out = disk.path / "exports"
    out.mkdir()
    geo = prototype_geojson(coords, 256.0, labels, styles, slide, (40 * 256, 40 * 256))
    write_geojson(out / "a.geojson", geo)
    previous_export = (out / "a.geojson").read_bytes()

    filler = disk.fill(leave=512)
    with pytest.raises(StorageError) as info:
        names.rename(slide, 1, "stroma")
    _assert_full_message(info.value, cohort.root)
    assert cohort.annotations_path.read_bytes() == saved
    # the name is not silently dropped either: it is still in memory and saved once there is room
    assert names.labels(slide)[1].name.startswith("stroma")

    with pytest.raises(StorageError) as info:
        write_geojson(out / "a.geojson", prototype_geojson(coords, 256.0, (labels + 1) % 3, styles, slide,
                                                            (40 * 256, 40 * 256)))
    _assert_full_message(info.value, out)
    assert (out / "a.geojson").read_bytes() == previous_export
    with pytest.raises(StorageError):
        write_label_map_tiff(out / "a.tiff", np.repeat(coords, 8, 0) * 8, 256.0, np.repeat(labels, 8), styles)
    assert not (out / "a.tiff").exists()
    assert leftovers(disk.path) == []

    filler.unlink()
    names.save()
    assert PrototypeAnnotations.load(cohort).labels(slide)[1].name.startswith("stroma")
    write_label_map_tiff(out / "a.tiff", coords, 256.0, labels, styles)


def test_training_checkpoint_on_a_full_disk(small_disk):
    import torch

    from src_training.checkpoint import load_checkpoint, save_checkpoint

    disk = small_disk(4 << 20)
    path = disk.path / "run" / "checkpoint.pth"
    state = {"format": "slpd-train-checkpoint", "format_version": 1, "step": 1, "w": torch.zeros(1000)}
    save_checkpoint(state, path)
    before = path.read_bytes()
    filler = disk.fill(leave=64 << 10)
    with pytest.raises(StorageError) as info:
        save_checkpoint({**state, "step": 2, "w": torch.randn(400_000)}, path)
    _assert_full_message(info.value, path.parent)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert leftovers(disk.path) == []
    filler.unlink()
    save_checkpoint({**state, "step": 2, "w": torch.randn(400_000)}, path)
    assert load_checkpoint(path)["step"] == 2


@pytest.mark.qt_no_exception_capture  # h5py reports its own failed closes while unwinding
def test_extraction_on_a_full_disk_stops_with_the_folder_and_resumes(small_disk, tmp_path):
    from napari_slpd.features.engine import extract_slide
    from napari_slpd.features.store import FeatureStore, partial_path_for
    from napari_slpd.samples.synthetic import write_synthetic_slide
    from napari_slpd.slides.grid import GridConfig

    from faults.faults_support import extraction_config, tiny_encoders

    slide = tmp_path / "slide.svs"
    write_synthetic_slide(slide, 3072, 2048, seed=1)
    patch, region = tiny_encoders()
    config = extraction_config(grid=GridConfig(region_px=256, patch_px=32, target_mpp=1.0, min_tissue=0.25))
    disk = small_disk(4 << 20)
    out = disk.path / "cohort" / "features" / "slide.h5"
    out.parent.mkdir(parents=True)
    filler = disk.fill(leave=1536 << 10)  # room for a few chunks (~360 KB each), not the whole slide
    with pytest.raises(StorageError) as info:
        extract_slide(slide, out, patch, region, config)
    _assert_partial = partial_path_for(out)
    text = str(info.value)
    assert info.value.kind == "full" and str(out.parent) in text and "needs" in text, text
    assert not out.exists()
    # Finished chunks are kept in the slide's verified .partial file (the resume point) and said so.
    assert _assert_partial.name in text
    filler.unlink()
    result = extract_slide(slide, out, patch, region, config)
    assert result.status == "extracted" and result.resumed_from > 0  # resumed, not restarted
    with FeatureStore.open(out) as store:
        assert store.n_regions == result.n_regions and np.isfinite(store.region_embeddings).all()
    assert leftovers(disk.path) == []


_RLIMIT_SCRIPT = textwrap.dedent("""
    import sys, json, numpy as np
    from napari_slpd.errors import StorageError
    from napari_slpd.utils.files import atomic_write_text
    target = sys.argv[1]
    try:
        atomic_write_text(target, "x" * 4_000_000)
    except StorageError as exc:
        print(json.dumps({"kind": exc.kind, "message": str(exc)}))
""")


def test_file_size_limit_is_reported_like_a_full_disk(tmp_path):
    """The variant without mounts: a subprocess under RLIMIT_FSIZE (runs everywhere)."""
    target = tmp_path / "out" / "names.json"
    target.parent.mkdir()
    target.write_text("old")

    def limit():
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = subprocess.run([sys.executable, "-c", _RLIMIT_SCRIPT, str(target)], capture_output=True, text=True,
                         preexec_fn=limit, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "full" and str(target.parent) in result["message"], result
    assert target.read_text() == "old" and leftovers(tmp_path) == []
