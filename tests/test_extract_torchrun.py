"""``slpd extract`` under torchrun: 2 CPU processes give the same files and registry as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, real_slide

SETTINGS = ["--region-px", "512", "--patch-px", "128", "--target-mpp", "1.0", "--input-size", "32",
            "--device", "cpu", "--workers", "1", "--mpp-fallback", "level0", "--quiet",
            "--threads", "1"]  # a fixed thread count: CPU kernels then give the same bits in every process


def slide_args() -> list[str]:
    return [str(real_slide(name)) for name in ("cmu_svs", "tcga_jp2k_svs", "breast_tiff", "dicom_pyramid")]


def read_all(path) -> dict:
    with h5py.File(path, "r") as fh:
        data = {name: fh[name][()] for name in fh if isinstance(fh[name], h5py.Dataset)}
        data["attrs"] = {k: fh.attrs[k] for k in fh.attrs if k not in ("slide_path",)}
    return data


def test_torchrun_two_ranks_equal_single_process(tmp_path, capsys):
    pytest.importorskip("torch.distributed.run")
    from napari_slpd.cli import main

    slides = slide_args()
    single = tmp_path / "single"
    assert main(["extract", *slides, "--out", str(single), *SETTINGS]) == 0
    capsys.readouterr()

    multi = tmp_path / "multi"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "napari_slpd", "extract", *slides, "--out", str(multi), *SETTINGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # rank 0 prints the whole cohort's summary, after waiting for rank 1's slides
    assert "4 slides: 4 extracted" in proc.stdout, proc.stdout
    assert not (multi / ".extract-ranks").exists()

    one = json.loads((single / "cohort.json").read_text())
    two = json.loads((multi / "cohort.json").read_text())
    assert one == two and len(one["slides"]) == 4
    names = sorted(p.name for p in (single / "features").iterdir())
    assert names == sorted(p.name for p in (multi / "features").iterdir()) and len(names) == 4
    for name in names:
        a, b = read_all(single / "features" / name), read_all(multi / "features" / name)
        assert a.keys() == b.keys()
        for key in a:
            if key == "attrs":
                assert a[key].keys() == b[key].keys()
                for attr in a[key]:
                    np.testing.assert_array_equal(a[key][attr], b[key][attr], err_msg=f"{name} attr {attr}")
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")


def test_rank_share_and_stale_reports(tmp_path, monkeypatch):
    import threading
    import time

    from napari_slpd.errors import SlpdError

    from napari_slpd.cli.extract import RankInfo, _wait_for_ranks, _write_rank_report

    items = list(range(7))
    shares = [RankInfo(rank=r, world=3).share(items) for r in range(3)]
    assert sorted(sum(shares, [])) == items and shares[1] == [1, 4]
    rank0 = RankInfo(rank=0, world=2)
    stale = RankInfo(rank=1, world=2, started=rank0.started - 3600)
    _write_rank_report(tmp_path, stale, [{"slide_id": "old"}])
    fresh = RankInfo(rank=1, world=2, started=time.time())
    timer = threading.Timer(0.3, _write_rank_report, args=(tmp_path, fresh, [{"slide_id": "new"}]))
    timer.start()
    rows = _wait_for_ranks(tmp_path, rank0, poll_s=0.05)  # ignores the stale report, waits for the new one
    timer.join()
    assert rows == [{"slide_id": "new"}]
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SlpdError, match="RANK 3 does not fit WORLD_SIZE 2"):
        RankInfo.from_env()
