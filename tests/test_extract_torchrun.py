"""``slpd extract`` across processes: torchrun ranks, a rank killed mid-slide, job-array shards, and
``slpd register`` / ``slpd status``. Every way gives the files and registry of one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import REPO_ROOT, real_slide

SETTINGS = ["--region-px", "512", "--patch-px", "128", "--target-mpp", "1.0", "--input-size", "32",
            "--device", "cpu", "--workers", "1", "--mpp-fallback", "level0", "--quiet",
            "--threads", "1"]  # a fixed thread count: CPU kernels then give the same bits in every process
SLIDES = ("cmu_svs", "tcga_jp2k_svs", "breast_tiff", "dicom_pyramid")


def slide_args() -> list[str]:
    return [str(real_slide(name)) for name in SLIDES]


def read_all(path) -> dict:
    with h5py.File(path, "r") as fh:
        data = {name: fh[name][()] for name in fh if isinstance(fh[name], h5py.Dataset)}
        data["attrs"] = {k: fh.attrs[k] for k in fh.attrs if k not in ("slide_path",)}
    return data


def assert_same_cohort(one, two) -> None:
    from napari_slpd.cohort import Cohort

    a = [(r.slide_id, str(r.path), r.mpp, r.mpp_source) for r in Cohort(one).slides()]
    b = [(r.slide_id, str(r.path), r.mpp, r.mpp_source) for r in Cohort(two).slides()]
    assert a == b and len(a) == len(SLIDES)
    names = sorted(p.name for p in (one / "features").glob("*.h5"))
    assert names == sorted(p.name for p in (two / "features").glob("*.h5")) and len(names) == len(SLIDES)
    for name in names:
        x, y = read_all(one / "features" / name), read_all(two / "features" / name)
        assert x.keys() == y.keys()
        for key in x:
            if key == "attrs":
                assert x[key].keys() == y[key].keys()
                for attr in x[key]:
                    np.testing.assert_array_equal(x[key][attr], y[key][attr], err_msg=f"{name} attr {attr}")
            else:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name} {key}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The cohort one process makes (the reference of every test here)."""
    from napari_slpd.cli import main

    out = tmp_path_factory.mktemp("single") / "cohort"
    assert main(["extract", *slide_args(), "--out", str(out), *SETTINGS]) == 0
    return out


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **extra}


def test_two_torchrun_nodes_equal_single_process(tmp_path, single):
    """Two torchrun agents (two "nodes", c10d rendezvous) on this host, one output folder."""
    pytest.importorskip("torch.distributed.run")
    multi = tmp_path / "multi"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
           "-m", "napari_slpd", "extract", *slide_args(), "--out", str(multi), *SETTINGS]
    t0 = time.perf_counter()
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                              cwd=tmp_path) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    print(f"2 nodes: {time.perf_counter() - t0:.1f} s")
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    summary = [out for out, _ in outputs if "4 slides:" in out]
    assert len(summary) == 1 and "4 slides: 4 extracted" in summary[0]  # rank 0 prints the whole cohort's
    assert not (multi / ".extract-ranks").exists() and not list(multi.glob(".slpd-run-*"))
    assert_same_cohort(single, multi)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lock_holders(features) -> set[int]:
    pids = set()
    for lock in features.glob(".*.lock"):
        try:
            pids.add(json.loads(lock.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
    return pids


def test_rank_killed_mid_slide_survivor_names_it_and_rerun_finishes(tmp_path, single):
    """Two ranks (RANK/WORLD_SIZE/MASTER_*: rank 0 serves the store); rank 1 is SIGKILLed while it writes
    a slide. Rank 0 finishes the other slides, registers them, names rank 1 and its slides within the
    peer timeout and exits non-zero; a rerun finishes the cohort bit for bit as one process."""
    from napari_slpd.cli import main
    from napari_slpd.cohort import Cohort

    out = tmp_path / "cohort"
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), SLPD_PEER_TIMEOUT_S="4")
        procs.append(subprocess.Popen([sys.executable, "-m", "napari_slpd", "extract", *slide_args(), "--out",
                                       str(out), *SETTINGS], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    victim = procs[1]
    deadline = time.time() + 180
    while victim.pid not in _lock_holders(out / "features"):  # rank 1 is writing a slide
        assert victim.poll() is None and time.time() < deadline, "rank 1 ended before it was seen writing"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    stdout, stderr = procs[0].communicate(timeout=180)
    detected = time.perf_counter() - killed
    victim.wait()
    print(f"survivor stopped {detected:.1f} s after the kill")
    assert procs[0].returncode == 3, stderr[-3000:]
    assert "rank 1 (" in stderr and "stopped answering for 4 s" in stderr, stderr[-3000:]
    done = {p.stem for p in (out / "features").glob("*.h5")}
    assert done and len(done) < len(SLIDES)
    assert set(Cohort(out).slide_ids()) == done  # every finished slide registered, by whichever rank
    missing = stderr.split("unfinished: ")[1].split(".")[0]
    assert all(slide_id not in done for slide_id in missing.split(", "))

    assert main(["extract", *slide_args(), "--out", str(out), *SETTINGS]) == 0  # the rerun resumes
    assert_same_cohort(single, out)


def test_shards_union_equals_single_run_register_and_status(tmp_path, single, capsys):
    from napari_slpd.cli import main

    out = tmp_path / "cohort"
    listing = tmp_path / "slides.csv"
    listing.write_text("wsi,mpp\n" + "".join(f"{p},\n" for p in slide_args()))
    for shard in ("0/2", "1/2"):  # two array tasks, one after the other here
        assert main(["extract", "--slides-from", str(listing), "--shard", shard, "--out", str(out), *SETTINGS]) == 0
    capsys.readouterr()
    assert_same_cohort(single, out)

    # the same features registered afresh, without models: the same registry
    copy = tmp_path / "copy"
    (copy / "features").mkdir(parents=True)
    for h5 in (out / "features").glob("*.h5"):
        (copy / "features" / h5.name).write_bytes(h5.read_bytes())
    (copy / "features" / "extra.h5.partial").write_bytes(b"")  # a stopped run's file
    assert main(["register", str(copy), *slide_args()]) == 0
    assert "registered 4 of 4 slides" in capsys.readouterr().out
    from napari_slpd.cohort import Cohort

    assert [(r.slide_id, r.mpp, r.mpp_source) for r in Cohort(copy).slides()] == \
        [(r.slide_id, r.mpp, r.mpp_source) for r in Cohort(single).slides()]
    assert main(["status", str(copy), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"done": 4, "partial": 1}
    assert {r["slide_id"]: r["registered"] for r in report["slides"]}["extra"] is False


@pytest.mark.slow
def test_lost_node_elastic_restart_finishes_alone(tmp_path, single):
    """``--nnodes 1:2 --max-restarts 1``: node 1 (agent and worker) is SIGKILLed while writing a slide;
    node 0's worker names it and exits, torchrun restarts it without node 1, and it finishes the cohort
    as one process would have."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "cohort"
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
           "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "elastic", "-m", "napari_slpd", "extract", *slide_args(), "--out", str(out), *SETTINGS]
    env = _env(SLPD_PEER_TIMEOUT_S="5")
    node0 = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    time.sleep(1)
    node1 = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.time() + 240
    while True:  # node 1's worker holds a slide's lock: freeze the node, check, kill it
        assert node1.poll() is None and time.time() < deadline, "node 1 ended before it was seen writing"
        group = [node1.pid, *(c.pid for c in psutil.Process(node1.pid).children(recursive=True))]
        if _lock_holders(out / "features") & set(group):
            for pid in group:
                os.kill(pid, signal.SIGSTOP)
            if _lock_holders(out / "features") & set(group):
                break
            for pid in group:
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    for pid in group:
        os.kill(pid, signal.SIGKILL)
    _, err = node0.communicate(timeout=400)
    node1.wait()
    assert node0.returncode == 0, err[-4000:]
    assert "rank 1 (" in err and "stopped answering" in err  # the first attempt named the lost node
    assert_same_cohort(single, out)
