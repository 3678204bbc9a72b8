import json
import os

import pytest

from napari_slpd.cohort import Cohort, find_slides, slide_id_for
from napari_slpd.errors import SlpdError
from napari_slpd.utils.files import atomic_path, atomic_write_json, sha256_file


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_sha256_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_registry_roundtrip_relative_paths(tmp_path):
    root = tmp_path / "cohort"
    root.mkdir()
    slide = root / "slide A.svs"
    slide.write_bytes(b"")
    cohort = Cohort(root)
    record = cohort.add_slide(slide, mpp=0.25)
    assert record.slide_id == "slide_A"
    stored = json.loads((root / "registry" / "slide_A.json").read_text())  # the slide's own record
    assert stored["path"] == "slide A.svs" and stored["mpp_source"] == "user"
    # Moving the whole cohort folder keeps slide paths valid.
    moved = tmp_path / "moved"
    os.rename(root, moved)
    assert Cohort(moved).slide("slide_A").path == moved / "slide A.svs"


def test_same_id_different_file_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "s1.svs").write_bytes(b"")
    (tmp_path / "b" / "s1.svs").write_bytes(b"")
    cohort = Cohort(tmp_path / "c")
    cohort.add_slide(tmp_path / "a" / "s1.svs")
    cohort.add_slide(tmp_path / "a" / "s1.svs")  # idempotent
    with pytest.raises(SlpdError, match="already used"):
        cohort.add_slide(tmp_path / "b" / "s1.svs")
    with pytest.raises(SlpdError, match="not in cohort"):
        cohort.slide("nope")


def test_find_slides_includes_dicom_folders(tmp_path):
    (tmp_path / "x.svs").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "f.dcm").write_bytes(b"")
    assert [p.name for p in find_slides(tmp_path)] == ["dcm", "x.svs"]
    assert slide_id_for(tmp_path / "dcm") == "dcm"


def test_cohort_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SlpdError, match="is a file"):
        Cohort(f)


def test_atomic_path_gives_default_permissions(tmp_path):
    target = tmp_path / "shared.json"
    old = os.umask(0o022)
    try:
        atomic_write_json(target, {})
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644


def test_concurrent_creation_of_one_cohort(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "new" / "cohort"
    with ThreadPoolExecutor(8) as pool:
        cohorts = list(pool.map(lambda _: Cohort(root), range(32)))
    assert all(c.root == root.resolve() for c in cohorts)
