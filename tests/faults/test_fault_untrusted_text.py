"""Fault 7 (core): slide ids made from untrusted file names never leave the cohort folder; ids from an
edited cohort.json that could are refused with a message."""

from __future__ import annotations

import json

import pytest

from napari_slpd.errors import SlpdError

pytestmark = pytest.mark.faults

NAMES = ["../../etc/passwd.svs", "..svs", "...svs", ".hidden.svs", "a" * 400 + ".svs", "b" * 400 + ".svs",
         "Gewebe_Ü_ß_日本.svs", "<img src=x onerror=alert(1)>.svs", "<b>bold</b> & \"q\" 'x'.svs",
         "with space\tand\nnewline.svs", "con.svs", "-rf.svs"]


def test_slide_ids_from_file_names_stay_inside_the_cohort(tmp_path):
    from napari_slpd.cohort import Cohort
    from napari_slpd.slides.ids import safe_slide_id, slide_id_for

    cohort = Cohort(tmp_path / "cohort")
    ids = [slide_id_for(tmp_path / "slides" / name) for name in NAMES]
    assert len(set(ids)) == len(ids)  # two long names never share an id
    for name, sid in zip(NAMES, ids):
        assert safe_slide_id(sid) == sid and len(sid) <= 120, (name, sid)
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in sid) and not sid.startswith(".")
        for path in (cohort.features_path(sid), cohort.prototypes_path(sid), cohort.thumbnail_path(sid),
                     cohort.proalign_path(sid)):
            assert path.resolve().parent.parent == cohort.root
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")  # a name the file system takes (<= 255 bytes, no separator)
            with open(path.parent / f".{path.name}.abcdefgh.partial.npz", "wb"):
                pass  # and so does the temporary name atomic_path gives it


def test_ids_from_an_edited_cohort_file_are_refused(tmp_path):
    from napari_slpd.cohort import Cohort

    cohort = Cohort(tmp_path / "cohort")
    registry = {"slides": {"../../outside": {"path": "x.svs"}, "a/b": {"path": "y.svs"}, "ok": {"path": "z.svs"}}}
    cohort.registry_path.write_text(json.dumps(registry))
    assert "ok" in cohort.slide_ids()
    for bad in ("../../outside", "a/b", "..", ""):
        with pytest.raises(SlpdError, match="cannot name a file"):
            cohort.features_path(bad)
    assert not (tmp_path / "outside.h5").exists()
