"""Bad inputs: each gets a specific message from open_slide, the reader and `slpd info`."""

from __future__ import annotations

import re

import pytest

from conftest import real_slide
from napari_slpd.viewer import reader as _reader
from napari_slpd.cli import main
from napari_slpd.errors import NotASlideError, SlideError
from napari_slpd.slides.slide import open_slide


@pytest.fixture
def bad_inputs(tmp_path):
    source = real_slide("cmu_svs").read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(source[: len(source) // 2])
    cut_at_end = tmp_path / "cut_at_end.svs"
    cut_at_end.write_bytes(source[:-20_000])  # directory readable, last image's data missing
    text = tmp_path / "report.svs"
    text.write_text("Pathology report\nDiagnosis: benign\n")
    empty = tmp_path / "empty.svs"
    empty.touch()
    folder = tmp_path / "a_folder"
    folder.mkdir()
    return {
        "truncated": (truncated, SlideError, "truncated"),
        "cut_at_end": (cut_at_end, SlideError, "truncated or damaged"),
        "text": (text, NotASlideError, "not a whole-slide image (a text file)"),
        "empty": (empty, SlideError, "is empty (0 bytes)"),
        "directory": (folder, NotASlideError, "is a folder without .dcm files"),
        "missing": (tmp_path / "nowhere.svs", SlideError, "does not exist"),
    }


CASES = ["truncated", "cut_at_end", "text", "empty", "directory", "missing"]


@pytest.mark.parametrize("case", CASES)
def test_open_slide_message(bad_inputs, case):
    path, error, message = bad_inputs[case]
    with pytest.raises(error, match=re.escape(message)) as info:
        open_slide(path)
    assert str(path) in str(info.value)  # the message names the file
    if case in ("text", "directory"):
        assert type(info.value) is NotASlideError
    else:
        assert not isinstance(info.value, NotASlideError)


@pytest.mark.parametrize("case", CASES)
def test_reader_never_raises_into_napari_for_non_slides(bad_inputs, case):
    path, error, message = bad_inputs[case]
    reader = _reader.get_reader(str(path))  # must not raise for any input
    if case in ("text", "directory", "missing"):
        assert reader is None  # other readers may take it
    else:
        # A damaged slide: the reader is ours and reports a clear error naming the file.
        with pytest.raises(SlideError, match=re.escape(message)) as info:
            reader(str(path))
        assert path.name in str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_cli_info_exits_nonzero_with_message(bad_inputs, case, capsys):
    path, _, message = bad_inputs[case]
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slpd info: error:") and message in err and str(path) in err


def test_reader_probe_survives_unreadable_input(tmp_path):
    assert _reader.get_reader(str(tmp_path / "x" / "y.svs")) is None
    assert _reader.get_reader([]) is None
    assert _reader.get_reader(12345) is None
