"""Slide lists, shards and the store coordinator's rules (no models: fast)."""

from __future__ import annotations

import pytest

from napari_slpd.errors import SlpdError
from napari_slpd.features.slide_tasks import (
    SlideTask,
    collect_tasks,
    parse_shard,
    read_slide_list,
    shard_tasks,
)


def test_slide_list_lines_and_csv(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.tif").write_bytes(b"x" * 30)
    lines = tmp_path / "list.txt"
    lines.write_text("# my slides\na.svs\n\n" + str(tmp_path / "sub" / "b.tif") + "\n")
    assert read_slide_list(lines) == [(tmp_path / "a.svs", None), (tmp_path / "sub" / "b.tif", None)]
    trident = tmp_path / "list.csv"
    trident.write_text("wsi,mpp,label\na.svs,0.25,x\nsub/b.tif,,y\n")
    assert read_slide_list(trident) == [(tmp_path / "a.svs", 0.25), (tmp_path / "sub" / "b.tif", None)]
    tasks = collect_tasks([str(tmp_path / "a.svs")], str(trident))
    assert [(t.slide_id, t.mpp, t.size) for t in tasks] == [("a", 0.25, 10), ("b", None, 30)]

    bad = tmp_path / "bad.csv"
    bad.write_text("slide_name,mpp\na.svs,0.25\n")
    with pytest.raises(SlpdError, match="names no path column"):
        read_slide_list(bad)
    bad.write_text("path,mpp\na.svs,fast\n")
    with pytest.raises(SlpdError, match="line 2: mpp 'fast' is not a number"):
        read_slide_list(bad)
    bad.write_text("path\nnope.svs\n")
    with pytest.raises(SlpdError, match="1 slide.s. of .* do not exist: .*nope.svs"):
        collect_tasks([], str(bad))
    with pytest.raises(SlpdError, match="no slides given"):
        collect_tasks([], None)


def test_shards_partition_and_balance():
    tasks = [SlideTask(f"/s/{i}.svs", size=size) for i, size in enumerate([90, 10, 50, 50, 40, 30, 20, 5, 5])]
    parts = [shard_tasks(tasks, i, 3) for i in range(3)]
    ids = sorted(t.slide_id for part in parts for t in part)
    assert ids == sorted(t.slide_id for t in tasks)  # each slide in exactly one shard
    loads = [sum(t.size for t in part) for part in parts]
    assert max(loads) - min(loads) <= 10, loads
    # the same parts whatever order the list gives
    assert [t.slide_id for t in shard_tasks(tasks[::-1], 1, 3)] == [t.slide_id for t in parts[1]]
    assert [t.size for t in parts[0]] == sorted((t.size for t in parts[0]), reverse=True)  # largest first


def test_parse_shard():
    assert parse_shard(None) is None
    assert parse_shard("2/4") == (2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("slurm", env) == (2, 4)
    with pytest.raises(SlpdError, match="shard 4 does not exist among 4"):
        parse_shard("4/4")
    with pytest.raises(SlpdError, match="write I/N"):
        parse_shard("two")
    with pytest.raises(SlpdError, match="SLURM_ARRAY_TASK_ID is not set"):
        parse_shard("slurm", {})
    with pytest.raises(SlpdError, match="step of 2"):
        parse_shard("slurm", {**env, "SLURM_ARRAY_TASK_STEP": "2"})


def test_store_coordinator_claims_and_names_a_silent_rank(tmp_path):
    """Two coordinators on one in-process store: dynamic claims cover every slide once; a rank that
    stops beating with a claimed slide is named within the peer timeout."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from napari_slpd.features.distributed import PeersLost, RankInfo, StoreCoordinator, Timeouts

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=5))
    timeouts = Timeouts(peer_s=1.0, join_s=5.0, poll_s=0.05)
    made = {}

    def start(rank):
        made[rank] = StoreCoordinator(RankInfo(rank, 2, rank), timeouts, store=store)

    threads = [threading.Thread(target=start, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    zero, one = made[0], made[1]
    errors = {}

    def check(coordinator, folder):
        try:
            coordinator.check_shared(folder, wait_s=0.3)
        except SlpdError as exc:
            errors[coordinator.rank] = str(exc)

    shared = [threading.Thread(target=check, args=(c, tmp_path / "out")) for c in (zero, one)]
    for t in shared:
        t.start()
    for t in shared:
        t.join(10)
    assert errors == {}
    ids = ["big", "mid", "small", "tiny"]
    assert zero.plan(ids) == ids and one.plan(list(reversed(ids))) == ids
    first = next(one.claims(4))  # rank 1 takes a slide, then goes silent
    one._closing.set()
    mine = list(zero.claims(4))
    assert sorted(mine + [first]) == [0, 1, 2, 3]
    for i in mine:
        zero.finished(i, {"slide_id": ids[i]})
    t0 = time.monotonic()
    with pytest.raises(PeersLost, match=f"rank 1 .* unfinished: {ids[first]}") as info:
        zero.gather({i: {"slide_id": ids[i]} for i in mine})
    assert time.monotonic() - t0 < 1.0 + 2.0
    assert info.value.missing == {1: [ids[first]]} and len(info.value.rows) == 3
    zero.close()


def test_ranks_writing_to_different_folders_are_refused(tmp_path):
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from napari_slpd.features.distributed import RankInfo, StoreCoordinator, Timeouts

    store = dist.HashStore()
    store.set_timeout(timedelta(seconds=5))
    timeouts = Timeouts(peer_s=1.0, join_s=2.0, poll_s=0.05)
    errors = {}

    def run(rank):
        coordinator = StoreCoordinator(RankInfo(rank, 2, rank), timeouts, store=store)
        try:
            coordinator.check_shared(tmp_path / f"node{rank}", wait_s=0.3)  # each node its own local folder
        except SlpdError as exc:
            errors[rank] = str(exc)
        finally:
            coordinator._closing.set()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert "rank 1" in errors[1] and "does not see rank 0's output folder" in errors[1]
    assert "rank 1 stopped" in errors[0]
