"""`slpd info`: the summary a pathologist reads, and JSON for scripts."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import real_slide
from napari_slpd.cli import main


def test_info_on_svs(capsys):
    path = real_slide("cmu_svs")
    assert main(["info", str(path), "--region-px", "512", "--patch-px", "64"]) == 0
    out = capsys.readouterr().out
    assert "format          aperio" in out
    assert "2220 x 2967 px  (1.11 x 1.48 mm)" in out
    assert "levels          1: 2220x2967 (/1)" in out
    assert "0.499 um/px (metadata)" in out
    assert "objective       20x" in out
    assert "label, macro, thumbnail" in out
    assert "tissue          " in out and "% of the slide" in out
    assert "regions         1" in out  # 10-14 regions of 512 px


def test_info_default_regions_on_small_slide_explains_zero(capsys):
    assert main(["info", str(real_slide("cmu_svs"))]) == 0
    out = capsys.readouterr().out
    assert "regions         0" in out and "smaller than one region" in out


def test_info_unknown_and_bogus_pixel_size(capsys):
    assert main(["info", str(real_slide("tcga_jp2k_svs"))]) == 0
    out = capsys.readouterr().out
    assert "unknown: not in the file (give --mpp or --mpp-fallback)" in out
    assert "objective       not stated" in out and "regions         unknown" in out

    assert main(["info", str(real_slide("breast_tiff"))]) == 0
    out = capsys.readouterr().out
    assert "the file states 264.583 um/px, which is not plausible" in out

    assert main(["info", str(real_slide("breast_tiff")), "--mpp-fallback", "level0", "--region-px", "512"]) == 0
    out = capsys.readouterr().out
    assert "0.5 um/px (level0-assumed); the file states 264.583" in out


def test_info_json_and_several_slides(capsys):
    paths = [str(real_slide("dicom_pyramid").parent), str(real_slide("tcga_jp2k_svs"))]
    assert main(["info", *paths, "--json", "--mpp", "0.25", "--region-px", "1024"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    infos = [json.loads(line) for line in lines]
    assert [i["format"] for i in infos] == ["dicom", "aperio"]
    assert infos[0]["mpp_source"] == "user" and infos[0]["mpp"] == 0.25
    assert len(infos[0]["levels"]) == 12
    assert infos[1]["regions"] >= 1 and infos[1]["region_size_level0"] == 2048


def test_info_several_slides_one_bad(tmp_path, capsys):
    bad = tmp_path / "bad.svs"
    bad.write_text("x")
    assert main(["info", str(real_slide("cmu_svs")), str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["format"] == "aperio"
    assert "bad.svs is not a whole-slide image" in captured.err


def test_console_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_slpd", "info", str(tmp_path / "missing.svs")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "slpd info: error: slide" in result.stderr and "does not exist" in result.stderr
