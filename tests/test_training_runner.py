"""The training runner: command lines, the incremental event reader, stop escalation and clean-up with a
stand-in process, and the real ``src_training`` run: detach, re-attach, stop with a checkpoint, resume to
the end, then "use this checkpoint" (region embeddings re-encoded from the cached token grids, prototypes
and the similar-slides index refreshed, names carried over)."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_slpd.training import (TrainingRun, TrainingRunError, TrainingSettings, build_command, find_runs,
                                  running_runs)
from src_training.event_reader import EventTail, RunProgress


def _settings(tmp_path, **kw):
    cohort = tmp_path / "cohort"
    cohort.mkdir(exist_ok=True)
    (cohort / "cohort.json").write_text('{"slides": {}}')
    return TrainingSettings(cohort=str(cohort), run_dir=str(tmp_path / "run"), **kw)


def test_command_lines(tmp_path):
    s = _settings(tmp_path, preset="tiny", epochs=3, num_clusters=4, batch_size=8, device="cpu", warm_epoch=0)
    cmd = build_command(s, python="PY")
    assert cmd[:3] == ["PY", "-m", "src_training"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {"--cohort": s.cohort, "--out": s.run_dir, "--events": str(Path(s.run_dir) / "events.jsonl"),
                     "--preset": "tiny", "--device": "cpu", "--resume": "none", "--epochs": "3",
                     "--num-clusters": "4", "--batch-size": "8", "--warm-epoch": "0"}
    assert build_command(s, resume=True, python="PY")[cmd.index("--resume") + 1] == "auto"
    multi = build_command(_settings(tmp_path, gpus=4), python="PY")
    assert multi[:8] == ["PY", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                         "-m", "src_training"]
    assert multi[multi.index("--device") + 1] == "cuda"
    for bad, match in ((dict(gpus=2, device="cpu"), "device 'cpu'"), (dict(preset="huge"), "preset"),
                       (dict(epochs=0), "epochs"), (dict(gpus=0), "GPUs")):
        with pytest.raises(TrainingRunError, match=match):
            build_command(_settings(tmp_path, **bad))


def test_event_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read_new() == []  # no file yet
    with open(path, "w") as fh:
        fh.write('{"event": "start", "epochs": 2}\n{"event": "st')
    assert [e["event"] for e in tail.read_new()] == ["start"]
    with open(path, "a") as fh:
        fh.write('ep", "global_step": 0, "loss": 1.5}\nnot json\n[1, 2]\n')
    events = tail.read_new()
    assert [e["event"] for e in events] == ["step"] and events[0]["loss"] == 1.5
    assert tail.skipped == 2 and tail.read_new() == []
    path.write_text('{"event": "done"}\n')  # replaced by a shorter file: read from the start again
    assert [e["event"] for e in tail.read_new()] == ["done"]


def test_progress_curves_eta_and_resume():
    p = RunProgress()
    t0 = 1000.0
    p.update({"event": "start", "epochs": 2, "steps_per_epoch": 3, "total_steps": 6, "start_step": 0,
              "start_epoch": 0, "time": t0, "device": "cpu", "n_slides": 2, "n_regions": 9, "world_size": 1})
    for s in range(4):
        p.update({"event": "step", "epoch": s // 3, "step": s % 3, "global_step": s, "total_steps": 6,
                  "steps_per_epoch": 3, "loss": 5.0 - s, "dino_loss": 4.0 - s, "intra_loss": 0.5,
                  "inter_loss": 0.5, "eta_s": 20.0 - 5 * s, "time": t0 + s})
    assert p.curves["loss"] == ([0, 1, 2, 3], [5.0, 4.0, 3.0, 2.0]) and p.global_step == 4
    assert p.eta(now=t0 + 3) == pytest.approx(5.0) and p.eta(now=t0 + 60) == 0.0
    assert "ETA 0:05" in p.summary(now=t0 + 3) and p.fraction == pytest.approx(4 / 6)
    p.update({"event": "stopped", "reason": "signal SIGINT", "checkpoint": "/r/checkpoint.pth", "time": t0 + 4})
    assert p.outcome == "stopped" and p.last_checkpoint == "/r/checkpoint.pth"
    # Resumed from the checkpoint of step 3: the logged step 3 is dropped, it will be run again.
    p.update({"event": "start", "epochs": 2, "steps_per_epoch": 3, "total_steps": 6, "start_step": 3,
              "start_epoch": 1, "resumed_from": "/r/checkpoint.pth", "time": t0 + 10})
    assert p.curves["loss"][0] == [0, 1, 2] and p.outcome is None
    assert any("resumed from /r/checkpoint.pth" in line for line in p.log)


STUB = textwrap.dedent("""
    import json, os, signal, sys, time
    run_dir = sys.argv[sys.argv.index("--out") + 1]
    events = sys.argv[sys.argv.index("--events") + 1]
    signal.signal(signal.SIGINT, lambda *a: None)   # a trainer stuck in a step: ignores the stop request
    signal.signal(signal.SIGTERM, lambda *a: None)
    open(os.path.join(run_dir, ".checkpoint.pth.abc123.partial"), "w").write("half a checkpoint")
    with open(events, "a") as fh:
        fh.write(json.dumps({"event": "start", "epochs": 1, "steps_per_epoch": 1, "total_steps": 1,
                             "start_step": 0, "time": time.time()}) + "\\n")
    while True:
        time.sleep(0.05)
""")


def test_stop_escalates_to_kill_and_removes_half_written_files(tmp_path, monkeypatch):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    import napari_slpd.training.run as tr

    monkeypatch.setattr(tr, "build_command", lambda settings, resume=False, python=None:
                        [sys.executable, str(stub), "--out", settings.run_dir, "--events",
                         str(settings.events_path)])
    run = TrainingRun.start(_settings(tmp_path))
    deadline = time.time() + 30
    while not run.progress.log and time.time() < deadline:
        run.poll()
        time.sleep(0.05)
    assert run.state == "running" and (run.run_dir / ".checkpoint.pth.abc123.partial").exists()
    assert running_runs(tmp_path / "cohort") == [] and find_runs(tmp_path / "cohort") == []  # run is elsewhere
    assert json.loads(run.run_file.read_text())["pid"] == run.pid
    with pytest.raises(TrainingRunError, match="already running"):
        TrainingRun.start(_settings(tmp_path), resume=True)
    t0 = time.time()
    state = run.stop(timeout=0.5)
    assert time.time() - t0 < 10
    assert state == "failed" and not run.is_running  # killed: no stopped event, no checkpoint
    assert not list(run.run_dir.glob(".*.partial"))
    record = json.loads(run.run_file.read_text())
    assert record["state"] == "failed" and record["returncode"] == -signal.SIGKILL


GRACEFUL = textwrap.dedent("""
    # Stands in for src_training with the same command line, events and stop protocol, in a fraction of
    # the time: a step every 0.1 s; SIGINT/SIGTERM -> checkpoint (atomic) + "stopped"; end -> export + "done".
    import json, os, signal, sys, time
    arg = lambda name, default=None: sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default
    run_dir, events, epochs = arg("--out"), arg("--events"), int(arg("--epochs", 3))
    ckpt = os.path.join(run_dir, "checkpoint.pth")
    stop = []
    signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    fh = open(events, "a")
    emit = lambda kind, **kw: (fh.write(json.dumps({"event": kind, "time": time.time(), **kw}) + "\\n"), fh.flush())
    start = int(open(ckpt).read()) if arg("--resume") == "auto" and os.path.exists(ckpt) else 0
    total = epochs * 2
    emit("start", epochs=epochs, steps_per_epoch=2, total_steps=total, start_step=start, start_epoch=start // 2,
         resumed_from=ckpt if start else None, device="cpu", world_size=1, n_slides=1, n_regions=4)
    def save(step):
        tmp = ckpt + ".tmp"
        open(tmp, "w").write(str(step))
        os.replace(tmp, ckpt)
    for step in range(start, total):
        time.sleep(0.1)
        emit("step", epoch=step // 2, step=step % 2, global_step=step, steps_per_epoch=2, total_steps=total,
             loss=5.0 - 0.1 * step, dino_loss=4.0, intra_loss=0.5, inter_loss=0.5, eta_s=0.1 * (total - step))
        if stop:
            save(step + 1)
            emit("checkpoint", path=ckpt, epoch=(step + 1) // 2, global_step=step + 1, reason="stop")
            emit("stopped", reason="signal", checkpoint=ckpt)
            sys.exit(0)
    save(total)
    export = os.path.join(run_dir, "teacher_vit4k.pth")
    open(export, "w").write("teacher")
    emit("export", path=export, global_step=total)
    emit("done", epochs=epochs, global_step=total, seconds=1.0, export=export)
""")


def _wait(predicate, run, timeout=30.0):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        run.poll()
        time.sleep(0.05)
    run.poll()
    assert predicate(), run.log_tail()


def test_detach_reattach_stop_and_resume_follow_the_trainer_protocol(tmp_path, monkeypatch):
    stub = tmp_path / "graceful.py"
    stub.write_text(GRACEFUL)
    import napari_slpd.training.run as tr

    real_build = tr.build_command
    launched = []

    def fake_build(settings, resume=False, python=None):
        cmd = real_build(settings, resume=resume, python=python)  # the real flags, another program
        launched.append(cmd)
        return [sys.executable, str(stub)] + cmd[3:]

    monkeypatch.setattr(tr, "build_command", fake_build)
    settings = _settings(tmp_path, epochs=40)
    (Path(settings.cohort) / "training").mkdir()
    settings.run_dir = str(Path(settings.cohort) / "training" / "run1")
    run = TrainingRun.start(settings)
    _wait(lambda: run.progress.global_step >= 2, run)
    assert launched[-1][launched[-1].index("--resume") + 1] == "none"
    pid = run.pid
    run.detach()  # napari closes and leaves the run going
    assert running_runs(settings.cohort) == [Path(settings.run_dir).resolve()]
    attached = TrainingRun.attach(settings.run_dir)
    assert attached.pid == pid and attached.state == "running" and attached.settings.epochs == 40
    assert attached.progress.curves["loss"][0][:2] == [0, 1]  # the whole history is read back
    with pytest.raises(TrainingRunError, match="still running"):
        attached.resume()
    assert attached.stop(timeout=20) == "stopped"
    stopped_at = int(attached.checkpoint_path.read_text())
    assert attached.progress.global_step == stopped_at and attached.can_resume
    assert json.loads(attached.run_file.read_text())["state"] == "stopped"
    with pytest.raises(TrainingRunError, match="already holds a run"):
        TrainingRun.start(settings)  # a new run never silently continues or overwrites an old one

    attached.settings.epochs = stopped_at // 2 + 2  # finish soon
    attached.resume()
    assert launched[-1][launched[-1].index("--resume") + 1] == "auto"
    assert attached.wait(timeout=30) == "done"
    steps = attached.progress.curves["loss"][0]
    assert steps == list(range(steps[-1] + 1))  # resumed exactly where the checkpoint was, no duplicate
    assert attached.exported_checkpoint() == attached.run_dir / "teacher_vit4k.pth"
    assert attached.progress.eta() == 0.0 and "finished" in attached.progress.log[-1]
    assert find_runs(settings.cohort) == [attached.run_dir] and running_runs(settings.cohort) == []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from test_annotations import build_labeled_cohort

    return build_labeled_cohort(tmp_path_factory.mktemp("ft") / "cohort", rows=3, cols=4, n_slides=3)


def test_use_checkpoint_reencodes_regions_and_refreshes_prototypes(lab, tmp_path):
    from napari_slpd.labeling import PrototypeAnnotations
    from napari_slpd.features.store import FeatureStore
    from napari_slpd.models.checkpoints import save_dino_checkpoint
    from napari_slpd.models.encoders import build_region_encoder
    from napari_slpd.models.vit import vit4k_xs
    from napari_slpd.session import FeatureSettings, PrototypeSettings, Session, SessionSettings
    from napari_slpd.session.use_checkpoint import use_checkpoint
    from test_annotations import TYPE_NAMES, type_of_prototypes

    import torch

    torch.manual_seed(7)
    # A teacher in the layout src_training exports (official DINO: "teacher" with backbone./head. keys).
    checkpoint = save_dino_checkpoint(vit4k_xs(input_embed_dim=32), tmp_path / "teacher_vit4k.pth",
                                      extra={"epoch": 3})
    settings = SessionSettings(
        features=FeatureSettings(patch_encoder="open_clip:slpd-tiny-clip", region_px=256, patch_px=64,
                                 device="cpu"),
        prototypes=PrototypeSettings(k=3),
    )
    session = Session(lab.cohort.root, settings)
    sid = lab.slide_ids[0]
    before = session.prototypes(sid)
    ann = PrototypeAnnotations.load(session.cohort, session)
    for k, t in type_of_prototypes(lab, sid, before).items():
        ann.rename(sid, k, TYPE_NAMES[t])
    with FeatureStore.open(lab.cohort.features_path(sid)) as store:
        old_emb, old_key = store.region_embeddings.copy(), store.settings_key
        tokens = store.tokens()
    seen = []
    report = use_checkpoint(session, checkpoint, progress=lambda d, t: seen.append((d, t)))
    assert [r.status for r in report.reencoded] == ["reencoded"] * 3
    assert seen[-1] == (1000, 1000) and all(d <= t for d, t in seen)
    with FeatureStore.open(lab.cohort.features_path(sid)) as store:
        new_key = store.settings_key
        assert new_key != old_key and "teacher_vit4k.pth" in store.attrs["region_encoder"]
        np.testing.assert_array_equal(store.tokens(), tokens)  # token grids untouched
        new_emb = store.region_embeddings
    enc = build_region_encoder("hipt_vit4k", checkpoint=checkpoint, device="cpu", in_dim=32)
    np.testing.assert_allclose(new_emb, enc.encode(tokens).numpy(), atol=1e-4)
    assert not np.allclose(new_emb, old_emb)
    assert not list(lab.cohort.root.joinpath("features").glob(".*partial"))
    assert report.prototypes == {s: "ok" for s in lab.slide_ids} and report.index_slides == 3
    after = session.prototypes(sid, compute=False)
    assert after.features_settings_key == new_key
    assert session.settings.features.region_checkpoint == str(checkpoint.resolve())
    assert report.names == {sid: "3 name(s) carried over"}
    labels = PrototypeAnnotations.load(session.cohort, session).labels(sid)
    truth = type_of_prototypes(lab, sid, after)
    assert {k: label.name for k, label in labels.items()} == {k: TYPE_NAMES[t] for k, t in truth.items()}
    assert "3 slides re-encoded" in report.summary()
    again = use_checkpoint(session, checkpoint)  # the same checkpoint again: nothing to re-encode
    assert [r.status for r in again.reencoded] == ["current"] * 3

    cancel = lambda: True  # noqa: E731
    with FeatureStore.open(lab.cohort.features_path(sid)) as store:
        key = store.settings_key
    other = save_dino_checkpoint(vit4k_xs(input_embed_dim=32), tmp_path / "other.pth")
    cancelled = use_checkpoint(session, other, cancel=cancel)
    assert cancelled.cancelled and {r.status for r in cancelled.reencoded} == {"cancelled"}
    assert session.settings.features.region_checkpoint == str(checkpoint.resolve())  # not switched
    with FeatureStore.open(lab.cohort.features_path(sid)) as store:
        assert store.settings_key == key  # a cancelled re-encoding leaves every file as it was


@pytest.mark.cuda
def test_real_tiny_run_on_cuda_then_use_checkpoint(tmp_path):
    """src_training on the GPU(s) (torchrun with two when there are two), then re-encoding on the GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from napari_slpd.session import FeatureSettings, PrototypeSettings, Session, SessionSettings
    from napari_slpd.session.use_checkpoint import use_checkpoint
    from test_annotations import build_labeled_cohort

    lab = build_labeled_cohort(tmp_path / "cohort", rows=3, cols=4)
    gpus = min(2, torch.cuda.device_count())
    settings = TrainingSettings(cohort=str(lab.cohort.root), run_dir=str(tmp_path / "cohort" / "training" / "gpu"),
                                preset="tiny", epochs=2, batch_size=8, device="auto", gpus=gpus, warm_epoch=0)
    run = TrainingRun.start(settings)
    assert run.wait(timeout=400) == "done", run.log_tail(30)
    assert run.progress.device.startswith("cuda") and run.progress.curves["intra_loss"][1][-1] > 0
    session = Session(lab.cohort.root, SessionSettings(
        features=FeatureSettings(patch_encoder="open_clip:slpd-tiny-clip", region_px=256, patch_px=64, device="cuda"),
        prototypes=PrototypeSettings(k=3)))
    report = use_checkpoint(session, run.exported_checkpoint())
    assert [r.status for r in report.reencoded] == ["reencoded"] * 3 and report.index_slides == 3
